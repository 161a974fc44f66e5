"""Hand-written optimisers and the diagonal-Hessian estimators Sophia needs.

- `AdamW`: Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2).
- `Sophia`: second-order clipped stochastic optimisation (Liu et al. 2023, Algorithm 3); one class for
  Sophia-H and Sophia-G, which differ only in the estimator the training loop feeds `update_hessian`:
  `hutchinson_hessian` (Algorithm 1) or `sample_labels` + `gnb_hessian` (Algorithm 2).
- `optimizer_param_groups`, `build_optimizer`, `layer_lr_factor`: what the training script calls.

How a training loop drives Sophia (k = hess_interval; the reference code refreshes when
step % k == k - 1, multitask_classifier.py when step % k == 0; until the first refresh h = 0 and every
step is a sign-momentum step of size lr):

    sophiah, refresh step:  grads, h = hutchinson_hessian(scaler.scale(loss), params, gen, scale=S)
                            p.grad += g * S for each g (p.grad holds scaled gradients until unscale_)
                            after scaler.step: optimizer.update_hessian(h)
    sophiag, refresh step:  y_hat = sample_labels(logits.detach(), kind, gen)
                            h = gnb_hessian(scaler.scale(nll(logits, y_hat)), params, len(y_hat), scale=S)
                            scaler.scale(loss).backward() on the same forward; after scaler.step: update_hessian(h)
    other steps:            ordinary backward; no second-order graph is built.

With gradient accumulation the loop calls the estimator once per micro-batch and sums the returned
lists, each weighted by its share w = len(micro) / len(batch); each micro-batch estimate is unbiased for
the same diagonal, so their weighted mean is too. Hutchinson is linear in the loss, so passing the
share-weighted loss w * L gives w * h_hat directly. GNB is quadratic: on w * L pass batch_size=len(batch)
(not len(micro)), since len(batch) * (w g)^2 = w * len(micro) * g^2. Over tasks the
estimates are summed, as the training loss (a sum of task means) is.
"""
import math
import re

import torch
from torch import Tensor
from torch.optim import Optimizer

OPTIMIZERS = ("adamw", "sophiag", "sophiah")
HUTCHINSON_DISTRIBUTIONS = ("rademacher", "gaussian")
LABEL_KINDS = ("multiclass", "binary", "regression")
NO_DECAY_SUBSTRINGS = ("LayerNorm", "layer_norm", "norm.")


def _check_betas(betas: tuple[float, float]):
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2 with the decay decoupled from the gradient):

        p <- p * (1 - lr * wd)
        m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g*g
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

    correct_bias=False drops the two bias corrections (p <- p - lr * m / (sqrt(v) + eps)): the keyword of
    the course skeleton's optimizer check and of the old HuggingFace AdamW, so their calls run unchanged.

    t counts the steps on which this parameter had a gradient; parameters whose .grad is None are
    left untouched (no decay, no step count), as torch.optim.AdamW does.

    foreach: apply each line of the update to all parameters at once (torch._foreach_* ops). None
    (default): on CUDA, where a per-parameter loop pays one kernel launch per parameter and line (about
    800 per step for MiniLM; not measured here, no GPU). On the CPU the two take the same time (MiniLM's
    encoder, 2 threads: 56 vs 59 ms per step; the update is memory-bound), so the plainer loop stays."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, correct_bias: bool = True, foreach: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        _check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            foreach = self.foreach if self.foreach is not None else any(p.is_cuda for p in params)
            # Without bias correction, each step counts as if t were infinite: both corrections are 1.
            corrected = group.get("correct_bias", True)
            (self._foreach_update if foreach else self._update)(params, lr, beta1, beta2, eps, wd, corrected)
        return loss

    def _update(self, params: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, wd: float,
                corrected: bool):
        for p in params:
            state = self.state[p]
            t, m, v, g = state["step"] if corrected else math.inf, state["exp_avg"], state["exp_avg_sq"], p.grad
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))

    def _foreach_update(self, params: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, wd: float,
                        corrected: bool):
        """`_update` with each line one torch._foreach_* call over all parameters."""
        if not params:
            return
        states = [self.state[p] for p in params]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] if corrected else math.inf for s in states]
        grads = [p.grad for p in params]
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** t) for t in steps])


