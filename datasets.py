"""Data loading, batching and task scheduling for multitask fine-tuning (the tasks themselves: tasks.py).

- `load_task_split`: read and validate one CSV file of the course's format, before any training.
- `TaskDataset`: one split tokenised once up front; `collate(indices)` pads a batch to its longest.
- Batch orders: `length_bucketed_batches` (training), `sequential_batches` (evaluation),
  `TaskBatchIterator` (an endless, resumable stream of one task's batches).
- Task schedules: `task_sampling_probs` and `epoch_task_schedule`, pure functions of their inputs
  and a `torch.Generator`, so a run is reproducible and resumable.
"""
import csv
import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from errors import InputError
from tasks import ALL_TASKS, TaskSpec

logger = logging.getLogger(__name__)

SCHEDULERS = ("round_robin", "sequential", "random", "proportional", "pal", "all")


class DataError(InputError):
    """A data file that cannot be used as it is: the message names the file, the line and what was expected."""


# ----------------------------------------------------------------------------- loading

@dataclass
class RawSplit:
    """One split as read from its file, rows in file order."""
    path: str
    ids: list[str]
    texts: list[str]
    pair_texts: list[str] | None   # second sentence of pair tasks
    labels: list[float] | None     # None for the test split
    sources: int | None = None     # rows the file gave, when augmented copies follow them (None: every row)

    @property
    def num_sources(self) -> int:
        """Rows before augmentation: what the task schedule counts, so augmenting a task does not
        change how often it trains."""
        return len(self.ids) if self.sources is None else self.sources

    def subset(self, keep: list[int]) -> "RawSplit":
        """These rows (indices into the split), in the order given."""
        if self.sources is not None:
            raise ValueError("subset of an augmented split: select rows before augmenting")
        return RawSplit(self.path, [self.ids[i] for i in keep], [self.texts[i] for i in keep],
                        None if self.pair_texts is None else [self.pair_texts[i] for i in keep],
                        None if self.labels is None else [self.labels[i] for i in keep])


def _label_expectation(spec: TaskSpec) -> str:
    low, high = spec.label_range
    if spec.kind == "regression":
        return f"a number from {low:g} to {high:g}"
    return f"an integer from {low:g} to {high:g}"


def _parse_label(text: str, spec: TaskSpec, where: str) -> float:
    expected = f"expected {_label_expectation(spec)} in column {spec.label_column!r}"
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not a number ({expected})") from None
    low, high = spec.label_range
    integer_if_needed = spec.kind == "regression" or value.is_integer()
    if not (math.isfinite(value) and low <= value <= high and integer_if_needed):
        raise DataError(f"{where}: label {text!r} is not valid ({expected})")
    return value


def _decoding_error(path: str) -> DataError:
    """The error for a file that is not UTF-8, at the line of its first bad byte (the text reader
    decodes ahead of the line it hands out, so its own count is not that line)."""
    with open(path, "rb") as f:
        raw = f.read()
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        bad = start + e.start
        line = raw.count(b"\n", 0, bad) + 1
        return DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {bad}: "
                         f"{raw[bad:bad + 4]!r}; save the file as UTF-8)")
    return DataError(f"{path}: not UTF-8 text")


