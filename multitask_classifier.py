"""Multitask BERT fine-tuning: one encoder, one head per task, trained jointly.

    python multitask_classifier.py [--flags]        (--help lists every flag, from config.TrainConfig)

Read `main()` top to bottom: settings -> data -> model -> optimiser -> training loop -> predictions.
Each technique lives in its own module and is chosen once, up front, not tested for at every step.
"""
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import augment
import ensemble
import plots
from bert import BertModel, cpu_native_bf16
from config import TrainConfig
from flags import parse_args
from errors import InputError
from distributed import Distributed, exit_process, init_distributed
from datasets import (TaskBatchIterator, TaskDataset, default_num_batches, epoch_task_schedule, load_task_split,
                      sequential_batches, without_longest)
from optimizer import build_optimizer as make_optimizer
from optimizer import layer_lr_factor, optimizer_param_groups, update_weight_average
from optimizer import Sophia, gnb_hessian, hutchinson_hessian, sample_labels
from pcgrad import GradVac, assign_flat_grads, flatten_grads, gradient_cosines, pcgrad
from rdrop import rdrop_loss
from smart import (add_weighted_term, bregman_divergence, ema_update, replaying_rng, rng_state,
                   smart_adversarial_loss)
from evaluation import (EvaluationStopped, TaskPredictions, confusion_matrix, evaluate, overall_score, write_outputs,
                        write_predictions)
from rundir import (RunDirLocks, atomic_path, atomic_save, atomic_write_json, check_run_dir, checkpoint_path,
                    claim_folders, claim_predictions_dir, file_sha256, load_checkpoint, load_weights, new_run_dir,
                    prepare_run_dir, resumed_config)
from tasks import ALL_TASKS, TASKS, TaskSpec
from tokenizer import BertTokenizer


# ----------------------------------------------------------------------------- model

class TaskHead(nn.Module):
    """dropout -> [Linear -> GELU -> dropout] * n_hidden_layers -> Linear(out_dim)."""

    def __init__(self, hidden_size: int, out_dim: int, n_hidden_layers: int, dropout: float):
        super().__init__()
        layers = [nn.Dropout(dropout)]
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden_size, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def head_width(spec: TaskSpec, sst_loss: str = "ce") -> int:
    """Outputs of a task's head: C logits (multiclass; C-1 threshold logits for the ordinal loss),
    one logit (binary), one score (regression)."""
    if spec.kind == "multiclass" and sst_loss == "ordinal":
        return spec.num_classes - 1
    return spec.num_outputs


class MultitaskBERT(nn.Module):
    """The shared encoder and one head per task (or, with separate encoders, one encoder per task).

    `logits(task, batch)` -> (B, C) for multiclass tasks, (B,) for binary and regression tasks.
    Siamese tasks (the cosine STS head) encode both sentences separately and score 5 * cos(u, v).
    `bert`: one BertModel (shared), or a {task: BertModel} dict (nothing shared: `--separate_encoders`).
    `dropout`: the heads' dropout, one value or {task: value}.
    """

    def __init__(self, bert: BertModel | dict[str, BertModel], specs: dict[str, TaskSpec], n_hidden_layers: int,
                 dropout: float | dict[str, float], pooling: str, siamese_tasks: tuple[str, ...] = (),
                 sst_loss: str = "ce"):
        super().__init__()
        self.separate = isinstance(bert, dict)
        # Parameter names: bert.<part> when shared, bert.<task>.<part> when separate (see `encoder_part`).
        self.bert = nn.ModuleDict(bert) if self.separate else bert
        self.specs = specs
        self.pooling = pooling
        self.siamese_tasks = set(siamese_tasks)
        any_encoder = next(iter(self.bert.values())) if self.separate else self.bert
        hidden = any_encoder.config.hidden_size
        dropouts = dropout if isinstance(dropout, dict) else {name: dropout for name in specs}
        self.heads = nn.ModuleDict({
            name: TaskHead(hidden, head_width(spec, sst_loss), n_hidden_layers, dropouts[name])
            for name, spec in specs.items() if name not in self.siamese_tasks})

    def encoder(self, task: str) -> BertModel:
        return self.bert[task] if self.separate else self.bert

    def encoders(self) -> list[BertModel]:
        return list(self.bert.values()) if self.separate else [self.bert]

    def sentence_vector(self, task: str, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) embeddings -> (B, H): the pooler over [CLS], or the masked mean of the last layer."""
        out = self.encoder(task).encode(embeddings, attention_mask, task)
        if self.pooling == "pooler":
            return out["pooler_output"]
        mask = attention_mask.unsqueeze(-1).to(out["last_hidden_state"].dtype)  # (B, T, 1)
        return (out["last_hidden_state"] * mask).sum(1) / mask.sum(1).clamp(min=1)

    def logits_from_embeddings(self, task: str, embeddings: torch.Tensor, attention_mask: torch.Tensor
                               ) -> torch.Tensor:
        """Task logits from the embedding layer's output: the path SMART perturbs."""
        pooled = self.sentence_vector(task, embeddings, attention_mask)
        if task in self.siamese_tasks:
            u, v = pooled.float().chunk(2)  # both sides were stacked along the batch
            return 5.0 * F.cosine_similarity(u, v, dim=-1)
        out = self.heads[task](pooled)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def embed_batch(self, task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B', T, H), attention_mask (B', T)); siamese: both sides stacked, B' = 2B."""
        if task in self.siamese_tasks:
            length = max(batch["input_ids_1"].shape[1], batch["input_ids_2"].shape[1])
            ids = torch.cat([_pad_to(batch["input_ids_1"], length), _pad_to(batch["input_ids_2"], length)])
            types = torch.cat([_pad_to(batch["token_type_ids_1"], length), _pad_to(batch["token_type_ids_2"], length)])
            mask = torch.cat([_pad_to(batch["attention_mask_1"], length), _pad_to(batch["attention_mask_2"], length)])
            return self.encoder(task).embed(ids, types), mask
        return self.encoder(task).embed(batch["input_ids"], batch["token_type_ids"]), batch["attention_mask"]

    def logits(self, task: str, batch: dict) -> torch.Tensor:
        embeddings, mask = self.embed_batch(task, batch)
        return self.logits_from_embeddings(task, embeddings, mask)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]))


# ----------------------------------------------------------------------------- losses and predictions