class Sophia(Optimizer):
    """Sophia (Liu et al. 2023, Algorithm 3), for both Sophia-H and Sophia-G.

    Every step, for each parameter with a gradient g:

        p <- p * (1 - lr * wd)                                   (decoupled weight decay)
        m <- b1 m + (1 - b1) g
        p <- p - lr * sign(m) * min(|m| / max(rho * h, eps), 1)   (elementwise clip, Algorithm 3)

    so no coordinate moves by more than lr (before decay). The paper's max(rho h, eps), not the reference
    code's rho h + eps: Hutchinson estimates can make h negative, and max turns such coordinates into
    full sign steps downhill where rho h + eps < 0 would step uphill. The Hessian EMA
    h <- b2 h + (1 - b2) h_hat is applied only by `update_hessian`, which the training loop calls every
    k steps with a fresh estimate; steps before the first refresh are sign-momentum steps. After n
    refreshes the step uses h / (1 - b2^n): the EMA starts at 0, and uncorrected it is 1% of its mean
    after the first refresh and 76% after 140 (a whole 1400-step run at k = 10), which clipped nearly
    every coordinate. The paper and the reference code leave it uncorrected; their 100k-step runs do not
    notice. `clip_statistics` gives the fraction of coordinates left unclipped (rho's target: 10-50%).

    Where the batch size B lives: in the estimate. `gnb_hessian` returns the paper's
    h_hat = B * g_hat*g_hat (Algorithm 2), so this class is estimator-agnostic. The reference code
    instead keeps EMA(g_hat*g_hat) and multiplies by bs inside the step (rho * bs * h); the two are the
    same update. This class's defaults are the paper's GPT-2 values (a batch of ~500k tokens) and the
    reference code's eps = 1e-15; the training script chooses rho per estimator for its batch of 32
    examples (config.SOPHIA_RHO).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, eps: float = 1e-15):
        if lr < 0 or eps < 0 or weight_decay < 0 or rho <= 0:
            raise ValueError(f"need lr, eps, weight_decay >= 0 and rho > 0, got {lr}, {eps}, {weight_decay}, {rho}")
        _check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["hessian_updates"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @staticmethod
    def _hessian(state: dict, group: dict) -> Tensor:
        """The Hessian EMA divided by 1 - beta2^n after n refreshes (0 before the first)."""
        n = state["hessian_updates"]
        return state["hessian"] if n == 0 else state["hessian"] / (1 - group["betas"][1] ** n)

    @torch.no_grad()
    def update_hessian(self, h_hats: list[Tensor | None]) -> bool:
        """h <- b2 h + (1 - b2) h_hat (Algorithm 3). `h_hats` follows the order of the parameters
        of all groups; None entries are skipped. If any estimate is not finite (an fp16 overflow in
        the estimator) nothing is updated and False is returned, as GradScaler skips such steps."""
        params = [p for group in self.param_groups for p in group["params"]]
        if len(h_hats) != len(params):
            raise ValueError(f"update_hessian got {len(h_hats)} estimates for {len(params)} parameters")
        if not all(torch.isfinite(h).all() for h in h_hats if h is not None):
            return False
        estimates = iter(h_hats)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                h_hat = next(estimates)
                if h_hat is None:
                    continue
                state = self._state(p)
                state["hessian"].mul_(beta2).add_(h_hat.to(p.dtype), alpha=1 - beta2)
                state["hessian_updates"] += 1
        return True

    @torch.no_grad()
    def clip_statistics(self) -> tuple[Tensor, Tensor]:
        """(fraction of coordinates whose last update was not clipped, mean of the Hessian EMA h), over
        every parameter that has taken a step. Unclipped means |m| < max(rho * h, eps): the official
        training script logs the same fraction as `train/win_rate` (Liuhong99/Sophia, train_sophiag.py),
        and its README advises a rho that keeps it between 10% and 50%. With no Hessian refresh yet
        (h = 0) it is 0: every step is a sign step. Returns 0-dim tensors (no synchronisation)."""
        unclipped, hessian_sum, count = [], [], 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or state["step"] == 0:
                    continue
                m, h = state["exp_avg"], self._hessian(state, group)
                unclipped.append((m.abs() < (group["rho"] * h).clamp(min=group["eps"])).sum())
                hessian_sum.append(h.float().sum())
                count += p.numel()
        if not count:
            return torch.zeros(()), torch.zeros(())
        return torch.stack(unclipped).sum() / count, torch.stack(hessian_sum).sum() / count

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1, rho = group["lr"], group["betas"][0], group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m, h = state["exp_avg"], self._hessian(state, group)
                p.mul_(1 - lr * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                ratio = (m.abs() / (rho * h).clamp(min=group["eps"])).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-lr)
        return loss


def hutchinson_hessian(loss: Tensor, params: list[Tensor], generator: torch.Generator,
                       distribution: str = "rademacher", scale: float = 1.0) -> tuple[list, list]:
    """Hutchinson's diagonal-Hessian estimate (Liu et al. 2023, Algorithm 1):
    h_hat = u * (H u) with u ~ Rademacher (or N(0, I)), so E[h_hat] = diag(H).

    One first-order pass with create_graph=True gives g; H u is the gradient of sum(g . u), so the
    Hessian is never formed. Returns (grads, h_hats), one entry per param (None where the loss does not
    depend on it), both detached and divided by `scale` (the GradScaler factor already in `loss`), so
    they estimate the unscaled loss's gradient and Hessian diagonal. u is drawn on generator.device
    (pass a generator on the parameters' device to avoid a copy). Only call this on refresh steps:
    it costs about two backward passes.
    """
    if distribution not in HUTCHINSON_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {HUTCHINSON_DISTRIBUTIONS}, got {distribution!r}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    probes, dot = [], 0.0
    for p, g in zip(params, grads):
        if distribution == "rademacher":
            u = torch.randint(0, 2, p.shape, generator=generator, device=generator.device) * 2.0 - 1.0
        else:
            u = torch.randn(p.shape, generator=generator, device=generator.device)
        u = u.to(p.device, p.dtype)
        probes.append(u)
        if g is not None and g.requires_grad:
            dot = dot + (g * u).sum()
    hvps = ([None] * len(params) if not torch.is_tensor(dot) else
            torch.autograd.grad(dot, params, allow_unused=True))
    h_hats = [None if g is None else
              (torch.zeros_like(u) if hu is None else u * hu.detach() / scale)
              for g, u, hu in zip(grads, probes, hvps)]
    return [None if g is None else g.detach() / scale for g in grads], h_hats


def sample_labels(logits: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Labels y_hat drawn from the model's own predictive distribution, for the GNB estimator
    (Liu et al. 2023, Algorithm 2). Sampled on generator.device, returned on logits' device.

    - "multiclass": logits (B, C) -> (B,) long, y_hat ~ Categorical(softmax(logits)); loss: cross-entropy.
    - "binary": logits of any shape -> same shape float, y_hat ~ Bernoulli(sigmoid(logits)) elementwise
      (also fits an ordinal head's C-1 threshold logits); loss: binary cross-entropy with logits.
    - "regression": predictions f of any shape -> y_hat ~ N(f, 1/2). The squared error (f - y)^2 is the
      NLL of N(f, 1/2) up to a constant, so with these labels E[B g_hat*g_hat] is the diagonal of the
      Gauss-Newton matrix of the mean squared error, 2/B sum_b grad f_b grad f_b^T; loss: (f - y_hat)^2.
    """
    x = logits.detach().float().to(generator.device)
    if kind == "multiclass":
        y = torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator).squeeze(-1)  # (B,)
    elif kind == "binary":
        y = torch.bernoulli(torch.sigmoid(x), generator=generator)
    elif kind == "regression":
        y = x + math.sqrt(0.5) * torch.randn(x.shape, generator=generator, device=x.device)
    else:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    return y.to(logits.device)


