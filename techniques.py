"""Each training technique's glue to the step, chosen once from the config and the identity when off:
SMART's terms and R-Drop's second pass (loss -> loss), gradient surgery (the shared encoder's per-task
gradients set aside and combined), Sophia's curvature refreshes, and the diagnostics they record on
logged steps (`Diagnostics`, one `gradient_share` for all). Each takes the pieces it uses, not the run.
The techniques' mathematics is in smart.py, rdrop.py, pcgrad.py and optimizer.py.
"""
import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from config import TrainConfig
from distributed import Distributed
from model import MultitaskBERT, output_kind, shared_parameters, task_loss
from optimizer import gnb_hessian, hutchinson_hessian, sample_labels
from pcgrad import GradVac, assign_flat_grads, flatten_grads, gradient_cosines, pcgrad
from rdrop import rdrop_loss
from smart import add_weighted_term, bregman_divergence, replaying_rng, rng_state, smart_adversarial_loss


class Diagnostics:
    """What the techniques measure on logged steps (every --log_every steps), by TensorBoard tag:
    train/grad_norm, technique/smart_term, technique/smart_grad_share, technique/bregman_term,
    technique/rdrop_term, technique/rdrop_grad_share,
    technique/conflict_fraction, technique/cosine/<a>_<b>, technique/gradvac_target/<a>_<b>,
    technique/sophia_unclipped, technique/sophia_hessian_mean. Techniques add values only while
    `active`, so unlogged steps pay nothing for them: no extra passes and no device synchronisation."""

    def __init__(self):
        self.active = False
        self.step: dict[str, list[float]] = {}    # this step's values (a term per task or micro-batch)
        self.epoch: dict[str, list[float]] = {}   # per logged step of this epoch, for the epoch line

    def add(self, name: str, value) -> None:
        self.step.setdefault(name, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))

    def end_step(self) -> dict[str, float]:
        """This step's values, averaged per tag, moved to the epoch's record."""
        means = {name: sum(values) / len(values) for name, values in self.step.items()}
        for name, value in means.items():
            self.epoch.setdefault(name, []).append(value)
        self.step = {}
        return means

    def end_epoch(self) -> dict[str, float]:
        """Mean of each tag over the epoch's logged steps; starts a new epoch."""
        means = {name: sum(values) / len(values) for name, values in self.epoch.items()}
        self.epoch = {}
        return means


def gradient_norm(tensors) -> torch.Tensor:
    """The l2 norm of a list of gradients (None entries skipped), in float32."""
    present = [t.float() for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in present])) if present \
        else torch.zeros(())


