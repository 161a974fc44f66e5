"""AdamW against torch.optim.AdamW, Sophia's clipped update and Hessian EMA, and the Hutchinson and
Gauss-Newton-Bartlett estimators on cases whose Hessian diagonal is known by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from optimizer import (AdamW, Sophia, build_optimizer, gnb_hessian, hutchinson_hessian, layer_lr_factor, lr_multiplier,
                       optimizer_param_groups, sample_labels, update_weight_average, weight_average_rate)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_torch_with_groups_and_missing_grads(foreach):
    ours, reference = tiny_model(0), tiny_model(0)
    extra_ours, extra_ref = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))

    def groups(model, extra):
        return [{"params": list(model[0].parameters()), "lr": 3e-3, "weight_decay": 0.1},
                {"params": list(model[2].parameters()) + [extra], "lr": 1e-2, "weight_decay": 0.0}]

    opt = AdamW(groups(ours, extra_ours), lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.5, foreach=foreach)
    ref = torch.optim.AdamW(groups(reference, extra_ref), lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.5)
    generator = torch.Generator().manual_seed(1)
    for step in range(100):
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        uses_extra = step % 3 == 0  # the extra parameter's .grad is None on the other steps
        for model, extra, optimizer in ((ours, extra_ours, opt), (reference, extra_ref, ref)):
            logits = model(x) + (extra if uses_extra else 0)  # (16, 3)
            F.cross_entropy(logits, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for a, b in zip(list(ours.parameters()) + [extra_ours], list(reference.parameters()) + [extra_ref]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.state[extra_ours]["step"] == 34  # advanced only on steps with a gradient
    assert not torch.equal(extra_ours, torch.ones(3))


def test_decoupled_weight_decay_shrinks_by_lr_times_wd_with_zero_gradient():
    # With g = 0 both moments stay 0, so the only change is p * (1 - lr * wd). An L2 penalty added to
    # the gradient instead would be normalised by Adam/Sophia into a step of about lr per coordinate.
    for optimizer_class in (AdamW, Sophia):
        p = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
        optimizer = optimizer_class([p], lr=0.1, weight_decay=0.5)
        p.grad = torch.zeros(2)
        optimizer.step()
        torch.testing.assert_close(p.detach(), torch.tensor([2.0, -4.0]) * (1 - 0.1 * 0.5))


def test_sophia_clip_bounds_every_coordinate_step_by_lr():
    generator = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    optimizer = Sophia([p], lr=0.01, betas=(0.0, 0.0), rho=0.5, weight_decay=0.0)  # m = g, h = h_hat
    h_hat = torch.rand(1000, generator=generator) * 10
    optimizer.update_hessian([h_hat])
    g = torch.randn(1000, generator=generator)
    p.grad = g
    optimizer.step()
    step = p.detach().abs()
    assert (step <= 0.01 + 1e-9).all()
    clipped = g.abs() >= 0.5 * h_hat
    assert 0 < clipped.sum() < 1000  # both regimes are exercised
    torch.testing.assert_close(step[clipped], torch.full_like(step[clipped], 0.01))
    torch.testing.assert_close(step[~clipped], 0.01 * g.abs()[~clipped] / (0.5 * h_hat[~clipped]))
    assert torch.equal(torch.sign(p.detach()), -torch.sign(g))


def test_sophia_momentum_is_an_ema_of_gradients():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = Sophia([p], betas=(0.9, 0.99), weight_decay=0.0)
    for g in (torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])):
        p.grad = g
        optimizer.step()
    torch.testing.assert_close(optimizer.state[p]["exp_avg"],
                               0.9 * 0.1 * torch.tensor([1.0, -2.0]) + 0.1 * torch.tensor([3.0, 0.5]))


def test_sophia_steps_downhill_where_the_hessian_estimate_is_negative():
    # Hutchinson's u * Hu can be negative; max(rho h, eps) makes those coordinates full sign steps.
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = Sophia([p], lr=0.01, betas=(0.0, 0.0), weight_decay=0.0)
    optimizer.update_hessian([torch.tensor([-3.0, 2.0])])
    p.grad = torch.tensor([1e-3, -1e-3])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.01, 0.01 * 1e-3 / (0.04 * 2.0)]))


def test_update_hessian_is_an_ema_that_skips_none_and_non_finite_estimates():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = Sophia([{"params": [a]}, {"params": [b], "betas": (0.9, 0.5)}], betas=(0.965, 0.99))
    assert optimizer.update_hessian([torch.tensor([1.0, 2.0]), None])
    torch.testing.assert_close(optimizer.state[a]["hessian"], 0.01 * torch.tensor([1.0, 2.0]))
    assert b not in optimizer.state
    assert optimizer.update_hessian([torch.tensor([1.0, 2.0]), torch.ones(3)])
    torch.testing.assert_close(optimizer.state[a]["hessian"], 0.99 * 0.01 * torch.tensor([1.0, 2.0])
                               + 0.01 * torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(optimizer.state[b]["hessian"], torch.full((3,), 0.5))  # per-group beta2
    before = optimizer.state[a]["hessian"].clone()
    assert not optimizer.update_hessian([torch.tensor([1.0, math.inf]), torch.ones(3)])
    assert torch.equal(optimizer.state[a]["hessian"], before)
    assert optimizer.state[a]["hessian_updates"] == 2
    with pytest.raises(ValueError, match="1 estimates for 2 parameters"):
        optimizer.update_hessian([None])


def diagonal_quadratic(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return 0.5 * (d * x * x).sum()  # Hessian diag(d)


def test_hutchinson_recovers_a_known_diagonal_hessian():
    d = torch.tensor([0.5, 2.0, 7.0])
    x = torch.nn.Parameter(torch.tensor([1.0, -1.0, 3.0]))
    generator = torch.Generator().manual_seed(0)
    grads, h_hats = hutchinson_hessian(diagonal_quadratic(x, d), [x], generator)
    torch.testing.assert_close(grads[0], d * x.detach())
    torch.testing.assert_close(h_hats[0], d)  # Rademacher: u*u = 1, exact for a diagonal Hessian
    samples = torch.stack([hutchinson_hessian(diagonal_quadratic(x, d), [x], generator, "gaussian")[1][0]
                           for _ in range(2000)])  # (2000, 3)
    assert samples.std(0).min() > 0.5  # single Gaussian estimates are noisy (u*u varies) ...
    torch.testing.assert_close(samples.mean(0), d, rtol=0.12, atol=0)  # ... their mean converges to d
    with pytest.raises(ValueError, match="rademacher"):
        hutchinson_hessian(diagonal_quadratic(x, d), [x], generator, "uniform")


def test_hutchinson_mean_is_the_diagonal_of_a_non_diagonal_hessian():
    a = torch.tensor([[2.0, 1.0, -1.0], [1.0, 3.0, 0.5], [-1.0, 0.5, 1.0]])  # symmetric Hessian
    x, y = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([-1.0]))
    generator = torch.Generator().manual_seed(0)

    def loss():
        z = torch.cat([x, y])
        return 0.5 * z @ a @ z

    samples = torch.stack([torch.cat(hutchinson_hessian(loss(), [x, y], generator)[1]) for _ in range(2000)])
    assert not torch.allclose(samples[0], torch.diag(a))  # off-diagonal terms make single samples noisy
    torch.testing.assert_close(samples.mean(0), torch.diag(a), rtol=0, atol=0.1)


def test_estimators_divide_out_the_loss_scale():
    model = tiny_model(0)
    params = list(model.parameters())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    g1, h1 = hutchinson_hessian(F.cross_entropy(model(x), y), params, torch.Generator().manual_seed(3))
    g2, h2 = hutchinson_hessian(1024.0 * F.cross_entropy(model(x), y), params, torch.Generator().manual_seed(3),
                                scale=1024.0)
    for a, b in zip(g1 + h1, g2 + h2):
        torch.testing.assert_close(a, b)
    assert all(g.grad_fn is None and not g.requires_grad for g in g2 + h2)  # the second-order graph is freed
    torch.testing.assert_close(gnb_hessian(F.cross_entropy(model(x), y), params, 8),
                               gnb_hessian(1024.0 * F.cross_entropy(model(x), y), params, 8, scale=1024.0))


def test_gnb_is_batch_size_times_squared_gradient_computed_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    logits = linear(x)  # (5, 4)
    y_hat = torch.tensor([0, 3, 1, 1, 2])  # fixed "sampled" labels
    h_w, h_b = gnb_hessian(F.cross_entropy(logits, y_hat), [linear.weight, linear.bias], batch_size=5)
    residual = torch.softmax(logits.detach(), -1) - F.one_hot(y_hat, 4)  # (5, 4): d CE / d logits
    g_w, g_b = residual.T @ x / 5, residual.mean(0)  # gradient of the mean sampled loss
    torch.testing.assert_close(h_w, 5 * g_w * g_w)
    torch.testing.assert_close(h_b, 5 * g_b * g_b)
    F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).backward()  # the forward's graph was retained
    assert linear.weight.grad is not None


def test_gnb_micro_batch_estimates_weighted_by_share():
    # The module docstring's accumulation contract: a micro-batch of b out of B contributes
    # (b / B) * b * g*g, which is what the share-weighted loss gives with batch_size=B.
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 4)
    micro, full = 2, 8
    logits = linear(torch.randn(micro, 3))  # (2, 4)
    loss = F.cross_entropy(logits, torch.tensor([1, 3]))  # fixed "sampled" labels
    share = micro / full
    (weighted,) = gnb_hessian(loss, [linear.weight], batch_size=micro)
    (from_share_loss,) = gnb_hessian(share * loss, [linear.weight], batch_size=full)
    torch.testing.assert_close(from_share_loss, share * weighted)
    (wrong,) = gnb_hessian(share * loss, [linear.weight], batch_size=micro)  # squares the share
    torch.testing.assert_close(wrong, share * share * weighted)


def test_sample_labels_follow_the_model_distribution():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.7])
    classes = sample_labels(probs.log().expand(20000, 3), "multiclass", generator)  # (20000,)
    assert classes.dtype == torch.long
    torch.testing.assert_close(torch.bincount(classes, minlength=3) / 20000, probs, rtol=0, atol=0.015)
    binary = sample_labels(torch.tensor([0.0, 2.0]).expand(20000, 2), "binary", generator)  # (20000, 2)
    torch.testing.assert_close(binary.mean(0), torch.sigmoid(torch.tensor([0.0, 2.0])), rtol=0, atol=0.015)
    scores = sample_labels(torch.full((20000,), 3.0), "regression", generator)
    assert abs(scores.mean() - 3.0) < 0.02 and abs(scores.var() - 0.5) < 0.03
    with pytest.raises(ValueError, match="multiclass"):
        sample_labels(torch.zeros(2), "ordinal", generator)


def test_gnb_with_sampled_regression_labels_estimates_the_mse_gauss_newton_diagonal():
    # f = x @ w, loss mean (f - y)^2: Gauss-Newton matrix 2/B X^T X, diagonal 2/B sum_b x_b^2.
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 3, generator=generator), torch.nn.Parameter(torch.randn(3, generator=generator))
    estimates = []
    for _ in range(3000):
        f = x @ w  # (6,)
        y_hat = sample_labels(f, "regression", generator)
        estimates.append(gnb_hessian(((f - y_hat) ** 2).mean(), [w], batch_size=6)[0])
    torch.testing.assert_close(torch.stack(estimates).mean(0), 2 * (x * x).mean(0), rtol=0.1, atol=0)


def sophia_h_loop(loss_fn, params, optimizer, steps: int, interval: int, generator) -> int:
    """The training loop's contract for Sophia-H: Hutchinson on refresh steps, plain backward otherwise.
    Returns how many steps left a gradient with an autograd graph attached."""
    graphs = 0
    for step in range(steps):
        loss = loss_fn()
        if step % interval == interval - 1:
            grads, h_hats = hutchinson_hessian(loss, params, generator)
            for p, g in zip(params, grads):
                p.grad = g
        else:
            loss.backward()
        graphs += sum(p.grad.requires_grad for p in params)
        optimizer.step()
        if step % interval == interval - 1:
            optimizer.update_hessian(h_hats)
        optimizer.zero_grad(set_to_none=True)
    return graphs


def test_sophia_beats_the_best_stable_sgd_on_an_ill_conditioned_quadratic():
    # Curvatures 1 and 1000. With the Hessian, Sophia's unclipped step is (lr / rho) * m / h, a damped
    # Newton step, the same contraction in both directions. Without it (h = 0: sign momentum) the loss
    # stalls at ~0.05, oscillating by lr. Small betas so this deterministic problem needs no averaging.
    d = torch.tensor([1.0, 1000.0])
    start = torch.tensor([0.73, -1.31])
    x = torch.nn.Parameter(start.clone())
    optimizer = Sophia([x], lr=0.05, betas=(0.5, 0.9), rho=0.1, weight_decay=0.0)
    sophia_h_loop(lambda: diagonal_quadratic(x, d), [x], optimizer, steps=100, interval=5,
                  generator=torch.Generator().manual_seed(0))
    z = start.clone()
    for _ in range(100):  # gradient descent diverges for lr > 2 / 1000, so its flat direction crawls
        z = z - 1.9e-3 * d * z
    sgd_loss = diagonal_quadratic(z, d).item()
    assert sgd_loss > 0.1
    assert diagonal_quadratic(x.detach(), d).item() < 1e-8


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamw_correct_bias_by_hand(correct_bias, foreach):
    # The course skeleton's call. One step from m = v = 0 with g = (0.5, -1): m = 0.1 g, v = 0.001 g^2.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = AdamW([p], lr=1e-3, weight_decay=1e-4, correct_bias=correct_bias, foreach=foreach)
    p.grad = torch.tensor([0.5, -1.0])
    optimizer.step()
    m, v = 0.1 * torch.tensor([0.5, -1.0]), 0.001 * torch.tensor([0.25, 1.0])
    if correct_bias:  # m_hat = g, v_hat = g^2: a step of lr * sign(g)
        m, v = m / 0.1, v / 0.001
    expected = torch.tensor([1.0, -2.0]) * (1 - 1e-3 * 1e-4) - 1e-3 * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_sophia_hessian_is_bias_corrected_and_clip_statistics_count_unclipped_coordinates():
    # After one refresh the EMA holds (1 - beta2) h_hat; the step divides that by 1 - beta2 again, so
    # the unclipped coordinate moves by lr * m / (rho * h_hat), as if h had reached its mean.
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = Sophia([p], lr=0.01, betas=(0.0, 0.99), rho=0.5, weight_decay=0.0)
    assert [t.item() for t in optimizer.clip_statistics()] == [0.0, 0.0]  # no step yet
    h_hat = torch.tensor([4.0, 4.0, 1.0, -1.0])
    optimizer.update_hessian([h_hat])
    p.grad = torch.tensor([1.0, -3.0, 0.1, 1e-3])  # unclipped iff |g| < max(0.5 h_hat, eps)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.01 * 1.0 / 2.0, 0.01, -0.01 * 0.1 / 0.5, -0.01]))
    unclipped, hessian_mean = optimizer.clip_statistics()
    assert unclipped.item() == 0.5  # coordinates 0 and 2
    assert hessian_mean.item() == pytest.approx(h_hat.mean().item())


def test_param_groups_and_build_optimizer():
    named = [("bert.layer.weight", torch.nn.Parameter(torch.ones(1))),
             ("bert.layer.bias", torch.nn.Parameter(torch.ones(1))),
             ("bert.LayerNorm.weight", torch.nn.Parameter(torch.ones(1))),
             ("heads.sst.weight", torch.nn.Parameter(torch.ones(1)))]
    groups = optimizer_param_groups(named, weight_decay=0.1, lr=1e-5, head_lr=1e-3,
                                    is_head=lambda name: name.startswith("heads."))
    summary = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
    assert summary == [(1, 1e-5, 0.1), (2, 1e-5, 0.0), (1, 1e-3, 0.1)]
    flat = optimizer_param_groups(named, weight_decay=0.1, lr=1e-5, is_head=lambda name: name.startswith("heads."))
    assert [(len(g["params"]), g["lr"]) for g in flat] == [(2, 1e-5), (2, 1e-5)]
    assert isinstance(build_optimizer("adamw", groups, 1e-5, (0.9, 0.999), 1e-8, 0.1, 0.04), AdamW)
    sophia = build_optimizer("sophiah", groups, 1e-5, (0.965, 0.99), 1e-15, 0.1, 0.04)
    assert isinstance(sophia, Sophia) and sophia.param_groups[2]["lr"] == 1e-3
    with pytest.raises(ValueError, match="unknown optimizer 'sophia'"):
        build_optimizer("sophia", groups, 1e-5, (0.9, 0.999), 1e-8, 0.1, 0.04)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer("adamw", groups, 1e-5, (0.9, 1.0), 1e-8, 0.1, 0.04)


def test_param_groups_skip_decay_on_every_norm_naming_and_reject_bad_settings():
    named = [(name, torch.nn.Parameter(torch.ones(1))) for name in
             ("encoder.layer_norm.weight", "encoder.final_norm.weight", "encoder.dense.weight")]
    groups = optimizer_param_groups(named, weight_decay=0.1, lr=1e-5)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.0), (1, 0.1)]
    with pytest.raises(ValueError, match="is_head matched no parameter name"):
        optimizer_param_groups(named, weight_decay=0.1, lr=1e-5, head_lr=1e-3,
                               is_head=lambda name: name.startswith("heads."))
    with pytest.raises(ValueError, match="lr > 0"):
        optimizer_param_groups(named, weight_decay=0.1, lr=0.0)
    with pytest.raises(ValueError, match="no parameters"):
        optimizer_param_groups([], weight_decay=0.1, lr=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.998])
def test_weight_average_is_the_normalised_exponentially_weighted_mean_of_the_iterates(decay):
    generator = torch.Generator().manual_seed(0)
    iterates = [[torch.randn(5, generator=generator), torch.randn(2, 3, generator=generator)] for _ in range(7)]
    average = [torch.full((5,), 100.0), torch.full((2, 3), -100.0)]  # the starting weights must carry no weight
    for t, params in enumerate(iterates, start=1):
        update_weight_average(average, params, decay, t)
    T = len(iterates)
    weights = [decay ** (T - s) * (1 - decay) for s in range(1, T + 1)]
    for k in range(2):
        expected = sum(w * params[k] for w, params in zip(weights, iterates)) / (1 - decay ** T)
        torch.testing.assert_close(average[k], expected)
    if decay == 0.0:  # decay 0: the latest weights
        assert all(torch.equal(a, p) for a, p in zip(average, iterates[-1]))


def test_weight_average_rate_starts_at_one_and_tends_to_one_minus_decay():
    assert weight_average_rate(0.998, 1) == 1.0
    assert weight_average_rate(0.998, 10_000) == pytest.approx(0.002, rel=1e-8)
    with pytest.raises(ValueError):
        weight_average_rate(1.0, 3)


def test_layer_lr_factor_decays_from_the_top_layer_down_to_the_embeddings():
    """Six layers at decay 0.8: layer 5 (top) 1, layer i 0.8^(5 - i), embeddings 0.8^6, under the shared
    encoder's prefix or a separate one's; what is not a pretrained layer or embedding keeps the full rate."""
    for prefix in ("bert.", "encoders.sst.", ""):
        assert layer_lr_factor(f"{prefix}encoder.layer.5.output.dense.weight", 6, 0.8) == 1.0
        for i in range(6):
            assert layer_lr_factor(f"{prefix}encoder.layer.{i}.attention.self.query.bias", 6, 0.8) == \
                pytest.approx(0.8 ** (5 - i))
        assert layer_lr_factor(f"{prefix}embeddings.word_embeddings.weight", 6, 0.8) == pytest.approx(0.8 ** 6)
    for name in ("bert.pooler.dense.weight", "bert.pals.sst.attention.3.query.weight", "bert.adapters.sst.2.down.weight",
                 "heads.sst.net.1.weight"):
        assert layer_lr_factor(name, 6, 0.8) == 1.0
    assert layer_lr_factor("bert.encoder.layer.0.output.dense.weight", 6, 1.0) == 1.0
    for decay in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="decay must be in"):
            layer_lr_factor("bert.encoder.layer.0.output.dense.weight", 6, decay)
    with pytest.raises(ValueError, match="layer 6, but the encoder has 6"):
        layer_lr_factor("bert.encoder.layer.6.output.dense.weight", 6, 0.8)


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (7, 0.5), (9, 1 / 6)])
def test_linear_schedule_with_warmup(step, expected):
    assert lr_multiplier(step, total_steps=10, warmup_steps=4, kind="linear") == pytest.approx(expected)


def test_cosine_and_constant_schedules():
    assert lr_multiplier(7, total_steps=10, warmup_steps=4, kind="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(9, total_steps=10, warmup_steps=4, kind="constant") == 1.0
