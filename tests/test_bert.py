"""The from-scratch encoder and tokenizer against the reference implementation's outputs, and loading."""
import json
import os

import numpy as np
import pytest
import torch

from base_bert import normalize_checkpoint_keys
import bert
from bert import BertModel, FastDropout
from pretrained import BertConfig, embedded_model_dir
from tokenizer import BertTokenizer

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
needs_reference = pytest.mark.skipif(not os.path.isdir(REFERENCE_DIR), reason="the reference implementation's outputs are not beside the repository")


@pytest.fixture(scope="module")
def reference():
    arrays = np.load(os.path.join(REFERENCE_DIR, "minilm_l6_reference.npz"))
    with open(os.path.join(REFERENCE_DIR, "minilm_l6_reference_inputs.json")) as f:
        inputs = json.load(f)
    return arrays, inputs


@pytest.fixture(scope="module")
def minilm():
    return BertModel.from_pretrained().eval()


@needs_reference
@pytest.mark.parametrize("kind", ["single", "pair"])
def test_tokenizer_ids_match_reference(reference, kind):
    arrays, inputs = reference
    tok = BertTokenizer.from_pretrained()
    if kind == "single":
        batch = tok(inputs["singles"])
    else:
        first, second = zip(*inputs["pairs"])
        batch = tok(list(first), list(second))
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert batch[key].dtype == torch.int64
        np.testing.assert_array_equal(batch[key].numpy(), arrays[f"{kind}_{key}"], err_msg=key)


@needs_reference
@pytest.mark.parametrize("kind", ["single", "pair"])
def test_encoder_matches_reference(reference, minilm, kind):
    arrays, _ = reference
    mask = arrays[f"{kind}_attention_mask"]
    with torch.no_grad():
        out = minilm(torch.from_numpy(arrays[f"{kind}_input_ids"]), torch.from_numpy(mask),
                     torch.from_numpy(arrays[f"{kind}_token_type_ids"]))
    keep = torch.from_numpy(mask).bool()
    torch.testing.assert_close(out["last_hidden_state"][keep],
                               torch.from_numpy(arrays[f"{kind}_last_hidden_state"])[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooler_output"], torch.from_numpy(arrays[f"{kind}_pooler_output"]),
                               atol=1e-5, rtol=0)


def test_tokenizer_truncates_pairs_longest_first():
    tok = BertTokenizer.from_pretrained()
    ids, type_ids = tok.encode(["word " * 50], ["short pair"], max_length=16)
    assert len(ids[0]) == 16
    assert ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    assert type_ids[0].count(1) == 3  # "short pair [SEP]" kept whole, the long side was cut
    batch = tok(["a", "a much longer sentence here"])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]


@needs_reference
def test_embed_encode_split_matches_reference_and_encodes_the_given_embeddings(reference, minilm):
    """SMART perturbs between `embed` and `encode`: that split path itself reproduces the reference
    encoder, and `encode` computes from the embeddings it is given (a perturbation changes the output)."""
    arrays, _ = reference
    ids, mask = torch.from_numpy(arrays["pair_input_ids"]), torch.from_numpy(arrays["pair_attention_mask"])
    with torch.no_grad():
        embeddings = minilm.embed(ids, torch.from_numpy(arrays["pair_token_type_ids"]))
        out = minilm.encode(embeddings, mask)
        moved = minilm.encode(embeddings + 0.1, mask)
    keep = mask.bool()
    torch.testing.assert_close(out["last_hidden_state"][keep],
                               torch.from_numpy(arrays["pair_last_hidden_state"])[keep], atol=1e-5, rtol=0)
    assert (moved["last_hidden_state"][keep] - out["last_hidden_state"][keep]).abs().max() > 1e-3


def test_padding_does_not_change_outputs(minilm):
    tok = BertTokenizer.from_pretrained()
    alone = tok(["a short one"])
    padded = tok(["a short one", "a much longer sentence that forces padding on the first"])
    with torch.no_grad():
        a = minilm(**alone)["last_hidden_state"][0]
        b = minilm(**padded)["last_hidden_state"][0, :a.shape[0]]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


