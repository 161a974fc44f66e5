"""Loading pretrained BERT weights from a local HuggingFace-format folder.

A folder holds `config.json` and `model.safetensors` or `pytorch_model.bin`. Two key styles are
seen in the wild and both load:
- plain: `embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...
- Google-converted: the same behind a `bert.` prefix, with `LayerNorm.gamma` / `LayerNorm.beta`.
Pre-training heads (`cls.*`) and buffers (`*.position_ids`) are dropped. Any other key that is
missing or unexpected, or has the wrong shape, is an error that names it.
"""
import os

import torch
from safetensors.torch import load_file
from torch import nn

from errors import InputError, MissingInput
from pretrained import BertConfig, resolve_model_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_checkpoint(model_dir: str) -> dict[str, torch.Tensor]:
    """The raw state dict of a folder's weights file (safetensors preferred)."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated files raise many different types
            raise InputError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise MissingInput(f"{model_dir}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")


def normalize_checkpoint_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map either key style onto this module's names; drop pre-training heads and buffers."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("cls.") or key.endswith("position_ids"):
            continue
        if key.startswith("bert."):
            key = key[len("bert."):]
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


class BertPreTrainedModel(nn.Module):
    """Weight initialisation and `from_pretrained` for the encoder in bert.py."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config

    def init_weights(self):
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module):
        # BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def pretrained_keys(self) -> set[str]:
        """Keys a checkpoint must provide: the encoder's own, not extra modules added for fine-tuning."""
        return set(self.state_dict().keys())

    @classmethod
    def from_pretrained(cls, path: str | None = None, **model_kwargs) -> "BertPreTrainedModel":
        """Build from a folder's config.json and load its weights (None: the embedded MiniLM).

        `model_kwargs` go to the constructor (e.g. dropout overrides or PAL/adapter settings);
        modules they add keep their own initialisation.
        """
        model_dir = resolve_model_dir(path)
        config = BertConfig.from_json_file(os.path.join(model_dir, "config.json"))
        model = cls(config, **model_kwargs)
        state = normalize_checkpoint_keys(read_checkpoint(model_dir))
        model.load_pretrained_state(state, source=model_dir)
        return model

    def load_pretrained_state(self, state: dict[str, torch.Tensor], source: str):
        expected = self.pretrained_keys()
        own = self.state_dict()
        missing = sorted(expected - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise InputError(f"{source}: checkpoint does not match the BERT architecture; "
                             f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}")
        wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(state) if state[k].shape != own[k].shape]
        if wrong:
            raise InputError(f"{source}: wrong shapes for {'; '.join(wrong)}")
        self.load_state_dict(state, strict=False)
