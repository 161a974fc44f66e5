"""The training loop, top down: `fit` runs the epochs (each trained, then evaluated on dev, best.pt kept,
the plateau schedule's halving, last.pt saved, early stopping), `train_epoch` its scheduled steps (logs,
signals, deadline, mid-epoch checkpoints), `train_step` one optimiser step. What each technique adds is
chosen once in `Run` (state.py) and reached through it; the best checkpoint's predictions are written last.
"""
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

import plots
from datasets import epoch_task_schedule
from evaluation import EvaluationStopped, confusion_matrix
from model import apply_trainable, output_kind, task_loss
from optimizer import Sophia, lr_multiplier
from pipeline import split_batch, to_device
from predict import confusion_markdown, format_metrics, run_evaluation, write_all_predictions
from rundir import atomic_save, atomic_write_json, load_checkpoint
from state import Run
from tasks import ALL_TASKS, TASKS
from techniques import HessianEstimate


def fit(run: Run, run_dir: str, writer, on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train for the remaining epochs; returns the best epoch's dev metrics. on_epoch: see `train`.
    An epoch whose steps are done waits for its evaluation in `run.trained_epoch` (saved in last.pt): a
    signal during the evaluation stops it between two batches, saves, and a --resume evaluates again."""
    while run.trained_epoch is not None or (run.epoch < run.cfg.epochs and not reached_stop_at_step(run)):
        if run.trained_epoch is None:
            run.epoch_start = time.perf_counter()
            train_losses = train_epoch(run, writer, run_dir)
            seconds = run.epoch_seconds_before + time.perf_counter() - run.epoch_start  # with a resumed epoch's start
            run.epoch_seconds_before, run.epoch_start = 0.0, None
            run.trained_epoch = {"train_losses": train_losses, "seconds": seconds}
        try:
            improved = end_of_epoch(run, run.trained_epoch["train_losses"], run.trained_epoch["seconds"], run_dir,
                                    writer)
        except EvaluationStopped:
            save_and_stop_if_asked(run, run_dir)
            raise
        if not improved and run.cfg.scheduler == "plateau":
            run.lr_scale *= 0.5  # ReduceLROnPlateau with patience 0 and factor 0.5, on the dev overall score
        run.epoch, run.trained_epoch = run.epoch + 1, None
        run.save(os.path.join(run_dir, "last.pt"))
        if on_epoch is not None:
            on_epoch(run.epoch, run.history[-1]["dev"])
        if run.cfg.patience is not None and run.stale_epochs >= run.cfg.patience:
            print(f"early stop: no better dev score for {run.stale_epochs} epochs", flush=True)
            break
        save_and_stop_if_asked(run, run_dir)  # a signal during the evaluation
    return run.history[run.best_epoch]["dev"] if run.history else {}


def end_of_epoch(run: Run, train_losses: dict, epoch_seconds: float, run_dir: str, writer) -> bool:
    """Evaluate the epoch's weights on dev, keep them as best.pt if better, record. Returns whether they were."""
    cfg = run.cfg
    began = time.perf_counter()
    metrics, predictions = run_evaluation(run.evaluated_model, run.data["dev"], run.device, run.amp_context,
                                          cfg.eval_batch_size, cfg.sst_loss, run.ranks,
                                          stop_requested=lambda: run.ranks.any(run.stop_signal is not None))
    evaluation_seconds = time.perf_counter() - began
    score = metrics["overall"]
    improved = score > run.best_score
    if improved:
        run.best_score, run.best_epoch, run.stale_epochs = score, run.epoch, 0
        if run.ranks.main:
            atomic_save({"model": run.evaluated_model.state_dict(), "config": cfg.__dict__, "epoch": run.epoch,
                         "metrics": metrics}, os.path.join(run_dir, "best.pt"))
        run.best_dev_predictions = predictions  # reused for the prediction files: no second dev pass
    else:
        run.stale_epochs += 1
    record_epoch(run, train_losses, metrics, predictions, improved, epoch_seconds, evaluation_seconds, run_dir, writer)
    return improved


def record_epoch(run: Run, train_losses: dict, metrics: dict, predictions: dict, improved: bool, epoch_seconds: float,
                 evaluation_seconds: float, run_dir: str, writer):
    """An evaluated epoch in the run's history (metrics.json), TensorBoard (with confusion matrices) and a line."""
    diagnostics = run.diagnostics.end_epoch()  # means over the epoch's logged steps
    run.history.append({"epoch": run.epoch + 1, "step": run.step, "train_loss": train_losses,
                        "dev": metrics, "seconds": round(epoch_seconds, 1),
                        "evaluation_seconds": round(evaluation_seconds, 1), "best": improved,
                        "diagnostics": diagnostics, "skipped_steps": run.skipped_steps,
                        **({"missed_refreshes": run.missed_refreshes} if isinstance(run.optimizer, Sophia) else {})})
    if run.ranks.main:
        atomic_write_json(run.history, os.path.join(run_dir, "metrics.json"))
    for task, values in metrics.items():
        if task == "overall":
            writer.add_scalar("dev/overall", values, run.step)
            continue
        for name, value in values.items():
            writer.add_scalar(f"dev/{task}_{name}", value, run.step)
    for task, p in predictions.items():
        spec = TASKS[task]
        if spec.num_classes is not None and run.ranks.main:
            matrix = confusion_matrix(p.values, run.data["dev"][task].labels.numpy(), spec.num_classes)
            writer.add_text(f"confusion/{task}", confusion_markdown(matrix), run.step)
            writer.add_figure(f"confusion/{task}", plots.confusion_figure(
                matrix, f"{task} dev, epoch {run.epoch + 1}: true vs predicted"), run.step)  # closes the figure
    print(f"epoch {run.epoch + 1}/{run.cfg.epochs} ({epoch_seconds:.0f} s): "
          + ", ".join(f"{t} loss {v:.4f}" for t, v in train_losses.items())
          + f" | dev {format_metrics(metrics)}" + (" (best)" if improved else "")
          + (" | logged-step means: " + ", ".join(f"{tag.split('/', 1)[1]} {value:.4g}"
                                                  for tag, value in diagnostics.items()) if diagnostics else ""),
          flush=True)


def train_epoch(run: Run, writer, run_dir: str) -> dict[str, float]:
    """The current epoch's remaining steps (all `run.num_batches` of a new one; a resumed epoch goes on
    from its saved position). Saves last.pt every --checkpoint_every steps and stops (`Preempted`)
    when a signal asked it to. Returns the mean training loss per task."""
    cfg = run.cfg
    run.model.train()
    apply_trainable(run.model, cfg, run.epoch)
    if run.schedule is None:
        run.schedule = epoch_task_schedule(cfg.task_scheduler, run.sizes, run.num_batches, run.schedule_generator,
                                           run.epoch, cfg.epochs)
        run.position, run.epoch_losses = 0, {}
    window_tokens, window_start = 0, time.perf_counter()
    # disable=None: a live bar on a terminal, none in log files of sweep scripts
    bar = tqdm(run.schedule[run.position:], desc=f"epoch {run.epoch + 1}/{cfg.epochs}", initial=run.position,
               total=len(run.schedule), dynamic_ncols=True, leave=False, disable=None)
    for task in bar:
        losses, tokens = advance(run, task)
        run.profiler.step()
        run.position += 1
        window_tokens += tokens
        for name, loss in losses.items():
            total, count = run.epoch_losses.get(name, (0.0, 0))
            run.epoch_losses[name] = (total + loss, count + 1)
        if run.step % cfg.log_every == 0:
            log_step(run, writer, bar, losses, window_tokens / (time.perf_counter() - window_start))
            window_tokens, window_start = 0, time.perf_counter()
        save_and_stop_if_asked(run, run_dir)
        if training_ends(run, run_dir):
            break
        if cfg.checkpoint_every is not None and run.step % cfg.checkpoint_every == 0 \
                and run.position < len(run.schedule):  # the epoch's end saves anyway
            run.save(os.path.join(run_dir, "last.pt"))
    bar.close()
    losses = {task: float(total) / count for task, (total, count) in run.epoch_losses.items() if count}
    run.schedule, run.epoch_losses = None, {}
    return losses


def log_step(run: Run, writer, bar, losses: dict[str, torch.Tensor], rate: float):
    """A logged step (every --log_every): its losses, learning rate, tokens per second, skipped steps and
    the techniques' diagnostics to TensorBoard, and to the bar (or, without a terminal, one line)."""
    values = {name: float(loss) for name, loss in losses.items()}
    for name, value in values.items():
        writer.add_scalar(f"train_loss/{name}", value, run.step)
    writer.add_scalar("lr", run.optimizer.param_groups[0]["lr"], run.step)
    writer.add_scalar("tokens_per_s", rate, run.step)
    writer.add_scalar("train/skipped_steps", run.skipped_steps, run.step)
    if isinstance(run.optimizer, Sophia):
        writer.add_scalar("technique/sophia_missed_refreshes", run.missed_refreshes, run.step)
    for tag, value in run.diagnostics.end_step().items():
        writer.add_scalar(tag, value, run.step)
    bar.set_postfix({**{n: f"{v:.3f}" for n, v in values.items()}, "tok/s": f"{rate:.0f}"})
    if bar.disable:  # no terminal (a sweep's log file): a plain line instead of the bar
        print(f"  step {run.step}: " + ", ".join(f"{n} loss {v:.3f}" for n, v in values.items())
              + f", {rate:.0f} tok/s", flush=True)


def training_ends(run: Run, run_dir: str) -> bool:
    """Whether training ends after this step, before its planned count: at --stop_at_step, or when a
    --time_budget run has reached its deadline (every rank decides together). A deadline stop becomes
    the run's stop_at_step, written to config.json, so that the run can be repeated exactly."""
    if reached_stop_at_step(run):
        return True
    if run.deadline is None or not run.ranks.any(past_deadline(run)) or run.step >= run.total_steps:
        return False
    run.cfg = dataclasses.replace(run.cfg, stop_at_step=run.step)
    if run.ranks.main:
        atomic_write_json(run.cfg.__dict__, os.path.join(run_dir, "config.json"))
    print(f"time_budget: training stopped at the budget's deadline, at step {run.step} of {run.total_steps}, to leave "
          f"time for the evaluation and predictions (the same run: --num_batches_per_epoch {run.num_batches} "
          f"--stop_at_step {run.step} --time_budget none)", flush=True)
    return True


def past_deadline(run: Run) -> bool:
    return time.perf_counter() > run.deadline


def reached_stop_at_step(run: Run) -> bool:
    return run.cfg.stop_at_step is not None and run.step >= run.cfg.stop_at_step


def advance(run: Run, task: str) -> tuple[dict[str, torch.Tensor], int]:
    """One scheduled step of the loop on `task`: learning rate, diagnostics if this step is logged
    (every --log_every steps), the optimiser step, the step count. Returns train_step's result."""
    trains_all = task == ALL_TASKS or run.cfg.projection != "none"  # a surgery step needs every task's gradient
    set_learning_rate(run, ALL_TASKS if trains_all else task)
    run.diagnostics.active = (run.step + 1) % run.cfg.log_every == 0
    result = train_step(run, list(run.sizes) if trains_all else [task])
    run.step += 1
    return result


def set_learning_rate(run: Run, task: str):
    """This step's learning rates (schedule x peak) and weight decays: the shared encoder takes the
    trained task's --task_settings (ALL_TASKS: the run's own), a task's own groups keep theirs."""
    scale = lr_multiplier(run.step, run.total_steps, run.warmup_steps, run.cfg.scheduler) * run.lr_scale
    for group in run.optimizer.param_groups:
        if "by_task" in group:
            group["peak_lr"], group["weight_decay"] = group["by_task"][task]
        group["lr"] = group["peak_lr"] * scale


def train_step(run: Run, tasks: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on one batch of each task in `tasks`. Returns (detached losses, tokens).

    Each task's batch passes in micro-batches, the techniques' terms in its loss; with gradient surgery its
    gradient of the shared encoder is set aside, and the combination replaces them before the step. The
    gradients, summed over ranks, are unscaled and clipped; a non-finite loss or gradient skips the step;
    else the optimiser steps, Sophia's curvature is refreshed when due, and the averages take the step in."""
    hessian = run.curvature.for_step(run.step)
    run.surgery.begin(run.model)
    losses, tokens = {}, 0
    for task in tasks:
        losses[task], task_tokens = task_backward(run, task, hessian)
        tokens += task_tokens
        run.surgery.set_aside(run.ranks)
    # The rest (all of it without surgery) summed over ranks once, after every micro-batch of the step.
    run.ranks.sum_gradients(run.surgery.others(run.model))
    run.surgery.combine(tasks)
    grad_norm = unscale_and_clip(run)
    # One synchronisation per step, as GradScaler's own check: a non-finite loss or gradient skips the step.
    if not bool(torch.isfinite(torch.stack([grad_norm.float(), *losses.values()])).all()):
        hessian.missed()
        skip_step(run, losses)
        return {}, tokens
    run.skipped_in_a_row = 0
    run.scaler.step(run.optimizer)
    hessian.apply()
    run.curvature.record(run.diagnostics)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.update_averages()
    return losses, tokens


def task_backward(run: Run, task: str, hessian: HessianEstimate) -> tuple[torch.Tensor, int]:
    """One task's batch of the step: each micro-batch's forward and backward, curvature estimated when due.
    Returns (the global batch's loss, the tokens this rank trained)."""
    indices = next(run.iterators[task])  # under torchrun: the global batch, of which this rank trains a slice
    kind = output_kind(run.train_sets[task].spec, run.cfg.sst_loss)
    total, tokens = torch.zeros((), device=run.device), 0
    with hessian.forward_context():
        for loss, logits, share, n_tokens in micro_batch_losses(run, task, run.ranks.shard(indices), len(indices),
                                                                hessian.amp_context):
            hessian.backward(loss, logits, kind, share)
            total += loss.detach().float()
            tokens += n_tokens
    return run.ranks.sum_value(total), tokens


def micro_batch_losses(run: Run, task: str, indices: list[int], batch_size: int | None = None,
                       amp_context: Callable | None = None):
    """Yield (loss, logits, share, n_tokens) for each micro-batch of `indices`, one task's batch or (under
    torchrun) this rank's slice of a global batch of `batch_size` rows; each loss is already weighted by
    its share of that batch, so summing their gradients (over ranks too) gives the gradient of the whole
    batch's mean. `amp_context`: the autocast to run in (default: the run's)."""
    dataset = run.train_sets[task]
    batch_size = batch_size or len(indices)
    for chunk in split_batch(indices, run.cfg.micro_batch_size(task)):
        batch = to_device(dataset.collate(chunk), run.device)
        with (amp_context or run.amp_context)():
            clean = run.clean_forward(task, batch)
            loss = task_loss(dataset.spec, clean.logits, batch["labels"], run.cfg.sst_loss, run.class_weights[task],
                             run.label_smoothing[task])
            loss = run.rdrop(loss, task, clean)
            loss = run.regularize(loss, task, clean)
        share = len(chunk) / batch_size
        yield loss * share, clean.logits, share, sum(dataset.lengths[i] for i in chunk)


def unscale_and_clip(run: Run) -> torch.Tensor:
    """The step's gradients unscaled (fp16's GradScaler) and clipped to --clip; returns their norm before
    clipping (recorded on logged steps)."""
    run.scaler.unscale_(run.optimizer)  # clip on true gradients
    with_grad = [p for p in run.model.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(with_grad, run.cfg.clip) if run.cfg.clip is not None
                 else torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
    if run.diagnostics.active:
        run.diagnostics.add("train/grad_norm", grad_norm)
    return grad_norm


def skip_step(run: Run, losses: dict[str, torch.Tensor]):
    """A step with a non-finite loss or gradient: no update (optimiser, Hessian, momentum copy), the
    GradScaler still backs off, the step is counted and reported; too many in a row stop the run
    before anything is saved, so the last checkpoint stays the last good one."""
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.diagnostics.step = {}  # this step's values are not finite either
    run.skipped_steps += 1
    run.skipped_in_a_row += 1
    shown = ", ".join(f"{task} loss {float(loss):.4g}" for task, loss in losses.items())
    print(f"step {run.step + 1}: skipped, non-finite loss or gradient ({shown}); {run.skipped_in_a_row} in a row, "
          f"{run.skipped_steps} in all", flush=True)
    if run.skipped_in_a_row >= run.cfg.max_bad_steps:
        raise NonFiniteTraining(f"{run.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                f"(--max_bad_steps {run.cfg.max_bad_steps}); stopped without saving, so the "
                                f"run folder's last.pt is its last good state. Lower --lr or use --amp none.")


class NonFiniteTraining(RuntimeError):
    """--max_bad_steps steps in a row had a non-finite loss or gradient: the run stops (exit status 3)."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived: the run saved last.pt after its current step and stops (exit status 75)."""


@contextlib.contextmanager
def stop_on_signals(run: Run):
    """While training: SIGTERM and SIGUSR1 (how SLURM and most schedulers stop a job, or warn that they
    will) ask the run to finish its current step, save and stop; the previous handlers come back after."""
    def request_stop(signum, frame):
        run.stop_signal = signal.Signals(signum).name
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_and_stop_if_asked(run: Run, run_dir: str):
    if run.ranks.any(run.stop_signal is not None):  # all ranks stop at the same step
        run.stop_signal = run.stop_signal or "a signal to another rank"
        run.save(os.path.join(run_dir, "last.pt"))
        raise Preempted(f"{run.stop_signal}: saved {os.path.join(run_dir, 'last.pt')} at step {run.step}; continue "
                        f"with: python multitask_classifier.py --resume {run_dir}")


def write_best_predictions(run: Run, run_dir: str) -> dict:
    """Dev and test predictions of the best checkpoint, in the course's format; returns its dev metrics.
    Records how long it took in `run.prediction_seconds`."""
    began = time.perf_counter()
    best = load_checkpoint(os.path.join(run_dir, "best.pt"))
    run.model.load_state_dict(best["model"])
    dev_predictions = getattr(run, "best_dev_predictions", None)
    if dev_predictions is None:  # the best epoch was before a --resume: evaluate it again
        _, dev_predictions = run_evaluation(run.model, run.data["dev"], run.device, run.amp_context,
                                            run.cfg.eval_batch_size, run.cfg.sst_loss, run.ranks)
    _, test_predictions = run_evaluation(run.model, run.data["test"], run.device, run.amp_context,
                                         run.cfg.eval_batch_size, run.cfg.sst_loss, run.ranks)
    folder = run.cfg.predictions_dir or os.path.join(run_dir, "predictions")
    if run.ranks.main:
        write_all_predictions({"dev": dev_predictions, "test": test_predictions}, folder, run.cfg)
    print(f"predictions: {folder}", flush=True)
    run.prediction_seconds = time.perf_counter() - began
    return best["metrics"]