def load_task_split(spec: TaskSpec, split: str, data_dir: str, max_examples: int | None = None) -> RawSplit:
    """Read and validate one split of a task (tab-separated, CSV quoting with doubled quotes).

    Columns are found by header name, so the test files' shifted header works. Ids and texts are
    stripped of surrounding spaces. Labels are read for train and dev; the test split has none.
    A row with an empty label is skipped (in the course's Quora files these are rows whose broken
    quoting swallowed the fields after it) and one warning per file gives the count. Anything else
    wrong raises `DataError` naming the file, the 1-based line (the header is line 1) and what was
    expected: a missing file or column, a wrong number of fields, an empty id or text, a label that
    is not a number or is out of the task's range.

    max_examples: keep a subset of this many rows, the same one on every run (a fixed-seed random
    choice kept in file order), after the whole file has been validated.
    """
    if split not in spec.files:
        raise ValueError(f"task {spec.name} has no {split!r} split; it has {sorted(spec.files)}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, got {max_examples}")
    path = os.path.join(data_dir, spec.files[split])
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the {spec.name} {split} split in data folder "
                        f"{data_dir!r}; data/README.md lists the course files)")
    wanted = ["id", *spec.text_columns] + ([spec.label_column] if split != "test" else [])

    ids, texts, skipped_lines = [], [], []
    pair_texts = [] if spec.is_pair else None
    labels = [] if split != "test" else None
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")
        line = 0  # last line read so far
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}:1: empty file (expected a header with columns {wanted})")
            missing = [c for c in wanted if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing} (expected a header with columns "
                                f"{wanted}, found {header})")
            id_col = header.index("id")
            text_cols = [header.index(c) for c in spec.text_columns]
            label_col = None if labels is None else header.index(spec.label_column)
            line = reader.line_num
            for row in reader:
                row_line, line = line + 1, reader.line_num  # a quoted field may span lines: report its first
                where = f"{path}:{row_line}"
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise DataError(f"{where}: expected {len(header)} tab-separated fields as in the header, "
                                    f"found {len(row)}")
                if label_col is not None and not row[label_col].strip():
                    skipped_lines.append(row_line)
                    continue
                for col in [id_col, *text_cols]:
                    if not row[col].strip():
                        raise DataError(f"{where}: empty {header[col]!r} (expected a non-empty value)")
                ids.append(row[id_col].strip())
                texts.append(row[text_cols[0]].strip())
                if pair_texts is not None:
                    pair_texts.append(row[text_cols[1]].strip())
                if labels is not None:
                    labels.append(_parse_label(row[label_col].strip(), spec, where))
        except csv.Error as e:
            raise DataError(f"{path}:{line + 1}: {e} (expected tab-separated fields with CSV quoting; "
                            f"an unmatched quote?)") from None
        except UnicodeDecodeError:
            raise _decoding_error(path) from None

    if skipped_lines:
        shown = ", ".join(map(str, skipped_lines[:5])) + (", ..." if len(skipped_lines) > 5 else "")
        logger.warning("%s: skipped %d row(s) with an empty %r label (line %s)",
                       path, len(skipped_lines), spec.label_column, shown)
    if not ids:
        raise DataError(f"{path}: no usable rows (expected at least one data row after the header)")

    raw = RawSplit(path=path, ids=ids, texts=texts, pair_texts=pair_texts, labels=labels)
    if max_examples is not None and max_examples < len(ids):
        subset_rng = torch.Generator().manual_seed(0)  # fixed: the same subset on every run
        raw = raw.subset(sorted(torch.randperm(len(ids), generator=subset_rng)[:max_examples].tolist()))
    return raw


