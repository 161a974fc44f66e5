"""Per-task and per-layer control on tiny data and a tiny BERT: --task_settings, --layer_lr_decay,
--task_scheduler all, --separate_encoders and --profile."""
import json
import os

import pytest
import torch

from config import TaskSettings
from datasets import epoch_task_schedule
from errors import InputError
from flags import parse_args
from model import apply_trainable, build_model
import multitask_classifier as mc
from pipeline import load_datasets
from state import Run
from tasks import ALL_TASKS
from tokenizer import BertTokenizer
from train import advance, micro_batch_losses


def tiny_args(tiny, run_dir, *extra):
    return ["--data_dir", tiny["data"], "--bert_path", tiny["bert"], "--save_path", str(run_dir),
            "--batch_size", "8", "--num_batches_per_epoch", "3", "--eval_batch_size", "16", "--log_every", "1",
            "--encoder_dropout", "0", "--hidden_dropout_prob", "0", *extra]


def make_run(tiny, *extra) -> Run:
    cfg = parse_args(tiny_args(tiny, "unused", *extra))
    torch.manual_seed(cfg.seed)
    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    model = build_model(cfg)
    apply_trainable(model, cfg, epoch=0)  # as train_epoch does: embeddings frozen by default
    return Run(cfg, model, data, torch.device("cpu"), "none")


def step_deltas(run: Run, task: str) -> dict[str, torch.Tensor]:
    """Each parameter's change in one optimiser step on `task` (at the peak learning rate)."""
    run.step = run.warmup_steps  # past warm-up: the schedule's multiplier is 1
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    advance(run, task)
    return {n: p.detach() - before[n] for n, p in run.model.named_parameters()}


# ----------------------------------------------------------------------------- --task_settings

def test_task_settings_parse_fill_in_the_run_flags_and_reach_the_saved_config(tiny):
    cfg = parse_args(tiny_args(tiny, "x", "--task_settings", "sst.lr=5e-5, sts.head_dropout=0.3,sst.weight_decay=0"))
    assert cfg.settings_for("sst") == TaskSettings(lr=5e-5, head_lr=1e-3, weight_decay=0.0, head_dropout=0.0, rdrop=0.0,
                                                   label_smoothing=0.0)
    assert cfg.settings_for("sts") == TaskSettings(lr=1e-4, head_lr=1e-3, weight_decay=0.01, head_dropout=0.3, rdrop=0.0,
                                                   label_smoothing=0.0)
    assert cfg.__dict__["task_settings"] == "sst.lr=5e-5, sts.head_dropout=0.3,sst.weight_decay=0"  # config.json
    model = build_model(cfg)
    assert model.heads["sts"].net[0].p == 0.3 and model.heads["sst"].net[0].p == 0.0


@pytest.mark.parametrize("value, message", [
    ("sst.momentum=1", "unknown setting 'momentum'"), ("cfimdb.lr=1e-5", "not among --tasks"),
    ("sst.lr=fast", "TASK.KEY=NUMBER"), ("sst.head_dropout=1", "out of range"), ("sst.lr=0", "out of range"), ("sst.head_lr=2", "out of range"),
    ("sst.lr=nan", "out of range (finite"), ("sst.weight_decay=nan", "out of range (finite"), ("sst.max_batch_size=2.5", "max_batch_size a whole number"),
    ("sst.max_batch_size=0", "max_batch_size a whole number")])
