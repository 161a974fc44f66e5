"""Gradient surgery for multitask training on flat per-task gradients of the shared encoder.

* `pcgrad`: PCGrad, Yu et al. 2020, "Gradient Surgery for Multi-Task Learning" (NeurIPS),
  Algorithm 1 / Eq. (1): a task's gradient that conflicts with another's (negative dot product)
  loses its component along that other gradient.
* `GradVac`: Gradient Vaccine, Wang et al. 2021, "Gradient Vaccine: Investigating and Improving
  Multi-task Optimization in Massively Multilingual Models" (ICLR), Eq. (3)-(4) and Algorithm 2:
  a task's gradient is moved towards a running target cosine similarity with each other task.

Both take one flat gradient per task (None when the task had no batch this step) and return the
combined flat gradient. Both are scale-equivariant up to their eps: scaling every task gradient by
S scales the result by S, so they may be applied to GradScaler-scaled gradients before unscaling.
`flatten_grads` and `assign_flat_grads` convert between parameters' .grad and flat vectors.
"""
from typing import Iterable, Sequence

import torch

REDUCTIONS = ("sum", "mean")


def flatten_grads(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate the parameters' .grad into one flat vector (total_numel,), with zeros for a
    parameter whose .grad is None (it took no part in the backward)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@torch.no_grad()
def assign_flat_grads(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Inverse of `flatten_grads`: set each parameter's .grad to its slice of `flat`, in order."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"assign_flat_grads: flat gradient has {flat.numel()} elements, parameters have {total}")
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def _present(task_grads: Sequence[torch.Tensor | None]) -> list[int]:
    """Indices of the tasks that have a gradient this step; an error if none has."""
    present = [i for i, g in enumerate(task_grads) if g is not None]
    if not present:
        raise ValueError("gradient surgery: every task gradient is None, there is nothing to combine")
    return present


def _reduce(grads: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Sum, or mean over the tasks present this step, of (numel,) gradients."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"gradient surgery: unknown reduction {reduction!r}, expected one of {REDUCTIONS}")
    total = torch.stack(grads).sum(0)  # (numel,)
    return total / len(grads) if reduction == "mean" else total


def gradient_cosines(task_grads: Sequence[torch.Tensor | None]) -> dict[tuple[int, int], torch.Tensor]:
    """cos(g_i, g_j) for every pair i < j of present tasks, on the original (unprojected) flat
    gradients: the conflicts PCGrad projects away (negative cosines) and the similarities GradVac
    steers. A zero gradient has cosine 0 with everything. Returns 0-dim tensors (no synchronisation)."""
    present = [i for i, g in enumerate(task_grads) if g is not None]
    norms = {i: task_grads[i].norm() for i in present}
    return {(i, j): torch.dot(task_grads[i], task_grads[j]) / (norms[i] * norms[j]).clamp(min=1e-30)
            for k, i in enumerate(present) for j in present[k + 1:]}


def pcgrad(task_grads: Sequence[torch.Tensor | None], generator: torch.Generator, reduction: str = "sum",
           eps: float = 1e-12) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1) on flat (numel,) task gradients.

    For each task i, starting from g_i^PC = g_i, for each other task j in a random order (drawn from
    `generator`, a CPU generator): if g_i^PC . g_j < 0, project onto the normal plane of the ORIGINAL g_j,
        g_i^PC <- g_i^PC - (g_i^PC . g_j) / (||g_j||^2 + eps) g_j            (Eq. 1)
    Returns sum_i g_i^PC, or its mean over the present tasks for reduction="mean". A None task is
    absent this step and neither projects nor is projected; zero gradients never conflict.
    """
    present = _present(task_grads)
    originals = [task_grads[i] for i in present]  # each (numel,)
    projected = []
    for i, g_i in enumerate(originals):
        g = g_i.clone()
        for j in torch.randperm(len(originals), generator=generator).tolist():
            if j == i:
                continue
            g_j = originals[j]
            dot = torch.dot(g, g_j)
            if dot < 0:
                g = g - dot / (torch.dot(g_j, g_j) + eps) * g_j
        projected.append(g)
    return _reduce(projected, reduction)


class GradVac:
    """Gradient Vaccine (Wang et al. 2021, Algorithm 2) on flat (numel,) task gradients of the whole
    shared encoder (the paper also applies it per layer; here it is one vector).

    For each task i, starting from g_i^PS = g_i, for each other task j in a random order:
        phi_ij = cos(g_i^PS, g_j)
        if phi_ij < phi_hat_ij:                                              (Eq. 3, closed form)
            g_i^PS <- g_i^PS + ||g_i^PS|| (phi_hat_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi_hat_ij^2))
                                / (||g_j|| sqrt(1 - phi_hat_ij^2) + eps) g_j
        phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij                  (Eq. 4, EVERY step)
    The targets phi_hat form a (num_tasks, num_tasks) matrix for ordered pairs, starting at 0 as in
    the paper, and are updated only for pairs of tasks that are both present. Tasks are the positions
    of `task_names`; `project` takes the gradients in that order. A step whose gradients are not all
    finite (a GradScaler overflow, which makes the scaler skip the step) returns the plain reduction
    and leaves the targets as they were, instead of turning them into NaN for the rest of training.
    """

    def __init__(self, task_names: Sequence[str], beta: float = 0.01, reduction: str = "sum", eps: float = 1e-12):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in (0, 1], got {beta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"GradVac: unknown reduction {reduction!r}, expected one of {REDUCTIONS}")
        self.task_names = list(task_names)
        self.beta = beta
        self.reduction = reduction
        self.eps = eps
        self.targets = torch.zeros(len(self.task_names), len(self.task_names), dtype=torch.float64)  # phi_hat

    def project(self, task_grads: Sequence[torch.Tensor | None], generator: torch.Generator) -> torch.Tensor:
        """Combined (numel,) gradient of one step; updates the target cosines."""
        if len(task_grads) != len(self.task_names):
            raise ValueError(f"GradVac: got {len(task_grads)} task gradients for tasks {self.task_names}")
        present = _present(task_grads)
        if not all(torch.isfinite(task_grads[i]).all() for i in present):
            return _reduce([task_grads[i] for i in present], self.reduction)
        projected = []
        for i in present:
            g = task_grads[i].clone()  # (numel,)
            for k in torch.randperm(len(present), generator=generator).tolist():
                j = present[k]
                if j == i:
                    continue
                g_j = task_grads[j]
                norm_i, norm_j = g.norm(), g_j.norm()
                phi = (torch.dot(g, g_j) / (norm_i * norm_j + self.eps)).clamp(-1.0, 1.0).item()
                phi_hat = self.targets[i, j].item()
                if phi < phi_hat:
                    coefficient = norm_i * (phi_hat * (1 - phi ** 2) ** 0.5 - phi * (1 - phi_hat ** 2) ** 0.5) \
                        / (norm_j * (1 - phi_hat ** 2) ** 0.5 + self.eps)
                    g = g + coefficient * g_j
                self.targets[i, j] = (1 - self.beta) * phi_hat + self.beta * phi
            projected.append(g)
        return _reduce(projected, self.reduction)

    def state_dict(self) -> dict:
        """The target cosines, for checkpoints; beta and reduction come from the config on resume."""
        return {"task_names": list(self.task_names), "targets": self.targets.clone()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["task_names"]) != self.task_names:
            raise ValueError(f"GradVac: checkpoint tasks {state['task_names']} differ from {self.task_names}")
        self.targets = state["targets"].to(torch.float64).clone()
