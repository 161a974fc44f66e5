"""PCGrad and GradVac on hand-computed 2-D and 3-D cases, their edge cases, the flat-gradient helpers"""
import math

import pytest
import torch

from pcgrad import GradVac, assign_flat_grads, flatten_grads, gradient_cosines, pcgrad

NAMES = ["sst", "para", "sts"]


def vec(*values):
    return torch.tensor(values, dtype=torch.float64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pcgrad_2d_by_hand():
    # g1 . g2 = -1 < 0: g1 <- g1 + 1/2 g2 = (0.5, 0.5); g2 <- g2 + 1/1 g1 = (0, 1).
    g1, g2 = vec(1, 0), vec(-1, 1)
    torch.testing.assert_close(pcgrad([g1, g2], gen()), vec(0.5, 1.5))
    torch.testing.assert_close(pcgrad([g1, g2], gen(), reduction="mean"), vec(0.25, 0.75))


def test_pcgrad_3d_by_hand_projects_against_originals_in_random_order():
    g1, g2, g3 = vec(1, 0, 0), vec(-1, 1, 0), vec(0, -1, 1)
    # Task 1: g2 then g3 -> (0.5, 0.5, 0) -> + 0.25 g3 = (0.5, 0.25, 0.25); g3 first (dot 0) -> (0.5, 0.5, 0).
    # Task 2: either order -> (0, 0.5, 0.5).
    # Task 3: g2 then g1 -> (-0.5, -0.5, 1) -> + 0.5 g1 = (0, -0.5, 1); g1 first (dot 0) -> (-0.5, -0.5, 1).
    outcomes = {
        tuple((t1 + vec(0, 0.5, 0.5) + t3).tolist())
        for t1 in (vec(0.5, 0.25, 0.25), vec(0.5, 0.5, 0))
        for t3 in (vec(0, -0.5, 1), vec(-0.5, -0.5, 1))
    }
    seen = set()
    for seed in range(12):
        out = pcgrad([g1, g2, g3], gen(seed))
        assert tuple(round(x, 9) for x in out.tolist()) in outcomes  # up to eps = 1e-12
        assert torch.equal(out, pcgrad([g1, g2, g3], gen(seed)))  # the generator alone fixes the order
        seen.add(tuple(round(x, 9) for x in out.tolist()))
    assert len(seen) > 1  # the order really is drawn from the generator


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    grads = [vec(1, 2, 0), vec(0, 1, 3), vec(2, 0, 1)]  # all dot products >= 0
    assert torch.equal(pcgrad(grads, gen()), torch.stack(grads).sum(0))


def test_pcgrad_none_task_is_absent_and_zero_gradients_give_no_nan():
    g1, g2 = vec(1, 0), vec(-1, 1)
    assert torch.equal(pcgrad([g1, None, g2], gen()), pcgrad([g1, g2], gen()))
    torch.testing.assert_close(pcgrad([None, g1, g2], gen(), reduction="mean"), vec(0.25, 0.75))
    zeros = pcgrad([torch.zeros(3), torch.zeros(3), None], gen())
    assert torch.equal(zeros, torch.zeros(3))
    out = pcgrad([torch.zeros(2), vec(-1, 1).float()], gen())
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="every task gradient is None"):
        pcgrad([None, None], gen())
    with pytest.raises(ValueError, match="reduction"):
        pcgrad([g1], gen(), reduction="max")


def test_gradvac_2d_reaches_the_target_cosine():
    # phi_hat_12 = 0.5, g1 = e1, g2 = e2: phi = 0 < 0.5, so
    # g1 <- e1 + 1 * (0.5 * 1 - 0) / (1 * sqrt(0.75)) e2 = (1, 1/sqrt(3)), whose cosine with e2 is 0.5.
    vac = GradVac(NAMES[:2], beta=0.01)
    vac.targets[0, 1] = 0.5
    out = vac.project([vec(1, 0), vec(0, 1)], gen())
    torch.testing.assert_close(out, vec(1, 1 + 1 / math.sqrt(3)))  # task 2's target 0 <= phi = 0: unchanged
    assert vac.targets[0, 1].item() == pytest.approx(0.99 * 0.5 + 0.01 * 0.0)
    projected = vec(1, 1 / math.sqrt(3))
    assert (projected @ vec(0, 1) / projected.norm()).item() == pytest.approx(0.5)


def test_gradvac_2d_with_zero_target_is_pcgrad_projection():
    # Targets start at 0: phi = -1/sqrt(2) < 0, and Eq. (3) with phi_hat = 0 removes the conflicting component.
    g1, g2 = vec(1, 0), vec(-1, 1)
    vac = GradVac(NAMES[:2])
    torch.testing.assert_close(vac.project([g1, g2], gen()), vec(0.5, 1.5))
    torch.testing.assert_close(vac.targets, 0.01 * torch.tensor([[0, -1], [-1, 0]], dtype=torch.float64) / math.sqrt(2))


