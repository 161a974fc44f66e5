"""SMART regularisation (Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained
Natural Language Models through Principled Regularized Optimization", ACL; arXiv:1911.03437).

Two terms are added to a task's loss L(theta):

* the smoothness-inducing adversarial regulariser of Eq. (1)-(2),
      lambda_s * max_{||x~ - x|| <= eps} l_s(f(x~; theta), f(x; theta)),
  with the maximum found by projected gradient ascent on the embeddings (Algorithm 1):
  `smart_adversarial_loss`;
* the momentum Bregman proximal point term of Eq. (3)-(5),
      mu * l_s(f(x; theta), f(x; theta~)),  theta~ = beta * theta~ + (1 - beta) * theta,
  where theta~ is a momentum (exponential moving average) copy of the model:
  `bregman_divergence` and `ema_update`.

l_s is the symmetric divergence between two predictions (`smart_divergence`). The functions take
a callable from embeddings to logits, never the model, so they work with any encoder, e.g.

    embeddings = model.embed(input_ids, token_type_ids)              # (batch, seq, hidden)
    logits_fn = lambda e: head(model.encode(e, attention_mask)["pooler_output"])

`add_weighted_term` combines a term with the loss so that weight 0 costs nothing and leaves the
gradient bit-identical to plain training.
"""
import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

KINDS = ("multiclass", "binary", "regression")
NORMS = ("l2", "inf")


def smart_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """l_s(p, q) of Eq. (2), averaged over the batch and computed in float32 (safe under autocast).

    multiclass: (batch, classes) logits; symmetric KL between the softmaxes,
        KL(p||q) + KL(q||p) = sum_k (p_k - q_k) (log p_k - log q_k).
    binary: (batch,) single logits a; the same symmetric KL between the Bernoulli distributions
        (1 - sigmoid(a), sigmoid(a)), i.e. softmaxes over the logit pair (0, a). A softmax over the
        single logit itself is always 1, so its KL is always 0: that case is rejected, not computed.
    regression: (batch,) predictions; squared error (p - q)^2.

    Gradients flow into both arguments; detach one to make it a fixed target.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"smart_divergence: shapes differ, {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    p, q = p_logits.float(), q_logits.float()
    if kind == "regression":
        return (p - q).pow(2).mean()
    if kind == "binary":
        log_p, log_q = _bernoulli_log_probs(p), _bernoulli_log_probs(q)  # (batch, 2)
    elif kind == "multiclass":
        if p.dim() < 2 or p.shape[-1] < 2:
            raise ValueError(f"smart_divergence: 'multiclass' needs (batch, classes >= 2) logits, got "
                             f"{tuple(p.shape)}; a single logit is kind='binary'")
        log_p, log_q = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
    else:
        raise ValueError(f"smart_divergence: unknown kind {kind!r}, expected one of {KINDS}")
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


def _bernoulli_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(...) single logits -> (..., 2) log-probabilities (log(1 - sigmoid), log sigmoid), stably."""
    return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)


