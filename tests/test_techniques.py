"""Each technique, switched on in the training loop, must change the update; switched off (or at weight 0)
it must leave the gradients bit-identical. These catch a technique that silently does nothing."""
import pytest
import torch

import multitask_classifier as mc
from tests.test_training import make_run, tiny  # noqa: F401  (pytest fixture)


def step_gradients(run: mc.Run, tasks: list[str]) -> dict[str, torch.Tensor]:
    """The gradients the optimiser sees in one training step (dropout off, same batches every call)."""
    seen = {}

    def record(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
    run.model.eval()
    run.optimizer.step = record
    mc.train_step(run, tasks)
    return seen


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_smart_changes_gradients_and_weight_zero_is_bit_identical(tiny, task):  # noqa: F811
    plain = step_gradients(make_run(tiny), [task])
    zero = step_gradients(make_run(tiny, "--smart", "--smart_weight", "0"), [task])
    assert same(plain, zero)
    smart = step_gradients(make_run(tiny, "--smart", "--smart_eps", "1e-2", "--smart_step_size", "1e-2"), [task])
    assert not same(plain, smart)
    assert plain.keys() == smart.keys()


def test_smart_on_ordinal_and_cosine_heads(tiny):  # noqa: F811
    for extra, task in ((["--sst_loss", "ordinal"], "sst"), (["--sts_head", "cosine"], "sts")):
        plain = step_gradients(make_run(tiny, *extra), [task])
        smart = step_gradients(make_run(tiny, *extra, "--smart", "--smart_eps", "1e-2"), [task])
        assert not same(plain, smart), extra


def test_bregman_term_changes_gradients_once_the_teacher_lags(tiny):  # noqa: F811
    base = ["--smart", "--smart_weight", "0", "--smart_momentum", "0.5", "--lr", "1e-2"]
    without, with_term = make_run(tiny, *base), make_run(tiny, *base, "--smart_bregman_weight", "1")
    for run in (without, with_term):  # one real step, so model and momentum copy differ
        mc.train_step(run, ["sst"])
    assert with_term.ema_model is not None and without.ema_model is None
    assert not same(step_gradients(without, ["sst"]), step_gradients(with_term, ["sst"]))


@pytest.mark.parametrize("projection", ["pcgrad", "gradvac"])
def test_surgery_changes_shared_gradients_only(tiny, projection):  # noqa: F811
    tasks = ["sst", "para", "sts"]
    no_clip = ["--clip", "none"]  # clipping by the global norm would rescale the heads' gradients too
    plain = step_gradients(make_run(tiny, *no_clip), tasks)
    extra = ["--gradvac_beta", "1.0"] if projection == "gradvac" else []
    run = make_run(tiny, "--projection", projection, *no_clip, *extra)
    if projection == "gradvac":  # targets above any cosine: every pair is moved toward them
        run.gradvac.targets.fill_(0.5)
    surgery = step_gradients(run, tasks)
    assert plain.keys() == surgery.keys()
    heads = [k for k in plain if k.startswith("heads.")]
    assert heads and all(torch.equal(plain[k], surgery[k]) for k in heads)
    encoder = [k for k in plain if k.startswith("bert.")]
    assert any(not torch.allclose(plain[k], surgery[k]) for k in encoder)
    for k in encoder:
        assert torch.isfinite(surgery[k]).all()


def test_surgery_without_conflict_equals_plain_sum(tiny, monkeypatch):  # noqa: F811
    tasks = ["sst", "para", "sts"]
    plain = step_gradients(make_run(tiny), tasks)
    run = make_run(tiny, "--projection", "pcgrad")
    monkeypatch.setattr(mc, "pcgrad", lambda grads, generator, reduction: torch.stack(grads).sum(0))
    surgery = step_gradients(run, tasks)
    for k in plain:
        torch.testing.assert_close(surgery[k], plain[k], atol=1e-6, rtol=1e-6)


def hessians(run: mc.Run) -> list[torch.Tensor]:
    return [run.optimizer.state[p]["hessian"] for g in run.optimizer.param_groups for p in g["params"]
            if p in run.optimizer.state]


@pytest.mark.parametrize("name", ["sophiah", "sophiag"])
@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_sophia_refresh_keeps_the_gradient_and_feeds_the_hessian(tiny, name, task):  # noqa: F811
    plain = step_gradients(make_run(tiny, "--clip", "none"), [task])
    run = make_run(tiny, "--optimizer", name, "--clip", "none", "--max_batch_size_" + task, "4")
    sophia = step_gradients(run, [task])  # step 0 refreshes the Hessian
    assert plain.keys() == sophia.keys()
    for k in plain:
        torch.testing.assert_close(sophia[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
    estimates = hessians(run)
    assert estimates and sum(float(h.abs().sum()) for h in estimates) > 0
    if name == "sophiag":  # Gauss-Newton estimates are squares
        assert all((h >= 0).all() for h in estimates)


def test_sophiah_builds_the_second_order_graph_on_refresh_steps_only(tiny, monkeypatch):  # noqa: F811
    calls = []
    real = mc.hutchinson_hessian
    monkeypatch.setattr(mc, "hutchinson_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = make_run(tiny, "--optimizer", "sophiah", "--hess_interval", "3")
    for _ in range(6):
        mc.train_step(run, ["sst"])
        run.step += 1
    assert len(calls) == 2  # steps 0 and 3


def test_sophiag_estimates_from_sampled_labels_not_the_true_ones(tiny, monkeypatch):  # noqa: F811
    seen = []
    real = mc.sample_labels
    monkeypatch.setattr(mc, "sample_labels", lambda *a, **k: seen.append(1) or real(*a, **k))
    run = make_run(tiny, "--optimizer", "sophiag")
    mc.train_step(run, ["sst"])
    assert seen


def test_surgery_leaves_parameters_no_task_used_without_gradient(tiny):  # noqa: F811
    run = make_run(tiny, "--projection", "pcgrad", "--pooling", "mean")  # mean pooling: the pooler is unused
    grads = step_gradients(run, ["sst", "para", "sts"])
    assert not any(name.startswith("bert.pooler.") for name in grads)
    assert any(name.startswith("bert.encoder.") for name in grads)


def test_smart_still_acts_under_bf16_autocast_at_the_default_eps(tiny):  # noqa: F811
    plain = step_gradients(make_run(tiny, amp="bf16"), ["sst"])
    smart = step_gradients(make_run(tiny, "--smart", amp="bf16"), ["sst"])
    assert not same(plain, smart)
