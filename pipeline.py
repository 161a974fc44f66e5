"""The data's way in, one direction: read each task's files, filter and augment the training rows, tokenise
every split once, and later cut batches into micro-batches on the run's device. Every setting that shapes
the data (--drop_longest, --augment, --sts_head cosine, --eval_both_orders, --max_length) acts here,
before any training time is spent.
"""
import torch

import augment
from config import TrainConfig
from datasets import TaskDataset, default_num_batches, load_task_split, without_longest
from errors import InputError
from tasks import TASKS, TaskSpec
from tokenizer import BertTokenizer


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


def encodes_alone(cfg: TrainConfig, task: str) -> bool:
    """Whether `task` encodes each sentence of a pair alone (siamese): STS with --sts_head cosine."""
    return task == "sts" and cfg.sts_head == "cosine"


def reads_both_orders(cfg: TrainConfig, task: str) -> bool:
    """Whether dev and test predict `task` from both orders of each pair (--eval_both_orders): a symmetric
    pair task encoded jointly."""
    return cfg.eval_both_orders and TASKS[task].symmetric and not encodes_alone(cfg, task)


def check_positions(data: dict[str, dict[str, TaskDataset]], model: torch.nn.Module, max_length: int):
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


def steps_per_epoch(cfg: TrainConfig, train_sets: dict[str, TaskDataset]) -> int:
    """--num_batches_per_epoch, or by default the batches of one pass over the smallest task's rows (before
    augmentation) times the number of tasks."""
    return cfg.num_batches_per_epoch or default_num_batches({name: ds.num_sources for name, ds in train_sets.items()},
                                                            cfg.batch_size)


def split_batch(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
