"""--time_budget: how many steps per epoch fit in the minutes given, from timed calibration steps of the
run's own recipe and a timed sample of its evaluation; the deadline by which training stops if the steps
then run slower.
"""
import copy
import dataclasses
import time

import numpy as np
import torch

from config import TrainConfig
from datasets import TaskDataset, epoch_task_schedule, sequential_batches
from distributed import Distributed
from errors import InputError
from model import MultitaskBERT, apply_trainable
from predict import make_predict_fn
from state import Run
from tasks import ALL_TASKS
from train import advance


CALIBRATION_WARMUP, CALIBRATION_STEPS, CALIBRATION_MAX_STEPS = 3, 20, 300
CALIBRATION_SHARE = 0.01  # of the budget: timed steps go on until they have taken this long (or the most steps)
BUDGET_RESERVE = 0.05  # of the budget, for what is not timed: checkpoints, logs, writing predictions
DEADLINE_MARGIN = 15, 0.05  # seconds, share of the budget (the smaller): left after a deadline stop, besides
                             # 1.25 x the estimate of the evaluation and predictions that follow it


def steps_within_budget(budget_s: float, spent_s: float, step_s: float, evaluation_s: float, epochs: int) -> int:
    """Steps per epoch that fit in what is left of the budget: (budget x (1 - reserve) - time spent so far
    - the evaluations' estimate) / seconds per step, divided over the epochs (0 if nothing is left)."""
    left = budget_s * (1 - BUDGET_RESERVE) - spent_s - evaluation_s
    return max(0, int(left / step_s)) // epochs


def evaluation_seconds(model: MultitaskBERT, datasets: dict[str, TaskDataset], device, amp_context, batch_size: int,
                       sst_loss: str, world: int, batches_per_task: int = 4) -> float:
    """Seconds to predict every row of `datasets` on this rank: `batches_per_task` batches spread over each
    task's length-sorted batches are timed, and the time scaled by padded tokens (all / timed)."""
    predict, total = make_predict_fn(model, device, amp_context, sst_loss), 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for task, dataset in datasets.items():
            batches = sequential_batches(dataset.lengths, batch_size)
            padded = [len(b) * max(dataset.lengths[i] for i in b) for b in batches]
            chosen = sorted(set(np.linspace(0, len(batches) - 1, min(batches_per_task, len(batches))).round().astype(int)))
            predict(task, dataset.collate(batches[chosen[0]]))  # the first call pays for allocations
            synchronize(device)
            began = time.perf_counter()
            for k in chosen:
                predict(task, dataset.collate(batches[k]))
            synchronize(device)
            total += (time.perf_counter() - began) * sum(padded) / sum(padded[k] for k in chosen)
    model.train(was_training)
    return total / world


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_step_tokens(run: Run) -> float:
    """Tokens this rank trains in an average step of the run's schedule (batch x mean row length of the
    tasks a step trains, weighted by how often the schedule draws each task)."""
    batch_tokens = {task: run.cfg.batch_size * sum(ds.lengths) / len(ds) for task, ds in run.train_sets.items()}
    if run.cfg.task_scheduler == ALL_TASKS or run.cfg.projection != "none":
        return sum(batch_tokens.values())
    draws = epoch_task_schedule(run.cfg.task_scheduler, run.sizes, 10_000, torch.Generator().manual_seed(0), 0,
                                run.cfg.epochs)
    return sum(batch_tokens[task] for task in draws) / len(draws)


def fit_to_time_budget(cfg: TrainConfig, model: MultitaskBERT, data: dict, device, amp: str, ranks: Distributed,
                       started: float) -> tuple[TrainConfig, dict]:
    """--time_budget: the config with num_batches_per_epoch set so that the whole run ends within the
    budget, and the calibration's figures (with `deadline_s`, seconds from `started` by which training
    must stop if the steps run slower than these). A copy of the model takes CALIBRATION_WARMUP steps,
    then timed steps (at least CALIBRATION_STEPS, until they have taken CALIBRATION_SHARE of the budget,
    at most CALIBRATION_MAX_STEPS) of this recipe (its techniques included) on real batches, the evaluation
    is timed on a sample (`evaluation_seconds`), and the global random state is restored afterwards, so
    the run trains exactly as `--num_batches_per_epoch <the chosen count>` would. Every rank uses rank 0's
    count."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = Run(cfg, copy.deepcopy(model), data, device, amp, ranks)
        apply_trainable(probe.model, cfg, epoch=0)
        schedule = epoch_task_schedule(cfg.task_scheduler, probe.sizes, CALIBRATION_WARMUP + CALIBRATION_MAX_STEPS,
                                       probe.schedule_generator, 0, cfg.epochs)
        timed_tokens, timed_steps = 0, 0
        for k, task in enumerate(schedule):
            if k == CALIBRATION_WARMUP:
                synchronize(device)
                began = time.perf_counter()
            tokens = advance(probe, task)[1]
            if k >= CALIBRATION_WARMUP:
                timed_tokens, timed_steps = timed_tokens + tokens, timed_steps + 1
                # every rank stops on the same step (all of them step together)
                if timed_steps >= CALIBRATION_STEPS and ranks.broadcast(
                        time.perf_counter() - began >= CALIBRATION_SHARE * 60 * cfg.time_budget):
                    break
        synchronize(device)
        timed_s = time.perf_counter() - began
        # A step's time follows its tokens: scale the timed steps' seconds per token to the epoch's mean step.
        step_s = timed_s / timed_tokens * mean_step_tokens(probe)
        dev_s = evaluation_seconds(probe.model, data["dev"], device, probe.amp_context, cfg.eval_batch_size,
                                   cfg.sst_loss, ranks.world)
        test_s = evaluation_seconds(probe.model, data["test"], device, probe.amp_context, cfg.eval_batch_size,
                                    cfg.sst_loss, ranks.world)
        del probe
    evaluation_s = cfg.epochs * dev_s + test_s  # dev after each epoch; the best epoch's dev predictions are kept
    budget_s, spent_s = 60 * cfg.time_budget, time.perf_counter() - started
    steps = ranks.broadcast(steps_within_budget(budget_s, spent_s, step_s, evaluation_s, cfg.epochs))
    # Training stops by then whatever the count: what must follow is one dev evaluation and the predictions.
    margin_s = min(DEADLINE_MARGIN[0], DEADLINE_MARGIN[1] * budget_s)
    deadline_s = ranks.broadcast(budget_s - 1.25 * (dev_s + test_s) - margin_s)
    figures = {"budget_s": budget_s, "spent_s": round(spent_s, 1), "timed_steps": timed_steps,
               "timed_s": round(timed_s, 2), "step_s": round(step_s, 4), "evaluation_s": round(evaluation_s, 1),
               "steps_per_epoch": steps, "deadline_s": round(deadline_s, 1)}
    if steps < 1:
        raise InputError(f"--time_budget {cfg.time_budget:g} min leaves no time to train: {spent_s:.0f} s spent "
                         f"before training (calibration included), about {evaluation_s:.0f} s of evaluation, "
                         f"{step_s:.2f} s per step")
    print(f"time_budget: {cfg.time_budget:g} min: {step_s:.3f} s per step ({timed_steps} timed), evaluation "
          f"about {evaluation_s:.0f} s, {spent_s:.0f} s spent: {steps} steps per epoch (the same run: "
          f"--num_batches_per_epoch {steps} --time_budget none)", flush=True)
    return dataclasses.replace(cfg, num_batches_per_epoch=steps), figures