def ordinal_targets(labels: torch.Tensor, num_thresholds: int) -> torch.Tensor:
    """Class c of C ordered classes -> C-1 binary targets [c > 0, c > 1, ...] (cumulative encoding)."""
    return (labels.unsqueeze(-1) > torch.arange(num_thresholds, device=labels.device)).float()


def task_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, sst_loss: str = "ce",
              class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss of a batch: cross-entropy (multiclass), or cumulative binary cross-entropy over the
    C-1 thresholds (ordinal); binary cross-entropy on one logit (binary); squared error (regression).
    class_weights: (C,) per-class weights for multiclass, (2,) [negative, positive] for binary.
    label_smoothing: eps of Szegedy et al. (2016) for classification: the target is (1 - eps) times
    the label plus eps spread evenly (eps / C on each class; each binary target y becomes
    (1 - eps) y + eps / 2, the ordinal thresholds' too)."""
    logits = logits.float()
    if spec.kind == "regression" and label_smoothing:
        raise ValueError(f"label smoothing applies to classification, not to {spec.name} (regression)")
    if spec.kind == "multiclass" and sst_loss == "ordinal":
        targets = smoothed(ordinal_targets(labels, logits.shape[-1]), label_smoothing)  # (B, C-1)
        per_example = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
        if class_weights is not None:
            per_example = per_example * class_weights[labels]
        return per_example.mean()
    if spec.kind == "multiclass":
        per_example = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
        return (per_example * class_weights[labels]).mean() if class_weights is not None else per_example.mean()
    if spec.kind == "binary":
        per_example = F.binary_cross_entropy_with_logits(logits, smoothed(labels, label_smoothing), reduction="none")
        if class_weights is not None:
            per_example = per_example * class_weights[labels.long()]
        return per_example.mean()
    return F.mse_loss(logits, labels)


def smoothed(targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Binary targets in [0, 1] pulled toward 1/2: (1 - eps) * targets + eps / 2."""
    return targets * (1 - eps) + eps / 2 if eps else targets


def predictions_from_logits(spec: TaskSpec, logits: torch.Tensor, sst_loss: str = "ce") -> torch.Tensor:
    """(B,) predictions: the class index, 0/1, or the score clipped to the label range."""
    if spec.kind == "multiclass" and sst_loss == "ordinal":
        return (logits.float() > 0).sum(-1)  # number of thresholds passed
    if spec.kind == "multiclass":
        return logits.argmax(-1)
    if spec.kind == "binary":
        return (logits.float() > 0).float()
    low, high = spec.label_range
    return logits.float().clamp(low, high)


def outputs_from_logits(spec: TaskSpec, logits: torch.Tensor, sst_loss: str = "ce") -> torch.Tensor:
    """What an ensemble averages: (B, C) class probabilities for classification ((B, 2) for binary),
    the clipped (B,) score for regression. The ordinal head's C-1 threshold probabilities
    P(y > k), made non-increasing, become class probabilities P(y > k-1) - P(y > k)."""
    logits = logits.float()
    if spec.kind == "multiclass" and sst_loss == "ordinal":
        above = torch.sigmoid(logits).cummin(-1).values  # (B, C-1) P(y > k)
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        cumulative = torch.cat([ones, above, zeros], -1)  # (B, C+1)
        return cumulative[:, :-1] - cumulative[:, 1:]
    if spec.kind == "multiclass":
        return logits.softmax(-1)
    if spec.kind == "binary":
        p = torch.sigmoid(logits)
        return torch.stack([1 - p, p], -1)
    return predictions_from_logits(spec, logits)


def inverse_frequency_weights(spec: TaskSpec, labels: torch.Tensor) -> torch.Tensor | None:
    """Class weights n / (C * n_c) for classification tasks (mean weight 1 on the training data)."""
    if spec.kind == "regression":
        return None
    num_classes = spec.num_classes or 2
    counts = torch.bincount(labels.long(), minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


# ----------------------------------------------------------------------------- learning-rate schedule

def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then linear decay to 0,
    half-cosine decay to 0, or constant ("constant" and "plateau"; plateau's drops are applied per epoch)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "plateau"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: a GPU of compute capability 8.0 or later (Ampere on), or a CPU
    with AVX512-BF16/AMX. torch.cuda.is_bf16_supported() is True on a V100 or T4 too, where bf16 is
    emulated; on CPUs without AVX-512 (AVX2 only) bf16 is emulated and about 10-20x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_native_bf16()


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp's precision on `device`: auto is bf16 where it is native, else none (fp32). bf16 asked for
    where it is emulated runs, with one warning. fp16 runs on a CPU too: there it is no faster than fp32,
    it exists so that the GPU's fp16 path (GradScaler, unscaling, skipped steps) can be checked anywhere."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "bf16" and not native_bf16(device):
        what = ("this GPU (compute capability below 8.0)" if device.type == "cuda"
                else "this CPU (no AVX512-BF16 or AMX)")
        print(f"warning: --amp bf16 on {what} is emulated, about 10-20x slower than fp32 on an AVX2-only "
              f"CPU; --amp auto would train in fp32 here", flush=True)
    return amp


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_batch(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


# ----------------------------------------------------------------------------- data

def load_datasets(cfg: TrainConfig, tokenizer: BertTokenizer, splits: tuple[str, ...] = ("train", "dev", "test")
                  ) -> dict[str, dict[str, TaskDataset]]:
    """Every split of every task, validated and tokenised once, before any training time is spent;
    the training rows filtered (--drop_longest) and augmented (--augment) here, and the counts printed.
    `splits`: --option test reads dev and test only (no training file needed, no augmentation made)."""
    data = {split: {} for split in splits}
    limits = {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": None}
    wordnet = augment.WordNet(augment.find_wordnet()) if cfg.augmented_tasks("eda") and "train" in splits else None
    for name in cfg.task_names:
        spec = TASKS[name]
        siamese = encodes_alone(cfg, name)
        for split in data:
            raw = load_task_split(spec, split, cfg.data_dir, max_examples=limits[split])
            if split == "train":
                raw = prepare_training_rows(cfg, spec, raw, tokenizer, wordnet)
            both_orders = split != "train" and reads_both_orders(cfg, name)
            data[split][name] = TaskDataset(spec, raw, tokenizer, max_length=cfg.max_length, siamese=siamese,
                                            both_orders=both_orders)
    return data


def encodes_alone(cfg: TrainConfig, task: str) -> bool:
    """Whether `task` encodes each sentence of a pair alone (siamese): STS with --sts_head cosine."""
    return task == "sts" and cfg.sts_head == "cosine"


def reads_both_orders(cfg: TrainConfig, task: str) -> bool:
    """Whether dev and test predict `task` from both orders of each pair (--eval_both_orders): a symmetric
    pair task encoded jointly."""
    return cfg.eval_both_orders and TASKS[task].symmetric and not encodes_alone(cfg, task)


def steps_per_epoch(cfg: TrainConfig, train_sets: dict[str, TaskDataset]) -> int:
    """--num_batches_per_epoch, or by default the batches of one pass over the smallest task's rows (before
    augmentation) times the number of tasks."""
    return cfg.num_batches_per_epoch or default_num_batches({name: ds.num_sources for name, ds in train_sets.items()},
                                                            cfg.batch_size)


def check_positions(data: dict[str, dict[str, TaskDataset]], model: MultitaskBERT, max_length: int):
    """Before any training: no tokenised row may be longer than the encoder's position table (a
    --max_length above the model's max_position_embeddings, with rows that long)."""
    positions = next(iter(model.encoders())).config.max_position_embeddings
    for split, tasks in data.items():
        for task, ds in tasks.items():
            for _, ids, _ in ds.encodings + ([("", *ds.swapped)] if ds.swapped else []):
                longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
                if longest is not None and len(ids[longest]) > positions:
                    raise InputError(f"--max_length {max_length}: {task} {split} row {ds.ids[longest]!r} has "
                                     f"{len(ids[longest])} tokens, but the model has {positions} positions; "
                                     f"use --max_length {positions} or less")


def prepare_training_rows(cfg: TrainConfig, spec: TaskSpec, raw, tokenizer: BertTokenizer, wordnet):
    """A task's training rows without the longest (--drop_longest), then with augmented copies
    (--augment, seeded by --seed and the task), each step printed with its count."""
    if cfg.drop_longest > 0:
        lengths = [len(ids) for ids in tokenizer.encode(raw.texts, raw.pair_texts, max_length=1_000_000)[0]]
        before = len(raw.ids)
        raw, longest_kept = without_longest(raw, lengths, cfg.drop_longest)
        print(f"drop_longest: {spec.name} dropped {before - len(raw.ids)} of {before} training rows "
              f"(kept up to {longest_kept} tokens)", flush=True)
    methods = tuple(m for m in cfg.augment_methods if spec.name in cfg.augmented_tasks(m))
    if methods:
        seed = cfg.seed + sum(map(ord, spec.name))  # each task its own stream, the same on every run
        raw, added = augment.augment_split(raw, spec, methods, cfg.eda_alpha, cfg.eda_num_aug, seed, wordnet)
        print(f"augment: {spec.name} {raw.num_sources} training rows + "
              + " + ".join(f"{count} {method}" for method, count in added.items())
              + f" = {len(raw.ids)}", flush=True)
    return raw


# ----------------------------------------------------------------------------- model and optimiser

def build_model(cfg: TrainConfig) -> MultitaskBERT:
    def encoder() -> BertModel:
        return BertModel.from_pretrained(cfg.bert_path, tasks=tuple(cfg.task_names),
                                         pal_size=cfg.pal_size if cfg.use_pal else None,
                                         pal_per_layer=cfg.pal_per_layer, adapter_size=cfg.adapter_size,
                                         adapter_sharing=cfg.adapter_sharing, hidden_dropout_prob=cfg.encoder_dropout,
                                         attention_probs_dropout_prob=cfg.encoder_dropout)
    bert = {name: encoder() for name in cfg.task_names} if cfg.separate_encoders else encoder()
    specs = {name: TASKS[name] for name in cfg.task_names}
    siamese = tuple(name for name in cfg.task_names if encodes_alone(cfg, name))
    dropout = {name: cfg.settings_for(name).head_dropout for name in cfg.task_names}
    return MultitaskBERT(bert, specs, cfg.n_hidden_layers, dropout, cfg.pooling, siamese, cfg.sst_loss)


def is_task_specific(name: str) -> bool:
    """Parameters that belong to tasks rather than the pretrained encoder: heads, PALs, adapters."""
    return name.startswith("heads.") or ".pal" in name or "adapter" in name


def encoder_part(model: MultitaskBERT, name: str) -> str:
    """A parameter's name inside its encoder ("bert.sst.encoder.layer.3.x" or "bert.encoder.layer.3.x" ->
    "encoder.layer.3.x"); heads keep their names."""
    if not name.startswith("bert."):
        return name
    return name.split(".", 2)[2] if model.separate else name[len("bert."):]


def parameter_owner(model: MultitaskBERT, name: str) -> tuple[str | None, str]:
    """(task, role) of a parameter: (task, "head") for a head, (task, "encoder") for a separate
    encoder's, (None, "encoder") for the shared encoder's (its PALs and adapters included)."""
    if name.startswith("heads."):
        return name.split(".")[1], "head"
    return (name.split(".")[1] if model.separate else None), "encoder"


def trainable_encoder_parts(cfg: TrainConfig, epoch: int, num_layers: int) -> tuple[bool, list[bool], bool]:
    """Which pretrained parts train in `epoch` (0-based): (embeddings, [layer 0 .. L-1], pooler).

    Gradual unfreezing (--unfreeze_interval N) starts with the pooler alone and adds one layer from the
    top every N epochs, the embeddings after the last layer. --freeze_bert_last_epochs, --freeze_bert
    and the pretrain options freeze all of it, --freeze_embeddings the embeddings, --freeze_layers N
    the bottom N layers; task-specific parameters always train."""
    if cfg.freeze_layers > num_layers:
        raise InputError(f"--freeze_layers {cfg.freeze_layers}, but the encoder has {num_layers} layers")
    frozen = (cfg.option in ("pretrain", "individual_pretrain") or cfg.freeze_bert
              or epoch >= cfg.epochs - cfg.freeze_bert_last_epochs)
    if frozen:
        return False, [False] * num_layers, False
    unfrozen = num_layers + 1 if cfg.unfreeze_interval is None else epoch // cfg.unfreeze_interval
    # `unfrozen`: layers trained so far, counted from the top (embeddings after the last layer).
    return (unfrozen > num_layers and not cfg.freeze_embeddings,
            [layer >= max(num_layers - unfrozen, cfg.freeze_layers) for layer in range(num_layers)], True)


def apply_trainable(model: MultitaskBERT, cfg: TrainConfig, epoch: int):
    num_layers = len(model.encoders()[0].encoder.layer)
    embeddings, layers, pooler = trainable_encoder_parts(cfg, epoch, num_layers)
    for name, p in model.named_parameters():
        part = encoder_part(model, name)
        if is_task_specific(name):
            p.requires_grad_(True)
        elif part.startswith("embeddings."):
            p.requires_grad_(embeddings)
        elif part.startswith("pooler."):
            p.requires_grad_(pooler)
        else:  # encoder.layer.<i>.
            p.requires_grad_(layers[int(part.split(".")[2])])


def compile_encoder(model: MultitaskBERT):
    """--compile: torch.compile each encoder's layers (`encode`) in place. Parameter names, and so
    checkpoints, stay as they are; dynamic shapes avoid a recompile for every new padded batch length.
    fallback_random: the compiled code draws its random numbers (dropout) with eager's operations from
    eager's generator, so that the same random state gives the same masks compiled or not: SMART's passes
    replay the training pass's masks, and the Bregman teacher (an eager copy) sees the student's.
    Buffers are not donated to the compiled backward: a donated one is freed by the first backward, and the
    diagnostics' gradient shares and Sophia-G's estimate differentiate the graph once before the training
    backward does (retain_graph), which a donating backward refuses."""
    torch._functorch.config.donated_buffer = False
    # Each graph is specialised on its inputs' kinds: train or eval, with or without gradients, an input that
    # needs one (SMART's ascent), and with PALs or adapters the task. Dynamo allows 8 per function, then runs
    # it eagerly without an error; here a run has room for 8 per task and stops with an error past them.
    variants = max(len(bert.pals) + len(bert.adapters) for bert in model.encoders()) or 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * variants)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for bert in model.encoders():
        encode = torch.compile(bert.encode, dynamic=True, options={"fallback_random": True})
        if len(bert.pals) == 0 and len(bert.adapters) == 0:
            # `task` only selects PALs and adapters: without them one graph serves every task (a str
            # argument would otherwise make torch.compile specialise, and recompile, per task).
            bert.encode = lambda embeddings, attention_mask, task=None, encode=encode: encode(embeddings,
                                                                                              attention_mask)
        else:
            bert.encode = encode


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


