"""The task registry. A task is data: its files, columns, label range and kind. The kind ("multiclass",
"binary", "regression") decides the head, the loss and the metric, so adding a task means adding one
`TaskSpec` entry to `TASKS`. Imports nothing of ours: every room may read it.
"""
from dataclasses import dataclass
from types import MappingProxyType

SPLITS = ("train", "dev", "test")
KINDS = ("multiclass", "binary", "regression")
ALL_TASKS = "all"  # the schedule's entry for a step that trains one batch of every task


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its data is, how to read it and how its predictions are written."""
    name: str                      # short name used in flags, logs, metrics and checkpoints
    kind: str                      # "multiclass" | "binary" | "regression": head, loss and metric follow from it
    text_columns: tuple[str, ...]  # one column (single sentence) or two (sentence pair)
    label_column: str              # absent from the test split
    label_range: tuple[float, float]  # inclusive; classification labels are the integers 0..max
    files: dict[str, str]          # split -> file name inside the data folder
    prediction_header: str         # first line of the prediction file, spelled as the course's script does
    prediction_dtype: str          # numpy dtype of written values: "int64" -> 3, "float32" -> 0.46074217557907104
    symmetric: bool = False        # pair tasks: (a, b) and (b, a) have the same label (--augment swap)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"task {self.name}: expected 1 or 2 text columns, got {self.text_columns}")
        low, high = self.label_range
        if self.kind != "regression" and (low != 0 or high != int(high)):
            raise ValueError(f"task {self.name}: classification labels must be the integers 0..n, "
                             f"got range {self.label_range}")
        if self.kind == "binary" and self.label_range != (0, 1):
            raise ValueError(f"task {self.name}: binary labels must be 0/1, got range {self.label_range}")
        if self.symmetric and not self.is_pair:
            raise ValueError(f"task {self.name}: only a sentence-pair task can be symmetric")
        unknown = set(self.files) - set(SPLITS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown splits {sorted(unknown)}; expected some of {SPLITS}")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_classes(self) -> int | None:
        """Number of classes for classification tasks, None for regression."""
        return None if self.kind == "regression" else int(self.label_range[1]) + 1

    @property
    def num_outputs(self) -> int:
        """Width of the task head: one logit per class for multiclass, a single value otherwise."""
        return self.num_classes if self.kind == "multiclass" else 1

    @property
    def metric(self) -> str:
        """Headline dev metric: Pearson correlation for regression, accuracy otherwise."""
        return "pearson" if self.kind == "regression" else "accuracy"

    def prediction_file(self, split: str) -> str:
        """File name of this task's predictions for `split`, as the course names them (sst-dev-output.csv)."""
        return f"{self.name}-{split}-output.csv"


# The course's files (see data/README.md). "Predicted_Similiary" is the course's own spelling: its
# evaluation.py writes that header, and submissions are graded against the course's format.
TASKS = MappingProxyType({spec.name: spec for spec in (
    TaskSpec(name="sst", kind="multiclass", text_columns=("sentence",), label_column="sentiment",
             label_range=(0, 4),
             files={"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
             prediction_header="id \t Predicted_Sentiment", prediction_dtype="int64"),
    TaskSpec(name="para", kind="binary", text_columns=("sentence1", "sentence2"), label_column="is_duplicate",
             label_range=(0, 1),
             files={"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"},
             prediction_header="id \t Predicted_Is_Paraphrase", prediction_dtype="float32", symmetric=True),
    TaskSpec(name="sts", kind="regression", text_columns=("sentence1", "sentence2"), label_column="similarity",
             label_range=(0.0, 5.0),
             files={"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"},
             prediction_header="id \t Predicted_Similiary", prediction_dtype="float32", symmetric=True),
    TaskSpec(name="cfimdb", kind="binary", text_columns=("sentence",), label_column="sentiment",
             label_range=(0, 1),
             files={"train": "ids-cfimdb-train.csv", "dev": "ids-cfimdb-dev.csv",
                    "test": "ids-cfimdb-test-student.csv"},
             prediction_header="id \t Predicted_Sentiment", prediction_dtype="int64"),
)})
