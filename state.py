"""What a training run owns and saves: `Run` holds the model, optimiser, scaler, data streams, generators,
the techniques chosen for it and its progress, and writes and reads them as last.pt (the checkpoint
format an exact --resume needs); `build_optimizer` makes its optimiser's parameter groups.
"""
import copy
import math
import time

import torch

from config import TrainConfig
from datasets import TaskBatchIterator
from distributed import Distributed
from errors import InputError
from hardware import autocast
from model import MultitaskBERT, inverse_frequency_weights, parameter_owner
from optimizer import build_optimizer as make_optimizer
from optimizer import layer_lr_factor, optimizer_param_groups, update_weight_average
from pcgrad import GradVac
from pipeline import steps_per_epoch
from profiler import NullProfiler
from rundir import atomic_save
from smart import ema_update
from tasks import ALL_TASKS
from techniques import (CleanPass, Diagnostics, clean_forward, make_curvature, make_rdrop, make_regularizer,
                        make_rng_snapshot, make_surgery)


# The fp16 GradScaler's first factor. torch's default, 2^16, overflowed fp16 on 3 of the first 4 steps of
# MiniLM with SMART and R-Drop and on all 4 with Sophia-H (the STS loss's gradient is large); from 2^12
# down none overflowed (tests/test_fp16.py). The scaler doubles it after 2000 good steps and halves it on
# an overflow, as usual.
FP16_INIT_SCALE = 2.0 ** 10


def build_optimizer(cfg: TrainConfig, model: MultitaskBERT) -> torch.optim.Optimizer:
    """AdamW or Sophia over parameter groups by owner (the shared encoder, each task's head, each task's
    separate encoder) and by decay (none on biases and norms). A task's own groups keep its settings
    (--task_settings: head_lr, lr for a separate encoder, weight_decay); the shared encoder's groups
    carry every task's (lr, weight_decay) in `by_task`, and `set_learning_rate` applies the trained
    task's at each step. --layer_lr_decay splits an encoder's groups by depth and scales all of these
    learning rates by the depth's factor (`lr_factor`). Every parameter is in the optimiser: frozen
    ones get no gradient and are skipped, so unfreezing later needs no new optimiser."""
    num_layers = len(next(iter(model.encoders())).encoder.layer)
    buckets: dict[tuple[str | None, str, float], list] = {}
    for name, p in model.named_parameters():
        task, role = parameter_owner(model, name)
        factor = layer_lr_factor(name, num_layers, cfg.layer_lr_decay) if role == "encoder" else 1.0
        buckets.setdefault((task, role, factor), []).append((name, p))
    groups = []
    for (task, role, factor), named in buckets.items():
        own = cfg.settings_for(task) if task is not None else None
        lr = cfg.peak_lr if task is None else own.head_lr if role == "head" else own.lr
        weight_decay = cfg.weight_decay if task is None else own.weight_decay
        for group in optimizer_param_groups(named, weight_decay, lr * factor):
            group["task"], group["role"], group["lr_factor"], group["peak_lr"] = task, role, factor, group["lr"]
            if task is None:  # [lr, weight_decay] on each task's steps; ALL_TASKS: the run's own
                decays = group["weight_decay"] > 0
                group["by_task"] = {name: [cfg.settings_for(name).lr * factor,
                                           cfg.settings_for(name).weight_decay * decays] for name in cfg.task_names}
                group["by_task"][ALL_TASKS] = [cfg.peak_lr * factor, cfg.weight_decay * decays]
            groups.append(group)
    return make_optimizer(cfg.optimizer, groups, lr=cfg.peak_lr, betas=cfg.betas, eps=cfg.optimizer_eps,
                          weight_decay=cfg.weight_decay, rho=cfg.sophia_rho)


