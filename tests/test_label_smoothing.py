"""Label smoothing (--label_smoothing, TASK.label_smoothing): the loss by hand for each classification loss,
the bounded confidence it asks for, and in the training loop: on the tasks that ask for it, the same step
bit for bit where it is 0, never on STS."""
import math

import pytest
import torch
import torch.nn.functional as F

from config import TaskSettings
from flags import parse_args
import model
from tasks import TASKS
import techniques
import train
from tests.fixtures import make_run, same, tiny_args, train_mode_step


def test_multiclass_smoothing_is_the_mixed_target_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0], [-0.5, 0.0, 3.0, 1.0, -2.0]])
    labels = torch.tensor([0, 2])
    log_p = logits.log_softmax(-1)
    eps = 0.2
    target = (1 - eps) * F.one_hot(labels, 5) + eps / 5  # (1 - eps) on the label, eps spread over 5 classes
    by_hand = -(target * log_p).sum(-1).mean()
    torch.testing.assert_close(model.task_loss(TASKS["sst"], logits, labels, label_smoothing=eps), by_hand)
    assert torch.equal(model.task_loss(TASKS["sst"], logits, labels, label_smoothing=0.0),
                       model.task_loss(TASKS["sst"], logits, labels))
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0])  # class weights multiply each row's smoothed loss
    rows = -(target * log_p).sum(-1)
    torch.testing.assert_close(model.task_loss(TASKS["sst"], logits, labels, class_weights=weights, label_smoothing=eps),
                               (rows * torch.tensor([1.0, 3.0])).mean())


def binary_cross_entropy_by_hand(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logit)
    return -(target * p.log() + (1 - target) * (1 - p).log())


def test_binary_and_ordinal_targets_move_toward_one_half():
    logits, labels, eps = torch.tensor([1.5, -0.5, 3.0]), torch.tensor([1.0, 0.0, 0.0]), 0.1
    targets = torch.tensor([0.95, 0.05, 0.05])  # (1 - eps) y + eps / 2
    torch.testing.assert_close(model.task_loss(TASKS["para"], logits, labels, label_smoothing=eps),
                               binary_cross_entropy_by_hand(logits, targets).mean())
    thresholds = torch.tensor([[2.0, 1.0, -1.0, -3.0]])  # class 2 of 5: targets [1, 1, 0, 0]
    smoothed = torch.tensor([[0.95, 0.95, 0.05, 0.05]])
    torch.testing.assert_close(model.task_loss(TASKS["sst"], thresholds, torch.tensor([2]), "ordinal", label_smoothing=eps),
                               binary_cross_entropy_by_hand(thresholds, smoothed).sum(-1).mean())


@pytest.mark.parametrize("task, eps", [("para", 0.1), ("sst", 0.1), ("sst", 0.3)])
def test_the_loss_is_least_at_a_bounded_confidence(task, eps):
    """Without smoothing a right prediction's loss falls forever as its logit grows; with it the loss is least
    where the predicted probability of the label is 1 - eps + eps / C, and larger logits cost more."""
    spec = TASKS[task]
    classes = 2 if spec.kind == "binary" else spec.num_classes
    best = 1 - eps + eps / classes

    def loss_at(margin: float, eps: float) -> float:
        if spec.kind == "binary":
            return model.task_loss(spec, torch.tensor([margin]), torch.tensor([1.0]), label_smoothing=eps).item()
        return model.task_loss(spec, torch.tensor([[margin, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([0]),
                            label_smoothing=eps).item()

    # the margin at which the label's probability is `best` (the other classes level)
    margin = math.log(best / (1 - best) * (classes - 1))
    assert loss_at(margin, eps) < loss_at(margin - 0.5, eps) and loss_at(margin, eps) < loss_at(margin + 0.5, eps)
    assert loss_at(margin + 5, eps) > loss_at(margin + 0.5, eps)
    assert loss_at(margin + 5, 0.0) < loss_at(margin + 0.5, 0.0)


def test_regression_has_no_label_to_smooth():
    with pytest.raises(ValueError, match="not to sts"):
        model.task_loss(TASKS["sts"], torch.zeros(2), torch.ones(2), label_smoothing=0.1)


@pytest.mark.parametrize("task", ["sst", "para"])
def test_smoothing_changes_the_step_and_zero_is_bit_identical(tiny, task):
    plain, plain_rng = train_mode_step(make_run(tiny), task)
    zero, zero_rng = train_mode_step(make_run(tiny, "--label_smoothing", "0",
                                              "--task_settings", f"{task}.label_smoothing=0"), task)
    assert same(plain, zero) and torch.equal(plain_rng, zero_rng)
    smoothed, smoothed_rng = train_mode_step(make_run(tiny, "--label_smoothing", "0.1"), task)
    assert plain.keys() == smoothed.keys() and not same(plain, smoothed)
    assert torch.equal(plain_rng, smoothed_rng)  # the targets change, not the random stream


def test_the_run_flag_reaches_the_classification_tasks_only_and_a_tasks_own_overrides_it(tiny):
    run = make_run(tiny, "--label_smoothing", "0.1", "--task_settings", "para.label_smoothing=0.2")
    assert run.label_smoothing == {"sst": 0.1, "para": 0.2, "sts": 0.0}
    assert same(train_mode_step(make_run(tiny), "sts")[0], train_mode_step(run, "sts")[0])
    own = make_run(tiny, "--task_settings", "sst.label_smoothing=0.1")
    assert own.label_smoothing == {"sst": 0.1, "para": 0.0, "sts": 0.0}
    assert same(train_mode_step(make_run(tiny), "para")[0], train_mode_step(own, "para")[0])
    assert not same(train_mode_step(make_run(tiny), "sst")[0], train_mode_step(own, "sst")[0])
    assert own.cfg.settings_for("sts") == TaskSettings(lr=1e-4, head_lr=1e-3, weight_decay=0.01, head_dropout=0.1,
                                                       rdrop=0.0, label_smoothing=0.0)


def test_rdrops_second_pass_smooths_its_targets_too(tiny, monkeypatch):
    seen = []
    real = model.task_loss

    def task_loss(spec, *args):
        seen.append((spec.name, args[-1]))
        return real(spec, *args)

    monkeypatch.setattr(train, "task_loss", task_loss)  # the step's forward
    monkeypatch.setattr(techniques, "task_loss", task_loss)  # R-Drop's second pass
    train_mode_step(make_run(tiny, "--rdrop", "1", "--label_smoothing", "0.1"), "sst")
    assert seen == [("sst", 0.1), ("sst", 0.1)]  # the first pass and R-Drop's second


@pytest.mark.parametrize("flags, message", [
    (["--label_smoothing", "1"], "--label_smoothing must be in [0, 1)"),
    (["--label_smoothing", "-0.1"], "--label_smoothing must be in [0, 1)"),
    (["--tasks", "sts", "--label_smoothing", "0.1"], "--tasks sts has none"),
    (["--task_settings", "sts.label_smoothing=0.1"], "sts is a regression task"),
    (["--task_settings", "sst.label_smoothing=1"], "out of range")])
def test_smoothing_settings_that_cannot_work_are_refused(tiny, flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(tiny_args(tiny, "x", *flags))
    assert message in capsys.readouterr().err
