"""Each technique, switched on in the training loop, must change the update; switched off (or at weight 0)
it must leave the gradients bit-identical. These catch a technique that silently does nothing."""
import json

import pytest
import torch

from model import shared_parameters, task_loss
import multitask_classifier as mc
from optimizer import Sophia, hutchinson_hessian, sample_labels
from state import Run
import techniques
from techniques import Diagnostics, gradient_share
from train import train_step
from tests.fixtures import make_run, tiny_args


def step_gradients(run: Run, tasks: list[str]) -> dict[str, torch.Tensor]:
    """The gradients the optimiser sees in one training step (dropout off, same batches every call)."""
    seen = {}

    def record(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
    run.model.eval()
    run.optimizer.step = record
    train_step(run, tasks)
    return seen


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_smart_changes_gradients_and_weight_zero_is_bit_identical(tiny, task):
    plain = step_gradients(make_run(tiny), [task])
    zero = step_gradients(make_run(tiny, "--smart", "--smart_weight", "0"), [task])
    assert same(plain, zero)
    smart = step_gradients(make_run(tiny, "--smart", "--smart_eps", "1e-2", "--smart_step_size", "1e-2"), [task])
    assert not same(plain, smart)
    assert plain.keys() == smart.keys()


def test_smart_on_ordinal_and_cosine_heads(tiny):
    for extra, task in ((["--sst_loss", "ordinal"], "sst"), (["--sts_head", "cosine"], "sts")):
        plain = step_gradients(make_run(tiny, *extra), [task])
        smart = step_gradients(make_run(tiny, *extra, "--smart", "--smart_eps", "1e-2"), [task])
        assert not same(plain, smart), extra


def test_bregman_term_changes_gradients_once_the_teacher_lags(tiny):
    base = ["--smart", "--smart_weight", "0", "--smart_momentum", "0.5", "--lr", "1e-2"]
    without, with_term = make_run(tiny, *base), make_run(tiny, *base, "--smart_bregman_weight", "1")
    for run in (without, with_term):  # one real step, so model and momentum copy differ
        train_step(run, ["sst"])
    assert with_term.ema_model is not None and without.ema_model is None
    assert not same(step_gradients(without, ["sst"]), step_gradients(with_term, ["sst"]))


@pytest.mark.parametrize("projection", ["pcgrad", "gradvac"])
def test_surgery_changes_shared_gradients_only(tiny, projection):
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


def test_surgery_without_conflict_equals_plain_sum(tiny, monkeypatch):
    tasks = ["sst", "para", "sts"]
    plain = step_gradients(make_run(tiny), tasks)
    run = make_run(tiny, "--projection", "pcgrad")
    monkeypatch.setattr(techniques, "pcgrad", lambda grads, generator, reduction: torch.stack(grads).sum(0))
    surgery = step_gradients(run, tasks)
    for k in plain:
        torch.testing.assert_close(surgery[k], plain[k], atol=1e-6, rtol=1e-6)


def hessians(run: Run) -> list[torch.Tensor]:
    return [run.optimizer.state[p]["hessian"] for g in run.optimizer.param_groups for p in g["params"]
            if p in run.optimizer.state]


@pytest.mark.parametrize("name", ["sophiah", "sophiag"])
@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_sophia_refresh_keeps_the_gradient_and_feeds_the_hessian(tiny, name, task):
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


def test_sophiah_builds_the_second_order_graph_on_refresh_steps_only(tiny, monkeypatch):
    calls = []
    real = hutchinson_hessian
    monkeypatch.setattr(techniques, "hutchinson_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = make_run(tiny, "--optimizer", "sophiah", "--hess_interval", "3")
    for _ in range(6):
        train_step(run, ["sst"])
        run.step += 1
    assert len(calls) == 2  # steps 0 and 3


def test_hessian_estimate_refreshes_on_its_steps_only(tiny):
    """HessianEstimate, as the loop drives it: refresh steps hand one estimate to the optimiser; other
    steps backpropagate plainly, leaving gradients without an autograd graph and h untouched."""
    run = make_run(tiny, "--optimizer", "sophiah", "--hess_interval", "3")
    received, graphs = [], []
    update = run.optimizer.update_hessian
    run.optimizer.update_hessian = lambda h_hats: received.append(run.step) or update(h_hats)
    step = run.optimizer.step

    def record_step(*args, **kwargs):
        graphs.append(any(p.grad.requires_grad for p in run.model.parameters() if p.grad is not None))
        return step(*args, **kwargs)
    run.optimizer.step = record_step
    for _ in range(6):
        train_step(run, ["sst"])
        run.step += 1
    assert received == [0, 3]
    assert graphs == [False] * 6
    encoder = run.model.bert.encoder.layer[0].attention.self.query.weight
    assert run.optimizer.state[encoder]["hessian_updates"] == 2 and run.optimizer.state[encoder]["step"] == 6


def test_a_logged_gradient_share_is_taken_through_the_scale_so_fp16_does_not_flush_it(tiny):
    """technique/*_grad_share is ||d term|| / ||d loss|| on the encoder. A term of 1e-6 of the loss has a
    gradient of 1e-6 of its size: under fp16, unscaled, its gradients at fp16 activations fall below fp16's
    smallest numbers (measured on the tiny model: 0.58 of the true share at 1e-6, 0 at 1e-7); through the
    GradScaler's factor they do not (1.00 at both)."""
    run = make_run(tiny, amp="fp16")
    run.model.train()
    batch = run.train_sets["sst"].collate(list(range(8)))
    with run.amp_context():
        clean = run.clean_forward("sst", batch)
        loss = task_loss(run.train_sets["sst"].spec, clean.logits, batch["labels"])
    share = gradient_share(1e-6 * loss, loss, shared_parameters(run.model), run.scaler.scale)
    assert float(share) == pytest.approx(1e-6, rel=0.05)


@pytest.mark.parametrize("name", ["sophiah", "sophiag"])
def test_a_missed_curvature_refresh_is_said_and_made_at_the_next_step(tiny, capsys, name):
    """A non-finite estimate (an fp16 overflow in the estimator) is refused by Sophia; the loop used to go
    on until the next interval, or for a whole run, as sign-momentum without a word. Now the refresh is due
    again at the next step, counted (saved in last.pt) and printed."""
    run = make_run(tiny, "--optimizer", name, "--hess_interval", "10")
    update, calls = run.optimizer.update_hessian, []

    def overflow_at_first(h_hats):
        calls.append(run.step)
        return update([h * float("inf") if h is not None else None for h in h_hats] if len(calls) == 1 else h_hats)
    run.optimizer.update_hessian = overflow_at_first
    for _ in range(3):
        train_step(run, ["sst"])
        run.step += 1
    assert calls == [0, 1]  # missed at step 0, made at step 1, then not due until step 10
    encoder = run.model.bert.encoder.layer[0].attention.self.query.weight
    assert run.optimizer.state[encoder]["hessian_updates"] == 1
    assert run.missed_refreshes == 1 and not run.curvature_due
    assert run.state_dict()["progress"]["missed_refreshes"] == 1
    assert "step 1: Sophia's curvature refresh not made" in capsys.readouterr().out


def test_sophiag_estimates_from_sampled_labels_not_the_true_ones(tiny):
    """The Hessian handed to Sophia is B * g^2 of the loss on labels drawn from the model's own prediction
    with the run's technique generator, recomputed here independently, and not that of the true labels."""
    run = make_run(tiny, "--optimizer", "sophiag")
    run.model.eval()  # dropout off: the recomputation below sees the same function
    received = []
    run.optimizer.update_hessian = lambda h_hats: received.append(h_hats) or True
    iterator_state = run.iterators["sst"].state_dict()
    indices = next(run.iterators["sst"])
    run.iterators["sst"].load_state_dict(iterator_state)
    generator = torch.Generator().set_state(run.technique_generator.get_state())
    batch = run.train_sets["sst"].collate(indices)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    trainable = [p for p in params if p.requires_grad]

    def gnb(labels):  # before the step moves the weights
        logits = run.model.logits("sst", batch).float()
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), trainable, allow_unused=True)
        return [None if g is None else len(indices) * g ** 2 for g in grads]

    sampled = sample_labels(run.model.logits("sst", batch).detach(), "multiclass", generator)
    assert not torch.equal(sampled, batch["labels"])
    expected, true_labels = gnb(sampled), gnb(batch["labels"])
    train_step(run, ["sst"])
    (got,) = received
    got = [h for p, h in zip(params, got) if p.requires_grad]
    pairs = [(g, e, t) for g, e, t in zip(got, expected, true_labels) if e is not None]
    assert pairs
    for g, e, _ in pairs:
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-10)
    assert any(not torch.allclose(g, t, rtol=1e-3, atol=1e-10) for g, _, t in pairs)


