"""The model (model.py): losses, predictions from logits, class weights, which parameters train (freezing,
gradual unfreezing), the encoder's dropout."""

import pytest
import torch

from errors import InputError
from flags import parse_args
import model as model_module
from model import (apply_trainable, build_model, inverse_frequency_weights, ordinal_targets, outputs_from_logits,
                   predictions_from_logits, trainable_encoder_parts)
import multitask_classifier as mc
from pipeline import load_datasets
from predict import run_evaluation
from tasks import TASKS
from tokenizer import BertTokenizer
from train import train_step
from tests.fixtures import make_run, read_predictions, tiny_args


def test_ordinal_loss_and_predictions():
    spec = TASKS["sst"]
    labels = torch.tensor([0, 2, 4])
    targets = ordinal_targets(labels, 4)
    assert targets.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    logits = (targets * 2 - 1) * 10  # confident and right
    assert predictions_from_logits(spec, logits, "ordinal").tolist() == [0, 2, 4]
    assert model_module.task_loss(spec, logits, labels, "ordinal") < 1e-3
    assert model_module.task_loss(spec, -logits, labels, "ordinal") > 10
    probabilities = outputs_from_logits(spec, logits, "ordinal")
    assert probabilities.argmax(-1).tolist() == [0, 2, 4]
    assert torch.allclose(probabilities.sum(-1), torch.ones(3))
    crossing = torch.tensor([[3.0, -3.0, 2.0, -5.0]])  # P(y>2) > P(y>1): made non-increasing, no negative class
    assert (outputs_from_logits(spec, crossing, "ordinal") >= 0).all()


def test_class_weights_are_inverse_frequency_and_change_the_loss():
    spec = TASKS["para"]
    labels = torch.tensor([0.0, 0.0, 0.0, 1.0])
    weights = inverse_frequency_weights(spec, labels)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]))
    logits = torch.zeros(4)
    plain = model_module.task_loss(spec, logits, labels)
    weighted = model_module.task_loss(spec, logits, labels, class_weights=weights)
    torch.testing.assert_close(weighted, plain * (3 * 4 / 6 + 2) / 4)


def test_ordinal_sst_trains_and_predicts_every_class(tiny, tmp_path):
    """--sst_loss ordinal: C-1 = 4 threshold logits, a run that trains and evaluates, and an SST head
    whose logits are all positive predicts the top class (4), in the loop's own evaluation."""
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir, "--sst_loss", "ordinal"))
    lines = read_predictions(run_dir / "predictions" / TASKS["sst"].prediction_file("dev"))
    assert {line.rstrip(" ").split(" , ")[1] for line in lines[1:]} <= {"0", "1", "2", "3", "4"}
    run = make_run(tiny, "--sst_loss", "ordinal")
    head = run.model.heads["sst"].net[-1]
    assert head.out_features == 4
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(5.0)
    metrics, predictions = run_evaluation(run.model, {"sst": run.data["dev"]["sst"]}, torch.device("cpu"),
                                             run.amp_context, 16, "ordinal")
    assert set(predictions["sst"][1].tolist()) == {4}
    assert metrics["sst"]["accuracy"] == (run.data["dev"]["sst"].labels == 4).float().mean().item()


@pytest.mark.parametrize("extra,epoch,expected", [
    ([], 0, (False, [True] * 4, True)),  # --freeze_embeddings is the default
    (["--no-freeze_embeddings"], 0, (True, [True] * 4, True)),
    (["--no-freeze_embeddings", "--unfreeze_interval", "2"], 0, (False, [False] * 4, True)),
    (["--no-freeze_embeddings", "--unfreeze_interval", "2"], 2, (False, [False, False, False, True], True)),
    (["--no-freeze_embeddings", "--unfreeze_interval", "1"], 3, (False, [False, True, True, True], True)),
    (["--no-freeze_embeddings", "--unfreeze_interval", "1"], 5, (True, [True] * 4, True)),
    (["--unfreeze_interval", "1"], 5, (False, [True] * 4, True)),
    (["--no-freeze_embeddings", "--freeze_bert_last_epochs", "2"], 3, (True, [True] * 4, True)),
    (["--freeze_bert_last_epochs", "2"], 4, (False, [False] * 4, False)),
    (["--option", "pretrain"], 0, (False, [False] * 4, False)),
    (["--freeze_layers", "1"], 0, (False, [False, True, True, True], True)),
    (["--freeze_layers", "4"], 0, (False, [False] * 4, True)),
    (["--freeze_layers", "2", "--no-freeze_embeddings"], 0, (True, [False, False, True, True], True)),
    (["--freeze_layers", "2", "--unfreeze_interval", "1"], 1, (False, [False, False, False, True], True)),
    (["--freeze_layers", "2", "--unfreeze_interval", "1"], 5, (False, [False, False, True, True], True)),
])
def test_trainable_encoder_parts(extra, epoch, expected):
    cfg = parse_args(["--epochs", "6", *extra])
    assert trainable_encoder_parts(cfg, epoch, num_layers=4) == expected


def test_freeze_embeddings_trains_everything_but_the_embeddings(tiny):
    run = make_run(tiny, "--freeze_embeddings", "--pooling", "pooler")
    apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = not name.startswith(("bert.embeddings.", "heads.para", "heads.sts"))
        assert (not torch.equal(before[name], p.detach())) == trains, name


@pytest.mark.parametrize("flags,rate", [([], 0.05), (["--encoder_dropout", "none"], 0.1),
                                        (["--encoder_dropout", "0"], 0.0)])
def test_encoder_dropout_sets_every_dropout_in_the_encoder(tiny, flags, rate):
    """The tiny checkpoint's config.json says 0.1, kept with none; --encoder_dropout replaces it everywhere in
    the encoder (heads keep --hidden_dropout_prob), and at 0 a training-mode forward is deterministic."""
    cfg = parse_args(tiny_args(tiny, "unused", "--hidden_dropout_prob", "0.2", *flags))
    model = build_model(cfg).train()
    assert {m.p for m in model.bert.modules() if isinstance(m, torch.nn.Dropout)} == {rate}
    assert {m.p for m in model.heads.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
    batch = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))["dev"]["para"].collate([0, 1, 2])
    first, second = (model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                     ["last_hidden_state"] for _ in range(2))
    assert torch.equal(first, second) == (rate == 0.0)


def test_freeze_layers_beyond_the_encoder_is_an_error():
    with pytest.raises(InputError, match="--freeze_layers 5, but the encoder has 4 layers"):
        trainable_encoder_parts(parse_args(["--freeze_layers", "5"]), 0, num_layers=4)
    with pytest.raises(SystemExit):
        parse_args(["--freeze_layers", "-1"])


def test_freeze_layers_trains_only_the_layers_above(tiny):
    run = make_run(tiny, "--freeze_layers", "1", "--pooling", "pooler")
    apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = name.startswith(("heads.sst", "bert.pooler", "bert.encoder.layer.1."))
        assert (not torch.equal(before[name], p.detach())) == trains, name


def test_freeze_layers_ends_the_backward_pass_above_the_frozen_layers(tiny):
    """The speed of --freeze_layers comes from autograd not recording the frozen bottom: layer 0's output
    carries no graph, layer 1's does."""
    run = make_run(tiny, "--freeze_layers", "1")
    apply_trainable(run.model, run.cfg, run.epoch)
    records = []
    for layer in run.model.bert.encoder.layer:
        layer.register_forward_hook(lambda module, inputs, output: records.append(output.requires_grad))
    run.model.logits("sst", run.data["train"]["sst"].collate([0, 1]))
    assert records == [False, True]