def smart_perturbation(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    embeddings: torch.Tensor,
    clean_logits: torch.Tensor,
    kind: str,
    attention_mask: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    noise_var: float,
    steps: int,
    norm: str,
    generator: torch.Generator,
    grad_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The inner maximisation of Eq. (2) by Algorithm 1: a detached perturbation delta
    (batch, seq, hidden) of the embeddings that approximately maximises
    l_s(logits_fn(embeddings + delta), clean_logits) subject to ||delta_t|| <= eps for every token t.

    delta starts as Gaussian noise N(0, noise_var I) (noise_var is the variance sigma^2 of Algorithm 1,
    so its standard deviation is sqrt(noise_var)), then `steps` times
        g       = d l_s(logits_fn(embeddings + delta), clean_logits.detach()) / d delta
        delta_t = Proj_eps(delta_t + step_size * g_t / ||g_t||)          for each token t
    with ||.|| the l2 or max-abs ("inf") norm of one token's hidden vector and Proj_eps the projection
    onto that token's eps ball. Per-token normalisation is the reference implementation's
    (namisan/mt-dnn, mt_dnn/perturbation.py, `_norm_grad` over the last dimension); there epsilon is only
    the normaliser's guard and the size of the step is step_size, here eps bounds each token's
    perturbation, so eps, step_size and sqrt(noise_var) are on the scale of one token's embedding
    vector (measured for MiniLM in docs/techniques.md). Near delta = 0 the divergence is quadratic,
    l_s ~ delta^T H delta, so g ~ H delta and one step is one power iteration towards the directions the
    prediction is most sensitive to: the random start must be small next to eps but large enough to
    survive the precision the logits are computed in.

    Padding positions (attention_mask == 0) are never perturbed. The embeddings and clean logits are
    constants here and the gradient is taken with respect to delta only, so no parameter's .grad is
    touched. `grad_scale` multiplies the divergence before its gradient is taken (the GradScaler's factor
    under fp16): near the clean point the divergence is about the start's size squared, and its gradient at
    fp16 activations would fall to fp16's subnormal floor (1e-7 to 1e-8) and round to zero; the direction is
    normalised per token, so the factor changes nothing else. `generator` draws the starting noise (on its
    own device); logits_fn runs in whatever
    train/eval mode and autocast context the caller set, and must compute the same function as the one
    that produced clean_logits (same dropout masks: see `replaying_rng`), so that delta = 0 gives l_s = 0.
    """
    if norm not in NORMS:
        raise ValueError(f"smart_perturbation: unknown norm {norm!r}, expected one of {NORMS}")
    x = embeddings.detach()  # (batch, seq, hidden)
    target = clean_logits.detach()
    mask = attention_mask.unsqueeze(-1).to(x.dtype)  # (batch, seq, 1), 0 at padding
    # Drawn where the generator lives, then moved: a CPU generator works with CUDA embeddings and
    # gives the same noise on every device.
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    delta = _project(noise * noise_var ** 0.5 * mask, eps, norm)
    for _ in range(steps):
        delta.requires_grad_(True)
        divergence = smart_divergence(logits_fn(x + delta), target, kind)
        (grad,) = torch.autograd.grad(divergence * grad_scale, delta)
        grad = grad.float() * mask  # (batch, seq, hidden)
        direction = grad / (_token_norm(grad, norm) + 1e-30)  # a token with zero gradient takes no step
        delta = _project(delta.detach() + step_size * direction.to(x.dtype), eps, norm)
    return delta.detach()


def _token_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, seq, 1): the l2 or max-abs norm of each token's vector."""
    return t.norm(dim=-1, keepdim=True) if norm == "l2" else t.abs().amax(dim=-1, keepdim=True)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projection of each token's delta onto {||delta_t|| <= eps}."""
    if norm == "inf":
        return delta.clamp(-eps, eps)
    return delta * (eps / (_token_norm(delta, "l2") + 1e-30)).clamp(max=1.0)


def smart_adversarial_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    embeddings: torch.Tensor,
    clean_logits: torch.Tensor,
    kind: str,
    attention_mask: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    noise_var: float,
    steps: int,
    norm: str,
    generator: torch.Generator,
    grad_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """R_s of Eq. (2) on one batch: l_s(f(x + delta; theta), f(x; theta)) at the adversarial delta
    of `smart_perturbation` (same arguments), as a float32 scalar to be weighted by lambda_s.

    The result is differentiable w.r.t. the model parameters through both sides: through
    logits_fn(embeddings + delta), including the embedding layer that produced `embeddings`, and
    through clean_logits. In Eq. (2) both predictions depend on theta; mt-dnn treats the clean logits
    as a constant during the ascent but keeps them in the graph of the final loss. Detach clean_logits
    before the call to train only the adversarial side.

    Like with like: clean_logits and every logits_fn call must share precision (the same autocast) and
    dropout masks (`replaying_rng`); otherwise the term measures rounding or dropout noise, which at
    a small eps is larger than the adversarial part.
    """
    delta = smart_perturbation(logits_fn, embeddings, clean_logits, kind, attention_mask, eps=eps,
                               step_size=step_size, noise_var=noise_var, steps=steps, norm=norm,
                               generator=generator, grad_scale=grad_scale)
    return smart_divergence(logits_fn(embeddings + delta), clean_logits, kind)


def rng_state(device: torch.device) -> tuple:
    """The global random state that dropout draws from on `device`: the CPU's, and the device's own
    on CUDA. Cheap (a copy of a few KB on the CPU, 16 bytes on CUDA, no synchronisation)."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device)


@contextlib.contextmanager
def replaying_rng(state: tuple):
    """Run the block from the global random state `state` (from `rng_state`): a forward pass inside
    draws the same dropout masks as the pass that ran after `state` was taken, provided it draws in
    the same order and shapes. On exit the random state is what it was before the block, so the block
    consumes no randomness of the training run.

    This is how SMART's ascent and perturbed passes, and the Bregman teacher, see the same network as
    the clean training forward with dropout on: shared masks, not independent draws."""
    cpu, cuda, device = state
    devices = [device] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if cuda is not None else "cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def add_weighted_term(loss: torch.Tensor, weight: float, compute_term: Callable[[], torch.Tensor]) -> torch.Tensor:
    """loss + weight * compute_term(): the regularised objectives of Eq. (1) and Eq. (3).

    compute_term is called only when weight != 0, so a disabled term costs no forward passes, draws
    no random numbers and leaves the gradient bit-identical to training on `loss` alone.
    """
    if weight == 0:
        return loss
    return loss + weight * compute_term()


def bregman_divergence(logits: torch.Tensor, ema_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """D_Breg(theta, theta~) of Eq. (4)-(5) on one batch: l_s(f(x; theta), f(x; theta~)), where
    ema_logits come from the momentum model theta~ and are a fixed target (detached)."""
    return smart_divergence(logits, ema_logits.detach(), kind)


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], momentum: float) -> None:
    """theta~ <- momentum * theta~ + (1 - momentum) * theta, in place: the momentum copy of Eq. (5)
    (momentum = beta, e.g. 0.99). Call after each optimizer step with
    ema_model = copy.deepcopy(model).requires_grad_(False) created once before training.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    for ema, param in zip(ema_params, params, strict=True):
        ema.lerp_(param, 1.0 - momentum)
