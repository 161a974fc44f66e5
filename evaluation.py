"""Metrics, the evaluation loop and prediction files in the course's submission format.

The model stays out of this module: `evaluate` takes `predict_fn(task_name, batch) -> predictions`
from the training loop, so the same code scores every task and every head.
"""
import json
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import sklearn.metrics
import torch

from datasets import TaskDataset, sequential_batches
from rundir import atomic_path


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the label."""
    predictions, labels = _paired_arrays(predictions, labels)
    return float(np.mean(predictions == labels))


def pearson(predictions, labels) -> float:
    """Pearson correlation r in [-1, 1].

    Returns 0.0 (no measurable linear relation) when either side is constant, e.g. a collapsed
    regression head, where r is undefined: the overall score then stays finite and comparable.
    """
    predictions, labels = _paired_arrays(predictions, labels)
    predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(np.corrcoef(predictions, labels)[0, 1])


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    predictions, labels = _paired_arrays(predictions, labels)
    return sklearn.metrics.confusion_matrix(labels, predictions, labels=list(range(num_classes)))


def _paired_arrays(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected equal, non-zero numbers of predictions and labels, "
                         f"got {len(predictions)} and {len(labels)}")
    return predictions, labels


def overall_score(metrics: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's headline metric mapped to [0, 1].

    Accuracy counts as is, a Pearson r as (r + 1) / 2. With SST, Quora and STS this is the course's
    leaderboard score (sst_acc + para_acc + (sts_r + 1) / 2) / 3; other task sets get the same mean.
    metrics: task name -> {"accuracy": a} or {"pearson": r} (other entries are ignored).
    """
    if not metrics:
        raise ValueError("no task metrics to score")
    scores = []
    for task, task_metrics in metrics.items():
        if "pearson" in task_metrics:
            scores.append((task_metrics["pearson"] + 1) / 2)
        elif "accuracy" in task_metrics:
            scores.append(task_metrics["accuracy"])
        else:
            raise ValueError(f"task {task}: expected an 'accuracy' or 'pearson' entry, got {sorted(task_metrics)}")
    return sum(scores) / len(scores)


METRICS = {"accuracy": accuracy, "pearson": pearson}  # TaskSpec.metric -> function


class TaskPredictions(NamedTuple):
    """One task's predictions on one split, in file order."""
    ids: list[str]
    values: np.ndarray   # (n,) what the prediction file holds, in the task's `prediction_dtype`
    outputs: np.ndarray  # float32 behind the values: (n, C) class probabilities, or (n,) scores


class EvaluationStopped(Exception):
    """`evaluate`'s stop_requested() said yes between two batches (a signal asked the run to stop)."""