# ----------------------------------------------------------------------------- evaluation

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


def format_metrics(metrics: dict) -> str:
    parts = [f"{task} {name} {value:.4f}" for task, m in metrics.items() if task != "overall"
             for name, value in m.items()]
    return ", ".join(parts) + (f", overall {metrics['overall']:.4f}" if "overall" in metrics else "")


# ----------------------------------------------------------------------------- training

# The fp16 GradScaler's first factor. torch's default, 2^16, overflowed fp16 on 3 of the first 4 steps of
# MiniLM with SMART and R-Drop and on all 4 with Sophia-H (the STS loss's gradient is large); from 2^12
# down none overflowed (tests/test_fp16.py). The scaler doubles it after 2000 good steps and halves it on
# an overflow, as usual.
FP16_INIT_SCALE = 2.0 ** 10


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
        # SMART repeats the clean pass's dropout masks: it needs the random state at the pass's start.
        self.rng_snapshot = (lambda: rng_state(device)) if cfg.smart else (lambda: None)
        self.gradvac = GradVac(list(self.sizes), cfg.gradvac_beta, cfg.pcgrad_reduction) \
            if cfg.projection == "gradvac" else None
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
        self.curvature_due = False  # Sophia: a refresh was missed, so the next step makes one
        self.missed_refreshes = 0   # Sophia: refreshes missed, in all
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
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

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

    def update_average(self):
        """--ema_decay: the weights' moving average takes in the step just taken (every parameter, one
        foreach call: about 5 ms for MiniLM on 2 CPU cores, 1-2% of a step)."""
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