class Run:
    """Everything a training run owns: model, optimiser, data streams, generators and progress.

    All randomness comes from generators seeded here (plus torch's global RNG for dropout), and all of
    it is saved in `last.pt`, so `--resume` continues exactly where an interrupted run stopped.
    """

    def __init__(self, cfg: TrainConfig, model: MultitaskBERT, data: dict, device: torch.device, amp: str,
                 ranks: Distributed = Distributed()):
        self.cfg, self.model, self.data, self.device, self.amp, self.ranks = cfg, model, data, device, amp, ranks
        self.train_sets = data["train"]
        self.sizes = {name: ds.num_sources for name, ds in self.train_sets.items()}  # rows before augmentation
        # One generator per purpose: the schedule, each task's batch order, the surgery order (the same
        # on every rank), and the techniques' draws (SMART's noise, Sophia's probes: each rank its own).
        # Under torchrun every rank draws the same global batches of world * batch_size and trains its slice.
        self.schedule_generator = torch.Generator().manual_seed(cfg.seed)
        # (on the run's device: SMART's noise and Sophia's probes are drawn where they are used, not copied there)
        self.technique_generator = torch.Generator(device).manual_seed(cfg.seed + 1 + 1000 * ranks.rank)
        self.surgery_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.iterators = {
            name: TaskBatchIterator(ds.lengths, cfg.batch_size * ranks.world,
                                    torch.Generator().manual_seed(cfg.seed + 2 + k))
            for k, (name, ds) in enumerate(self.train_sets.items())}
        self.num_batches = steps_per_epoch(cfg, self.train_sets)
        self.total_steps = self.num_batches * cfg.epochs
        self.warmup_steps = int(cfg.warmup_ratio * self.total_steps)
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE, enabled=(amp == "fp16"))
        self.class_weights = {
            name: (inverse_frequency_weights(ds.spec, ds.labels).to(device)
                   if cfg.class_weights and ds.spec.kind != "regression" else None)
            for name, ds in self.train_sets.items()}
        self.label_smoothing = {name: cfg.settings_for(name).label_smoothing for name in self.train_sets}
        # Techniques, chosen once here rather than tested for in every step.
        self.ema_model = (copy.deepcopy(model).requires_grad_(False).eval()
                          if cfg.smart and cfg.smart_bregman_weight > 0 else None)
        # --ema_decay: a moving average of the weights is what each epoch evaluates, best.pt keeps and the
        # predictions use; the optimiser trains the raw weights (`self.model`) throughout.
        self.average_model = (copy.deepcopy(model).requires_grad_(False).eval()
                              if cfg.ema_decay is not None else None)
        self.evaluated_model = self.average_model if self.average_model is not None else model
        self.diagnostics = Diagnostics()
        self.regularize = make_regularizer(cfg, model, self.ema_model, self.technique_generator, self.diagnostics,
                                           self.scaler.scale)
        self.rdrop = make_rdrop(cfg, model, self.class_weights, self.label_smoothing, self.diagnostics,
                                self.scaler.scale)
        self.rng_snapshot = make_rng_snapshot(cfg, device)
        self.gradvac = GradVac(list(self.sizes), cfg.gradvac_beta, cfg.pcgrad_reduction) \
            if cfg.projection == "gradvac" else None
        self.surgery = make_surgery(cfg, self.gradvac, self.surgery_generator, self.diagnostics)
        self.curvature = make_curvature(cfg, self.optimizer, self.scaler, self.technique_generator, ranks, amp,
                                        self.amp_context)
        # Progress, saved with every checkpoint.
        self.epoch = 0            # next epoch to run (0-based)
        self.step = 0             # optimiser steps taken
        self.deadline = None      # --time_budget: time.perf_counter() by which training must stop
        self.lr_scale = 1.0       # plateau schedule's drops
        self.best_score = -math.inf
        self.best_epoch = -1
        self.stale_epochs = 0
        self.history = []         # one dict per finished epoch
        self.skipped_steps = 0    # steps skipped for a non-finite loss or gradient, in all
        self.skipped_in_a_row = 0
        self.average_updates = 0  # --ema_decay: steps averaged so far
        self.schedule = None      # the current epoch's task per step; None between epochs
        self.position = 0         # steps of the current epoch done
        self.trained_epoch = None  # an epoch trained but not yet evaluated: its train losses and seconds
        self.epoch_losses = {}    # task -> (sum of its step losses, steps) in the current epoch
        # Wall time of the processes before this one (up to their last checkpoint), and the training time
        # of the current epoch spent in them: a resumed run reports the time of the whole run.
        self.seconds_before = 0.0
        self.epoch_seconds_before = 0.0
        self.process_start = time.perf_counter()  # train() sets its own start (not saved)
        self.epoch_start = None   # when this process began the current epoch's steps (not saved)
        self.stop_signal = None   # the name of a signal asking the run to save and stop (not saved)
        self.profiler = NullProfiler()  # --profile: a StepProfiler (not saved)
        self.prediction_seconds = 0.0   # the final predictions' time (not saved)

    def amp_context(self):
        return autocast(self.amp, self.device)

    def clean_forward(self, task: str, batch: dict) -> CleanPass:
        """A micro-batch's training forward, with what SMART needs to replay it (techniques.clean_forward)."""
        return clean_forward(self.model, task, batch, self.rng_snapshot)

    # Sophia's refresh state lives with its technique; the checkpoint keeps it among the progress.
    @property
    def curvature_due(self) -> bool:
        return self.curvature.due

    @curvature_due.setter
    def curvature_due(self, value: bool):
        self.curvature.due = value

    @property
    def missed_refreshes(self) -> int:
        return self.curvature.missed

    @missed_refreshes.setter
    def missed_refreshes(self, value: int):
        self.curvature.missed = value

    def state_dict(self) -> dict:
        now = time.perf_counter()
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iterators": {name: it.state_dict() for name, it in self.iterators.items()},
            "schedule_generator": self.schedule_generator.get_state(),
            "surgery_generator": self.surgery_generator.get_state(),
            # Each rank's own random states (a list over ranks under torchrun, so a resume is exact there too).
            **self._per_rank({"technique_generator": self.technique_generator.get_state(),
                              "torch_rng": torch.get_rng_state(),
                              # the run's own GPU only: a resume may see fewer GPUs than the run did
                              "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                              else None}),
            "world": self.ranks.world,
            "progress": {**{k: getattr(self, k) for k in ("epoch", "step", "lr_scale", "best_score", "best_epoch",
                                                          "stale_epochs", "history", "skipped_steps",
                                                          "skipped_in_a_row", "curvature_due", "missed_refreshes",
                                                          "average_updates", "schedule", "position",
                                                          "trained_epoch")},
                         "seconds_before": self.seconds_before + now - self.process_start,
                         "epoch_seconds_before": self.epoch_seconds_before
                         + (now - self.epoch_start if self.epoch_start is not None else 0.0)},
            # Inside an epoch: its training-loss sums so far and the diagnostics of its logged steps.
            "epoch_losses": {task: [float(total), count] for task, (total, count) in self.epoch_losses.items()},
            "diagnostics_epoch": self.diagnostics.epoch,
            "config": self.cfg.__dict__,
            "ema_model": self.ema_model.state_dict() if self.ema_model is not None else None,
            "average_model": self.average_model.state_dict() if self.average_model is not None else None,
            "gradvac": self.gradvac.state_dict() if self.gradvac is not None else None,
        }

    def update_averages(self):
        """After a step: SMART's momentum teacher (--smart_bregman_weight) and the weights' moving average
        (--ema_decay) take in the step just taken (every parameter, one foreach call: about 5 ms for MiniLM
        on 2 CPU cores, 1-2% of a step)."""
        if self.ema_model is not None:
            ema_update(self.ema_model.parameters(), self.model.parameters(), self.cfg.smart_momentum)
        if self.average_model is not None:
            self.average_updates += 1
            update_weight_average(list(self.average_model.parameters()), list(self.model.parameters()),
                                  self.cfg.ema_decay, self.average_updates)

    def _per_rank(self, states: dict) -> dict:
        return states if self.ranks.world == 1 else {key: self.ranks.gather(value) for key, value in states.items()}

    def save(self, path: str):
        """last.pt: the state gathered from every rank (a collective call), written by rank 0."""
        state = self.state_dict()
        if self.ranks.main:
            atomic_save(state, path)

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for name, it in self.iterators.items():
            try:
                it.load_state_dict(state["iterators"][name])
            except ValueError as e:
                raise InputError(f"--resume: the {name} training rows are not those the run was saved with ({e})") \
                    from None
        if state.get("world", 1) != self.ranks.world:
            raise InputError(f"the checkpoint was written by {state.get('world', 1)} processes; resume it with as "
                             f"many (torchrun --nproc_per_node), not {self.ranks.world}")
        self.schedule_generator.set_state(state["schedule_generator"])
        if "surgery_generator" in state:  # runs saved before it existed drew the surgery order elsewhere
            self.surgery_generator.set_state(state["surgery_generator"])
        own = (lambda value: value[self.ranks.rank]) if self.ranks.world > 1 else (lambda value: value)
        self.technique_generator.set_state(own(state["technique_generator"]))
        torch.set_rng_state(own(state["torch_rng"]))
        cuda_rng = own(state["cuda_rng"])
        if cuda_rng is not None and self.device.type == "cuda":
            if isinstance(cuda_rng, (list, tuple)):  # saved before: every visible GPU's, the run's at its index
                cuda_rng = cuda_rng[min(self.device.index or 0, len(cuda_rng) - 1)]
            torch.cuda.set_rng_state(cuda_rng, self.device)
        if self.ema_model is not None:
            self.ema_model.load_state_dict(state["ema_model"])
        if self.average_model is not None:
            self.average_model.load_state_dict(state["average_model"])
        if self.gradvac is not None:
            self.gradvac.load_state_dict(state["gradvac"])
        for key, value in state["progress"].items():
            setattr(self, key, value)
        self.epoch_losses = {task: tuple(pair) for task, pair in state.get("epoch_losses", {}).items()}
        self.diagnostics.epoch = state.get("diagnostics_epoch", {})
