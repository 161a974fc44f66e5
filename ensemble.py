"""Ensembles of finished runs, from the outputs every run saves (`predictions/outputs-{dev,test}.npz`).

    python multitask_classifier.py --option ensemble --ensemble RUN_DIR [RUN_DIR ...]
                                   [--ensemble_method greedy|average|vote] [--save_path DIR]

- `average`: the members' class probabilities (SST, Quora) and scores (STS), averaged.
- `vote`: each member's predicted class counts one vote (ties go to the higher average probability);
  STS scores are averaged. This is the majority vote of the course's best public submission.
- `greedy`: forward selection with replacement on the overall score (Caruana et al., "Ensemble
  selection from libraries of models", ICML 2004): start from the best member, repeatedly add the
  member (possibly again) whose addition scores best, and keep the best ensemble seen. Weights are
  how often each member was picked.

Selection is never scored on the rows it was chosen on: the dev set is split in two halves, seeded
by --seed and stratified by label (`split_halves`). Greedy selection looks at the selection half only;
every method is scored on both halves, and the report half is the figure to quote. Single members
are scored on the same report half, so the ensemble's gain is measured on rows none of it was chosen on.

Writes to --save_path (default runs/<time>-ensemble): course-format dev and test predictions, their
outputs (so an ensemble can itself be a member), `summary.json` (members, weights, scores) and
`scores.png` (each member's and the ensemble's report-half scores).
"""
import json
import os
import zipfile
from typing import NamedTuple

import numpy as np

import plots
from config import TrainConfig
from errors import InputError, MissingInput
from datasets import load_task_split
from tasks import TASKS, TaskSpec
from evaluation import METRICS, TaskPredictions, overall_score, read_outputs, write_outputs, write_predictions
from rundir import atomic_path, file_sha256

METHODS = ("greedy", "average", "vote")


class Member(NamedTuple):
    """One finished run: where its outputs are, and per split {task: (ids, outputs)}."""
    path: str
    meta: dict                      # the dev file's meta: tasks, data files (sha256), how they were made
    outputs: dict[str, dict[str, tuple[list[str], np.ndarray]]]  # split -> task -> (ids, outputs)


def load_member(path: str) -> Member:
    """A run folder (its predictions/ subfolder, or the --predictions_dir its config.json names) or a
    predictions folder, holding outputs-dev.npz and outputs-test.npz."""
    folders = [os.path.join(path, "predictions"), path]
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            elsewhere = json.load(f).get("predictions_dir")
        folders += [elsewhere] if elsewhere else []
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "outputs-dev.npz")):
            break
    else:
        raise MissingInput(f"{path}: no outputs-dev.npz in it or in its predictions/ folder (runs write them "
                           f"beside their prediction CSVs; an older run can be re-predicted with "
                           f"--option test --pretrained_model_name {path})")
    outputs, meta = {}, None
    for split in ("dev", "test"):
        file = os.path.join(folder, f"outputs-{split}.npz")
        if not os.path.isfile(file):
            raise MissingInput(f"{file}: not found (a member needs both outputs-dev.npz and outputs-test.npz)")
        try:
            split_meta, outputs[split] = read_outputs(file)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:  # an .npz is a zip: cut short, not one
            raise InputError(f"{file}: not a readable outputs file ({e})") from None
        meta = meta or split_meta
        if split_meta["split"] != split:
            raise InputError(f"{file}: holds the {split_meta['split']} split, expected {split}")
        if split == "test":
            meta = {**meta, "test_data": split_meta["data"]}
    return Member(path, meta, outputs)


HOW_MADE = ("sst_loss", "both_orders", "ensemble", "members")  # a member's provenance, not shared by the others


def made_how(meta: dict) -> dict:
    """How one member's outputs were made (its SST loss, the tasks it read in both orders; for an ensemble,
    its method and members): kept per member in an ensemble's outputs, since members may differ in it."""
    return {key: meta[key] for key in HOW_MADE if key in meta}


def shared_meta(meta: dict, split: str) -> dict:
    """The part of a member's meta that every member shares (check_compatible), for `split`."""
    shared = {key: value for key, value in meta.items() if key not in HOW_MADE and key != "test_data"}
    return {**shared, "split": split, "data": meta["test_data"] if split == "test" else meta["data"]}


def check_compatible(members: list[Member]):
    """Members must have the same tasks, the same data files (by content) and the same rows."""
    first = members[0]
    for member in members[1:]:
        for key, what in (("tasks", "tasks"), ("data", "dev files"), ("test_data", "test files")):
            if member.meta[key] != first.meta[key]:
                raise InputError(f"--ensemble: {member.path} and {first.path} differ in their {what}: "
                                 f"{member.meta[key]} vs {first.meta[key]}")
        for split in ("dev", "test"):
            for task, (ids, outputs) in first.outputs[split].items():
                other_ids, other_outputs = member.outputs[split][task]
                if other_ids != ids or other_outputs.shape != outputs.shape:
                    raise InputError(f"--ensemble: {member.path} and {first.path} predicted different {task} "
                                     f"{split} rows ({len(other_ids)} vs {len(ids)}, or other ids or order): "
                                     f"evaluate both on the same files (--max_dev_examples must agree)")