def test_surgery_leaves_parameters_no_task_used_without_gradient(tiny):
    run = make_run(tiny, "--projection", "pcgrad", "--pooling", "mean")  # mean pooling: the pooler is unused
    grads = step_gradients(run, ["sst", "para", "sts"])
    assert not any(name.startswith("bert.pooler.") for name in grads)
    assert any(name.startswith("bert.encoder.") for name in grads)


def tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_diagnostics_are_logged_under_their_documented_names(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir, "--smart", "--smart_bregman_weight", "1", "--projection", "gradvac",
                      "--optimizer", "sophiag", "--rdrop", "1"))
    pairs = [("sst", "para"), ("sst", "sts"), ("para", "sts")]
    expected = {"train/grad_norm", "technique/smart_term", "technique/smart_grad_share", "technique/bregman_term",
                "technique/conflict_fraction", "technique/sophia_unclipped", "technique/sophia_hessian_mean",
                "technique/rdrop_term", "technique/rdrop_grad_share",
                *(f"technique/cosine/{a}_{b}" for a, b in pairs),
                *(f"technique/gradvac_target/{a}_{b}" for a, b in pairs),
                *(f"technique/gradvac_target/{b}_{a}" for a, b in pairs)}
    assert expected <= tensorboard_tags(run_dir)
    diagnostics = json.loads((run_dir / "metrics.json").read_text())[0]["diagnostics"]
    assert expected == set(diagnostics)
    assert 0 <= diagnostics["technique/conflict_fraction"] <= 1 and diagnostics["technique/smart_term"] > 0
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if "logged-step means: " in line)
    assert " smart_term " in epoch_line and " rdrop_term " in epoch_line


