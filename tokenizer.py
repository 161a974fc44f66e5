"""BERT WordPiece tokenizer on the Rust `tokenizers` library.

Built from a checkpoint folder's `vocab.txt` and `tokenizer_config.json` (lower-casing and accent
stripping as the checkpoint says), it produces `[CLS] a [SEP]` for single sentences and
`[CLS] a [SEP] b [SEP]` for pairs, with token_type_ids 0 for the first segment and 1 for the second.

Two ways to call it:
- `tok(texts, pair_texts=None, max_length=128)`: a padded batch of int64 tensors, like HuggingFace.
- `tok.encode(texts, pair_texts=None, max_length=128)` then `tok.pad(...)`: unpadded id lists,
  so a dataset can tokenise once up front and pad each batch to its own longest sequence.
"""
import json
import os

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing

from errors import InputError, MissingInput
from pretrained import resolve_model_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BertTokenizer:
    def __init__(self, vocab_file: str, do_lower_case: bool = True, strip_accents: bool | None = None):
        if not os.path.isfile(vocab_file):
            raise MissingInput(f"{vocab_file}: vocabulary file not found (a model folder needs vocab.txt)")
        tokenizer = Tokenizer(WordPiece.from_file(vocab_file, unk_token="[UNK]"))
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise InputError(f"{vocab_file}: special tokens {missing} are not in the vocabulary")
        # strip_accents=None follows lower-casing, as BERT's original BasicTokenizer does.
        tokenizer.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=strip_accents, lowercase=do_lower_case)
        tokenizer.pre_tokenizer = BertPreTokenizer()
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0",
            pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        self._tokenizer = tokenizer
        self.pad_token_id = vocab["[PAD]"]
        self.cls_token_id = cls_id
        self.sep_token_id = sep_id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path: str | None = None) -> "BertTokenizer":
        """Load from a HuggingFace-format folder (None: the embedded all-MiniLM-L6-v2)."""
        model_dir = resolve_model_dir(path)
        settings = {}
        config_file = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                try:
                    settings = json.load(f)
                except json.JSONDecodeError as e:
                    raise InputError(f"{config_file}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(settings, dict):
                raise InputError(f"{config_file}: expected a JSON object, got {type(settings).__name__}")
        return cls(os.path.join(model_dir, "vocab.txt"),
                   do_lower_case=settings.get("do_lower_case", True),
                   strip_accents=settings.get("strip_accents"))

    def encode(self, texts: list[str], pair_texts: list[str] | None = None, max_length: int = 128
               ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token-type ids per example, unpadded; pairs truncated longest-first."""
        if pair_texts is not None and len(pair_texts) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pair_texts)} pair texts")
        self._tokenizer.enable_truncation(max_length, strategy="longest_first")
        inputs = list(texts) if pair_texts is None else list(zip(texts, pair_texts))
        encodings = self._tokenizer.encode_batch(inputs)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def pad(self, ids: list[list[int]], type_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest sequence: int64 tensors (batch, seq)."""
        seq_len = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), seq_len), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(ids), seq_len), dtype=torch.long)
        attention_mask = torch.zeros((len(ids), seq_len), dtype=torch.long)
        for row, (x, t) in enumerate(zip(ids, type_ids)):
            input_ids[row, :len(x)] = torch.tensor(x)
            token_type_ids[row, :len(t)] = torch.tensor(t)
            attention_mask[row, :len(x)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def __call__(self, texts: list[str] | str, pair_texts: list[str] | str | None = None,
                 max_length: int = 128) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
            pair_texts = [pair_texts] if isinstance(pair_texts, str) else pair_texts
        return self.pad(*self.encode(texts, pair_texts, max_length))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)