def test_bad_task_settings_are_refused_naming_the_item(tiny, value, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(tiny_args(tiny, "x", "--task_settings", value))
    assert message in capsys.readouterr().err


def test_encoder_settings_per_task_need_one_task_per_step(tiny, capsys):
    for flags in (["--task_scheduler", "all"], ["--projection", "pcgrad"]):
        with pytest.raises(SystemExit):
            parse_args(tiny_args(tiny, "x", "--task_settings", "sst.lr=1e-5", *flags))
        assert "set head_lr instead" in capsys.readouterr().err
    parse_args(tiny_args(tiny, "x", "--task_settings", "sst.head_lr=1e-5", "--task_scheduler", "all"))


def test_a_task_step_runs_with_that_tasks_learning_rate_and_weight_decay(tiny):
    """AdamW's first step moves each coordinate by lr * (sign(g) + wd * p): with sst.lr = 2 x --lr an sst
    step moves the encoder twice as far and a para step as far as the plain run; sst.head_lr moves sst's head."""
    plain, tuned = make_run(tiny), make_run(tiny, "--task_settings", "sst.lr=2e-4,sst.head_lr=3e-3")
    base, doubled = step_deltas(plain, "sst"), step_deltas(tuned, "sst")
    name = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(doubled[name], 2 * base[name], rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(doubled["heads.sst.net.1.weight"], 3 * base["heads.sst.net.1.weight"], rtol=1e-3,
                               atol=1e-9)
    plain, tuned = make_run(tiny), make_run(tiny, "--task_settings", "sst.lr=2e-4,para.weight_decay=0.5")
    base, para = step_deltas(plain, "para"), step_deltas(tuned, "para")
    bias = "bert.encoder.layer.1.output.dense.bias"  # no decay on biases: the same step
    torch.testing.assert_close(para[bias], base[bias], rtol=1e-5, atol=1e-9)
    weights = tuned.model.get_parameter(name).detach() - para[name]  # before the step
    torch.testing.assert_close(para[name] - base[name], -1e-4 * (0.5 - 0.01) * weights, rtol=1e-2, atol=1e-8)


# ----------------------------------------------------------------------------- --layer_lr_decay

@pytest.mark.parametrize("separate", [False, True])
def test_layer_lr_decay_scales_each_layers_step_and_every_tasks_encoder_rate(tiny, separate):
    """The tiny BERT has two layers. At decay 0.5 the top layer and the heads step as in the
    plain run, layer 0 half as far, the embeddings a quarter; with sst.lr = 2 x --lr on top, an sst step
    moves every encoder depth twice as far as that and a para step does not (AdamW's first step is
    linear in the learning rate, weight decay included; atol: float32's spacing near a LayerNorm weight
    of 1, far below the smallest step, 2.5e-5)."""
    extra = ["--no-freeze_embeddings", *(["--separate_encoders"] if separate else [])]
    prefix = "bert.sst." if separate else "bert."
    names = {1.0: [prefix + "encoder.layer.1.output.dense.weight", prefix + "encoder.layer.1.output.dense.bias",
                   "heads.sst.net.1.weight"],
             0.5: [prefix + "encoder.layer.0.attention.self.query.weight", prefix + "encoder.layer.0.output.LayerNorm.weight"],
             0.25: [prefix + "embeddings.word_embeddings.weight", prefix + "embeddings.LayerNorm.bias"]}
    base = step_deltas(make_run(tiny, *extra), "sst")
    decayed = step_deltas(make_run(tiny, *extra, "--layer_lr_decay", "0.5"), "sst")
    for factor, group in names.items():
        for name in group:
            assert base[name].abs().max() > 0, name
            torch.testing.assert_close(decayed[name], factor * base[name], rtol=1e-3, atol=2e-7, msg=name)
    task_rate = ["--task_settings", "sst.lr=2e-4" if not separate else "sst.lr=2e-4,para.lr=1e-4"]
    tuned = step_deltas(make_run(tiny, *extra, "--layer_lr_decay", "0.5", *task_rate), "sst")
    for factor, group in names.items():
        for name in group:
            expected = (1 if name.startswith("heads.") else 2) * factor * base[name]
            torch.testing.assert_close(tuned[name], expected, rtol=1e-3, atol=2e-7, msg=name)
    if not separate:
        para_base = step_deltas(make_run(tiny, *extra), "para")
        para = step_deltas(make_run(tiny, *extra, "--layer_lr_decay", "0.5", *task_rate), "para")
        name = "bert.encoder.layer.0.output.dense.weight"
        torch.testing.assert_close(para[name], 0.5 * para_base[name], rtol=1e-3, atol=2e-7)


# ----------------------------------------------------------------------------- --task_scheduler all

def test_an_all_tasks_step_trains_on_the_sum_of_every_tasks_loss(tiny):
    run = make_run(tiny, "--task_scheduler", "all", "--clip", "none")
    assert epoch_task_schedule("all", run.sizes, 4, run.schedule_generator) == [ALL_TASKS] * 4
    expected = {}
    for task in run.sizes:  # each task's gradient on the batch the step will draw
        probe = make_run(tiny, "--task_scheduler", "all", "--clip", "none")
        indices = next(probe.iterators[task])
        probe.model.zero_grad()
        for loss, *_ in micro_batch_losses(probe, task, indices):
            loss.backward()
        for n, p in probe.model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad
    run.optimizer.step = lambda *a, **k: None  # keep the gradients to compare them
    run.optimizer.zero_grad = lambda *a, **k: None
    losses, _ = advance(run, ALL_TASKS)
    assert set(losses) == {"sst", "para", "sts"}
    got = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any(n.startswith("heads.sts") for n in got)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_an_all_tasks_run_trains_every_task_each_step(tiny, tmp_path):
    mc.main(tiny_args(tiny, tmp_path / "run", "--task_scheduler", "all"))
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(history[0]["train_loss"]) == {"sst", "para", "sts"} and history[0]["step"] == 3


# ----------------------------------------------------------------------------- --separate_encoders

def test_separate_encoders_share_nothing(tiny):
    run = make_run(tiny, "--separate_encoders")
    names = [n for n, _ in run.model.named_parameters()]
    assert {n.split(".")[1] for n in names if n.startswith("bert.")} == {"sst", "para", "sts"}
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    torch.testing.assert_close(start["bert.sst.encoder.layer.0.output.dense.weight"],
                               start["bert.sts.encoder.layer.0.output.dense.weight"])  # all from the checkpoint
    deltas = step_deltas(run, "sst")
    moved = {n for n, d in deltas.items() if d.abs().max() > 0}
    assert moved and all(n.startswith(("bert.sst.", "heads.sst.")) for n in moved)
    assert any(n.startswith("bert.sst.encoder.layer.0.") for n in moved)
    assert not any(n.startswith("bert.sst.embeddings.") for n in moved)  # --freeze_embeddings holds per encoder


def test_a_separate_encoders_run_saves_and_tests_like_any_run(tiny, tmp_path):
    metrics = mc.main(tiny_args(tiny, tmp_path / "run", "--separate_encoders", "--smart"))
    again = mc.main(["--option", "test", "--pretrained_model_name", str(tmp_path / "run"), "--data_dir", tiny["data"],
                     "--predictions_dir", str(tmp_path / "again")])
    assert again["overall"] == pytest.approx(metrics["overall"])


def test_separate_encoders_refuse_what_needs_a_shared_one(tiny, capsys):
    for flags in (["--projection", "pcgrad"], ["--use_pal"], ["--adapter_size", "8"]):
        with pytest.raises(SystemExit):
            parse_args(tiny_args(tiny, "x", "--separate_encoders", *flags))
        assert "shares nothing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --profile

def test_profile_writes_a_trace_and_a_table_of_operators(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir, "--profile", "2", "--num_batches_per_epoch", "10"))
    out = capsys.readouterr().out
    assert "profile: 2 training steps after 7" in out and "aten::" in out
    table = (run_dir / "profile.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table
    assert any(f.endswith(".pt.trace.json") for f in os.listdir(run_dir / "tensorboard" / "profile"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert "profile/text_summary" in events.Tags()["tensors"]


def test_a_profile_longer_than_the_epochs_training_is_refused(tiny, tmp_path):
    """A window past the epoch's last step would time the dev evaluation (or predictions) as a step."""
    with pytest.raises(InputError, match="this epoch has 3 left; profile at most 0 steps"):
        mc.main(tiny_args(tiny, tmp_path / "run", "--profile", "5"))
    with pytest.raises(InputError, match="this epoch has 10 left; profile at most 3 steps"):
        mc.main(tiny_args(tiny, tmp_path / "run", "--profile", "4", "--num_batches_per_epoch", "10", "--epochs", "2"))
    assert not (tmp_path / "run").exists()


def test_a_tasks_batch_cap_is_a_task_setting_and_its_old_flag_an_alias():
    """--task_settings sst.max_batch_size=N caps sst's micro-batches as --max_batch_size_sst N does; the two
    given with different values are refused; the other tasks keep the whole batch."""
    for flags in (["--task_settings", "sst.max_batch_size=4"], ["--max_batch_size_sst", "4"],
                  ["--max_batch_size_sst", "4", "--task_settings", "sst.max_batch_size=4"]):
        cfg = parse_args(["--batch_size", "16", *flags])
        assert (cfg.micro_batch_size("sst"), cfg.micro_batch_size("para"), cfg.settings_for("sst").max_batch_size) \
            == (4, 16, 4), flags
    assert parse_args(["--batch_size", "2", "--task_settings", "sts.max_batch_size=8"]).micro_batch_size("sts") == 2
    with pytest.raises(SystemExit):
        parse_args(["--max_batch_size_sst", "4", "--task_settings", "sst.max_batch_size=8"])

