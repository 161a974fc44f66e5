"""R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", NeurIPS; arXiv:2106.14448).

Each training batch passes through the network twice; dropout draws different masks, so the two passes
are two sub-models, P1 and P2. Eq. (3) of the paper trains on

    L = NLL(P1) + NLL(P2) + alpha * 1/2 * (KL(P1 || P2) + KL(P2 || P1)),

the task loss of both passes plus alpha times their mean two-way KL divergence: the sub-models are pulled
to agree, which regularises what dropout alone leaves free (the paper: +0.4 to +1 points on GLUE with BERT
and RoBERTa at alpha 0.1 to 1). `rdrop_loss` returns half of L,

    (L1 + L2) / 2 + alpha / 4 * l_s(P1, P2),   l_s = KL(P1 || P2) + KL(P2 || P1)  (`smart_divergence`),

so the task loss keeps its scale (a run's learning rate means the same with and without R-Drop) and
alpha means what it means in the paper. Binary heads compare Bernoulli distributions and regression heads
use the squared difference of the two predictions as l_s, as SMART does.
"""
import torch

from smart import smart_divergence


def rdrop_loss(loss_a: torch.Tensor, loss_b: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor,
               kind: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half of Eq. (3) from the task losses and outputs of two passes of one batch with independent dropout.

    loss_a, loss_b: each pass's (scalar) task loss; logits_a, logits_b: their outputs, (B, C) for multiclass,
    (B,) or (B, K) single logits for binary, (B,) scores for regression. Gradients flow into both passes.
    Returns (loss, l_s): the loss to train on and the divergence l_s(P1, P2) it contains (for diagnostics)."""
    divergence = smart_divergence(logits_a, logits_b, kind)
    return (loss_a + loss_b) / 2 + alpha / 4 * divergence, divergence