def predictions_from_outputs(spec: TaskSpec, outputs: np.ndarray) -> np.ndarray:
    """(n,) predictions in the task's prediction dtype: the most probable class, 0/1, or the score."""
    if spec.kind == "multiclass":
        return outputs.argmax(-1).astype(spec.prediction_dtype)
    if spec.kind == "binary":
        return (outputs[:, 1] > 0.5).astype(spec.prediction_dtype)
    low, high = spec.label_range
    return np.clip(outputs, low, high).astype(spec.prediction_dtype)


def weighted_average(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(members, n, ...) outputs and (members,) weights summing to 1 -> (n, ...)."""
    return np.tensordot(weights, stack, axes=1).astype(np.float32)


def vote(spec: TaskSpec, stack: np.ndarray) -> np.ndarray:
    """Majority vote as outputs: (n, C) vote shares, ties broken by the average probability (it adds
    less than one vote); scores (regression) are averaged."""
    members = stack.shape[0]
    if spec.kind == "regression":
        return stack.mean(0)
    counts = np.eye(stack.shape[-1])[stack.argmax(-1)].sum(0)  # (n, C) votes per class
    return ((counts + 0.5 * stack.mean(0)) / (members + 0.5)).astype(np.float32)


def split_halves(labels: dict[str, np.ndarray], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task (selection rows, report rows): a seeded random order within each label stratum
    (classes; STS scores rounded to the nearest integer), rows alternating between the halves, so each
    half has every class in the same proportion to within one row."""
    rng = np.random.default_rng(seed)
    halves = {}
    for task, y in labels.items():
        strata = np.rint(y).astype(int)
        order = np.lexsort((rng.permutation(len(y)), strata))  # by stratum, random within it
        halves[task] = (np.sort(order[0::2]), np.sort(order[1::2]))
    return halves


def score(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict:
    """Each task's metric on the given rows, and the overall score."""
    metrics = {}
    for task, y in labels.items():
        spec = TASKS[task]
        metrics[task] = {spec.metric: METRICS[spec.metric](predictions_from_outputs(spec, outputs[task][rows[task]]),
                                                           y[rows[task]])}
    metrics["overall"] = overall_score({t: m for t, m in metrics.items()})
    return metrics


def combine(stacks: dict[str, np.ndarray], weights: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """The ensemble's outputs per task from (members, n, ...) stacks."""
    if method == "vote":
        return {task: vote(TASKS[task], stack[weights > 0]) for task, stack in stacks.items()}
    return {task: weighted_average(stack, weights) for task, stack in stacks.items()}


def greedy_selection(stacks: dict[str, np.ndarray], labels: dict[str, np.ndarray], rows: dict[str, np.ndarray],
                     rounds: int) -> tuple[np.ndarray, list[float]]:
    """Caruana's forward selection with replacement, scored on `rows` only. Returns (weights summing to
    1, the overall score after each round); the kept ensemble is the first best round."""
    num_members = next(iter(stacks.values())).shape[0]
    counts = np.zeros(num_members)
    best_counts, best_score, trajectory = None, -np.inf, []
    for _ in range(rounds):
        candidates = []
        for m in range(num_members):
            trial = counts.copy()
            trial[m] += 1
            candidates.append(score(combine(stacks, trial / trial.sum(), "average"), labels, rows)["overall"])
        pick = int(np.argmax(candidates))  # the first of equals: the earlier member
        counts[pick] += 1
        trajectory.append(candidates[pick])
        if candidates[pick] > best_score:
            best_score, best_counts = candidates[pick], counts.copy()
    return best_counts / best_counts.sum(), trajectory


def dev_labels(cfg: TrainConfig, member: Member) -> dict[str, np.ndarray]:
    """The dev labels of the members' rows, read from --data_dir, or else from the folder the members
    were evaluated from; the files must be the members' files (by sha256)."""
    folders = [cfg.data_dir] + ([member.meta["data_dir"]] if "data_dir" in member.meta else [])
    labels = {}
    for task in member.meta["tasks"]:
        spec = TASKS[task]
        expected = member.meta["data"][task]["sha256"]
        found = {}
        for folder in folders:
            path = os.path.join(folder, spec.files["dev"])
            if os.path.isfile(path):
                found[path] = file_sha256(path)
        matching = [path for path, digest in found.items() if digest == expected]
        if not matching:
            seen = "; ".join(f"{path} has sha256 {digest[:12]}..." for path, digest in found.items()) or "none found"
            raise InputError(f"{spec.files['dev']}: not the dev file the members were evaluated on (theirs has "
                             f"sha256 {expected[:12]}...; {seen}): set --data_dir to their data folder")
        raw = load_task_split(spec, "dev", os.path.dirname(matching[0]), member.meta.get("max_dev_examples"))
        by_id = dict(zip(raw.ids, raw.labels))
        labels[task] = np.array([by_id[i] for i in member.outputs["dev"][task][0]])
    return labels


def format_scores(metrics: dict) -> str:
    return ", ".join(f"{t} {next(iter(m.values())):.4f}" for t, m in metrics.items() if t != "overall") \
        + f", overall {metrics['overall']:.4f}"


def run(cfg: TrainConfig, out_dir: str) -> dict:
    """--option ensemble: combine the runs in cfg.ensemble, score, write summary.json and scores.png to
    `out_dir` and the predictions to its predictions/ (or --predictions_dir)."""
    members = [load_member(path) for path in cfg.ensemble]
    check_compatible(members)
    labels = dev_labels(cfg, members[0])
    halves = split_halves(labels, cfg.seed)
    selection = {t: h[0] for t, h in halves.items()}
    report = {t: h[1] for t, h in halves.items()}
    everything = {t: np.arange(len(y)) for t, y in labels.items()}
    stacks = {split: {task: np.stack([m.outputs[split][task][1] for m in members]) for task in members[0].meta["tasks"]}
              for split in ("dev", "test")}

    trajectory = None
    if cfg.ensemble_method == "greedy":
        weights, trajectory = greedy_selection(stacks["dev"], labels, selection, rounds=max(10, 2 * len(members)))
    else:
        weights = np.full(len(members), 1 / len(members))
    combined = {split: combine(stacks[split], weights, cfg.ensemble_method) for split in ("dev", "test")}

    member_report = [score({t: o for t, (_, o) in m.outputs["dev"].items()}, labels, report)
                     for m in members]
    mean_member = {task: {TASKS[task].metric: float(np.mean([next(iter(s[task].values())) for s in member_report]))}
                   for task in labels}
    mean_member["overall"] = float(np.mean([s["overall"] for s in member_report]))
    summary = {
        "method": cfg.ensemble_method, "split_seed": cfg.seed,
        "members": [{"path": m.path, "weight": round(float(w), 6), "report_half": s}
                    for m, w, s in zip(members, weights, member_report)],
        "selection_half": score(combined["dev"], labels, selection),
        "report_half": score(combined["dev"], labels, report),
        "whole_dev": score(combined["dev"], labels, everything),
        "mean_member_report_half": mean_member,
        "rows": {"selection": {t: len(r) for t, r in selection.items()}, "report": {t: len(r) for t, r in report.items()}},
    }
    summary["gain_over_mean_member_report_half"] = summary["report_half"]["overall"] - mean_member["overall"]
    if trajectory is not None:
        summary["greedy_selection_half_by_round"] = trajectory

    if os.path.exists(os.path.join(out_dir, "summary.json")):
        raise InputError(f"{out_dir} already holds an ensemble (summary.json): pick another --save_path")
    folder = cfg.predictions_dir or os.path.join(out_dir, "predictions")
    for split in ("dev", "test"):
        by_task = {}
        for task, outputs in combined[split].items():
            spec = TASKS[task]
            ids = members[0].outputs[split][task][0]
            by_task[task] = TaskPredictions(ids, predictions_from_outputs(spec, outputs), outputs)
            write_predictions(os.path.join(folder, spec.prediction_file(split)), ids, by_task[task].values,
                              spec.prediction_header)
        meta = {**shared_meta(members[0].meta, split), "ensemble": cfg.ensemble_method,
                "members": [{"path": m.path, **made_how(m.meta)} for m in members]}
        write_outputs(os.path.join(folder, f"outputs-{split}.npz"), by_task, meta)
    with atomic_path(os.path.join(out_dir, "summary.json")) as temp_path, open(temp_path, "w") as f:
        json.dump(summary, f, indent=1)
    plots.save(plots.scores_figure([m.path for m in members], member_report,
                summary["report_half"], f"{cfg.ensemble_method} ensemble of {len(members)} runs: dev report half "
                f"({sum(len(r) for r in report.values())} rows)"), os.path.join(out_dir, "scores.png"))

    width = max(len(m.path) for m in members)
    print(f"dev report half (split seed {cfg.seed}; selection on the other half):")
    for m, w, s in zip(members, weights, member_report):
        print(f"  {m.path:<{width}}  weight {w:.3f}  {format_scores(s)}")
    print(f"  {'mean of members':<{width}}                {format_scores(mean_member)}")
    print(f"  {cfg.ensemble_method + ' ensemble':<{width}}                {format_scores(summary['report_half'])}"
          f"  ({summary['gain_over_mean_member_report_half'] * 100:+.2f} points overall)")
    print(f"selection half: {format_scores(summary['selection_half'])}\npredictions: {folder}", flush=True)
    return summary
