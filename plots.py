"""Pictures: matplotlib figures for TensorBoard and for the files a sweep leaves behind.

- `confusion_figure`: a confusion matrix as a heatmap with its counts (TensorBoard, every epoch).
- `scores_figure`: per task and overall, each run's score and an ensemble's (--option ensemble,
  sweeps/seeds.sh).
- `save`: a figure as a PNG file, written atomically.
Figures are drawn off-screen (the Agg backend): no display is needed.
"""
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from tasks import TASKS  # noqa: E402
from rundir import atomic_path  # noqa: E402


def confusion_figure(matrix: np.ndarray, title: str) -> "plt.Figure":
    """(C, C) counts, row = true class, column = predicted: a heatmap with each cell's count, shaded by
    the row's share (so the rare classes' rows read as clearly as the common ones')."""
    n = matrix.shape[0]
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.55 * n))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def scores_figure(names: list[str], member_scores: list[dict], ensemble_scores: dict, title: str) -> "plt.Figure":
    """Per task and overall: each member's score (dots), their mean (dotted) and the ensemble's (line).
    member_scores, ensemble_scores: {task: {metric: value}, "overall": value}."""
    panels = [t for t in ensemble_scores if t != "overall"] + ["overall"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        value = (lambda m: m["overall"]) if panel == "overall" else (lambda m, p=panel: next(iter(m[p].values())))
        points = [value(m) for m in member_scores]
        ax.scatter(np.arange(len(points)), points, color="tab:blue", zorder=3, label="runs")
        ax.axhline(np.mean(points), color="tab:blue", linestyle=":", label="mean of runs")
        ax.axhline(value(ensemble_scores), color="tab:red", label="ensemble")
        ax.set_xticks(np.arange(len(points)), [os.path.basename(os.path.normpath(n)) for n in names],
                      rotation=60, fontsize=7)
        ax.set_title("overall" if panel == "overall" else f"{panel} {TASKS[panel].metric}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: "plt.Figure", path: str):
    """Write `fig` to `path` as a PNG (complete or not at all) and free it."""
    with atomic_path(path) as temp_path:
        fig.savefig(temp_path, format="png", dpi=110)
    plt.close(fig)