def set_learning_rate(run: Run, task: str):
    """This step's learning rates (schedule x peak) and weight decays: the shared encoder takes the
    trained task's --task_settings (ALL_TASKS: the run's own), a task's own groups keep theirs."""
    scale = lr_multiplier(run.step, run.total_steps, run.warmup_steps, run.cfg.scheduler) * run.lr_scale
    for group in run.optimizer.param_groups:
        if "by_task" in group:
            group["peak_lr"], group["weight_decay"] = group["by_task"][task]
        group["lr"] = group["peak_lr"] * scale


def output_kind(spec: TaskSpec, sst_loss: str) -> str:
    """How a head's outputs are compared (SMART, Sophia's sampled labels): ordinal thresholds are
    independent Bernoulli logits, the others follow the task's kind."""
    return "binary" if spec.kind == "multiclass" and sst_loss == "ordinal" else spec.kind


class CleanPass(NamedTuple):
    """One micro-batch's training forward, with what is needed to repeat it exactly (SMART)."""
    batch: dict
    embeddings: torch.Tensor      # (B', T, H) embedding-layer output (B' = 2B for a siamese task)
    mask: torch.Tensor            # (B', T) attention mask
    logits: torch.Tensor          # the task's clean logits
    rng_at_embed: tuple | None    # global random state before the embedding layer; None without SMART
    rng_at_encode: tuple | None   # and after it, before the encoder


class Diagnostics:
    """What the techniques measure on logged steps (every --log_every steps), by TensorBoard tag:
    train/grad_norm, technique/smart_term, technique/smart_grad_share, technique/bregman_term,
    technique/rdrop_term, technique/rdrop_grad_share,
    technique/conflict_fraction, technique/cosine/<a>_<b>, technique/gradvac_target/<a>_<b>,
    technique/sophia_unclipped, technique/sophia_hessian_mean. Techniques add values only while
    `active`, so unlogged steps pay nothing for them: no extra passes and no device synchronisation."""

    def __init__(self):
        self.active = False
        self.step: dict[str, list[float]] = {}    # this step's values (a term per task or micro-batch)
        self.epoch: dict[str, list[float]] = {}   # per logged step of this epoch, for the epoch line

    def add(self, name: str, value) -> None:
        self.step.setdefault(name, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))

    def end_step(self) -> dict[str, float]:
        """This step's values, averaged per tag, moved to the epoch's record."""
        means = {name: sum(values) / len(values) for name, values in self.step.items()}
        for name, value in means.items():
            self.epoch.setdefault(name, []).append(value)
        self.step = {}
        return means

    def end_epoch(self) -> dict[str, float]:
        """Mean of each tag over the epoch's logged steps; starts a new epoch."""
        means = {name: sum(values) / len(values) for name, values in self.epoch.items()}
        self.epoch = {}
        return means


