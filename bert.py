"""A BERT encoder written from scratch in PyTorch (Devlin et al. 2019).

Module and parameter names follow HuggingFace's BertModel so that its checkpoints load as they are
(see base_bert.py). Shapes: B = batch, T = sequence length, H = hidden size, N = heads, D = H / N.
"""
import torch
import torch.nn.functional as F
from torch import nn

from base_bert import BertPreTrainedModel
from pretrained import BertConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX, through oneDNN); on others
    (AVX2 only) bf16 is emulated and many times slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


# Attention with dropout on the CPU is written out (so that its mask comes from FastDropout) in fp32,
# in bf16 where bf16 is native, and in fp16 (which a CPU runs only to check the GPU's fp16 path: written
# out, it draws the same masks as fp32, so the two precisions can be compared step by step); elsewhere,
# and on GPUs, it is SDPA's kernel.
WRITTEN_OUT_ATTENTION = {torch.float32: True, torch.bfloat16: cpu_native_bf16(), torch.float16: True}


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU keep mask comes from 16 random bits per element, four per 64-bit draw of the
    generator: F.dropout's bernoulli_ and even torch.rand draw once per element, serially, which was
    the largest cost of a bf16 train step after the matmuls (16% of it on the Zen 4 EPYC; 5% with
    this). The drop rate is p rounded to a multiple of 2^-16 (0.05 -> 0.0500031) and the kept values
    are scaled by 1 / (1 - that rate). Elsewhere (CUDA's fused kernel) it is plain nn.Dropout."""

    @staticmethod
    def threshold(p: float) -> int:
        """int16 values below this are dropped: round(p * 2^16) of the 2^16 equally likely values."""
        return round(p * 65536) - 32768

    @staticmethod
    def rate(p: float) -> float:
        """The drop rate actually used for a nominal `p`."""
        return round(p * 65536) / 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # full 64-bit range
        keep = bits.view(torch.int16)[:n].view(x.shape).ge(self.threshold(self.p))
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.rate(self.p)))  # 0 or 1 / (1 - rate)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        positions = torch.arange(seq_len, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))  # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with scaled_dot_product_attention and a padding mask."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = FastDropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        # One matmul for the three projections instead of three: the weights stay separate
        # parameters (checkpoint names) and are concatenated here, a small copy per layer.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, weight, bias).view(B, T, 3, self.num_heads, H // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, N, T, D)
        dropout_p = self.dropout.p if self.training else 0.0
        if dropout_p > 0 and q.device.type == "cpu" and WRITTEN_OUT_ATTENTION.get(q.dtype, False):
            # SDPA's CPU kernel for dropout is this same math (its mask from the slower bernoulli_),
            # written out here for FastDropout. Under bf16 autocast only where bf16 is native: SDPA
            # computes in fp32 there, these matmuls in bf16 (emulated without AVX512-BF16: 30x slower).
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, N, T, T)
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            out = self.dropout(scores.softmax(-1)) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(B, T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor, adapter: nn.Module | None = None) -> torch.Tensor:
        h = self.dropout(self.dense(attended))
        return self.LayerNorm((h if adapter is None else adapter(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, adapter: nn.Module | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask), x, adapter)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, adapter: nn.Module | None = None,
                parallel: torch.Tensor | None = None) -> torch.Tensor:
        h = self.dropout(self.dense(hidden))
        h = h if adapter is None else adapter(h)
        if parallel is not None:  # a PAL's output joins the residual sum inside the last LayerNorm
            residual = residual + parallel
        return self.LayerNorm(h + residual)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block: attention, then the GELU feed-forward, each with a residual."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, adapters: "LayerAdapters | None" = None,
                parallel: torch.Tensor | None = None) -> torch.Tensor:
        """parallel: a PAL's output for this layer's input (B, T, H); adapters: this layer's pair."""
        attended = self.attention(x, mask, adapters.attention if adapters is not None else None)
        return self.output(self.intermediate(attended), attended,
                           adapters.feed_forward if adapters is not None else None, parallel)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence vector BERT was pre-trained to produce."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ProjectedAttentionLayers(nn.Module):
    """PALs (Stickland & Murray 2019, Sec. 3.2): one task's low-rank attention in parallel with every layer.

    TS_l(h) = V^D MH_l(V^E h): project down to `size` with the encoder V^E, multi-head self-attention
    in that space (its own per layer), back up with the decoder V^D. V^E and V^D are shared across
    layers (the paper's setting) or per layer. V^D starts at zero, so at step 0 the model is exactly
    the pretrained BERT.
    """

    def __init__(self, config: BertConfig, size: int, num_layers: int, per_layer: bool):
        super().__init__()
        heads = config.num_attention_heads
        if size % heads:
            raise ValueError(f"pal_size {size} must be a multiple of num_attention_heads {heads}")
        n_proj = num_layers if per_layer else 1
        self.down = nn.ModuleList(nn.Linear(config.hidden_size, size, bias=False) for _ in range(n_proj))
        self.up = nn.ModuleList(nn.Linear(size, config.hidden_size, bias=False) for _ in range(n_proj))
        self.attention = nn.ModuleList(BertSelfAttention(BertConfig(**{
            **config.__dict__, "hidden_size": size, "attention_probs_dropout_prob": 0.0})) for _ in range(num_layers))
        for module in [*self.down, *self.attention.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for up in self.up:
            nn.init.zeros_(up.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        k = layer if len(self.down) > 1 else 0
        return self.up[k](self.attention[layer](self.down[k](x), mask))  # (B, T, H)


class Adapter(nn.Module):
    """Houlsby et al. (2019) bottleneck adapter: h + W_up GELU(W_down h). W_up starts at zero (identity)."""

    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.up = nn.Linear(size, hidden_size)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class LayerAdapters(nn.Module):
    """The two adapters of one layer: after the attention output and after the feed-forward output."""

    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.attention = Adapter(hidden_size, size)
        self.feed_forward = Adapter(hidden_size, size)


class BertModel(BertPreTrainedModel):
    """The encoder. `model(input_ids, attention_mask, token_type_ids=None)` returns a dict with
    `last_hidden_state` (B, T, H) and `pooler_output` (B, H).

    The forward pass is split in two for techniques that perturb the embeddings (SMART):
    `embed(input_ids, token_type_ids)` -> (B, T, H), then `encode(embeddings, attention_mask)`.
    """

    def __init__(self, config: BertConfig, hidden_dropout_prob: float | None = None,
                 attention_probs_dropout_prob: float | None = None, tasks: tuple[str, ...] = (),
                 pal_size: int | None = None, pal_per_layer: bool = False, adapter_size: int | None = None,
                 adapter_sharing: str = "per_task"):
        if hidden_dropout_prob is not None or attention_probs_dropout_prob is not None:
            config = BertConfig(**{**config.__dict__,
                                   "hidden_dropout_prob": _pick(hidden_dropout_prob, config.hidden_dropout_prob),
                                   "attention_probs_dropout_prob": _pick(attention_probs_dropout_prob,
                                                                         config.attention_probs_dropout_prob)})
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.init_weights()
        # Task-specific modules, created after init_weights: they set their own (zero-start) init.
        layers = config.num_hidden_layers
        self.pals = nn.ModuleDict({task: ProjectedAttentionLayers(config, pal_size, layers, pal_per_layer)
                                   for task in tasks} if pal_size else {})
        adapter_keys = tasks if adapter_sharing == "per_task" else ("shared",)
        self.adapters = nn.ModuleDict({key: nn.ModuleList(LayerAdapters(config.hidden_size, adapter_size)
                                                          for _ in range(layers))
                                       for key in adapter_keys} if adapter_size else {})

    def pretrained_keys(self) -> set[str]:
        return {k for k in self.state_dict() if not k.startswith(("pals.", "adapters."))}

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids, token_type_ids)

    def encode(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None
               ) -> dict[str, torch.Tensor]:
        """task: selects that task's PALs and adapters (when the model has them)."""
        # Boolean mask (B, 1, 1, T): True where a key may be attended to.
        mask = attention_mask.bool()[:, None, None, :]
        pal = self.pals[task] if task in self.pals else None
        adapters = self.adapters["shared" if "shared" in self.adapters else task] if (
            "shared" in self.adapters or task in self.adapters) else None
        x = embeddings
        for i, layer in enumerate(self.encoder.layer):
            parallel = pal(x, mask, i) if pal is not None else None
            x = layer(x, mask, adapters[i] if adapters is not None else None, parallel)
        return {"last_hidden_state": x, "pooler_output": self.pooler(x)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, task: str | None = None) -> dict[str, torch.Tensor]:
        return self.encode(self.embed(input_ids, token_type_ids), attention_mask, task)


def _pick(value, default):
    return default if value is None else value
