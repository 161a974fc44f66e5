"""Tiny course-format data and a tiny BERT checkpoint, so whole training runs take seconds in tests."""
import json
import os
import random

import torch
from safetensors.torch import load_file, save_file

from bert import BertModel
from config import BertConfig, embedded_model_dir

WORDS = ["good", "bad", "film", "movie", "great", "awful", "is", "it", "a", "the", "how", "what", "why",
         "learn", "python", "fast", "sky", "blue", "man", "guitar", "plays", "dog", "runs", "?", "."]
TINY_CONFIG = dict(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1)


def blind_to_softmax(name: str) -> bool:
    """A parameter whose gradient is zero in theory: a key bias adds q . b to every score of a query's row,
    a constant that softmax ignores. In practice its gradient is rounding noise whose size depends on the
    CPU's kernels (exactly zero on some, about 1e-9 on others), so tests exclude it by this rule."""
    return name.endswith(".key.bias")


def write_tiny_bert(folder, seed: int = 0) -> str:
    """A HuggingFace-format folder: config.json, vocab.txt, model.safetensors of a random 2-layer BERT."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**TINY_CONFIG, "model_type": "bert"}, f)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**TINY_CONFIG))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


def write_embedded_model_layers(folder, layers: int) -> str:
    """The embedded MiniLM's embeddings and first `layers` layers, as a HuggingFace-format folder: its real
    weights and scales at a fraction of its cost (for paths that are slow on a CPU, such as fp16)."""
    source = embedded_model_dir()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    kept = [f"encoder.layer.{i}." for i in range(layers)]
    weights = {k: v for k, v in load_file(os.path.join(source, "model.safetensors")).items()
               if "encoder.layer." not in k or any(part in k for part in kept)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": layers}, f)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):  # the same tokenizer
        if os.path.isfile(os.path.join(source, name)):
            with open(os.path.join(source, name)) as f, open(os.path.join(folder, name), "w") as out:
                out.write(f.read())
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return str(folder)


def _sentence(rng: random.Random) -> str:
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))


def write_course_data(folder, rows: int = 24, seed: int = 0) -> str:
    """Course-format CSVs for sst, para, sts and cfimdb: train/dev/test, with the test files' shifted header.
    Labels follow a learnable rule (the count of 'good' words), so a few steps of training move the metrics."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    layouts = {"sst": ("ids-sst", ["sentence"], "sentiment"), "cfimdb": ("ids-cfimdb", ["sentence"], "sentiment"),
               "para": ("quora", ["sentence1", "sentence2"], "is_duplicate"),
               "sts": ("sts", ["sentence1", "sentence2"], "similarity")}
    for task, (prefix, columns, label) in layouts.items():
        for split in ("train", "dev", "test"):
            name = f"{prefix}-{split}-student.csv" if split == "test" else f"{prefix}-{split}.csv"
            lines = []
            if split == "test" and len(columns) == 1:
                lines.append("0\t\tid\t" + columns[0])
            else:
                lines.append("\tid\t" + "\t".join(columns) + ("" if split == "test" else f"\t{label}"))
            for i in range(rows):
                texts = [_sentence(rng) for _ in columns]
                goods = sum(t.count("good") + t.count("great") for t in texts)
                value = {"sst": min(goods, 4), "cfimdb": int(goods > 0), "para": float(goods % 2),
                         "sts": float(min(goods, 5))}[task]
                fields = [str(i), f"{task}{split}{i:03d}", *texts]
                if split == "test" and len(columns) == 1:
                    fields.insert(1, f"{i}.0")
                elif split != "test":
                    fields.append(str(value))
                lines.append("\t".join(fields))
            with open(os.path.join(folder, name), "w") as f:
                f.write("\n".join(lines) + "\n")
    return str(folder)
