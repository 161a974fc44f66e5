"""SMART: divergences by hand, the adversarial ascent on a tiny fixed model, weight 0 bit-identical to
plain training, padding and projection, autocast, and the momentum (Bregman) teacher."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smart import (add_weighted_term, bregman_divergence, ema_update, smart_adversarial_loss,
                   smart_divergence, smart_perturbation)

VOCAB, HIDDEN = 11, 8
ASCENT = dict(eps=0.5, step_size=0.1, noise_var=1e-4, steps=3, norm="l2")


def tiny_model(num_outputs: int) -> nn.ModuleDict:
    generator = torch.Generator().manual_seed(0)
    model = nn.ModuleDict(dict(embed=nn.Embedding(VOCAB, HIDDEN), mix=nn.Linear(HIDDEN, HIDDEN),
                               head=nn.Linear(HIDDEN, num_outputs)))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def make_logits_fn(model, attention_mask, kind):
    """Embeddings (batch, seq, hidden) -> logits: masked mean of tanh(linear), then the head."""
    def logits_fn(embeddings):
        hidden = torch.tanh(model["mix"](embeddings))  # (batch, seq, hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = model["head"]((hidden * mask).sum(1) / mask.sum(1))  # (batch, outputs)
        return logits if kind == "multiclass" else logits.squeeze(-1)
    return logits_fn


# (batch=3, seq=5); rows 1 and 2 end in padding.
INPUT_IDS = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0], [2, 9, 10, 3, 0]])
ATTENTION_MASK = (INPUT_IDS != 0).long()


def adversarial_loss(model, kind, generator_seed=0, **overrides):
    embeddings = model["embed"](INPUT_IDS)  # (3, 5, HIDDEN)
    logits_fn = make_logits_fn(model, ATTENTION_MASK, kind)
    return smart_adversarial_loss(logits_fn, embeddings, logits_fn(embeddings), kind, ATTENTION_MASK,
                                  generator=torch.Generator().manual_seed(generator_seed),
                                  **{**ASCENT, **overrides})


def test_symmetric_kl_by_hand_on_2x3():
    # Row 0: p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): sum (p - q) log(p / q) = 1/4 log 2 + 1/4 log 2.
    # Row 1: p = (.8, .1, .1), q = (.1, .8, .1): .7 log 8 + .7 log 8 = 4.2 log 2. Mean: 2.35 log 2.
    p = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]).log() + 3.0  # a shift leaves softmax unchanged
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]).log()
    assert smart_divergence(p, q, "multiclass").item() == pytest.approx(2.35 * math.log(2), rel=1e-6)
    assert smart_divergence(q, p, "multiclass").item() == pytest.approx(2.35 * math.log(2), rel=1e-6)
    assert smart_divergence(p, p, "multiclass").item() == 0.0


def test_binary_divergence_is_the_bernoulli_symmetric_kl():
    # sigmoid(0) = 1/2, sigmoid(log 3) = 3/4: (1/2 - 3/4) log(2/3) + (1/2 - 1/4) log 2 = 1/4 log 3.
    p, q = torch.tensor([0.0, 1.0]), torch.tensor([math.log(3), 1.0])
    assert smart_divergence(p, q, "binary").item() == pytest.approx(0.25 * math.log(3) / 2, rel=1e-6)
    # Saturated logits stay finite: (sigmoid(100) - sigmoid(-100)) * 200 = 200.
    assert smart_divergence(torch.tensor([100.0]), torch.tensor([-100.0]), "binary").item() == pytest.approx(200.0)
    # The classic bug, a softmax over one logit, is always 0: refused instead of computed.
    with pytest.raises(ValueError, match="kind='binary'"):
        smart_divergence(p.unsqueeze(-1), q.unsqueeze(-1), "multiclass")


def test_regression_divergence_and_input_checks():
    assert smart_divergence(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.0]), "regression").item() == 2.125
    with pytest.raises(ValueError, match="shapes differ"):  # (3,) vs (3, 1) would broadcast to (3, 3)
        smart_divergence(torch.zeros(3), torch.zeros(3, 1), "regression")
    with pytest.raises(ValueError, match="unknown kind"):
        smart_divergence(torch.zeros(3), torch.zeros(3), "ranking")


@pytest.mark.parametrize("kind, outputs", [("multiclass", 5), ("binary", 1), ("regression", 1)])
def test_ascent_raises_the_divergence_every_step_and_beats_random_directions(kind, outputs):
    model = tiny_model(outputs)
    embeddings = model["embed"](INPUT_IDS)
    logits_fn = make_logits_fn(model, ATTENTION_MASK, kind)
    clean_logits = logits_fn(embeddings).detach()

    def divergence_at(delta):
        return smart_divergence(logits_fn(embeddings + delta), clean_logits, kind).item()

    def ascend(steps):  # the same generator seed, so the same starting noise
        # Starting noise (norm ~0.6) larger than a step: a descent step would lower the divergence.
        return smart_perturbation(logits_fn, embeddings, clean_logits, kind, ATTENTION_MASK, eps=1.0,
                                  step_size=0.05, noise_var=1e-2, steps=steps, norm="l2",
                                  generator=torch.Generator().manual_seed(0))

    divergences = [divergence_at(ascend(steps)) for steps in range(4)]
    assert divergences[0] > 0
    assert all(after > before for before, after in zip(divergences, divergences[1:]))
    assert divergences[-1] > 2 * divergences[0]

    # From tiny noise the ascent finds a far worse direction than chance (the largest of 20 random
    # directions of the same per-example size).
    adversarial = smart_perturbation(logits_fn, embeddings, clean_logits, kind, ATTENTION_MASK, **ASCENT,
                                     generator=torch.Generator().manual_seed(0))
    sizes = adversarial.flatten(1).norm(dim=1).view(-1, 1, 1)  # (batch, 1, 1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        direction = torch.randn(adversarial.shape, generator=generator) * ATTENTION_MASK.unsqueeze(-1)
        random_delta = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1) * sizes
        assert divergence_at(random_delta) < divergence_at(adversarial) / 2


def test_adversarial_loss_reaches_the_worst_case_of_a_linear_model_by_hand():
    # Regression on the masked token mean, f(e) = mean_t(e_t) . w: over per-token inf balls of radius
    # eps the largest (f(x + delta) - f(x))^2 is (eps ||w||_1)^2, at delta_t = +-eps sign(w) for every
    # token. From a tiny start one ascent step of 10 eps saturates every coordinate of that corner.
    w = torch.tensor([1.0, -2.0, 1.5, -1.0, 0.5, 2.0, -0.75, 1.25])
    mask = ATTENTION_MASK.unsqueeze(-1).float()  # (3, 5, 1)

    def logits_fn(e):
        return ((e * mask).sum(1) / mask.sum(1)) @ w  # (3,)

    embeddings = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    eps = 0.1
    loss = smart_adversarial_loss(logits_fn, embeddings, logits_fn(embeddings), "regression", ATTENTION_MASK,
                                  eps=eps, step_size=10 * eps, noise_var=(0.01 * eps) ** 2, steps=1, norm="inf",
                                  generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx((eps * w.abs().sum().item()) ** 2, rel=1e-5)


def test_ascent_touches_no_parameter_gradient_and_final_loss_reaches_both_sides():
    model = tiny_model(5)
    embeddings = model["embed"](INPUT_IDS)
    logits_fn = make_logits_fn(model, ATTENTION_MASK, "multiclass")
    clean_logits = logits_fn(embeddings)
    smart_perturbation(logits_fn, embeddings, clean_logits, "multiclass", ATTENTION_MASK,
                       generator=torch.Generator().manual_seed(0), **ASCENT)
    assert all(param.grad is None for param in model.parameters())

    embeddings.retain_grad()
    clean_logits.retain_grad()
    smart_adversarial_loss(logits_fn, embeddings, clean_logits, "multiclass", ATTENTION_MASK,
                           generator=torch.Generator().manual_seed(0), **ASCENT).backward()
    assert clean_logits.grad.abs().sum() > 0  # the clean side stays in the graph of the final loss
    assert embeddings.grad.abs().sum() > 0  # and the adversarial side reaches the embedding layer
    assert model["embed"].weight.grad.abs().sum() > 0


def task_gradients(model, weight, compute_term_factory):
    model.zero_grad(set_to_none=True)
    embeddings = model["embed"](INPUT_IDS)
    logits_fn = make_logits_fn(model, ATTENTION_MASK, "multiclass")
    logits = logits_fn(embeddings)
    loss = F.cross_entropy(logits, torch.tensor([0, 3, 4]))
    add_weighted_term(loss, weight, compute_term_factory(logits_fn, embeddings, logits)).backward()
    return [param.grad.clone() for param in model.parameters()]


def test_weight_zero_is_bit_identical_to_plain_training_and_weight_one_changes_gradients():
    model = tiny_model(5)

    def never_called(logits_fn, embeddings, logits):
        def term():
            raise AssertionError("a term with weight 0 must not be computed")
        return term

    def smart_term(logits_fn, embeddings, logits):
        return lambda: smart_adversarial_loss(logits_fn, embeddings, logits, "multiclass", ATTENTION_MASK,
                                              generator=torch.Generator().manual_seed(0), **ASCENT)

    model.zero_grad(set_to_none=True)  # plain training: the loss alone, no add_weighted_term at all
    logits = make_logits_fn(model, ATTENTION_MASK, "multiclass")(model["embed"](INPUT_IDS))
    F.cross_entropy(logits, torch.tensor([0, 3, 4])).backward()
    plain = [param.grad.clone() for param in model.parameters()]
    off = task_gradients(model, 0.0, never_called)
    on = task_gradients(model, 1.0, smart_term)
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    assert all(not torch.allclose(a, b) for a, b in zip(plain, on))


@pytest.mark.parametrize("norm", ["l2", "inf"])
def test_projection_keeps_each_token_inside_the_eps_ball(norm):
    model = tiny_model(5)
    embeddings = model["embed"](INPUT_IDS)
    logits_fn = make_logits_fn(model, ATTENTION_MASK, "multiclass")
    eps = 0.05  # step_size 1.0 overshoots it, so the projection must act
    delta = smart_perturbation(logits_fn, embeddings, logits_fn(embeddings), "multiclass", ATTENTION_MASK,
                               eps=eps, step_size=1.0, noise_var=1e-4, steps=3, norm=norm,
                               generator=torch.Generator().manual_seed(0))
    tokens = delta[ATTENTION_MASK.bool()]  # (real tokens, hidden)
    sizes = tokens.norm(dim=-1) if norm == "l2" else tokens.abs().amax(dim=-1)
    assert torch.all(sizes <= eps * (1 + 1e-5))
    torch.testing.assert_close(sizes, torch.full_like(sizes, eps))  # on the boundary, not shrunk to 0


def test_padding_positions_are_never_perturbed():
    model = tiny_model(1)
    embeddings = model["embed"](INPUT_IDS)
    # A model that lets padding leak into its logits (an all-ones pooling mask), so that the ascent
    # would move padding positions if the attention mask were not applied to the perturbation.
    logits_fn = make_logits_fn(model, torch.ones_like(ATTENTION_MASK), "binary")
    for steps in (0, 2):
        delta = smart_perturbation(logits_fn, embeddings, logits_fn(embeddings), "binary", ATTENTION_MASK,
                                   **{**ASCENT, "steps": steps}, generator=torch.Generator().manual_seed(0))
        padding = ATTENTION_MASK == 0  # (batch, seq)
        assert torch.all(delta[padding] == 0)
        assert torch.all(delta[~padding].abs().sum(-1) > 0)


def test_works_under_bfloat16_autocast():
    model = tiny_model(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model["embed"](INPUT_IDS)
        logits_fn = make_logits_fn(model, ATTENTION_MASK, "multiclass")
        logits = logits_fn(embeddings)
        loss = smart_adversarial_loss(logits_fn, embeddings, logits, "multiclass", ATTENTION_MASK,
                                      generator=torch.Generator().manual_seed(0), **ASCENT)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ema_update_by_hand():
    ema, param = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    ema_update([ema], [param], momentum=0.75)  # 0.75 * ema + 0.25 * param
    assert ema.tolist() == [1.5, 3.0]
    assert param.tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="momentum"):
        ema_update([ema], [param], momentum=1.5)


def test_bregman_divergence_by_hand_with_the_momentum_model_as_a_fixed_target():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): sum (p - q) log(p / q) = 1/2 log 2.
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log().requires_grad_(True)
    ema_logits = torch.tensor([[0.25, 0.5, 0.25]]).log().requires_grad_(True)
    divergence = bregman_divergence(logits, ema_logits, "multiclass")
    assert divergence.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    divergence.backward()
    assert logits.grad.abs().sum() > 0
    assert ema_logits.grad is None