@torch.no_grad()
def evaluate(predict_fn: Callable[[str, dict], tuple[torch.Tensor, torch.Tensor]], datasets: dict[str, TaskDataset],
             batch_size: int, shard: tuple[int, int] = (0, 1), gather: Callable[[object], list] = lambda part: [part],
             stop_requested: Callable[[], bool] = lambda: False
             ) -> tuple[dict[str, dict[str, float]], dict[str, TaskPredictions]]:
    """Predict every example of every dataset and score the ones with labels.

    predict_fn(task_name, batch) -> (predictions, outputs): predictions (B,) are a class index
    (multiclass), 0/1 (binary) or a score (regression); outputs are what they were computed from,
    (B, C) class probabilities or (B,) scores, kept for ensembles. Batches go longest first for speed;
    predictions come back in file order.
    Returns (metrics, predictions): metrics[task] = {spec.metric: value} for datasets with labels
    (none for a test split), predictions[task] = TaskPredictions with values in the task's
    `prediction_dtype`, ready for `write_predictions`.

    Several processes: shard = (rank, world) predicts every world-th batch, and gather(part) returns
    every rank's part (distributed.Distributed.gather); each example is predicted exactly once.

    stop_requested() is asked before each round of batches (one batch per rank; every rank asks as often,
    so it may be a collective call) and raises EvaluationStopped when it says yes: a signal does not wait
    for the whole evaluation (about 4 minutes of dev sets on 2 CPU cores).
    """
    metrics, predictions = {}, {}
    rank, world = shard
    for name, dataset in datasets.items():
        spec = dataset.spec
        values = np.zeros(len(dataset), dtype=spec.prediction_dtype)  # (n,) in file order
        outputs = None  # (n, ...) float32, shaped on the first batch
        batches = sequential_batches(dataset.lengths, batch_size)
        mine = batches[rank::world]
        for round_ in range(-(-len(batches) // world)):  # ceil: the same count on every rank
            if stop_requested():
                raise EvaluationStopped()
            if round_ >= len(mine):
                continue
            indices = mine[round_]
            batch_values, batch_outputs = (t.detach().float().cpu() for t in predict_fn(name, dataset.collate(indices)))
            if batch_values.shape != (len(indices),) or batch_outputs.shape[:1] != (len(indices),):
                raise ValueError(f"task {name}: predict_fn returned shapes {tuple(batch_values.shape)} and "
                                 f"{tuple(batch_outputs.shape)}, expected ({len(indices)},) predictions and "
                                 f"outputs with {len(indices)} rows, one per example")
            batch_values = batch_values.double().numpy()
            if spec.num_classes is not None and not np.isin(batch_values, np.arange(spec.num_classes)).all():
                raise ValueError(f"task {name}: predict_fn must return class indices 0..{spec.num_classes - 1}, "
                                 f"got e.g. {batch_values[:3].tolist()}")
            values[indices] = batch_values
            if outputs is None:
                outputs = np.zeros((len(dataset), *batch_outputs.shape[1:]), dtype=np.float32)
            outputs[indices] = batch_outputs.numpy()
        if world > 1:
            own = [i for indices in mine for i in indices]
            own_outputs = outputs[own] if outputs is not None else np.zeros(0, dtype=np.float32)
            for part_indices, part_values, part_outputs in gather((own, values[own], own_outputs)):
                values[part_indices] = part_values
                if len(part_indices):
                    if outputs is None:
                        outputs = np.zeros((len(dataset), *part_outputs.shape[1:]), dtype=np.float32)
                    outputs[part_indices] = part_outputs
        if outputs is None:  # an empty dataset
            outputs = np.zeros(0, dtype=np.float32)
        predictions[name] = TaskPredictions(dataset.ids, values, outputs)
        if dataset.labels is not None:
            metrics[name] = {spec.metric: METRICS[spec.metric](values, dataset.labels.numpy())}
    return metrics, predictions


def write_predictions(path: str, ids: list[str], values, header: str):
    """Write a prediction file in the course's format, atomically.

    Exactly as the course's evaluation.py writes it: the header line, then one `{id} , {value}` line
    per example, every line ending in a space before the newline; values are formatted as an f-string
    formats their numpy type (np.int64 -> 3; np.float32 -> 1.0 or 0.46074217557907104, the float32
    value's exact decimal as a Python float). The text goes to a temporary file in the same folder
    that replaces `path` only once complete, so a crash never leaves a partial file.
    """
    values = np.asarray(values)
    if len(ids) != len(values):
        raise ValueError(f"{path}: {len(ids)} ids but {len(values)} values")
    with atomic_path(path) as temp_path, open(temp_path, "w", encoding="utf-8") as f:
        f.write(f"{header} \n")
        for example_id, value in zip(ids, values):
            f.write(f"{example_id} , {value} \n")


def write_outputs(path: str, predictions: dict[str, TaskPredictions], meta: dict):
    """Save the outputs behind a split's predictions as a .npz file, atomically: per task
    `<task>/ids` (strings) and `<task>/outputs` (float32), and `meta` (JSON: tasks, data files, model
    settings) under `meta`. Read back with `read_outputs`; no pickled objects are involved."""
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for task, p in predictions.items():
        arrays[f"{task}/ids"] = np.array(p.ids, dtype=str)
        arrays[f"{task}/outputs"] = np.asarray(p.outputs, dtype=np.float32)
    with atomic_path(path) as temp_path, open(temp_path, "wb") as f:
        np.savez(f, **arrays)


def read_outputs(path: str) -> tuple[dict, dict[str, tuple[list[str], np.ndarray]]]:
    """(meta, {task: (ids, outputs)}) from a file `write_outputs` wrote."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        tasks = {key.split("/")[0] for key in data.files if "/" in key}
        return meta, {task: (data[f"{task}/ids"].tolist(), data[f"{task}/outputs"]) for task in sorted(tasks)}
