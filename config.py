"""A training run's settings: `TrainConfig` (every flag: its default, help, choices and --help section; its
checks, each setting alone, then the combinations), and what each task may set for itself (`TaskSettings`).
The command line built from them: flags.py. The pretrained model's own config: pretrained.py.
"""
import dataclasses
import json
import math

from errors import InputError, MissingInput
from tasks import TASKS


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path`; MissingInput or InputError naming the file and `what` it should be."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MissingInput(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON {what} ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object ({what}), got {type(raw).__name__}")
    return raw


NOT_RECORDED = object()


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """What one task may set for itself (`--task_settings sst.lr=5e-5,sts.head_dropout=0.3`); None
    takes the run's own flag. A step that trains one task runs with that task's settings."""
    lr: float | None = None            # the encoder's peak learning rate on this task's steps (--lr)
    head_lr: float | None = None       # this task's head (--head_lr)
    weight_decay: float | None = None  # on this task's steps: the encoder and this task's head (--weight_decay)
    head_dropout: float | None = None  # dropout in this task's head (--hidden_dropout_prob)
    rdrop: float | None = None         # R-Drop's alpha on this task's batches (--rdrop)
    label_smoothing: float | None = None  # eps of this task's classification targets (--label_smoothing)
    max_batch_size: int | None = None  # micro-batch cap: gradient accumulation above it (--max_batch_size_TASK)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def parse_task_settings(text: str, tasks: list[str]) -> dict[str, TaskSettings]:
    """`TASK.KEY=VALUE[,TASK.KEY=VALUE ...]` -> {task: TaskSettings}; a ValueError names the bad item."""
    values: dict[str, dict[str, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, value = item.partition("=")
        task, _, key = target.strip().partition(".")
        if task not in tasks:
            raise ValueError(f"--task_settings {item!r}: task {task!r} is not among --tasks ({', '.join(tasks)})")
        if key not in TaskSettings.keys():
            raise ValueError(f"--task_settings {item!r}: unknown setting {key!r}; per-task settings are "
                             f"{', '.join(TaskSettings.keys())}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--task_settings {item!r}: expected TASK.KEY=NUMBER") from None
        if not math.isfinite(number) or (key in ("lr", "head_lr") and not 0 < number <= 1) \
                or (key in ("weight_decay", "rdrop") and number < 0) \
                or (key in ("head_dropout", "label_smoothing") and not 0 <= number < 1) \
                or (key == "max_batch_size" and not (number >= 1 and number == int(number))):
            raise ValueError(f"--task_settings {item!r}: out of range (finite; lr, head_lr in (0, 1]; weight_decay, rdrop "
                             f">= 0; head_dropout, label_smoothing in [0, 1); max_batch_size a whole number >= 1)")
        if key == "max_batch_size":
            number = int(number)
        if key == "label_smoothing" and number and TASKS[task].kind == "regression":
            raise ValueError(f"--task_settings {item!r}: {task} is a regression task; label smoothing applies to "
                             f"classification")
        values.setdefault(task, {})[key] = number
    return {task: TaskSettings(**given) for task, given in values.items()}

# Sophia's rho per estimator, chosen so that about a quarter of the coordinates are unclipped on the
# embedded MiniLM at batch 32 (docs/techniques.md; tests/test_techniques.py checks the 10-50% range).
# The two estimators differ in scale: GNB gives B * g^2 (batch mean gradients, B = 32 examples where
# the paper's GPT-2 runs count ~500k tokens), Hutchinson the far larger, signed u * Hu.
SOPHIA_RHO = {"sophiag": 2.0, "sophiah": 5e-4}

# TaskSettings.max_batch_size's flags, one per task (they came first; --task_settings TASK.max_batch_size=N
# says the same).
BATCH_CAP_ALIASES = {task: f"max_batch_size_{task}" for task in TASKS}


def setting(default, help: str, choices: tuple | None = None, group: str = "training", before=NOT_RECORDED):
    """A TrainConfig field: its default, the --help text, allowed values and the --help section.

    `before`: the value that runs saved before this setting existed had, where that differs from
    `default` (`TrainConfig.from_saved` fills it in, so a resumed or tested run keeps its behaviour)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                                        "before": before})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. argparse flags are generated from these fields (flags.py);
    `__post_init__` rejects impossible combinations before any data is read."""
    # --- data
    data_dir: str = setting("data", "folder with the course CSV files", group="data")
    tasks: str = setting("sst,para,sts", "comma-separated tasks to train (sst, para, sts, cfimdb)", group="data")
    max_length: int = setting(128, "truncate inputs to this many tokens (pairs: longest first)", group="data")
    max_train_examples: int | None = setting(None, "use at most this many training rows per task (quick runs)",
                                            group="data")
    max_dev_examples: int | None = setting(None, "evaluate on at most this many dev rows per task (quick runs)",
                                          group="data")
    drop_longest: float = setting(0.0, "drop this fraction of each task's longest training rows (untruncated "
                                  "tokens; a pair's joint encoding) before training", group="data")
    augment: str | None = setting(None, "training-data augmentation, made once before training (augment.py): "
                                  "eda (Wei & Zou 2019: synonym replacement from WordNet, random insertion, swap "
                                  "and deletion), swap ((a, b) -> (b, a) for the symmetric pair tasks), or "
                                  "eda,swap. Copies keep their row's label; the task schedule counts the "
                                  "original rows", group="data")
    augment_tasks: str | None = setting(None, "tasks to augment (default: sst for eda, whose edits can change a "
                                        "pair's label; para and sts for swap)", group="data")
    eda_alpha: float = setting(0.1, "EDA: the paper's alpha, the share of a sentence's words each operation "
                               "changes (at least one)", group="data")
    eda_num_aug: int = setting(4, "EDA: augmented copies per sentence (the paper's n_aug; 4 for 5,000+ rows)",
                               group="data")
    # --- model
    bert_path: str | None = setting(None, "HuggingFace-format BERT folder (default: the embedded all-MiniLM-L6-v2)",
                                   group="model")
    option: str = setting("finetune", "pretrain: frozen encoder, heads trained; finetune: everything; "
                         "individual_pretrain: each head alone on the frozen encoder; test: evaluate a checkpoint; "
                         "ensemble: combine finished runs (--ensemble)",
                         ("pretrain", "finetune", "individual_pretrain", "test", "ensemble"), group="model")
    pretrained_model_name: str | None = setting(None, "checkpoint (.pt file or run folder) to start from; "
                                               "required by --option test", group="model")
    pooling: str = setting("mean", "sentence vector: pooler (tanh over [CLS]) or mean (masked mean of tokens)",
                          ("pooler", "mean"), group="model")
    sts_head: str = setting("joint", "STS: joint ([CLS] a [SEP] b [SEP] -> regression) or cosine (siamese)",
                           ("joint", "cosine"), group="model")
    eval_both_orders: bool = setting(True, "predict the symmetric pair tasks (para, sts; joint encoding) from "
                                     "both orders, (a, b) and (b, a), averaging logits or scores: at six seeds "
                                     "of the default +0.0017 Quora, +0.0056 STS r, +0.0015 overall (higher at "
                                     "every seed) for one more forward pass per dev/test pair (+78 s per run "
                                     "on 2 CPU cores; docs/results.md)", group="model", before=False)
    n_hidden_layers: int = setting(0, "hidden layers in each task head", group="model")
    hidden_dropout_prob: float = setting(0.1, "dropout in the task heads", group="model")
    encoder_dropout: float | None = setting(0.05, "dropout inside the encoder (embeddings, attention "
                                            "probabilities, each sublayer's output); none: the checkpoint's "
                                            "config.json values (0.1 for MiniLM and BERT); the default, half "
                                            "of that, did better on Quora and STS in the one-epoch default "
                                            "recipe (docs/results.md)", group="model", before=None)
    separate_encoders: bool = setting(False, "one encoder per task, nothing shared: the single-task baseline "
                                      "inside the same loop and schedule", group="model")
    use_pal: bool = setting(False, "projected attention layers (Stickland & Murray 2019): a task-specific low-rank "
                            "attention in parallel with every encoder layer", group="model")
    pal_size: int = setting(204, "PAL: width of the low-rank space", group="model")
    pal_per_layer: bool = setting(False, "PAL: separate encoder/decoder projections per layer (default: shared "
                                  "across layers, per task, as in the paper)", group="model")
    adapter_size: int | None = setting(None, "Houlsby adapters of this bottleneck width after the attention and "
                                       "feed-forward sublayers of every encoder layer", group="model")
    adapter_sharing: str = setting("per_task", "adapters: one set per task or one shared set",
                                   ("per_task", "shared"), group="model")
    freeze_bert: bool = setting(False, "train only PALs, adapters and heads (the pretrained encoder stays fixed)",
                                group="model")
    freeze_embeddings: bool = setting(True, "keep the embedding layer fixed (word, position, type embeddings and "
                                      "their LayerNorm): no gradient or optimiser update for the word embeddings "
                                      "(11.7M of MiniLM's 22.7M parameters), and the backward pass stops at layer 0; "
                                      "--no-freeze_embeddings trains them", group="model")
    freeze_layers: int = setting(0, "keep the bottom N encoder layers fixed as well: with the embeddings frozen "
                                 "the backward pass stops at layer N, so a step costs less (not with --smart, which "
                                 "perturbs the embedding output, nor with PALs/adapters, which train in every layer)",
                                 group="model")
    # --- schedules of what trains
    unfreeze_interval: int | None = setting(None, "gradual unfreezing: start with the heads (and pooler), unfreeze "
                                            "one more encoder layer from the top every N epochs, embeddings last",
                                            group="schedules")
    freeze_bert_last_epochs: int = setting(0, "train only the heads (and PALs/adapters) in the last N epochs",
                                           group="schedules")
    # --- losses
    sst_loss: str = setting("ce", "SST loss: ce (cross-entropy) or ordinal (cumulative binary cross-entropy over "
                            "the 4 thresholds of the 5 ordered classes)", ("ce", "ordinal"), group="losses")
    class_weights: bool = setting(False, "weight classification losses by inverse class frequency (sst, para, "
                                  "cfimdb)", group="losses")
    rdrop: float = setting(0.0, "R-Drop (Liang et al. 2021): every training batch passes the model twice with "
                           "independent dropout masks, and the loss is the two passes' mean task loss plus "
                           "RDROP/4 times their two-way KL divergence (squared difference for STS): the paper's "
                           "alpha, 0.1 to 1 on GLUE (rdrop.py). Costs a second forward and backward on each "
                           "batch it applies to; per task with --task_settings TASK.rdrop=ALPHA; 0: off",
                           group="losses")
    label_smoothing: float = setting(0.0, "label smoothing (Szegedy et al. 2016) on the classification tasks (sst, "
                                     "para, cfimdb; not sts): the target is 1 - EPS on the label plus EPS spread over "
                                     "the classes (binary targets (1 - EPS) y + EPS / 2); per task with "
                                     "--task_settings TASK.label_smoothing=EPS; 0: off", group="losses")
    # --- optimisation
    epochs: int = setting(1, "training epochs")
    batch_size: int = setting(32, "effective batch size per step (split into micro-batches by the caps below)")
    # The per-task micro-batch caps are task settings (TASK.max_batch_size); these flags are their aliases.
    max_batch_size_sst: int | None = setting(None, "micro-batch cap for sst (gradient accumulation above it); the "
                                             "same as --task_settings sst.max_batch_size=N")
    max_batch_size_para: int | None = setting(None, "micro-batch cap for para (--task_settings para.max_batch_size)")
    max_batch_size_sts: int | None = setting(None, "micro-batch cap for sts (--task_settings sts.max_batch_size)")
    max_batch_size_cfimdb: int | None = setting(None, "micro-batch cap for cfimdb "
                                                "(--task_settings cfimdb.max_batch_size)")
    time_budget: float | None = setting(None, "minutes for the whole run (start-up, training, every evaluation, "
                                        "the predictions): the steps per epoch are set from timed calibration steps "
                                        "(1% of the budget, at least 20) and a timed sample of the evaluation, and "
                                        "recorded in config.json as num_batches_per_epoch (repeat the run exactly "
                                        "with that and --time_budget none); if the steps then run slower than "
                                        "calibrated, training stops in time for the evaluation and predictions, and "
                                        "the stop is recorded as stop_at_step")
    stop_at_step: int | None = setting(None, "end training after this many steps in all, the learning-rate schedule "
                                       "still spanning every epoch's steps (--time_budget records it when it "
                                       "stopped a run early: --config RUN/config.json --time_budget none repeats it)")
    num_batches_per_epoch: int | None = setting(1400, "steps per epoch (none: one pass over the smallest task for "
                                               "every task); the default fits a 2-core CPU in 20 minutes")
    task_scheduler: str = setting("proportional", "which task each step trains (all: one batch of every task, "
                                 "losses summed)", ("round_robin", "random", "proportional", "pal", "sequential",
                                                    "all"))
    task_settings: str = setting("", "per-task settings, TASK.KEY=VALUE separated by commas, keys "
                                 + ", ".join(TaskSettings.keys()) + " (see config.TaskSettings); e.g. "
                                 "sst.lr=5e-5,sts.head_dropout=0.3")
    optimizer: str = setting("adamw", "hand-written optimizer (optimizer.py)", ("adamw", "sophiag", "sophiah"))
    lr: float | None = setting(None, "peak learning rate (default: 1e-4 for adamw, 5e-5 for sophiag and sophiah)")
    head_lr: float | None = setting(1e-3, "learning rate of the task heads (none: --lr)")
    weight_decay: float = setting(0.01, "decoupled weight decay (not on biases and LayerNorm weights)")
    layer_lr_decay: float = setting(1.0, "layer-wise learning-rate decay: the top encoder layer trains at the "
                                    "learning rate, each layer below at this times the one above, the "
                                    "embeddings one step below the bottom layer; pooler, PALs, adapters and "
                                    "heads keep theirs (optimizer.layer_lr_factor). 1: off. On the default recipe 0.9 (and 0.85 with --lr "
                                    "1.5e-4) did not pay at two seeds (docs/results.md)")
    beta1: float | None = setting(None, "first-moment decay (default: 0.9 for adamw, 0.965 for sophia*)")
    beta2: float | None = setting(None, "second-moment / Hessian EMA decay (default: 0.999 for adamw, 0.99 for "
                                  "sophia*)")
    eps: float | None = setting(None, "optimizer epsilon (default: 1e-8 for adamw; 1e-15 for sophia*, the official "
                                "code's guard, far below rho * h)")
    rho: float | None = setting(None, "Sophia: clipping scale rho (default: 2 for sophiag, 5e-4 for sophiah). The "
                                "official README (Liuhong99/Sophia) advises a rho at which 10-50 percent of the "
                                "coordinates are not clipped (its train/win_rate); these defaults give about 25 "
                                "percent on MiniLM at batch 32 (logged as technique/sophia_unclipped)")
    hess_interval: int = setting(10, "Sophia: refresh the Hessian estimate every k steps")
    clip: float | None = setting(1.0, "clip the global gradient norm to this (none: no clipping)")
    scheduler: str = setting("linear", "learning-rate schedule after warm-up",
                            ("linear", "cosine", "plateau", "constant"))
    warmup_ratio: float = setting(0.1, "fraction of all steps spent warming up linearly")
    patience: int | None = setting(None, "stop after this many epochs without a better dev overall score")
    ema_decay: float | None = setting(None, "evaluate, keep and predict with an exponential moving average of the "
                                      "weights (bias-corrected, so the starting weights carry none; "
                                      "optimizer.weight_average_rate) with this decay per step (0.998: a window "
                                      "of about 500 steps); training goes on from the raw weights. On the "
                                      "default's linear decay to zero it did not pay (0.99-0.998, two seeds: "
                                      "docs/results.md); meant for flat or long schedules")
    max_bad_steps: int = setting(25, "a step whose loss or gradient is not finite is skipped (no update), counted and "
                                 "logged; stop (exit status 3) after this many in a row. The fp16 GradScaler's "
                                 "overflow steps count too: from its initial scale a few in a row are normal")
    seed: int = setting(11711, "random seed (same seed, same machine: same result)")
    # --- SMART (smart.py)
    smart: bool = setting(False, "SMART adversarial smoothness regulariser (Jiang et al. 2020)", group="smart")
    smart_weight: float = setting(1.0, "weight of the adversarial divergence in the loss", group="smart")
    smart_eps: float = setting(0.1, "radius of each token's perturbation ball, in the units of the embedding-layer "
                               "output (MiniLM: mean absolute coordinate 0.37, token l2 norm 9.8; at 0.1 the "
                               "term's encoder gradient is 0.02-0.18 times the task loss's, docs/techniques.md)",
                               group="smart")
    smart_step_size: float = setting(0.1, "ascent step: each token moves this far along its normalised gradient "
                                     "(per token, as mt-dnn), then is projected back into the eps ball",
                                     group="smart")
    smart_noise_var: float = setting(1e-4, "variance sigma^2 of the Gaussian random start (std sqrt(1e-4) = 0.01, "
                                     "a tenth of eps: small next to the step, large enough for bf16)", group="smart")
    smart_steps: int = setting(1, "projected ascent steps", group="smart")
    smart_norm: str = setting("inf", "per-token norm of the eps ball and of the step's normalisation",
                              ("l2", "inf"), group="smart")
    smart_bregman_weight: float = setting(0.0, "weight of the Bregman proximal point term (divergence to a "
                                          "momentum copy of the model); 0: off", group="smart")
    smart_momentum: float = setting(0.99, "EMA decay of the momentum copy", group="smart")
    # --- gradient surgery (pcgrad.py)
    projection: str = setting("none", "gradient surgery on the shared encoder: none, pcgrad (Yu et al. 2020) or "
                              "gradvac (Wang et al. 2021); a surgery step draws one batch of every task",
                              ("none", "pcgrad", "gradvac"), group="surgery")
    pcgrad_reduction: str = setting("sum", "how projected task gradients are combined", ("sum", "mean"),
                                    group="surgery")
    gradvac_beta: float = setting(0.01, "EMA rate of GradVac's target similarities", group="surgery")
    # --- speed
    amp: str = setting("auto", "autocast: auto (bf16 where the hardware computes bf16 natively, else none), "
                      "none, bf16, fp16 (with a GradScaler; on a CPU it exists to check the GPU's fp16 path, "
                      "not for speed)", ("auto", "none", "bf16", "fp16"), group="speed")
    device: str = setting("auto", "auto (cuda when available), cpu or cuda", ("auto", "cpu", "cuda"), group="speed")
    compile: bool = setting(False, "torch.compile the encoder; measure first with python bench.py compile (2 CPU "
                            "cores: 1.00x eager on the AVX2 EPYC in fp32; on the Zen 4 EPYC 0.85x in bf16, "
                            "1.11x in fp32, after 45-55 s of compiling)",
                            group="speed")
    eval_batch_size: int = setting(32, "batch size for evaluation (batches go longest first); on 2 CPU cores 32 "
                                   "predicted 1.2x (fp32) and 1.3x (bf16) as fast as 128 (python bench.py "
                                   "evaluation); on a GPU use more", group="speed")
    # --- output
    save_path: str | None = setting(None, "run folder (default: runs/<timestamp>-<name>)", group="output")
    name: str = setting("multitask", "run name used in the default run folder", group="output")
    predictions_dir: str | None = setting(None, "where prediction CSVs go (default: <run folder>/predictions); "
                                          "a folder that already holds predictions is refused (a --resume "
                                          "rewrites its own), as is one another process is writing to",
                                         group="output")
    resume: str | None = setting(None, "run folder of an interrupted run to continue", group="output")
    profile: int | None = setting(None, "PyTorch profiler over this many training steps after 7 warm-up steps, "
                                  "all within the first epoch: a trace in the run's TensorBoard (profile/) and a "
                                  "table of the top operators",
                                  group="output")
    log_every: int = setting(20, "log training loss and throughput every this many steps", group="output")
    checkpoint_every: int | None = setting(200, "also save last.pt every this many steps inside an epoch, with all that an "
                                           "exact --resume needs (none: at epoch ends only); 200 steps are about 2 "
                                           "minutes of the default run on a 2-core CPU, one save 0.3-0.7 s (176 MB)",
                                           group="output")
    # --- ensemble
    ensemble: tuple[str, ...] = setting((), "--option ensemble: the run folders (or prediction folders) to combine",
                                        group="ensemble")
    ensemble_method: str = setting("greedy", "greedy: forward selection with replacement on half of dev (Caruana "
                                   "et al., 2004); average: probabilities and scores averaged; vote: majority vote "
                                   "(STS averaged). Scored on the other half; --seed splits dev",
                                   ("greedy", "average", "vote"), group="ensemble")

    @classmethod
    def from_saved(cls, saved: dict, **overrides) -> "TrainConfig":
        """The config of a saved run (its config.json or checkpoint), with `overrides` on top. A setting
        the run predates takes the value such runs had (`setting(before=...)`), not today's default."""
        missing = {f.name: f.metadata["before"] for f in dataclasses.fields(cls)
                   if f.name not in saved and f.metadata["before"] is not NOT_RECORDED}
        return cls(**{**saved, **missing, **overrides})

    def __post_init__(self):
        object.__setattr__(self, "ensemble", tuple(self.ensemble))  # JSON gives a list back
        self.check_values()
        self.check_combinations()

    def check_values(self):
        """Each setting alone: finite, among its choices, within its range (ValueError naming the flag)."""
        for field in dataclasses.fields(self):  # nan passes every `x <= 0` check below; inf makes no step size
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{field.name} must be a finite number, got {value}")
            choices = field.metadata["choices"]  # argparse checks the flags; presets and hpo.py arrive here
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{field.name} must be one of {', '.join(choices)}, got {value!r}")
        unknown = [t for t in self.task_names if t not in TASKS]
        if unknown or not self.task_names:
            raise ValueError(f"--tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"--tasks lists a task twice: {self.tasks}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size", "hess_interval", "log_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_dev_examples", "num_batches_per_epoch", "patience", "checkpoint_every",
                     "stop_at_step", *BATCH_CAP_ALIASES.values()):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--beta1 and --beta2 must be in [0, 1), got {self.betas}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"--clip must be > 0 or none (no clipping), got {self.clip}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(f"--layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema_decay must be in [0, 1) or none, got {self.ema_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.hidden_dropout_prob < 1:
            raise ValueError(f"--hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")
        if self.encoder_dropout is not None and not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"--encoder_dropout must be in [0, 1) or none, got {self.encoder_dropout}")
        if (self.rho is not None and self.rho <= 0) or (self.eps is not None and self.eps < 0):
            raise ValueError(f"--rho must be > 0 and --eps >= 0, got {self.rho} and {self.eps}")
        if any(rate is not None and not 0 < rate <= 1 for rate in (self.lr, self.head_lr)):
            raise ValueError(f"--lr and --head_lr must be in (0, 1] (AdamW and Sophia move each weight by about "
                             f"the rate per step), got {self.lr} and {self.head_lr}")
        if len(set(self.ensemble)) != len(self.ensemble):
            raise ValueError(f"--ensemble names a run twice: {' '.join(self.ensemble)}")
        if self.pal_size < 1 or (self.adapter_size is not None and self.adapter_size < 1):
            raise ValueError("--pal_size and --adapter_size must be >= 1")
        if self.freeze_layers < 0:
            raise ValueError(f"--freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.unfreeze_interval is not None and self.unfreeze_interval < 1:
            raise ValueError(f"--unfreeze_interval must be >= 1, got {self.unfreeze_interval}")
        if not 0 <= self.smart_momentum < 1 or not 0 < self.gradvac_beta <= 1:
            raise ValueError("--smart_momentum must be in [0, 1) and --gradvac_beta in (0, 1]")
        if not 0 <= self.drop_longest < 1:
            raise ValueError(f"--drop_longest must be in [0, 1), got {self.drop_longest}")
        unknown = [m for m in self.augment_methods if m not in ("eda", "swap")]
        if unknown or (self.augment is not None and not self.augment_methods):
            raise ValueError(f"--augment: unknown method(s) {unknown or self.augment!r}; known: eda, swap")
        if not 0 < self.eda_alpha < 1 or self.eda_num_aug < 1:
            raise ValueError("--eda_alpha must be in (0, 1) and --eda_num_aug >= 1")
        if self.profile is not None and self.profile < 1:
            raise ValueError(f"--profile must be >= 1, got {self.profile}")
        parse_task_settings(self.task_settings, self.task_names)  # raises on a bad item
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label_smoothing must be in [0, 1) (0: off), got {self.label_smoothing}")
        if self.rdrop < 0:
            raise ValueError(f"--rdrop must be >= 0 (0: off), got {self.rdrop}")

    def check_combinations(self):
        """Settings that cannot go together, or one that needs another (ValueError saying what to do)."""
        if self.option == "test" and self.pretrained_model_name is None:
            raise ValueError("--option test needs --pretrained_model_name (a checkpoint or run folder)")
        if (self.option == "ensemble") != bool(self.ensemble) or (self.ensemble and len(self.ensemble) < 2):
            raise ValueError("--option ensemble and --ensemble RUN_DIR RUN_DIR [...] (two runs or more) go together")
        if self.sts_head == "cosine" and "sts" not in self.task_names:
            raise ValueError("--sts_head cosine needs the sts task in --tasks")
        if self.option in ("pretrain", "individual_pretrain") and self.sts_head == "cosine":
            raise ValueError(f"--option {self.option} freezes the encoder, which leaves the cosine STS head "
                             f"nothing to train: use --sts_head joint")
        if self.resume is not None and self.option == "individual_pretrain":
            raise ValueError("--resume is not available for --option individual_pretrain (its runs are short: "
                             "start it again)")
        if self.freeze_bert and not (self.use_pal or self.adapter_size):
            raise ValueError("--freeze_bert trains PALs/adapters and heads: add --use_pal or --adapter_size "
                             "(or use --option pretrain to train the heads alone)")
        if not 0 <= self.freeze_bert_last_epochs < self.epochs:
            raise ValueError(f"--freeze_bert_last_epochs must be in [0, epochs), got {self.freeze_bert_last_epochs}")
        if self.smart and (self.smart_steps < 1 or self.smart_eps <= 0 or self.smart_weight < 0):
            raise ValueError("--smart needs --smart_steps >= 1, --smart_eps > 0 and --smart_weight >= 0")
        if self.smart_bregman_weight > 0 and not self.smart:
            raise ValueError("--smart_bregman_weight is part of SMART: add --smart")
        if self.time_budget is not None and (self.time_budget <= 0 or self.option == "individual_pretrain"):
            raise ValueError(f"--time_budget must be > 0 minutes and not with --option individual_pretrain, "
                             f"got {self.time_budget}")
        if self.augment_tasks is not None:
            if not self.augment_methods:
                raise ValueError("--augment_tasks needs --augment")
            outside = [t for t in self.augment_tasks.split(",") if t.strip() not in self.task_names]
            if outside:
                raise ValueError(f"--augment_tasks: {outside} not among --tasks ({self.tasks})")
        if "swap" in self.augment_methods:
            asymmetric = [t for t in self.augmented_tasks("swap") if not TASKS[t].symmetric]
            if asymmetric or not self.augmented_tasks("swap"):
                raise ValueError(f"--augment swap needs symmetric sentence-pair tasks (para, sts); got "
                                 f"{asymmetric or 'none among --tasks'}")
        if self.profile is not None and self.option == "individual_pretrain":
            raise ValueError("--profile profiles the multitask training loop; --option individual_pretrain trains "
                             "each head in a loop of its own")
        if self.label_smoothing and not [t for t in self.task_names if TASKS[t].kind != "regression"]:
            raise ValueError(f"--label_smoothing applies to classification tasks, and --tasks {self.tasks} has none")
        without_dropout = [t for t in self.task_names if self.settings_for(t).rdrop > 0
                           and self.encoder_dropout == 0 and self.settings_for(t).head_dropout == 0]
        if without_dropout:
            raise ValueError(f"R-Drop compares two dropout masks, but {', '.join(without_dropout)} would train "
                             f"without dropout (--encoder_dropout 0 and no head dropout): its two passes would be "
                             f"the same and the term 0")
        per_task = parse_task_settings(self.task_settings, self.task_names)
        several = self.task_scheduler == "all" or self.projection != "none"
        encoder_keys = sorted({k for s in per_task.values() for k in ("lr", "weight_decay") if getattr(s, k) is not None})
        if several and encoder_keys and not self.separate_encoders:
            raise ValueError(f"--task_settings {', '.join(encoder_keys)} set the shared encoder's rate on one "
                             f"task's steps, but with --task_scheduler all or --projection every step trains "
                             f"all tasks: set head_lr instead")
        for task, own in per_task.items():
            alias = getattr(self, BATCH_CAP_ALIASES[task])
            if own.max_batch_size is not None and alias is not None and own.max_batch_size != alias:
                raise ValueError(f"--{BATCH_CAP_ALIASES[task]} {alias} and --task_settings "
                                 f"{task}.max_batch_size={own.max_batch_size} set the same cap: give one")
        if self.separate_encoders and (self.projection != "none" or self.use_pal or self.adapter_size):
            raise ValueError("--separate_encoders shares nothing: gradient surgery, PALs and adapters work on a "
                             "shared encoder")
        if self.projection != "none" and len(self.task_names) < 2:
            raise ValueError(f"--projection {self.projection} needs at least two tasks")
        if self.resume is not None and self.save_path is not None and self.save_path != self.resume:
            raise ValueError("--resume continues in its own run folder; do not also give --save_path")
        if self.option == "individual_pretrain" and self.projection != "none":
            raise ValueError(f"--option individual_pretrain trains each task's head alone: --projection "
                             f"{self.projection} needs several tasks in one step")

    def single_task(self, task: str) -> "TrainConfig":
        """The settings of `task`'s own run (--option individual_pretrain trains each head alone): --tasks the
        one task, its own --task_settings items, its augmentation (made once for the whole run; named here so
        that each head's checkpoint says what it trained on), its label smoothing (none for a regression)."""
        own = [item for item in self.task_settings.split(",") if item.split(".")[0].strip() == task]
        methods = [m for m in self.augment_methods if task in self.augmented_tasks(m)]
        return dataclasses.replace(self, tasks=task, task_settings=",".join(own), augment=",".join(methods) or None,
                                   augment_tasks=task if methods else None,
                                   label_smoothing=self.settings_for(task).label_smoothing)

    @property
    def betas(self) -> tuple[float, float]:
        """--beta1/--beta2, or the chosen optimizer's paper defaults."""
        default = (0.9, 0.999) if self.optimizer == "adamw" else (0.965, 0.99)
        return (default[0] if self.beta1 is None else self.beta1, default[1] if self.beta2 is None else self.beta2)

    @property
    def peak_lr(self) -> float:
        """--lr, or the chosen optimizer's default. Sophia's is half AdamW's: on the default recipe Sophia-G
        at 1e-4 ended 0.035-0.045 below AdamW overall, and at 2e-4 it did not train (docs/results.md)."""
        return self.lr if self.lr is not None else 1e-4 if self.optimizer == "adamw" else 5e-5

    @property
    def optimizer_eps(self) -> float:
        """--eps, or the chosen optimizer's default."""
        return self.eps if self.eps is not None else 1e-8 if self.optimizer == "adamw" else 1e-15

    @property
    def sophia_rho(self) -> float:
        """--rho, or the default measured for the chosen Sophia estimator (unused by adamw)."""
        return self.rho if self.rho is not None else SOPHIA_RHO.get(self.optimizer, 0.0)

    @property
    def augment_methods(self) -> list[str]:
        return [] if self.augment is None else [m.strip() for m in self.augment.split(",") if m.strip()]

    def augmented_tasks(self, method: str) -> list[str]:
        """The tasks `method` augments: --augment_tasks, else sst for eda and the symmetric pair tasks for swap."""
        if method not in self.augment_methods:
            return []
        if self.augment_tasks is not None:
            return [t.strip() for t in self.augment_tasks.split(",") if t.strip()]
        default = ["sst"] if method == "eda" else [t for t in self.task_names if TASKS[t].symmetric]
        return [t for t in default if t in self.task_names]

    def settings_for(self, task: str) -> TaskSettings:
        """This task's settings with the run's own flags filled in (every field a number, but max_batch_size
        None where the task's batches are not capped)."""
        own = parse_task_settings(self.task_settings, self.task_names).get(task, TaskSettings())
        defaults = {"lr": self.peak_lr, "head_lr": self.head_lr if self.head_lr is not None else self.peak_lr,
                    "weight_decay": self.weight_decay, "head_dropout": self.hidden_dropout_prob, "rdrop": self.rdrop,
                    "label_smoothing": self.label_smoothing if TASKS[task].kind != "regression" else 0.0,
                    "max_batch_size": getattr(self, BATCH_CAP_ALIASES[task])}
        return TaskSettings(**{key: defaults[key] if value is None else value
                               for key, value in dataclasses.asdict(own).items()})

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def micro_batch_size(self, task: str) -> int:
        """The size of `task`'s micro-batches: its max_batch_size, at most the batch."""
        cap = self.settings_for(task).max_batch_size
        return self.batch_size if cap is None else min(cap, self.batch_size)