def gnb_hessian(sampled_loss: Tensor, params: list[Tensor], batch_size: int, scale: float = 1.0) -> list:
    """Gauss-Newton-Bartlett diagonal-Hessian estimate (Liu et al. 2023, Algorithm 2):
    h_hat = B * g_hat * g_hat, g_hat the gradient of the mean loss on labels from `sample_labels`.

    `sampled_loss` is the batch mean of the plain NLL (no class weights or smoothing) on sampled labels,
    times `scale` (the GradScaler factor), which is divided out. For a micro-batch of b examples out of
    B, either pass its mean loss with batch_size=b and weight the result by b / B, or pass the loss
    already weighted by b / B with batch_size=B: the square makes these equal (see the module docstring). The graph is retained so the real loss
    can be backpropagated through the same forward afterwards. Returns one detached entry per param,
    None where the loss does not depend on it.
    """
    grads = torch.autograd.grad(sampled_loss, params, retain_graph=True, allow_unused=True)
    return [None if g is None else batch_size * (g.detach() / scale) ** 2 for g in grads]


def optimizer_param_groups(named_params, weight_decay: float, lr: float, head_lr: float | None = None,
                           is_head=lambda name: False) -> list[dict]:
    """Parameter groups with no weight decay on biases and normalisation weights (names ending in "bias"
    or containing "LayerNorm", "layer_norm" or "norm."), and learning rate `head_lr` for parameters where
    is_head(name) is True (`lr` for all when head_lr is None). Empty groups are left out."""
    if lr <= 0 or (head_lr is not None and head_lr <= 0) or weight_decay < 0:
        raise ValueError(f"need lr > 0, head_lr > 0 (or None) and weight_decay >= 0, got {lr}, {head_lr}, "
                         f"{weight_decay}")
    named_params, groups = list(named_params), {}
    for name, p in named_params:
        head = head_lr is not None and is_head(name)
        decay = not (name.endswith("bias") or any(s in name for s in NO_DECAY_SUBSTRINGS))
        key = (head, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": head_lr if head else lr, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("optimizer_param_groups got no parameters")
    if head_lr is not None and not any(head for head, _ in groups):
        raise ValueError(f"head_lr={head_lr} is set but is_head matched no parameter name "
                         f"(first names: {[name for name, _ in named_params][:3]})")
    return list(groups.values())


_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def layer_lr_factor(name: str, num_layers: int, decay: float) -> float:
    """Layer-wise learning-rate decay (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification",
    Sec. 5.3; Clark et al. 2020, ELECTRA): the factor on the learning rate of the encoder parameter
    `name`. The top layer (index num_layers - 1) keeps the full rate, each layer below it takes `decay`
    times the one above (layer i: decay^(num_layers - 1 - i)), the embeddings one step below layer 0
    (decay^num_layers). Everything else (pooler, PALs, adapters: task-specific or newly trained on
    top) keeps the full rate. Lower layers hold the more general features, so they move less.
    decay 1 turns it off."""
    if not 0 < decay <= 1:
        raise ValueError(f"layer_lr_factor: decay must be in (0, 1], got {decay}")
    if name.startswith("embeddings.") or ".embeddings." in name:
        return decay ** num_layers
    layer = _LAYER.search(name)
    if layer is None:
        return 1.0
    index = int(layer.group(1))
    if not 0 <= index < num_layers:
        raise ValueError(f"layer_lr_factor: {name!r} is in layer {index}, but the encoder has {num_layers}")
    return decay ** (num_layers - 1 - index)


def build_optimizer(name: str, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, rho: float) -> Optimizer:
    """The optimiser called `name`: "adamw", or "sophiag" / "sophiah" (the same `Sophia`; the name only
    tells the training loop which estimator to feed `update_hessian`). `rho` is ignored by AdamW."""
    if name == "adamw":
        return AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("sophiag", "sophiah"):
        return Sophia(param_groups, lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def weight_average_rate(decay: float, updates: int) -> float:
    """The rate r_t of the t-th update (t >= 1) of the weights' exponential moving average,
    a <- a + r_t (w_t - a), with r_t = (1 - decay) / (1 - decay^t).

    After t updates a = sum_s decay^(t-s) (1 - decay) w_s / (1 - decay^t): the iterates w_1..w_t weighted
    by decay^(age) and normalised, Polyak averaging (Polyak & Juditsky 1992) with an exponential window
    and Adam's bias correction (Kingma & Ba 2015, Algorithm 1). r_1 = 1, so the starting weights (the
    pretrained encoder and the random heads) carry no weight, however long the window; for large t the
    rate is the usual 1 - decay. decay 0 keeps the latest weights."""
    if updates < 1 or not 0 <= decay < 1:
        raise ValueError(f"weight_average_rate: updates >= 1 and decay in [0, 1), got {updates} and {decay}")
    return (1.0 - decay) / (1.0 - decay ** updates)


@torch.no_grad()
def update_weight_average(average: list[Tensor], params: list[Tensor], decay: float, updates: int) -> None:
    """The t-th (t = updates) step of the weights' moving average (`weight_average_rate`), in place on
    `average`, whose tensors pair with `params` one to one."""
    if len(average) != len(params):
        raise ValueError(f"update_weight_average: {len(average)} averages for {len(params)} parameters")
    torch._foreach_lerp_(average, params, weight_average_rate(decay, updates))


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then linear decay to 0,
    half-cosine decay to 0, or constant ("constant" and "plateau"; plateau's drops are applied per epoch)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "plateau"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
