"""The multitask model: the shared encoder (or one per task) and a head per task; the task losses and how
logits become predictions and ensemble outputs; which parameters belong to whom and which train in an
epoch (freezing, gradual unfreezing); --compile.
"""
import torch
import torch.nn.functional as F
from torch import nn

from bert import BertModel
from config import TrainConfig
from errors import InputError
from pipeline import encodes_alone
from tasks import TASKS, TaskSpec


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


def output_kind(spec: TaskSpec, sst_loss: str) -> str:
    """How a head's outputs are compared (SMART, Sophia's sampled labels): ordinal thresholds are
    independent Bernoulli logits, the others follow the task's kind."""
    return "binary" if spec.kind == "multiclass" and sst_loss == "ordinal" else spec.kind


def inverse_frequency_weights(spec: TaskSpec, labels: torch.Tensor) -> torch.Tensor | None:
    """Class weights n / (C * n_c) for classification tasks (mean weight 1 on the training data)."""
    if spec.kind == "regression":
        return None
    num_classes = spec.num_classes or 2
    counts = torch.bincount(labels.long(), minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


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


def shared_parameters(model: MultitaskBERT) -> list[nn.Parameter]:
    """Trainable parameters every task's gradient flows into: the encoder (and shared adapters)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")
            and not n.startswith("bert.pals.") and not (n.startswith("bert.adapters.")
                                                        and not n.startswith("bert.adapters.shared."))]


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
