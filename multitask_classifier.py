"""Multitask BERT fine-tuning: one encoder, one head per task, trained jointly.

    python multitask_classifier.py [--flags]        (--help lists every flag, from config.TrainConfig)

The story of a run, top to bottom: `main` parses the flags; `train_in` loads the data (pipeline.py), builds
the model (model.py), fits the steps to a --time_budget (budget.py), makes the run folder (rundir.py),
trains (`fit`, train.py, over the state of state.py with the techniques of techniques.py), writes the best
checkpoint's predictions and the summary. The other options follow: --option test, individual_pretrain,
ensemble (ensemble.py). Each technique is chosen once, up front, not tested for at every step.
"""
import datetime
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.tensorboard import SummaryWriter

import ensemble
from budget import fit_to_time_budget
from config import TrainConfig
from distributed import Distributed, exit_process, init_distributed
from errors import InputError
from flags import parse_args
from hardware import autocast, pick_device, resolve_amp
from model import MultitaskBERT, apply_trainable, build_model, compile_encoder
from pipeline import check_positions, load_datasets, steps_per_epoch
from predict import format_metrics, run_evaluation, write_all_predictions
from profiler import StepProfiler, check_profile_window
from rundir import (RunDirLocks, atomic_save, atomic_write_json, check_run_dir, checkpoint_path, claim_folders,
                    claim_predictions_dir, load_checkpoint, load_weights, new_run_dir, prepare_run_dir, resumed_config)
from state import Run
from tokenizer import BertTokenizer
from train import NonFiniteTraining, Preempted, fit, stop_on_signals, write_best_predictions