def test_gradvac_3d_by_hand():
    # Only the ordered pair (sst, para) has a target above its cosine: sst gets + (1/sqrt(3)) e2, after
    # which its cosine with e3 is 0 >= target 0 in either order; para and sts are unchanged.
    vac = GradVac(NAMES, beta=0.5)
    vac.targets[0, 1] = 0.5
    out = vac.project([vec(1, 0, 0), vec(0, 1, 0), vec(0, 0, 1)], gen())
    torch.testing.assert_close(out, vec(1, 1 + 1 / math.sqrt(3), 1))
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0, 1] = 0.25  # (1 - 0.5) * 0.5 + 0.5 * 0
    torch.testing.assert_close(vac.targets, expected)


def test_gradvac_updates_targets_every_step_even_without_projection():
    g1, g2 = vec(1, 0), vec(1, 1)  # phi = 1/sqrt(2) >= target 0: no projection
    vac = GradVac(NAMES[:2], beta=0.1)
    for step in range(1, 4):
        assert torch.equal(vac.project([g1, g2], gen(step)), g1 + g2)
        expected = (1 - 0.9 ** step) / math.sqrt(2)  # EMA of a constant phi from 0
        assert vac.targets[0, 1].item() == pytest.approx(expected)
        assert vac.targets[1, 0].item() == pytest.approx(expected)


def test_gradvac_none_task_mean_and_zero_gradients():
    vac = GradVac(NAMES)
    vac.targets.fill_(0.3)
    out = vac.project([vec(1, 0), None, vec(1, 0)], gen())  # parallel: phi = 1 >= 0.3
    assert torch.equal(out, vec(2, 0))
    assert (vac.targets[1] == 0.3).all() and (vac.targets[:, 1] == 0.3).all()  # absent task's pairs untouched
    vac = GradVac(NAMES, reduction="mean")
    assert torch.equal(vac.project([vec(1, 0), None, vec(3, 0)], gen()), vec(2, 0))
    vac.targets.fill_(0.5)
    assert torch.isfinite(vac.project([vec(0, 0), vec(1, 1), vec(0, 0)], gen())).all()
    with pytest.raises(ValueError, match="every task gradient is None"):
        vac.project([None, None, None], gen())


def test_gradvac_state_dict_round_trip():
    torch.manual_seed(0)
    grads = [torch.randn(6) for _ in NAMES]
    first = GradVac(NAMES)
    first.project(grads, gen(1))
    resumed = GradVac(NAMES)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.targets, first.targets) and first.targets.abs().sum() > 0
    assert torch.equal(resumed.project(grads, gen(2)), first.project(grads, gen(2)))
    with pytest.raises(ValueError, match="differ"):
        GradVac(["sst", "sts"]).load_state_dict(first.state_dict())


def test_both_are_scale_equivariant():
    torch.manual_seed(0)
    grads = [torch.randn(50) for _ in NAMES]
    grads[1] = -grads[0] + 0.3 * torch.randn(50)  # ensure a conflict
    scale = 65536.0
    scaled = [scale * g for g in grads]
    torch.testing.assert_close(pcgrad(scaled, gen()) / scale, pcgrad(grads, gen()))
    vac, vac_scaled = GradVac(NAMES), GradVac(NAMES)
    vac.targets.fill_(0.2)
    vac_scaled.targets.fill_(0.2)
    torch.testing.assert_close(vac_scaled.project(scaled, gen()) / scale, vac.project(grads, gen()))
    torch.testing.assert_close(vac_scaled.targets, vac.targets)
    assert not torch.allclose(pcgrad(grads, gen()), torch.stack(grads).sum(0))  # surgery did act


def test_flatten_and_assign_round_trip():
    torch.manual_seed(0)
    layer, unused = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.ones(4))
    params = [layer.weight, layer.bias, unused]
    layer(torch.randn(5, 3)).sum().backward()
    flat = flatten_grads(params)  # (6 + 2 + 4,)
    assert flat.shape == (12,)
    assert torch.equal(flat[:6], layer.weight.grad.reshape(-1)) and torch.equal(flat[8:], torch.zeros(4))
    for p in params:
        p.grad = None
    assign_flat_grads(params, 2 * flat)
    assert torch.equal(layer.weight.grad, 2 * flat[:6].view(2, 3))
    assert torch.equal(flatten_grads(params), 2 * flat)
    with pytest.raises(ValueError, match="12"):
        assign_flat_grads(params, flat[:5])


def test_gradvac_skips_a_non_finite_step_without_poisoning_its_targets():
    vac = GradVac(NAMES[:2])
    vac.targets.fill_(0.5)
    out = vac.project([vec(math.inf, 0), vec(-1, 1)], gen())  # a GradScaler overflow
    assert not torch.isfinite(out).all()  # so the scaler still sees it and skips the step
    assert (vac.targets == 0.5).all()


def test_gradient_cosines_by_hand():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), None, torch.tensor([1.0, 1.0])]
    cosines = {pair: round(value.item(), 6) for pair, value in gradient_cosines(g).items()}
    assert cosines == {(0, 1): -1.0, (0, 3): round(2 ** -0.5, 6), (1, 3): round(-(2 ** -0.5), 6)}
    assert gradient_cosines([torch.zeros(2), torch.ones(2)])[(0, 1)].item() == 0.0