def test_unlogged_steps_pay_nothing_for_diagnostics(tiny, monkeypatch):
    """No diagnostic is computed on a step that is not logged: no gradient norms, no cosines, no Sophia
    statistics, no extra backward passes (all of them are counted here)."""
    counted = {"grad": 0, "add": 0}
    real_grad, real_add = torch.autograd.grad, Diagnostics.add
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: counted.__setitem__("grad", counted["grad"] + 1)
                        or real_grad(*a, **k))
    monkeypatch.setattr(Diagnostics, "add", lambda self, *a: counted.__setitem__("add", counted["add"] + 1)
                        or real_add(self, *a))
    calls = {}
    for owner, name in ((techniques, "gradient_norm"), (techniques.GradientSurgery, "record_conflicts")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k:
                            calls.__setitem__(_name, calls.get(_name, 0) + 1) or _real(*a, **k))
    monkeypatch.setattr(Sophia, "clip_statistics", lambda self: calls.__setitem__("sophia", 1) or
                        (torch.zeros(()), torch.zeros(())))
    flags = ["--smart", "--projection", "pcgrad", "--optimizer", "sophiag", "--hess_interval", "100", "--rdrop", "1"]
    run = make_run(tiny, *flags)
    run.step = 1  # not a Hessian refresh step: its estimator would call autograd.grad
    train_step(run, ["sst", "para", "sts"])
    ascent_only = counted["grad"]
    assert counted["add"] == 0 and not calls
    assert ascent_only == 3 * run.cfg.smart_steps  # one ascent gradient per task, nothing else
    run.diagnostics.active = True
    train_step(run, ["sst", "para", "sts"])
    assert counted["add"] > 0 and set(calls) == {"gradient_norm", "record_conflicts", "sophia"}
    assert counted["grad"] - ascent_only > 3 * run.cfg.smart_steps  # the grad-share backward passes
