"""R-Drop (rdrop.py): the loss by hand, and in the training loop: a second pass with masks of its own, on the
tasks that ask for it, nothing at all (not even a random draw) where its alpha is 0."""
import math

import pytest
import torch

from flags import parse_args
from rdrop import rdrop_loss
from tests.fixtures import make_run, same, tiny_args, train_mode_step


def test_rdrop_loss_is_half_of_eq3_by_hand_on_2x3():
    """Eq. (3): NLL1 + NLL2 + alpha/2 (KL(P1||P2) + KL(P2||P1)); rdrop_loss is half of it."""
    a = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.5, -0.5, 1.0]])
    labels = torch.tensor([0, 2])
    nll_a, nll_b = (torch.nn.functional.cross_entropy(x, labels) for x in (a, b))
    kl_ab = kl_ba = 0.0
    for row in range(2):
        pa = [math.exp(v) / sum(math.exp(w) for w in a[row].tolist()) for v in a[row].tolist()]
        pb = [math.exp(v) / sum(math.exp(w) for w in b[row].tolist()) for v in b[row].tolist()]
        kl_ab += sum(p * math.log(p / q) for p, q in zip(pa, pb)) / 2  # batch mean
        kl_ba += sum(q * math.log(q / p) for p, q in zip(pa, pb)) / 2
    alpha = 0.7
    eq3 = nll_a + nll_b + alpha / 2 * (kl_ab + kl_ba)
    loss, divergence = rdrop_loss(nll_a, nll_b, a, b, "multiclass", alpha)
    torch.testing.assert_close(loss, eq3 / 2)
    torch.testing.assert_close(divergence, torch.tensor(kl_ab + kl_ba))


def test_binary_and_regression_divergences():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0])
    _, binary = rdrop_loss(torch.zeros(()), torch.zeros(()), a, b, "binary", 1.0)
    p, q = torch.sigmoid(torch.tensor(0.0)), torch.sigmoid(torch.tensor(1.0))
    by_hand = ((p - q) * (torch.log(p) - torch.log(q)) + (q - p) * (torch.log(1 - p) - torch.log(1 - q))) / 2
    torch.testing.assert_close(binary, by_hand)  # the second row agrees: 0
    loss, regression = rdrop_loss(torch.tensor(2.0), torch.tensor(4.0), a, b, "regression", 2.0)
    torch.testing.assert_close(regression, torch.tensor(0.5))  # mean of (0 - 1)^2 and 0
    torch.testing.assert_close(loss, torch.tensor(3.0 + 2.0 / 4 * 0.5))


def test_the_term_pulls_each_pass_toward_the_other():
    a = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    b = torch.tensor([[-1.0, 0.5, 1.0]], requires_grad=True)
    loss, divergence = rdrop_loss(torch.zeros(()), torch.zeros(()), a, b, "multiclass", 1.0)
    loss.backward()
    with torch.no_grad():
        closer = rdrop_loss(torch.zeros(()), torch.zeros(()), a - a.grad, b - b.grad, "multiclass", 1.0)[1]
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert closer < 0.8 * divergence


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_rdrop_changes_the_step_and_alpha_zero_is_bit_identical(tiny, task):
    plain, plain_rng = train_mode_step(make_run(tiny), task)
    zero, zero_rng = train_mode_step(make_run(tiny, "--rdrop", "0", "--task_settings", f"{task}.rdrop=0"), task)
    assert same(plain, zero) and torch.equal(plain_rng, zero_rng)  # no second pass, no draw
    rdrop, rdrop_rng = train_mode_step(make_run(tiny, "--rdrop", "1"), task)
    assert plain.keys() == rdrop.keys() and not same(plain, rdrop)
    assert not torch.equal(plain_rng, rdrop_rng)  # the second pass drew masks of its own


def test_the_second_pass_draws_new_masks_so_the_term_is_positive(tiny):
    run = make_run(tiny, "--rdrop", "1", "--sts_head", "cosine")
    for task in ("sst", "para", "sts"):
        run.diagnostics.active = True
        train_mode_step(run, task)
        values = run.diagnostics.end_step()
        assert values["technique/rdrop_term"] > 1e-6 and values["technique/rdrop_grad_share"] > 0, task


def test_a_tasks_own_alpha_acts_on_its_steps_only(tiny):
    plain, own = make_run(tiny), make_run(tiny, "--task_settings", "sst.rdrop=1")
    assert same(train_mode_step(plain, "para")[0], train_mode_step(own, "para")[0])
    assert not same(train_mode_step(make_run(tiny), "sst")[0], train_mode_step(own, "sst")[0])
    run = make_run(tiny, "--rdrop", "1", "--task_settings", "para.rdrop=0")
    assert run.cfg.settings_for("sst").rdrop == 1 and run.cfg.settings_for("para").rdrop == 0


@pytest.mark.parametrize("flags, message", [
    (["--rdrop", "-1"], "--rdrop must be >= 0"),
    (["--task_settings", "sst.rdrop=-0.5"], "out of range"),
    (["--rdrop", "1", "--encoder_dropout", "0", "--hidden_dropout_prob", "0"], "R-Drop compares two dropout masks"),
    (["--task_settings", "sts.rdrop=1,sts.head_dropout=0", "--encoder_dropout", "0"], "but sts would train")])
def test_rdrop_settings_that_cannot_work_are_refused(tiny, flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(tiny_args(tiny, "x", *flags))
    assert message in capsys.readouterr().err