def main(argv: list[str] | None = None) -> dict:
    """The command line's work: parse the flags, then train (or test, or ensemble)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.option == "ensemble":
        with RunDirLocks() as folders:  # the ensemble's folder is a run folder too: never over a run
            claim_predictions_dir(folders, cfg.predictions_dir)
            if cfg.save_path:
                check_run_dir(cfg.save_path)
                folders.hold(cfg.save_path)
                return ensemble.run(cfg, cfg.save_path)
            out_dir = new_run_dir(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "ensemble")
            folders.hold(out_dir, new=True)
            return ensemble.run(cfg, out_dir)
    return train(cfg, command=" ".join([sys.executable, *sys.argv[:1], *argv]))


def train(cfg: TrainConfig, on_epoch: Callable[[int, dict], None] | None = None, command: str = "") -> dict:
    """One run from a config: data, model, training, predictions; returns the best epoch's dev metrics.

    on_epoch(epoch, dev_metrics) is called after each epoch's evaluation and checkpoint (hpo.py reports
    the score there and may raise optuna.TrialPruned: the run then stops with its folder intact).
    command: what run.json records as the command (hpo.py gives the equivalent --config command).
    The run's folder is this process's alone while it runs (RunDirLocks)."""
    with RunDirLocks() as folders:
        return train_in(folders, cfg, on_epoch, command)


def train_in(folders: RunDirLocks, cfg: TrainConfig, on_epoch: Callable[[int, dict], None] | None,
             command: str) -> dict:
    """`train`, holding the run folder in `folders` from before the data load to the end."""
    start = time.perf_counter()  # wall time from here: data, model, training, predictions
    if cfg.resume:
        cfg = resumed_config(cfg)
    ranks, device_name = init_distributed(cfg.device)  # one process unless started by torchrun
    device = pick_device(device_name)
    if cfg.option == "test":
        if not ranks.main:
            return {}
        claim_predictions_dir(folders, cfg.predictions_dir)
        return test_checkpoint(cfg, device)
    if ranks.world > 1 and cfg.option == "individual_pretrain":
        raise InputError("--option individual_pretrain runs in one process (its heads train in seconds)")
    amp = resolve_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    ranks.on_main(lambda: claim_folders(folders, cfg))  # before the data and the model are loaded

    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    print("data: " + ", ".join(f"{task} {len(ds)} train / {len(data['dev'][task])} dev / "
                               f"{len(data['test'][task])} test" for task, ds in data["train"].items()), flush=True)
    model = starting_model(cfg, data, device, ranks)
    calibration = None
    if cfg.time_budget is not None and not cfg.resume:  # a resumed run keeps the count it chose
        cfg, calibration = fit_to_time_budget(cfg, model, data, device, amp, ranks, start)
    if cfg.profile:
        check_profile_window(cfg, steps_per_epoch(cfg, data["train"]))  # before the folder is made
    run_dir = ranks.on_main(lambda: folders.hold(prepare_run_dir(cfg, command, calibration)))  # the default one, new
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if ranks.main else NullWriter()
    if cfg.option == "individual_pretrain":
        return individual_pretrain(cfg, model, data, device, amp, run_dir, writer, start)

    run = Run(cfg, model, data, device, amp, ranks)
    run.process_start = start
    if calibration is not None:
        run.deadline = start + calibration["deadline_s"]
    if cfg.resume:
        run.load_state_dict(load_checkpoint(os.path.join(run_dir, "last.pt")))
        print(f"resuming {run_dir} at epoch {run.epoch + 1}, step {run.step}", flush=True)
    if cfg.compile:
        compile_encoder(model)
    print(f"run: {run_dir} | device {device}" + (f" x {ranks.world} processes" if ranks.world > 1 else "")
          + f", amp {amp}, {run.num_batches} steps/epoch x {cfg.epochs} epochs, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters", flush=True)
    if cfg.profile:
        check_profile_window(cfg, run.num_batches, run.position, run.step)  # a resumed run's place is known now
    if cfg.profile and ranks.main:
        run.profiler = StepProfiler(cfg.profile, run_dir, writer, device)

    with writer, stop_on_signals(run), run.profiler:
        fit(run, run_dir, writer, on_epoch)
        best_metrics = write_best_predictions(run, run_dir)
        writer.add_hparams({k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, bool))},
                           {"hparam/overall": best_metrics["overall"]}, run_name="hparams")
    seconds = time.perf_counter() - start
    if ranks.main:
        write_summary(run, run_dir, best_metrics, seconds)
    print(f"best epoch {run.best_epoch + 1}: dev {format_metrics(best_metrics)} "
          f"({run.seconds_before + seconds:.0f} s)", flush=True)
    return best_metrics


def starting_model(cfg: TrainConfig, data: dict, device: torch.device, ranks: Distributed) -> MultitaskBERT:
    """The model a run starts from (--bert_path's weights, or --pretrained_model_name's checkpoint), checked
    against the data's longest rows, its first epoch's parts trainable, on `device`. Under torchrun every
    rank builds the same model, then seeds its own dropout."""
    model = build_model(cfg)
    check_positions(data, model, cfg.max_length)
    if cfg.pretrained_model_name:
        path = checkpoint_path(cfg.pretrained_model_name)
        load_weights(model, load_checkpoint(path)["model"], path)
    apply_trainable(model, cfg, epoch=0)
    model.to(device)
    if ranks.world > 1:
        torch.manual_seed(cfg.seed + 1000 * ranks.rank)  # the same model everywhere, each rank its own dropout
    return model


def write_summary(run: Run, run_dir: str, best_metrics: dict, seconds: float):
    """summary.json: the best epoch and its dev metrics, and where the wall time went: training steps, dev
    evaluations, the final predictions, the rest (start-up, data, checkpoints) by difference; after a
    --resume the earlier processes' time up to their last checkpoint is counted in (what they did after it
    is done again here)."""
    parts = {"training_seconds": sum(h["seconds"] for h in run.history),
             "evaluation_seconds": sum(h.get("evaluation_seconds", 0) for h in run.history),
             "prediction_seconds": run.prediction_seconds}
    atomic_write_json({"best_epoch": run.best_epoch + 1, "dev": best_metrics,
                       "wall_seconds": round(run.seconds_before + seconds, 1),
                       **{k: round(v, 1) for k, v in parts.items()}, "steps": run.step, "processes": run.ranks.world},
                      os.path.join(run_dir, "summary.json"))


def test_checkpoint(cfg: TrainConfig, device: torch.device) -> dict:
    """--option test: evaluate a checkpoint on dev and write its dev and test predictions."""
    path = checkpoint_path(cfg.pretrained_model_name)
    checkpoint = load_checkpoint(path)
    # The model is rebuilt as it was trained; data location and evaluation settings come from this command.
    overrides = {k: getattr(cfg, k) for k in ("data_dir", "max_dev_examples", "device", "amp", "eval_batch_size",
                                              "eval_both_orders", "predictions_dir")}
    trained = TrainConfig.from_saved(checkpoint["config"], **overrides, option="test",
                                     pretrained_model_name=cfg.pretrained_model_name, resume=None, save_path=None)
    amp = resolve_amp(trained.amp, device)
    data = load_datasets(trained, BertTokenizer.from_pretrained(trained.bert_path), splits=("dev", "test"))
    model = build_model(trained).to(device)
    load_weights(model, checkpoint["model"], path)
    check_positions(data, model, trained.max_length)
    amp_context = lambda: autocast(amp, device)  # noqa: E731
    metrics, dev_predictions = run_evaluation(model, data["dev"], device, amp_context, trained.eval_batch_size,
                                              trained.sst_loss)
    _, test_predictions = run_evaluation(model, data["test"], device, amp_context, trained.eval_batch_size,
                                         trained.sst_loss)
    folder = cfg.predictions_dir or os.path.join(os.path.dirname(path), "predictions")
    write_all_predictions({"dev": dev_predictions, "test": test_predictions}, folder, trained)
    print(f"dev {format_metrics(metrics)}\npredictions: {folder}", flush=True)
    return metrics


def individual_pretrain(cfg: TrainConfig, model: MultitaskBERT, data: dict, device, amp: str, run_dir: str,
                        writer, start: float) -> dict:
    """--option individual_pretrain: each task's head trained alone on the frozen encoder (in
    <run>/<task>/), its best epoch's head kept; the assembled model is saved as <run>/best.pt and
    predicts. No last.pt: each head trains in seconds, so there is nothing to resume; summary.json as
    any run. Returns the assembled model's dev metrics."""
    for task in cfg.task_names:
        task_dir = os.path.join(run_dir, task)
        os.makedirs(task_dir, exist_ok=True)
        task_run = Run(cfg.single_task(task), model,
                       {split: {task: by_task[task]} for split, by_task in data.items()}, device, amp)
        print(f"individual_pretrain: {task}", flush=True)
        fit(task_run, task_dir, writer)
        best = load_checkpoint(os.path.join(task_dir, "best.pt"))
        prefix = f"heads.{task}."
        model.heads[task].load_state_dict({k[len(prefix):]: v for k, v in best["model"].items()
                                           if k.startswith(prefix)})
        os.remove(os.path.join(task_dir, "last.pt"))  # nothing resumes a head's run; its optimiser state is large
    run = Run(cfg, model, data, device, amp)
    metrics, run.best_dev_predictions = run_evaluation(model, data["dev"], device, run.amp_context,
                                                       cfg.eval_batch_size, cfg.sst_loss)
    atomic_save({"model": model.state_dict(), "config": cfg.__dict__, "epoch": None, "metrics": metrics},
                os.path.join(run_dir, "best.pt"))
    atomic_write_json([{"dev": metrics}], os.path.join(run_dir, "metrics.json"))
    best_metrics = write_best_predictions(run, run_dir)
    writer.close()
    seconds = time.perf_counter() - start
    atomic_write_json({"best_epoch": None, "dev": best_metrics, "wall_seconds": round(seconds, 1),
                       "option": "individual_pretrain"}, os.path.join(run_dir, "summary.json"))
    print(f"individual_pretrain: dev {format_metrics(best_metrics)} ({seconds:.0f} s)")
    return best_metrics


class NullWriter:
    """The TensorBoard writer of ranks other than 0 under torchrun: rank 0 alone logs."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cli() -> int:
    """The command line: `main()`, with an input error (a data file, a model folder, a checkpoint or
    run folder) printed as one `error: ...` line on stderr, no traceback, and exit status 2; a run
    stopped by --max_bad_steps likewise, with exit status 3; a run stopped by SIGTERM or SIGUSR1 after
    saving prints how to resume and exits with status 75 (EX_TEMPFAIL). Under torchrun the process
    ends here with that status (`exit_process`), once every rank is done."""
    code = 0
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except NonFiniteTraining as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 3
    except Preempted as e:
        print(f"stopped by {e}", flush=True)
        code = 75  # EX_TEMPFAIL: try again later, here with --resume
    exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(cli())