def gradient_share(term: torch.Tensor, reference: torch.Tensor, params: list[nn.Parameter],
                   scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """||d term / d params|| / ||d reference / d params||: how much of a technique's gradient reaches the
    shared encoder next to the task loss's. Both are taken through the GradScaler's factor (`scale`), as
    the training backward is, so that under fp16 the gradients at fp16 activations do not underflow; the
    factor cancels in the ratio."""
    reference_grads = torch.autograd.grad(scale(reference), params, retain_graph=True, allow_unused=True)
    term_grads = torch.autograd.grad(scale(term), params, retain_graph=True, allow_unused=True)
    return gradient_norm(term_grads) / gradient_norm(reference_grads).clamp(min=1e-30)


class CleanPass(NamedTuple):
    """One micro-batch's training forward, with what is needed to repeat it exactly (SMART)."""
    batch: dict
    embeddings: torch.Tensor      # (B', T, H) embedding-layer output (B' = 2B for a siamese task)
    mask: torch.Tensor            # (B', T) attention mask
    logits: torch.Tensor          # the task's clean logits
    rng_at_embed: tuple | None    # global random state before the embedding layer; None without SMART
    rng_at_encode: tuple | None   # and after it, before the encoder


def clean_forward(model: MultitaskBERT, task: str, batch: dict, rng_snapshot: Callable[[], tuple | None]
                  ) -> CleanPass:
    """The training forward of one micro-batch (in the caller's autocast), recording the random state
    before the embedding layer and before the encoder when a technique needs to replay it: `rng_snapshot`
    from `make_rng_snapshot`."""
    rng_at_embed = rng_snapshot()
    embeddings, mask = model.embed_batch(task, batch)
    rng_at_encode = rng_snapshot()
    logits = model.logits_from_embeddings(task, embeddings, mask)
    return CleanPass(batch, embeddings, mask, logits, rng_at_embed, rng_at_encode)


def make_rng_snapshot(cfg: TrainConfig, device: torch.device) -> Callable[[], tuple | None]:
    """SMART repeats the clean pass's dropout masks: it needs the random state at the pass's start. Without
    SMART nothing is recorded."""
    return (lambda: rng_state(device)) if cfg.smart else (lambda: None)


def make_regularizer(cfg: TrainConfig, model: MultitaskBERT, ema_model: MultitaskBERT | None,
                     generator: torch.Generator, diagnostics: Diagnostics,
                     scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
    """loss -> loss + SMART terms (Jiang et al. 2020, Eq. 1 and 3), or the identity when SMART is off.

    Returns regularize(loss, task, clean: CleanPass). Every pass compares like with like: the ascent
    and perturbed passes replay the clean pass's dropout masks (`replaying_rng` from the state before
    the encoder), and the momentum teacher runs in the student's mode with the student's masks (from
    the state before the embedding layer); all run in the caller's autocast, the clean logits' precision.
    The ascent's gradient is taken through the GradScaler's factor (`scale`), which fp16 needs (see
    `smart_perturbation`). On logged steps it records each term and the adversarial term's gradient norm
    on the shared encoder relative to the task loss's (technique/smart_grad_share)."""
    if not cfg.smart:
        return lambda loss, *_: loss

    def regularize(loss: torch.Tensor, task: str, clean: CleanPass) -> torch.Tensor:
        kind = output_kind(model.specs[task], cfg.sst_loss)

        def adversarial() -> torch.Tensor:
            term = smart_adversarial_loss(perturbed_logits_fn(model, task, clean), clean.embeddings, clean.logits,
                                          kind, clean.mask, eps=cfg.smart_eps, step_size=cfg.smart_step_size,
                                          noise_var=cfg.smart_noise_var, steps=cfg.smart_steps,
                                          norm=cfg.smart_norm, generator=generator,
                                          grad_scale=scale(torch.ones((), device=loss.device)))
            if diagnostics.active:
                diagnostics.add("technique/smart_term", term)
                diagnostics.add("technique/smart_grad_share",
                                gradient_share(cfg.smart_weight * term, loss, shared_parameters(model), scale))
            return term

        def bregman() -> torch.Tensor:
            term = bregman_divergence(clean.logits, teacher_logits(ema_model, model, task, clean), kind)
            if diagnostics.active:
                diagnostics.add("technique/bregman_term", term)
            return term

        loss_with_adversarial = add_weighted_term(loss, cfg.smart_weight, adversarial)
        return add_weighted_term(loss_with_adversarial, cfg.smart_bregman_weight, bregman)
    return regularize


def perturbed_logits_fn(model: MultitaskBERT, task: str, clean: CleanPass):
    """embeddings -> logits through the same network as the clean pass: its dropout masks replayed,
    so that logits_fn(clean.embeddings) equals clean.logits exactly (SMART's ascent and final pass)."""
    def logits_fn(embeddings: torch.Tensor) -> torch.Tensor:
        with replaying_rng(clean.rng_at_encode):
            return model.logits_from_embeddings(task, embeddings, clean.mask)
    return logits_fn


@torch.no_grad()
def teacher_logits(ema_model: MultitaskBERT, model: MultitaskBERT, task: str, clean: CleanPass) -> torch.Tensor:
    """The momentum teacher's logits on the clean pass's batch, in the student's mode with the student's
    dropout masks (replayed from before the embedding layer), in the caller's autocast."""
    ema_model.train(model.training)
    with replaying_rng(clean.rng_at_embed):
        return ema_model.logits(task, clean.batch)


def make_rdrop(cfg: TrainConfig, model: MultitaskBERT, class_weights: dict, smoothing: dict,
               diagnostics: Diagnostics, scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
    """loss -> R-Drop's loss (rdrop.py, Liang et al. 2021, half of Eq. 3) on the tasks whose alpha
    (--rdrop, --task_settings TASK.rdrop) is above 0; the identity on the others, and everywhere when
    no task has it (no second pass, no random draws: the run is bit-identical to one without the flag).

    Returns second_pass(loss, task, clean): a second forward of the clean pass's batch, with dropout
    masks of its own, its task loss, and the two passes' divergence. On logged steps it records the
    divergence (technique/rdrop_term) and its gradient norm on the shared encoder relative to the mean
    task loss's (technique/rdrop_grad_share)."""
    alphas = {task: cfg.settings_for(task).rdrop for task in model.specs}
    if not any(alphas.values()):
        return lambda loss, *_: loss

    def second_pass(loss: torch.Tensor, task: str, clean: CleanPass) -> torch.Tensor:
        if alphas[task] == 0:
            return loss
        spec, labels = model.specs[task], clean.batch["labels"]
        logits = model.logits(task, clean.batch)  # the same rows, new dropout masks
        other = task_loss(spec, logits, labels, cfg.sst_loss, class_weights[task], smoothing[task])
        kind = output_kind(spec, cfg.sst_loss)
        total, divergence = rdrop_loss(loss, other, clean.logits, logits, kind, alphas[task])
        if diagnostics.active:
            diagnostics.add("technique/rdrop_term", divergence)
            diagnostics.add("technique/rdrop_grad_share", gradient_share(alphas[task] / 4 * divergence,
                                                                         (loss + other) / 2,
                                                                         shared_parameters(model), scale))
        return total
    return second_pass


class NoSurgery:
    """--projection none: every task's gradient is summed as the backward passes leave it; the identity."""
    def begin(self, model: MultitaskBERT):
        """A new step on `model`."""

    def set_aside(self, ranks: Distributed):
        """After a task's backward: nothing set aside."""

    def others(self, model: MultitaskBERT) -> list[nn.Parameter]:
        """The trainable parameters whose gradients the step sums as they are: all of them."""
        return [p for p in model.parameters() if p.requires_grad]

    def combine(self, tasks: list[str]):
        """Nothing to combine."""


class GradientSurgery(NoSurgery):
    """--projection pcgrad (Yu et al. 2020) or gradvac (Wang et al. 2021) on the shared encoder: after each
    task's backward its gradient of the shared parameters is set aside (summed over ranks first; heads keep
    theirs), and before the step the projected combination replaces them. The projections are
    scale-equivariant, so they work on GradScaler-scaled gradients. `gradvac`: GradVac's state (its target
    similarities), or None for PCGrad; `generator` draws the projection order (the same on every rank);
    on logged steps the task pairs' cosines go to `diagnostics`."""

    def __init__(self, reduction: str, gradvac: GradVac | None, generator: torch.Generator, diagnostics: Diagnostics):
        self.reduction, self.gradvac, self.generator, self.diagnostics = reduction, gradvac, generator, diagnostics

    def begin(self, model: MultitaskBERT):
        self.shared = shared_parameters(model)
        self.task_grads = []  # per task: (param -> grad), None where unused

    def set_aside(self, ranks: Distributed):
        ranks.sum_gradients(self.shared)  # each task's gradient summed over ranks before the projection
        self.task_grads.append([p.grad for p in self.shared])
        for p in self.shared:
            p.grad = None

    def others(self, model: MultitaskBERT) -> list[nn.Parameter]:
        set_aside = {id(p) for p in self.shared}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in set_aside]

    def combine(self, tasks: list[str]):
        # Parameters no task used keep grad None (the optimiser skips them, as after a plain backward).
        used = [i for i, p in enumerate(self.shared) if any(grads[i] is not None for grads in self.task_grads)]
        used_params = [self.shared[i] for i in used]
        flat = []
        for grads in self.task_grads:
            for i in used:  # a task that did not use a parameter contributes zeros there
                self.shared[i].grad = grads[i]
            flat.append(flatten_grads(used_params))  # (numel,)
        if self.diagnostics.active:
            self.record_conflicts(tasks, flat)
        combined = (self.gradvac.project(flat, self.generator) if self.gradvac is not None
                    else pcgrad(flat, self.generator, self.reduction))
        assign_flat_grads(used_params, combined)

    def record_conflicts(self, tasks: list[str], task_grads: list[torch.Tensor]):
        """Logged surgery steps: each task pair's gradient cosine before projection, the share of pairs in
        conflict (negative cosine), and GradVac's target cosines."""
        cosines = gradient_cosines(task_grads)
        for (i, j), cosine in cosines.items():
            self.diagnostics.add(f"technique/cosine/{tasks[i]}_{tasks[j]}", cosine)
        self.diagnostics.add("technique/conflict_fraction",
                             sum(float(c < 0) for c in cosines.values()) / max(1, len(cosines)))
        if self.gradvac is not None:
            for i, a in enumerate(self.gradvac.task_names):
                for j, b in enumerate(self.gradvac.task_names):
                    if i != j:
                        self.diagnostics.add(f"technique/gradvac_target/{a}_{b}", self.gradvac.targets[i, j])


def make_surgery(cfg: TrainConfig, gradvac: GradVac | None, generator: torch.Generator,
                 diagnostics: Diagnostics) -> NoSurgery:
    """--projection's gradient surgery, chosen once: `GradientSurgery`, or the identity (`NoSurgery`)."""
    if cfg.projection == "none":
        return NoSurgery()
    return GradientSurgery(cfg.pcgrad_reduction, gradvac, generator, diagnostics)


def sampled_label_loss(logits: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The batch-mean NLL of labels drawn from the model's own prediction (Sophia-G's GNB estimator)."""
    labels = sample_labels(logits, kind, generator)
    logits = logits.float()
    if kind == "multiclass":
        return F.cross_entropy(logits, labels)
    if kind == "binary":
        per_example = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return per_example.sum(-1).mean() if per_example.dim() > 1 else per_example.mean()
    return (logits - labels).pow(2).mean()


class Curvature:
    """Sophia's curvature refreshes over a run: every `interval` steps, and at the step after one that was
    missed, the step's `HessianEstimate` is active. `estimator`: "gnb" (--optimizer sophiag), "hutchinson"
    (sophiah), or None (AdamW: every step's estimate is the identity, a plain scaled backward). `due` and
    `missed` are saved with the run's progress. `amp` and `autocast`: the run's precision and its context;
    `generator` draws the probes and sampled labels (each rank its own)."""

    def __init__(self, estimator: str | None, interval: int, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, generator: torch.Generator, ranks: Distributed, amp: str,
                 autocast: Callable):
        self.estimator, self.interval, self.optimizer, self.scaler = estimator, interval, optimizer, scaler
        self.generator, self.ranks, self.amp, self.autocast = generator, ranks, amp, autocast
        self.due = False  # a refresh was missed, so the next step makes one
        self.missed = 0   # refreshes missed, in all

    def for_step(self, step: int) -> "HessianEstimate":
        """The estimate of step `step` (0-based): active when a refresh is due."""
        return HessianEstimate(self, step, self.estimator is not None and (step % self.interval == 0 or self.due))

    def record(self, diagnostics: Diagnostics):
        """Logged steps: the share of coordinates Sophia left unclipped and the mean curvature it used."""
        if self.estimator is not None and diagnostics.active:
            unclipped, hessian_mean = self.optimizer.clip_statistics()
            diagnostics.add("technique/sophia_unclipped", unclipped)
            diagnostics.add("technique/sophia_hessian_mean", hessian_mean)


def make_curvature(cfg: TrainConfig, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   generator: torch.Generator, ranks: Distributed, amp: str, autocast: Callable) -> Curvature:
    """The run's `Curvature`, its estimator chosen once from --optimizer."""
    estimator = {"sophiag": "gnb", "sophiah": "hutchinson"}.get(cfg.optimizer)
    return Curvature(estimator, cfg.hess_interval, optimizer, scaler, generator, ranks, amp, autocast)


class HessianEstimate:
    """Sophia's curvature refresh for one step: when active, the micro-batches' estimates are summed with
    their batch shares as weights and handed to `optimizer.update_hessian`; when not (most steps, and every
    AdamW step), `backward` is the plain scaled backward and the rest does nothing.

    hutchinson (sophiah): on the training loss itself; its first-order gradients replace the ordinary
    backward (one pass with create_graph=True, on refresh steps only). gnb (sophiag): Gauss-Newton-Bartlett
    on labels sampled from the model, before the ordinary backward of the same forward."""

    def __init__(self, curvature: Curvature, step: int, active: bool):
        self.curvature, self.step, self.active = curvature, step, active
        self.params = [p for group in curvature.optimizer.param_groups for p in group["params"]]
        self.total: list[torch.Tensor | None] = [None] * len(self.params)
        self.hutchinson = active and curvature.estimator == "hutchinson"

    def forward_context(self):
        """Hutchinson differentiates twice; the fused attention kernels have no double backward, and a
        compiled backward cannot be differentiated again (torch.compile donates its buffers), so refresh
        steps of sophiah run the encoder eagerly (a --compile run too) with attention on the composite
        (math) path."""
        if self.hutchinson:
            stack = contextlib.ExitStack()
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.compiler.set_stance("force_eager"))
            return stack
        return contextlib.nullcontext()

    def amp_context(self):
        """The step's autocast, but fp32 on Sophia-H's refresh steps under fp16: the Hessian-vector product's
        second backward overflows fp16 where the gradient does not (MiniLM, 4 steps: every refresh was
        non-finite at a scale of 2^12, and one in two at 2^9), and bf16 has fp32's range."""
        if self.hutchinson and self.curvature.amp == "fp16":
            return contextlib.nullcontext()
        return self.curvature.autocast()

    def _add(self, trainable: list[int], estimates: list[torch.Tensor | None]):
        for i, h in zip(trainable, estimates):
            if h is not None:
                self.total[i] = h if self.total[i] is None else self.total[i] + h

    def backward(self, loss: torch.Tensor, logits: torch.Tensor, kind: str, share: float):
        """Backpropagate one micro-batch's (share-weighted, unscaled) loss, estimating curvature if due."""
        curvature, scaler = self.curvature, self.curvature.scaler
        scaled = scaler.scale(loss)
        if not self.active:
            scaled.backward()
            return
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        params = [self.params[i] for i in trainable]
        if self.hutchinson:
            grads, estimates = hutchinson_hessian(scaled, params, curvature.generator, scale=scale)
            for p, g in zip(params, grads):  # the loop keeps scaled gradients until unscale_
                if g is not None:
                    p.grad = g * scale if p.grad is None else p.grad + g * scale
            self._add(trainable, estimates)
            return
        with curvature.autocast():
            sampled = sampled_label_loss(logits, kind, curvature.generator) * share
        # GNB is quadratic in the loss: with the share-weighted loss, B is the whole batch's size
        # (B (w g)^2 = w b g^2, the micro-batch's estimate weighted by its share).
        batch_size = round(logits.shape[0] / share)
        self._add(trainable, gnb_hessian(scaler.scale(sampled), params, batch_size=batch_size, scale=scale))
        scaled.backward()

    def apply(self):
        """Hand the step's estimates to Sophia. One that is not finite (an fp16 overflow in the estimator)
        is refused by the optimiser: the refresh is then due again at the next step, and said."""
        if self.active:
            curvature = self.curvature
            if curvature.optimizer.update_hessian(curvature.ranks.sum_estimates(self.total, self.params)):
                curvature.due = False
            else:
                self.missed()

    def missed(self):
        """A due refresh that was not made (a non-finite estimate, or the step skipped): counted, printed,
        and due again at the next step, so that Sophia does not go on as sign-momentum without a word."""
        if self.active:
            curvature = self.curvature
            curvature.due, curvature.missed = True, curvature.missed + 1
            print(f"step {self.step + 1}: Sophia's curvature refresh not made (a non-finite estimate, or the step "
                  f"skipped); due again at the next step ({curvature.missed} missed in all)", flush=True)