def without_longest(raw: RawSplit, lengths: list[int], fraction: float) -> tuple[RawSplit, int]:
    """The split without its `fraction` longest rows (floor(fraction * rows); ties broken by file order,
    the later row dropped first), rows in file order; and the length of the longest row kept.
    lengths: tokens per row, untruncated (a pair's joint encoding)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    drop = int(fraction * len(lengths))
    keep = sorted(sorted(range(len(lengths)), key=lambda i: (lengths[i], i))[:len(lengths) - drop])
    return raw.subset(keep), max(lengths[i] for i in keep)


# ----------------------------------------------------------------------------- tokenised dataset

class TaskDataset:
    """One split of one task, tokenised once up front (unpadded id lists, padded per batch).

    Pairs are encoded jointly as `[CLS] a [SEP] b [SEP]`. With `siamese=True` (for a cosine-similarity
    head) the two sentences are encoded separately and a batch carries `input_ids_1`, `token_type_ids_1`,
    `attention_mask_1` and the same with `_2`. With `both_orders=True` (a symmetric pair task, joint
    encoding) every pair is also encoded as `[CLS] b [SEP] a [SEP]`, and a batch carries that encoding
    under `swapped` (a dict of the same three keys) for a prediction from both orders.
    """

    def __init__(self, spec: TaskSpec, raw: RawSplit, tokenizer, max_length: int = 128, siamese: bool = False,
                 both_orders: bool = False):
        if siamese and not spec.is_pair:
            raise ValueError(f"task {spec.name}: siamese encoding needs a sentence-pair task")
        if both_orders and (siamese or not spec.symmetric):
            raise ValueError(f"task {spec.name}: both orders are for a symmetric pair task encoded jointly")
        self.spec = spec
        self.ids = raw.ids
        self.num_sources = raw.num_sources  # rows before augmentation: the task's size for the schedule
        self.tokenizer = tokenizer
        if siamese:
            # (suffix, id lists, type-id lists) per encoded side
            self.encodings = [("_1", *tokenizer.encode(raw.texts, max_length=max_length)),
                              ("_2", *tokenizer.encode(raw.pair_texts, max_length=max_length))]
        else:
            self.encodings = [("", *tokenizer.encode(raw.texts, raw.pair_texts, max_length=max_length))]
        # (id lists, type-id lists) of every pair as (b, a); not part of `lengths` (the same tokens)
        self.swapped = tokenizer.encode(raw.pair_texts, raw.texts, max_length=max_length) if both_orders else None
        # Sort key for batching: tokens per example, both sides together when siamese.
        self.lengths = [sum(len(ids[i]) for _, ids, _ in self.encodings) for i in range(len(raw.ids))]
        label_dtype = torch.long if spec.kind == "multiclass" else torch.float32
        self.labels = None if raw.labels is None else torch.tensor(raw.labels, dtype=label_dtype)  # (n,)

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, indices: list[int]) -> dict:
        """A batch: padded int64 tensors (batch, longest in batch), `labels` when known, `ids` (list of str),
        `swapped` with both orders."""
        batch = {}
        for suffix, ids, type_ids in self.encodings:
            padded = self.tokenizer.pad([ids[i] for i in indices], [type_ids[i] for i in indices])
            batch.update({key + suffix: value for key, value in padded.items()})
        if self.swapped is not None:
            ids, type_ids = self.swapped
            batch["swapped"] = self.tokenizer.pad([ids[i] for i in indices], [type_ids[i] for i in indices])
        if self.labels is not None:
            batch["labels"] = self.labels[indices]  # (batch,) long for multiclass, float otherwise
        batch["ids"] = [self.ids[i] for i in indices]
        return batch


# ----------------------------------------------------------------------------- batch orders

def random_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Plain shuffled batches (lengths only give the number of examples); the baseline for bucketing."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                            bucket_chunks: int = 50) -> list[list[int]]:
    """Shuffled batches of similar lengths: little padding, still random.

    Shuffle all examples, cut them into chunks of `bucket_chunks` batches, sort each chunk by length
    and cut it into batches, then shuffle the order of all batches. Every index appears exactly once;
    only the last batch may be smaller than `batch_size`.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk_size = batch_size * bucket_chunks
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start:start + chunk_size], key=lengths.__getitem__)  # stable: ties stay shuffled
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def sequential_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches, longest first (an out-of-memory error shows on the first batch).

    Callers put predictions back in file order with the indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    """Real tokens / tokens after padding each batch to its longest (1.0 = no padding)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / padded


class TaskBatchIterator:
    """An endless stream of one task's batches: a fresh order each pass over the data.

    `state_dict()` holds the generator state from the start of the current pass, the pass count and
    the position in it, so `load_state_dict()` rebuilds that pass and continues with the same batches.
    The iterator owns `generator`: give each task's iterator its own, or a restore cannot be exact.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator,
                 bucketed: bool = True, bucket_chunks: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.bucketed = bucketed
        # The batch order strategy, chosen once.
        self._make_batches = (functools.partial(length_bucketed_batches, bucket_chunks=bucket_chunks)
                              if bucketed else random_batches)
        self.epoch = 0  # completed passes over this task's data
        self._start_pass()

    def _start_pass(self):
        self._pass_start_state = self.generator.get_state()
        self._batches = self._make_batches(self.lengths, self.batch_size, self.generator)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self.position == len(self._batches):
            self.epoch += 1
            self._start_pass()
        self.position += 1
        return self._batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator_state": self._pass_start_state.clone(),
                "num_examples": len(self.lengths), "batch_size": self.batch_size, "bucketed": self.bucketed}

    def load_state_dict(self, state: dict):
        settings = {"num_examples": len(self.lengths), "batch_size": self.batch_size, "bucketed": self.bucketed}
        saved = {key: state[key] for key in settings}
        if saved != settings:
            raise ValueError(f"batch iterator state was saved with {saved}, this iterator has {settings}")
        self.generator.set_state(state["generator_state"])
        self._start_pass()
        self.epoch, self.position = state["epoch"], state["position"]