def gradient_norm(tensors) -> torch.Tensor:
    """The l2 norm of a list of gradients (None entries skipped), in float32."""
    present = [t.float() for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in present])) if present \
        else torch.zeros(())


def gradient_share(term: torch.Tensor, reference: torch.Tensor, params: list[nn.Parameter],
                   scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """||d term / d params|| / ||d reference / d params||: how much of a technique's gradient reaches the
    shared encoder next to the task loss's. Both are taken through the GradScaler's factor (`scale`), as
    the training backward is, so that under fp16 the gradients at fp16 activations do not underflow; the
    factor cancels in the ratio."""
    reference_grads = torch.autograd.grad(scale(reference), params, retain_graph=True, allow_unused=True)
    term_grads = torch.autograd.grad(scale(term), params, retain_graph=True, allow_unused=True)
    return gradient_norm(term_grads) / gradient_norm(reference_grads).clamp(min=1e-30)


def make_regularizer(cfg: TrainConfig, model: MultitaskBERT, ema_model: MultitaskBERT | None,
                     generator: torch.Generator, diagnostics: Diagnostics,
                     scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
    """loss -> loss + SMART terms (Jiang et al. 2020, Eq. 1 and 3), or the identity when SMART is off.

    Returns regularize(loss, task, clean: CleanPass). Every pass compares like with like: the ascent
    and perturbed passes replay the clean pass's dropout masks (`replaying_rng` from the state before
    the encoder), and the momentum teacher runs in the student's mode with the student's masks (from
    the state before the embedding layer); all run in the caller's autocast, the clean logits' precision.
    The ascent's gradient is taken through the GradScaler's factor (`scale`), which fp16 needs (see
    `smart_perturbation`). On logged steps it records each term and the adversarial term's gradient norm
    on the shared encoder relative to the task loss's (technique/smart_grad_share)."""
    if not cfg.smart:
        return lambda loss, *_: loss

    def regularize(loss: torch.Tensor, task: str, clean: CleanPass) -> torch.Tensor:
        kind = output_kind(model.specs[task], cfg.sst_loss)

        def adversarial() -> torch.Tensor:
            term = smart_adversarial_loss(perturbed_logits_fn(model, task, clean), clean.embeddings, clean.logits,
                                          kind, clean.mask, eps=cfg.smart_eps, step_size=cfg.smart_step_size,
                                          noise_var=cfg.smart_noise_var, steps=cfg.smart_steps,
                                          norm=cfg.smart_norm, generator=generator,
                                          grad_scale=scale(torch.ones((), device=loss.device)))
            if diagnostics.active:
                diagnostics.add("technique/smart_term", term)
                diagnostics.add("technique/smart_grad_share",
                                gradient_share(cfg.smart_weight * term, loss, shared_parameters(model), scale))
            return term

        def bregman() -> torch.Tensor:
            term = bregman_divergence(clean.logits, teacher_logits(ema_model, model, task, clean), kind)
            if diagnostics.active:
                diagnostics.add("technique/bregman_term", term)
            return term

        loss_with_adversarial = add_weighted_term(loss, cfg.smart_weight, adversarial)
        return add_weighted_term(loss_with_adversarial, cfg.smart_bregman_weight, bregman)
    return regularize


def make_rdrop(cfg: TrainConfig, model: MultitaskBERT, class_weights: dict, smoothing: dict,
               diagnostics: Diagnostics, scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
    """loss -> R-Drop's loss (rdrop.py, Liang et al. 2021, half of Eq. 3) on the tasks whose alpha
    (--rdrop, --task_settings TASK.rdrop) is above 0; the identity on the others, and everywhere when
    no task has it (no second pass, no random draws: the run is bit-identical to one without the flag).

    Returns second_pass(loss, task, clean): a second forward of the clean pass's batch, with dropout
    masks of its own, its task loss, and the two passes' divergence. On logged steps it records the
    divergence (technique/rdrop_term) and its gradient norm on the shared encoder relative to the mean
    task loss's (technique/rdrop_grad_share)."""
    alphas = {task: cfg.settings_for(task).rdrop for task in model.specs}
    if not any(alphas.values()):
        return lambda loss, *_: loss

    def second_pass(loss: torch.Tensor, task: str, clean: CleanPass) -> torch.Tensor:
        if alphas[task] == 0:
            return loss
        spec, labels = model.specs[task], clean.batch["labels"]
        logits = model.logits(task, clean.batch)  # the same rows, new dropout masks
        other = task_loss(spec, logits, labels, cfg.sst_loss, class_weights[task], smoothing[task])
        kind = output_kind(spec, cfg.sst_loss)
        total, divergence = rdrop_loss(loss, other, clean.logits, logits, kind, alphas[task])
        if diagnostics.active:
            diagnostics.add("technique/rdrop_term", divergence)
            diagnostics.add("technique/rdrop_grad_share", gradient_share(alphas[task] / 4 * divergence,
                                                                         (loss + other) / 2,
                                                                         shared_parameters(model), scale))
        return total
    return second_pass


def clean_forward(run: Run, task: str, batch: dict) -> CleanPass:
    """The training forward of one micro-batch (in the caller's autocast), recording the random state
    before the embedding layer and before the encoder when a technique needs to replay it."""
    rng_at_embed = run.rng_snapshot()
    embeddings, mask = run.model.embed_batch(task, batch)
    rng_at_encode = run.rng_snapshot()
    logits = run.model.logits_from_embeddings(task, embeddings, mask)
    return CleanPass(batch, embeddings, mask, logits, rng_at_embed, rng_at_encode)


def perturbed_logits_fn(model: MultitaskBERT, task: str, clean: CleanPass):
    """embeddings -> logits through the same network as the clean pass: its dropout masks replayed,
    so that logits_fn(clean.embeddings) equals clean.logits exactly (SMART's ascent and final pass)."""
    def logits_fn(embeddings: torch.Tensor) -> torch.Tensor:
        with replaying_rng(clean.rng_at_encode):
            return model.logits_from_embeddings(task, embeddings, clean.mask)
    return logits_fn


@torch.no_grad()
def teacher_logits(ema_model: MultitaskBERT, model: MultitaskBERT, task: str, clean: CleanPass) -> torch.Tensor:
    """The momentum teacher's logits on the clean pass's batch, in the student's mode with the student's
    dropout masks (replayed from before the embedding layer), in the caller's autocast."""
    ema_model.train(model.training)
    with replaying_rng(clean.rng_at_embed):
        return ema_model.logits(task, clean.batch)


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
            clean = clean_forward(run, task, batch)
            loss = task_loss(dataset.spec, clean.logits, batch["labels"], run.cfg.sst_loss, run.class_weights[task],
                             run.label_smoothing[task])
            loss = run.rdrop(loss, task, clean)
            loss = run.regularize(loss, task, clean)
        share = len(chunk) / batch_size
        yield loss * share, clean.logits, share, sum(dataset.lengths[i] for i in chunk)


def shared_parameters(model: MultitaskBERT) -> list[nn.Parameter]:
    """Trainable parameters every task's gradient flows into: the encoder (and shared adapters)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")
            and not n.startswith("bert.pals.") and not (n.startswith("bert.adapters.")
                                                        and not n.startswith("bert.adapters.shared."))]


def record_gradient_conflicts(run: Run, tasks: list[str], task_grads: list[torch.Tensor]):
    """Logged surgery steps: each task pair's gradient cosine before projection, the share of pairs in
    conflict (negative cosine), and GradVac's target cosines."""
    cosines = gradient_cosines(task_grads)
    for (i, j), cosine in cosines.items():
        run.diagnostics.add(f"technique/cosine/{tasks[i]}_{tasks[j]}", cosine)
    run.diagnostics.add("technique/conflict_fraction",
                        sum(float(c < 0) for c in cosines.values()) / max(1, len(cosines)))
    if run.gradvac is not None:
        for i, a in enumerate(run.gradvac.task_names):
            for j, b in enumerate(run.gradvac.task_names):
                if i != j:
                    run.diagnostics.add(f"technique/gradvac_target/{a}_{b}", run.gradvac.targets[i, j])


def combine_task_gradients(run: Run, task_grads: list[torch.Tensor]) -> torch.Tensor:
    if run.gradvac is not None:
        return run.gradvac.project(task_grads, run.surgery_generator)
    return pcgrad(task_grads, run.surgery_generator, run.cfg.pcgrad_reduction)


def sampled_label_loss(logits: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The batch-mean NLL of labels drawn from the model's own prediction (Sophia-G's GNB estimator)."""
    labels = sample_labels(logits, kind, generator)
    logits = logits.float()
    if kind == "multiclass":
        return F.cross_entropy(logits, labels)
    if kind == "binary":
        per_example = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return per_example.sum(-1).mean() if per_example.dim() > 1 else per_example.mean()
    return (logits - labels).pow(2).mean()


class HessianEstimate:
    """Sophia's curvature refresh for one step: every `hess_interval` steps the micro-batches' estimates
    are summed with their batch shares as weights and handed to `optimizer.update_hessian`.

    sophiah: Hutchinson on the training loss itself; its first-order gradients replace the ordinary
    backward (one pass with create_graph=True, on refresh steps only). sophiag: Gauss-Newton-Bartlett on
    labels sampled from the model, before the ordinary backward of the same forward."""

    def __init__(self, run: "Run"):
        self.run = run
        self.params = [p for group in run.optimizer.param_groups for p in group["params"]]
        self.active = (run.cfg.optimizer in ("sophiag", "sophiah")
                       and (run.step % run.cfg.hess_interval == 0 or run.curvature_due))
        self.total: list[torch.Tensor | None] = [None] * len(self.params)

    def forward_context(self):
        """Hutchinson differentiates twice; the fused attention kernels have no double backward, and a
        compiled backward cannot be differentiated again (torch.compile donates its buffers), so refresh
        steps of sophiah run the encoder eagerly (a --compile run too) with attention on the composite
        (math) path."""
        if self.active and self.run.cfg.optimizer == "sophiah":
            stack = contextlib.ExitStack()
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.compiler.set_stance("force_eager"))
            return stack
        return contextlib.nullcontext()

    def amp_context(self):
        """The step's autocast, but fp32 on Sophia-H's refresh steps under fp16: the Hessian-vector product's
        second backward overflows fp16 where the gradient does not (MiniLM, 4 steps: every refresh was
        non-finite at a scale of 2^12, and one in two at 2^9), and bf16 has fp32's range."""
        if self.active and self.run.cfg.optimizer == "sophiah" and self.run.amp == "fp16":
            return contextlib.nullcontext()
        return self.run.amp_context()

    def _add(self, trainable: list[int], estimates: list[torch.Tensor | None]):
        for i, h in zip(trainable, estimates):
            if h is not None:
                self.total[i] = h if self.total[i] is None else self.total[i] + h

    def backward(self, loss: torch.Tensor, logits: torch.Tensor, kind: str, share: float):
        """Backpropagate one micro-batch's (share-weighted, unscaled) loss, estimating curvature if due."""
        run = self.run
        scaled = run.scaler.scale(loss)
        if not self.active:
            scaled.backward()
            return
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else 1.0
        trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        params = [self.params[i] for i in trainable]
        if run.cfg.optimizer == "sophiah":
            grads, estimates = hutchinson_hessian(scaled, params, run.technique_generator, scale=scale)
            for p, g in zip(params, grads):  # the loop keeps scaled gradients until unscale_
                if g is not None:
                    p.grad = g * scale if p.grad is None else p.grad + g * scale
            self._add(trainable, estimates)
            return
        with run.amp_context():
            sampled = sampled_label_loss(logits, kind, run.technique_generator) * share
        # GNB is quadratic in the loss: with the share-weighted loss, B is the whole batch's size
        # (B (w g)^2 = w b g^2, the micro-batch's estimate weighted by its share).
        batch_size = round(logits.shape[0] / share)
        self._add(trainable, gnb_hessian(run.scaler.scale(sampled), params, batch_size=batch_size, scale=scale))
        scaled.backward()

    def apply(self):
        """Hand the step's estimates to Sophia. One that is not finite (an fp16 overflow in the estimator)
        is refused by the optimiser: the refresh is then due again at the next step, and said."""
        if self.active:
            if self.run.optimizer.update_hessian(self.run.ranks.sum_estimates(self.total, self.params)):
                self.run.curvature_due = False
            else:
                self.missed()

    def missed(self):
        """A due refresh that was not made (a non-finite estimate, or the step skipped): counted, printed,
        and due again at the next step, so that Sophia does not go on as sign-momentum without a word."""
        if self.active:
            run = self.run
            run.curvature_due, run.missed_refreshes = True, run.missed_refreshes + 1
            print(f"step {run.step + 1}: Sophia's curvature refresh not made (a non-finite estimate, or the step "
                  f"skipped); due again at the next step ({run.missed_refreshes} missed in all)", flush=True)


def train_step(run: Run, tasks: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on one batch of each task in `tasks`. Returns (detached losses, tokens).

    With gradient surgery each task's gradient of the shared encoder is set aside after its
    backward (heads keep theirs), and the projected combination replaces them before the step.
    The projections are scale-equivariant, so they work on GradScaler-scaled gradients."""
    losses, tokens = {}, 0
    surgery = run.cfg.projection != "none"
    shared = shared_parameters(run.model) if surgery else []
    task_grads = []
    hessian = HessianEstimate(run)
    for task in tasks:
        indices = next(run.iterators[task])  # under torchrun: the global batch, of which this rank trains a slice
        kind = output_kind(run.train_sets[task].spec, run.cfg.sst_loss)
        total = torch.zeros((), device=run.device)
        with hessian.forward_context():
            for loss, logits, share, n_tokens in micro_batch_losses(run, task, run.ranks.shard(indices), len(indices),
                                                                    hessian.amp_context):
                hessian.backward(loss, logits, kind, share)
                total += loss.detach().float()
                tokens += n_tokens
        losses[task] = run.ranks.sum_value(total)  # the global batch's loss
        if surgery:  # set this task's shared gradients aside: (param -> grad), None where unused
            run.ranks.sum_gradients(shared)  # each task's gradient summed over ranks before the projection
            task_grads.append([p.grad for p in shared])
            for p in shared:
                p.grad = None
    # The rest (all of it without surgery) summed over ranks once, after every micro-batch of the step.
    set_aside = {id(p) for p in shared}
    run.ranks.sum_gradients([p for p in run.model.parameters() if p.requires_grad and id(p) not in set_aside])
    if surgery:
        # Parameters no task used keep grad None (the optimiser skips them, as after a plain backward).
        used = [i for i, p in enumerate(shared) if any(grads[i] is not None for grads in task_grads)]
        used_params = [shared[i] for i in used]
        flat = []
        for grads in task_grads:
            for i in used:  # a task that did not use a parameter contributes zeros there
                shared[i].grad = grads[i]
            flat.append(flatten_grads(used_params))  # (numel,)
        if run.diagnostics.active:
            record_gradient_conflicts(run, tasks, flat)
        assign_flat_grads(used_params, combine_task_gradients(run, flat))
    run.scaler.unscale_(run.optimizer)  # clip on true gradients
    with_grad = [p for p in run.model.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(with_grad, run.cfg.clip) if run.cfg.clip is not None  # before clipping
                 else torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
    if run.diagnostics.active:
        run.diagnostics.add("train/grad_norm", grad_norm)
    # One synchronisation per step, as GradScaler's own check: a non-finite loss or gradient skips the step.
    if not bool(torch.isfinite(torch.stack([grad_norm.float(), *losses.values()])).all()):
        hessian.missed()
        skip_step(run, losses)
        return {}, tokens
    run.skipped_in_a_row = 0
    run.scaler.step(run.optimizer)
    hessian.apply()
    if run.diagnostics.active and isinstance(run.optimizer, Sophia):
        unclipped, hessian_mean = run.optimizer.clip_statistics()
        run.diagnostics.add("technique/sophia_unclipped", unclipped)
        run.diagnostics.add("technique/sophia_hessian_mean", hessian_mean)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema_model is not None:
        ema_update(run.ema_model.parameters(), run.model.parameters(), run.cfg.smart_momentum)
    run.update_average()
    return losses, tokens


class NonFiniteTraining(RuntimeError):
    """--max_bad_steps steps in a row had a non-finite loss or gradient: the run stops (exit status 3)."""


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


def advance(run: Run, task: str) -> tuple[dict[str, torch.Tensor], int]:
    """One scheduled step of the loop on `task`: learning rate, diagnostics if this step is logged
    (every --log_every steps), the optimiser step, the step count. Returns train_step's result."""
    trains_all = task == ALL_TASKS or run.cfg.projection != "none"  # a surgery step needs every task's gradient
    set_learning_rate(run, ALL_TASKS if trains_all else task)
    run.diagnostics.active = (run.step + 1) % run.cfg.log_every == 0
    result = train_step(run, list(run.sizes) if trains_all else [task])
    run.step += 1
    return result


class StepProfiler:
    """--profile N: the PyTorch profiler over N training steps after WAIT + WARMUP steps (the first
    steps pay for allocations and kernel choices). The trace goes to <run>/tensorboard/profile (the
    TensorBoard profiler plugin and Perfetto read it); the top operators by self time are printed and
    kept in <run>/profile.txt and the run's TensorBoard text."""
    WAIT, WARMUP, TOP = 5, 2, 25

    def __init__(self, steps: int, run_dir: str, writer, device: torch.device):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.steps, self.run_dir, self.writer, self.done = steps, run_dir, writer, False
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.profiler = torch.profiler.profile(
            activities=activities, on_trace_ready=self._report,
            schedule=torch.profiler.schedule(wait=self.WAIT, warmup=self.WARMUP, active=steps, repeat=1))

    def _report(self, profiler):
        torch.profiler.tensorboard_trace_handler(os.path.join(self.run_dir, "tensorboard", "profile"))(profiler)
        table = profiler.key_averages().table(sort_by=self.sort_by, row_limit=self.TOP)
        heading = f"profile: {self.steps} training steps after {self.WAIT + self.WARMUP}, top operators by self time"
        print(f"{heading}\n{table}", flush=True)
        with atomic_path(os.path.join(self.run_dir, "profile.txt")) as temp, open(temp, "w") as f:
            f.write(f"{heading}\n{table}\n")
        self.writer.add_text("profile", f"{heading}\n\n```\n{table}\n```")
        self.done = True

    def step(self):
        self.profiler.step()

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        if not self.done and exc[0] is None:
            print(f"profile: the run ended before its {self.steps} profiled steps (they start after "
                  f"{self.WAIT + self.WARMUP}): nothing recorded", flush=True)
        return False


def check_profile_window(cfg: TrainConfig, num_batches: int, position: int = 0, step: int = 0):
    """--profile's window must lie inside the current epoch's training steps (from `position` of it, `step`
    steps into the run): one that ran past them would time the dev evaluation (or the predictions) as a
    training step."""
    steps_left = min(num_batches - position, (cfg.stop_at_step or math.inf) - step)
    before = StepProfiler.WAIT + StepProfiler.WARMUP
    if cfg.profile + before > steps_left:
        raise InputError(f"--profile {cfg.profile}: the profile needs {cfg.profile} steps after {before} within "
                         f"one epoch's training, and this epoch has {steps_left} left; profile at most "
                         f"{max(steps_left - before, 0)} steps")


class NullProfiler(contextlib.nullcontext):
    """No --profile: steps cost nothing."""

    def step(self):
        """Nothing to record."""


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
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / elapsed
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


def end_of_epoch(run: Run, train_losses: dict, epoch_seconds: float, run_dir: str, writer) -> bool:
    """Evaluate on dev, record, keep the best checkpoint, save `last.pt`. Returns True to stop early."""
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
        if cfg.scheduler == "plateau":
            run.lr_scale *= 0.5  # ReduceLROnPlateau with patience 0 and factor 0.5, on the dev overall score
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
    print(f"epoch {run.epoch + 1}/{cfg.epochs} ({epoch_seconds:.0f} s): "
          + ", ".join(f"{t} loss {v:.4f}" for t, v in train_losses.items())
          + f" | dev {format_metrics(metrics)}" + (" (best)" if improved else "")
          + (" | logged-step means: " + ", ".join(f"{tag.split('/', 1)[1]} {value:.4g}"
                                                  for tag, value in diagnostics.items()) if diagnostics else ""),
          flush=True)
    run.epoch, run.trained_epoch = run.epoch + 1, None
    run.save(os.path.join(run_dir, "last.pt"))
    return cfg.patience is not None and run.stale_epochs >= cfg.patience


def confusion_markdown(matrix: np.ndarray) -> str:
    """A confusion matrix as a markdown table (rows: true class, columns: predicted)."""
    n = matrix.shape[0]
    lines = ["| true \\ predicted | " + " | ".join(map(str, range(n))) + " |", "|---" * (n + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(int(v)) for v in row) + " |" for i, row in enumerate(matrix)]
    return "\n".join(lines)


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
            stop = end_of_epoch(run, run.trained_epoch["train_losses"], run.trained_epoch["seconds"], run_dir, writer)
        except EvaluationStopped:
            save_and_stop_if_asked(run, run_dir)
            raise
        if on_epoch is not None:
            on_epoch(run.epoch, run.history[-1]["dev"])
        if stop:
            print(f"early stop: no better dev score for {run.stale_epochs} epochs", flush=True)
            break
        save_and_stop_if_asked(run, run_dir)  # a signal during the evaluation
    return run.history[run.best_epoch]["dev"] if run.history else {}


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


# ----------------------------------------------------------------------------- time budget

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


# ----------------------------------------------------------------------------- options

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
    amp_context = (contextlib.nullcontext if amp == "none" else
                   lambda: torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16))
    metrics, dev_predictions = run_evaluation(model, data["dev"], device, amp_context, trained.eval_batch_size,
                                              trained.sst_loss)
    _, test_predictions = run_evaluation(model, data["test"], device, amp_context, trained.eval_batch_size,
                                         trained.sst_loss)
    folder = cfg.predictions_dir or os.path.join(os.path.dirname(path), "predictions")
    write_all_predictions({"dev": dev_predictions, "test": test_predictions}, folder, trained)
    print(f"dev {format_metrics(metrics)}\npredictions: {folder}", flush=True)
    return metrics


def individual_pretrain(cfg: TrainConfig, model: MultitaskBERT, data: dict, device, amp: str, run_dir: str,
                        writer) -> Run:
    """--option individual_pretrain: each task's head trained alone on the frozen encoder (in
    <run>/<task>/), its best epoch's head kept; the assembled model is saved as <run>/best.pt."""
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
    return run


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

    tokenizer = BertTokenizer.from_pretrained(cfg.bert_path)
    data = load_datasets(cfg, tokenizer)
    print("data: " + ", ".join(f"{task} {len(ds)} train / {len(data['dev'][task])} dev / "
                               f"{len(data['test'][task])} test" for task, ds in data["train"].items()), flush=True)

    model = build_model(cfg)
    check_positions(data, model, cfg.max_length)
    if cfg.pretrained_model_name:
        path = checkpoint_path(cfg.pretrained_model_name)
        load_weights(model, load_checkpoint(path)["model"], path)
    apply_trainable(model, cfg, epoch=0)
    model.to(device)
    if ranks.world > 1:
        torch.manual_seed(cfg.seed + 1000 * ranks.rank)  # the same model everywhere, each rank its own dropout
    calibration = None
    if cfg.time_budget is not None and not cfg.resume:  # a resumed run keeps the count it chose
        cfg, calibration = fit_to_time_budget(cfg, model, data, device, amp, ranks, start)
    if cfg.profile:
        check_profile_window(cfg, steps_per_epoch(cfg, data["train"]))  # before the folder is made
    run_dir = ranks.on_main(lambda: folders.hold(prepare_run_dir(cfg, command, calibration)))  # the default one, new
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if ranks.main else NullWriter()
    if cfg.option == "individual_pretrain":
        run = individual_pretrain(cfg, model, data, device, amp, run_dir, writer)
        best_metrics = write_best_predictions(run, run_dir)
        writer.close()
        seconds = time.perf_counter() - start
        # No last.pt: each head trains in seconds, so there is nothing to resume; summary.json as any run.
        atomic_write_json({"best_epoch": None, "dev": best_metrics, "wall_seconds": round(seconds, 1),
                           "option": "individual_pretrain"}, os.path.join(run_dir, "summary.json"))
        print(f"individual_pretrain: dev {format_metrics(best_metrics)} ({seconds:.0f} s)")
        return best_metrics

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
        # Where the wall time went: training steps, dev evaluations, the final predictions, the rest (start-up,
        # data, checkpoints) by difference; after a --resume the earlier processes' time up to their last
        # checkpoint is counted in (what they did after it is done again here).
        parts = {"training_seconds": sum(h["seconds"] for h in run.history),
                 "evaluation_seconds": sum(h.get("evaluation_seconds", 0) for h in run.history),
                 "prediction_seconds": run.prediction_seconds}
        atomic_write_json({"best_epoch": run.best_epoch + 1, "dev": best_metrics,
                           "wall_seconds": round(run.seconds_before + seconds, 1),
                           **{k: round(v, 1) for k, v in parts.items()}, "steps": run.step, "processes": ranks.world},
                          os.path.join(run_dir, "summary.json"))
    print(f"best epoch {run.best_epoch + 1}: dev {format_metrics(best_metrics)} "
          f"({run.seconds_before + seconds:.0f} s)", flush=True)
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