def write_google_style_checkpoint(folder, state, config=TINY):
    """A checkpoint as Google's TF->PyTorch conversion wrote them: `bert.` prefix, gamma/beta, cls heads."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "model_type": "bert"}, f)
    converted = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        converted["bert." + key] = value.clone()
    converted["bert.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    converted["cls.predictions.bias"] = torch.zeros(config["vocab_size"])
    converted["cls.seq_relationship.weight"] = torch.zeros(2, config["hidden_size"])
    torch.save(converted, os.path.join(folder, "pytorch_model.bin"))


def test_google_converted_checkpoint_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    source = BertModel(BertConfig(**TINY)).eval()
    write_google_style_checkpoint(tmp_path / "ckpt", source.state_dict())
    loaded = BertModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        expected, got = source(ids, mask), loaded(ids, mask)
    assert torch.equal(expected["last_hidden_state"], got["last_hidden_state"])
    assert torch.equal(expected["pooler_output"], got["pooler_output"])


def test_wrong_shape_names_the_key(tmp_path):
    state = BertModel(BertConfig(**TINY)).state_dict()
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(33, 16)
    write_google_style_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight"):
        BertModel.from_pretrained(str(tmp_path / "ckpt"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = BertModel(BertConfig(**TINY)).state_dict()
    del state["pooler.dense.bias"]
    state["encoder.layer.0.surprise"] = torch.zeros(1)
    write_google_style_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(ValueError, match=r"missing keys: \['pooler\.dense\.bias'\].*unexpected keys: "
                                         r"\['encoder\.layer\.0\.surprise'\]"):
        BertModel.from_pretrained(str(tmp_path / "ckpt"))


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        BertModel.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        BertModel.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        BertModel.from_pretrained(str(tmp_path / "broken"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        BertModel.from_pretrained(str(tmp_path / "noweights"))


def test_key_normalization_keeps_plain_style():
    state = {"embeddings.LayerNorm.weight": torch.ones(1), "encoder.layer.0.output.LayerNorm.beta": torch.ones(1),
             "cls.predictions.transform.dense.weight": torch.ones(1), "embeddings.position_ids": torch.ones(1)}
    assert sorted(normalize_checkpoint_keys(state)) == ["embeddings.LayerNorm.weight",
                                                        "encoder.layer.0.output.LayerNorm.bias"]


def test_embedded_model_folder_has_its_files():
    folder = embedded_model_dir()
    for name in ("config.json", "vocab.txt", "model.safetensors"):
        assert os.path.isfile(os.path.join(folder, name))


@pytest.mark.parametrize("kwargs", [dict(pal_size=8), dict(pal_size=8, pal_per_layer=True),
                                    dict(adapter_size=4), dict(adapter_size=4, adapter_sharing="shared")])
def test_pals_and_adapters_start_as_the_plain_model_and_then_learn(kwargs):
    torch.manual_seed(0)
    plain = BertModel(BertConfig(**TINY)).eval()
    extended = BertModel(BertConfig(**TINY), tasks=("sst", "sts"), **kwargs).eval()
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("pals.", "adapters.")) for k in missing) and missing
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(ids)
    assert torch.equal(plain(ids, mask)["last_hidden_state"], extended(ids, mask, task="sst")["last_hidden_state"])
    # The zero-initialised output projections get a gradient, so the task modules do learn.
    extended(ids, mask, task="sst")["pooler_output"].sum().backward()
    task_grads = [p.grad for n, p in extended.named_parameters() if n.startswith(("pals.sst", "adapters.sst", "adapters.shared"))
                  and (n.endswith("up.weight") or ".up." in n)]
    assert task_grads and all(g is not None and g.abs().sum() > 0 for g in task_grads)
    if "pal_size" in kwargs:
        assert all(p.grad is None for n, p in extended.named_parameters() if n.startswith("pals.sts"))


def test_task_modules_are_not_required_from_a_checkpoint(tmp_path):
    state = BertModel(BertConfig(**TINY)).state_dict()
    write_google_style_checkpoint(tmp_path / "ckpt", state)
    model = BertModel.from_pretrained(str(tmp_path / "ckpt"), tasks=("sst",), pal_size=8, adapter_size=4)
    assert set(model.pals) == {"sst"} and set(model.adapters) == {"sst"}


def test_pal_size_must_divide_into_heads():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertModel(BertConfig(**TINY), tasks=("sst",), pal_size=7)


def test_fast_dropout_is_inverted_dropout_with_the_right_rate():
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert FastDropout.rate(0.1) == 6554 / 65536 and abs(FastDropout.rate(0.05) - 0.05) < 1e-5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - FastDropout.rate(0.1))))
    rates = [(FastDropout(p).train()(torch.ones(400_000)) == 0).float().mean().item() for p in (0.02, 0.3, 0.7)]
    assert all(abs(r - p) < 0.003 for r, p in zip(rates, (0.02, 0.3, 0.7))), rates  # every bit pattern counts
    masks = [FastDropout(0.5).train()(torch.ones(64)) for _ in range(2)]
    assert not torch.equal(*masks)  # a fresh mask per call
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept positions, scaled alike
    assert dropout.eval()(x) is x


def test_training_attention_path_equals_sdpa():
    # On CPU, training with attention dropout takes the written-out path; with a negligible rate it
    # must compute what eval mode's scaled_dot_product_attention does, padding included.
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY), hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    ids = torch.randint(1, 50, (3, 7))
    mask = (torch.arange(7)[None] < torch.tensor([[7], [4], [2]])).long()
    trained = model.train()(ids, mask)
    with torch.no_grad():
        evaluated = model.eval()(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(trained["last_hidden_state"][keep], evaluated["last_hidden_state"][keep],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["pooler_output"], evaluated["pooler_output"], atol=1e-6, rtol=0)


def test_bf16_training_attention_is_written_out_where_bf16_is_native(monkeypatch):
    """Under bf16 autocast on the CPU, attention with dropout is written out (its mask from FastDropout)
    where bf16 is native, and computes what SDPA does there (bf16 tolerance); elsewhere it is SDPA."""
    assert bert.WRITTEN_OUT_ATTENTION == {torch.float32: True, torch.bfloat16: bert.cpu_native_bf16(),
                                          torch.float16: True}
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY), hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12).train()
    ids = torch.randint(1, 50, (3, 7))
    mask = (torch.arange(7)[None] < torch.tensor([[7], [4], [2]])).long()
    calls = []
    for layer in model.encoder.layer:
        layer.attention.self.dropout.register_forward_hook(lambda *_: calls.append(1))
    outputs = {}
    for written in (True, False):
        monkeypatch.setitem(bert.WRITTEN_OUT_ATTENTION, torch.bfloat16, written)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[written] = model(ids, mask)["last_hidden_state"].float()
        assert len(calls) == (len(model.encoder.layer) if written else 0)
    keep = mask.bool()
    torch.testing.assert_close(outputs[True][keep], outputs[False][keep], atol=5e-2, rtol=0)
