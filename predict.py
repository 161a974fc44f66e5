"""A model's predictions on dev and test: its predict function (both orders of a symmetric pair averaged
where asked), its evaluation in eval mode (under torchrun each rank a share), the course's prediction
files with the outputs behind them, and the metrics printed. Metrics and files themselves: evaluation.py.
"""
import os
from collections.abc import Callable

import numpy as np
import torch

from config import TrainConfig
from distributed import Distributed
from evaluation import TaskPredictions, evaluate, overall_score, write_outputs, write_predictions
from model import MultitaskBERT, outputs_from_logits, predictions_from_logits
from pipeline import reads_both_orders, to_device
from rundir import file_sha256
from tasks import TASKS


def make_predict_fn(model: MultitaskBERT, device: torch.device, amp_context, sst_loss: str = "ce"):
    def predict(task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with amp_context():
            logits = model.logits(task, to_device(batch, device))
            if "swapped" in batch:
                logits = both_orders_logits(logits, model.logits(task, to_device(batch["swapped"], device)))
        spec = model.specs[task]
        return predictions_from_logits(spec, logits, sst_loss), outputs_from_logits(spec, logits, sst_loss)
    return predict


def both_orders_logits(ab: torch.Tensor, ba: torch.Tensor) -> torch.Tensor:
    """A symmetric pair task's prediction from both orders (--eval_both_orders): the mean of the logits
    (binary: the geometric mean of the odds) or scores (regression) of (a, b) and (b, a). A joint
    encoder reads a pair in order; the mean of its two readings is a two-view ensemble, and symmetric."""
    return (ab.float() + ba.float()) / 2


def run_evaluation(model, datasets, device, amp_context, batch_size, sst_loss="ce", ranks: Distributed = Distributed(),
                   stop_requested: Callable[[], bool] = lambda: False):
    """(metrics with an 'overall' entry, predictions) with the model in eval mode; under torchrun each
    rank predicts its share of the batches and every rank gets all predictions. stop_requested: see
    `evaluate` (it raises EvaluationStopped)."""
    was_training = model.training
    model.eval()
    try:
        metrics, predictions = evaluate(make_predict_fn(model, device, amp_context, sst_loss), datasets, batch_size,
                                        shard=(ranks.rank, ranks.world), gather=ranks.gather,
                                        stop_requested=stop_requested)
    finally:
        model.train(was_training)
    if metrics:
        metrics["overall"] = overall_score(metrics)
    return metrics, predictions


def format_metrics(metrics: dict) -> str:
    parts = [f"{task} {name} {value:.4f}" for task, m in metrics.items() if task != "overall"
             for name, value in m.items()]
    return ", ".join(parts) + (f", overall {metrics['overall']:.4f}" if "overall" in metrics else "")


def confusion_markdown(matrix: np.ndarray) -> str:
    """A confusion matrix as a markdown table (rows: true class, columns: predicted)."""
    n = matrix.shape[0]
    lines = ["| true \\ predicted | " + " | ".join(map(str, range(n))) + " |", "|---" * (n + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(int(v)) for v in row) + " |" for i, row in enumerate(matrix)]
    return "\n".join(lines)


def write_all_predictions(predictions: dict[str, dict[str, TaskPredictions]], folder: str, cfg: TrainConfig):
    """Course-format CSVs per task and split, and per split `outputs-<split>.npz` with the outputs
    behind them (class probabilities, scores) for `--option ensemble`."""
    for split, by_task in predictions.items():
        for task, p in by_task.items():
            spec = TASKS[task]
            write_predictions(os.path.join(folder, spec.prediction_file(split)), p.ids, p.values,
                              spec.prediction_header)
        write_outputs(os.path.join(folder, f"outputs-{split}.npz"), by_task, outputs_meta(cfg, split, list(by_task)))


def outputs_meta(cfg: TrainConfig, split: str, tasks: list[str]) -> dict:
    """What must agree for outputs to be combined: the split, the tasks and their data files
    (by content: a sha256 per file), and how the outputs were made (the SST loss, the tasks predicted
    from both orders of each pair)."""
    files = {}
    for task in tasks:
        path = os.path.join(cfg.data_dir, TASKS[task].files[split])
        files[task] = {"file": TASKS[task].files[split], "sha256": file_sha256(path)}
    return {"split": split, "tasks": tasks, "data": files, "data_dir": os.path.abspath(cfg.data_dir),
            "sst_loss": cfg.sst_loss, "both_orders": [task for task in tasks if reads_both_orders(cfg, task)],
            "max_dev_examples": cfg.max_dev_examples if split == "dev" else None}