# ----------------------------------------------------------------------------- task scheduling

def pal_alpha(epoch: int, num_epochs: int) -> float:
    """Annealing exponent of Stickland & Murray (2019, BERT and PALs, Sec. 4): alpha = 1 - 0.8 (e-1)/(E-1).

    epoch is 0-based (e = epoch + 1): alpha is 1 (proportional) in the first epoch and 0.2 (close to
    uniform) in the last; alpha = 1 when num_epochs is 1.
    """
    if not 0 <= epoch < num_epochs:
        raise ValueError(f"epoch {epoch} is outside 0..{num_epochs - 1}")
    return 1.0 if num_epochs == 1 else 1.0 - 0.8 * epoch / (num_epochs - 1)


def task_sampling_probs(scheduler: str, sizes: dict[str, int], epoch: int, num_epochs: int) -> dict[str, float]:
    """Probability of drawing each task for a step.

    "random": uniform; "proportional": p_i ∝ N_i; "pal": p_i ∝ N_i^alpha with alpha from `pal_alpha`
    (epoch 0-based). sizes: training examples per task.
    """
    if scheduler == "random":
        weights = {name: 1.0 for name in sizes}
    elif scheduler == "proportional":
        weights = {name: float(n) for name, n in sizes.items()}
    elif scheduler == "pal":
        alpha = pal_alpha(epoch, num_epochs)
        weights = {name: float(n) ** alpha for name, n in sizes.items()}
    else:
        raise ValueError(f"scheduler {scheduler!r} does not sample; the sampling ones are random, proportional, pal")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def epoch_task_schedule(scheduler: str, sizes: dict[str, int], num_batches: int, generator: torch.Generator,
                        epoch: int = 0, num_epochs: int = 1) -> list[str]:
    """The task of each of an epoch's `num_batches` steps, tasks in the order of `sizes`.

    "round_robin": cycle through the tasks. "sequential": the same per-task step counts as
    round_robin (equal shares, the first tasks one more when it does not divide) but in blocks: all
    of the first task's steps, then the second's, ...; comparing the two isolates the effect of
    interleaving. "random" / "proportional" / "pal": each step drawn independently from
    `task_sampling_probs` with `generator`. "all": every step is ALL_TASKS (one batch of every task,
    their losses summed).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")
    if scheduler == ALL_TASKS:
        return [ALL_TASKS] * num_batches
    names = list(sizes)
    if scheduler == "round_robin":
        return [names[step % len(names)] for step in range(num_batches)]
    if scheduler == "sequential":
        share, extra = divmod(num_batches, len(names))
        return [name for k, name in enumerate(names) for _ in range(share + (k < extra))]
    probs = task_sampling_probs(scheduler, sizes, epoch, num_epochs)
    draws = torch.multinomial(torch.tensor([probs[name] for name in names], dtype=torch.float64),
                              num_batches, replacement=True, generator=generator)
    return [names[i] for i in draws.tolist()]


def default_num_batches(sizes: dict[str, int], batch_size: int) -> int:
    """Steps per epoch: under round_robin or sequential, each task gets as many batches as one pass
    over the smallest task's data takes (under "random", in expectation)."""
    return len(sizes) * math.ceil(min(sizes.values()) / batch_size)
