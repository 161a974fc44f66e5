"""The training loop (train.py, state.py) on tiny data and a tiny BERT: micro-batches, resume (in process,
after SIGKILL, after a signal), the moving average, non-finite steps, which parts train."""
import json
import os
import shutil

import pytest
import torch

from errors import InputError
from flags import parse_args
import model as model_module
from model import apply_trainable, build_model
import multitask_classifier as mc
from pipeline import load_datasets, split_batch
import predict as predict_module
from predict import make_predict_fn
from rundir import atomic_save, load_checkpoint
from state import Run
import techniques
from tokenizer import BertTokenizer
import train as train_module
from train import NonFiniteTraining, Preempted, advance, micro_batch_losses, train_epoch, train_step
from tests.fixtures import assert_same_metrics, blind_to_softmax, make_run, start_run, tiny_args, wait_for


def accumulated_grads(run: Run, task: str, indices: list[int]) -> dict[str, torch.Tensor]:
    run.model.eval()  # dropout off: the two ways must see the same function
    run.model.zero_grad(set_to_none=True)
    for loss, *_ in micro_batch_losses(run, task, indices):
        loss.backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_two_micro_batches_of_four_equal_one_batch_of_eight(tiny, task):
    whole = make_run(tiny)
    split = make_run(tiny, f"--max_batch_size_{task}", "4")
    indices = list(range(8))
    assert len(list(split_batch(indices, split.cfg.micro_batch_size(task)))) == 2
    expected, got = accumulated_grads(whole, task, indices), accumulated_grads(split, task, indices)
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("extra", [[], ["--ema_decay", "0.5"]])
def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path, monkeypatch, extra):
    args = ["--epochs", "3", "--lr", "1e-3", *extra]
    uninterrupted = mc.main(tiny_args(tiny, tmp_path / "a", *args))

    real_train_epoch = train_epoch
    calls = []

    def crash_in_epoch_two(run, writer, run_dir):
        calls.append(run.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_train_epoch(run, writer, run_dir)

    monkeypatch.setattr(train_module, "train_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        mc.main(tiny_args(tiny, tmp_path / "b", *args))
    monkeypatch.setattr(train_module, "train_epoch", real_train_epoch)
    assert len(json.loads((tmp_path / "b" / "metrics.json").read_text())) == 1

    resumed = mc.main(["--resume", str(tmp_path / "b")])
    assert resumed == uninterrupted
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [e["dev"] for e in a] == [e["dev"] for e in b]
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]


def test_a_checkpoint_keeps_the_random_state_of_the_runs_own_device_alone(tiny, monkeypatch):
    """A run saved every visible GPU's random state and restored them by index: a resume where fewer GPUs
    are visible raised IndexError. Now a run keeps its own device's state (none for a CPU run, on a machine
    with GPUs too), and a checkpoint written the old way still resumes."""
    visible = [torch.full((16,), k, dtype=torch.uint8) for k in range(3)]  # three GPUs when it was saved

    def one_gpu_now(states):
        if len(states) > 1:
            raise IndexError("list index out of range")  # what torch does with more states than devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu_now)
    run = make_run(tiny)
    state = run.state_dict()
    assert state["cuda_rng"] is None  # a CPU run, with GPUs visible
    run.load_state_dict({**state, "cuda_rng": visible})  # the old format resumes


def test_ema_decay_evaluates_keeps_and_predicts_with_the_average_of_the_iterates(tiny, tmp_path, monkeypatch):
    decay, run_dir = 0.5, tmp_path / "run"
    real_train_step, iterates = train_step, []

    def recording_train_step(run, tasks):
        result = real_train_step(run, tasks)
        iterates.append({name: p.detach().clone() for name, p in run.model.named_parameters()})
        return result

    monkeypatch.setattr(train_module, "train_step", recording_train_step)
    metrics = mc.main(tiny_args(tiny, run_dir, "--lr", "1e-3", "--ema_decay", str(decay), "--amp", "none"))
    best = load_checkpoint(str(run_dir / "best.pt"))["model"]
    raw = load_checkpoint(str(run_dir / "last.pt"))["model"]
    T = len(iterates)
    assert T == 3
    # A key bias adds the same score to a whole row of attention, which softmax ignores: its gradient is
    # zero in theory and rounding noise in practice (exactly zero on some CPUs, 1e-9 on others), so it is
    # left out by rule rather than by whether this CPU's noise happened to move it.
    trained = [name for name in iterates[0] if not torch.equal(iterates[0][name], iterates[-1][name])
               and not blind_to_softmax(name)]
    assert any(name.startswith("heads.") for name in trained) and any(name.startswith("bert.") for name in trained)
    for name in iterates[0]:  # the normalised exponentially weighted mean of w_1..w_T, not w_T
        expected = sum(decay ** (T - s) * (1 - decay) * iterates[s - 1][name] for s in range(1, T + 1)) / (1 - decay ** T)
        torch.testing.assert_close(best[name], expected)
        assert torch.equal(raw[name], iterates[-1][name])  # training goes on from the raw weights
    assert not any(torch.allclose(best[name], raw[name]) for name in trained)
    # The epoch's dev figures are the average's: --option test of best.pt reproduces them.
    history = json.loads((run_dir / "metrics.json").read_text())
    tested = mc.main(["--option", "test", "--pretrained_model_name", str(run_dir), "--data_dir", tiny["data"],
                      "--predictions_dir", str(tmp_path / "tested"), "--amp", "none"])
    assert metrics == history[0]["dev"]
    assert_same_metrics(tested, metrics)


EPOCH_STEPS = 100


LONG = ["--epochs", "2", "--num_batches_per_epoch", str(EPOCH_STEPS), "--lr", "1e-3", "--log_every", "5"]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = start_run(tiny, run_dir, *tiny_args(tiny, run_dir, *LONG))
    assert process.wait(timeout=300) == 0
    return json.loads((run_dir / "summary.json").read_text())["dev"]


def test_killed_mid_epoch_then_resumed_ends_exactly_as_the_uninterrupted_run(tiny, tmp_path, uninterrupted):
    """SIGKILL at a random moment after a mid-epoch checkpoint (every 7 steps); --resume continues from
    last.pt and the dev metrics equal the uninterrupted run's."""
    import random
    import signal
    import time
    run_dir = tmp_path / "run"
    process = start_run(tiny, run_dir, *tiny_args(tiny, run_dir, *LONG, "--checkpoint_every", "7"))
    wait_for(lambda: (run_dir / "last.pt").exists(), process)
    time.sleep(random.uniform(0.0, 0.1))  # a few steps on: a later mid-epoch checkpoint, or none
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = load_checkpoint(str(run_dir / "last.pt"))["progress"]
    assert saved["step"] % 7 == 0 and saved["step"] < EPOCH_STEPS  # a mid-epoch checkpoint
    resumed = start_run(tiny, tmp_path / "resumed", "--resume", str(run_dir))
    assert resumed.wait(timeout=300) == 0
    assert json.loads((run_dir / "summary.json").read_text())["dev"] == uninterrupted


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_saves_after_the_step_and_exits_75(tiny, tmp_path, uninterrupted, signal_name):
    import signal
    run_dir = tmp_path / "run"
    process = start_run(tiny, run_dir, *tiny_args(tiny, run_dir, *LONG, "--checkpoint_every", "none"))
    log = lambda: open(f"{run_dir}.log").read()  # noqa: E731
    wait_for(lambda: "step 10:" in log(), process)
    process.send_signal(getattr(signal, signal_name))
    assert process.wait(timeout=120) == 75
    assert f"stopped by {signal_name}: saved {run_dir / 'last.pt'} at step" in log()
    assert f"--resume {run_dir}" in log()
    saved = load_checkpoint(str(run_dir / "last.pt"))["progress"]
    assert 10 <= saved["step"] < 2 * EPOCH_STEPS and saved["position"] == saved["step"] - EPOCH_STEPS * saved["epoch"]
    resumed = start_run(tiny, tmp_path / "resumed", "--resume", str(run_dir))
    assert resumed.wait(timeout=300) == 0
    assert json.loads((run_dir / "summary.json").read_text())["dev"] == uninterrupted


def test_a_signal_during_the_evaluation_stops_it_saves_and_a_resume_evaluates_again(tiny, tmp_path, monkeypatch):
    """The stop flag is read between evaluation batches, not after the whole dev evaluation (4 minutes on
    2 CPU cores, while torchrun kills its workers 30 s after forwarding SIGTERM): last.pt then holds the
    trained, not yet evaluated epoch, and --resume evaluates it and ends as the uninterrupted run."""
    import signal
    args = ["--epochs", "2", "--amp", "none", "--eval_batch_size", "8"]
    uninterrupted = mc.main(tiny_args(tiny, tmp_path / "a", *args))
    real_predict_fn, calls = make_predict_fn, []

    def signalled_at_the_first_batch(*a, **k):
        predict = real_predict_fn(*a, **k)

        def predict_and_signal(task, batch):
            calls.append(task)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the run's handler only sets its stop flag
            return predict(task, batch)
        return predict_and_signal
    monkeypatch.setattr(predict_module, "make_predict_fn", signalled_at_the_first_batch)
    with pytest.raises(Preempted, match="SIGTERM: saved"):
        mc.main(tiny_args(tiny, tmp_path / "b", *args))
    assert len(calls) == 1  # of 9 batches of dev rows
    saved = load_checkpoint(str(tmp_path / "b" / "last.pt"))["progress"]
    assert saved["step"] == 3 and saved["epoch"] == 0 and saved["trained_epoch"] is not None
    monkeypatch.setattr(predict_module, "make_predict_fn", real_predict_fn)
    assert mc.main(["--resume", str(tmp_path / "b")]) == uninterrupted


def nan_on_calls(monkeypatch, calls: set[int]):
    """Make the task loss return NaN on the given (1-based) calls (the step's first pass and R-Drop's second),
    a fault injected into the loss."""
    count = {"n": 0}
    real = model_module.task_loss

    def task_loss(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] in calls else loss
    monkeypatch.setattr(train_module, "task_loss", task_loss)  # the step's forward
    monkeypatch.setattr(techniques, "task_loss", task_loss)  # R-Drop's second pass


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tiny, monkeypatch, capsys):
    run = make_run(tiny, "--optimizer", "sophiag", "--smart", "--smart_bregman_weight", "1")
    nan_on_calls(monkeypatch, {2})
    before = {}
    for step in range(3):
        if step == 1:
            before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
            ema_before = {n: p.detach().clone() for n, p in run.ema_model.named_parameters()}
        losses, _ = advance(run, "sst")
        if step == 1:
            assert losses == {}
            assert all(torch.equal(p, before[n]) for n, p in run.model.named_parameters())
            assert all(torch.equal(p, ema_before[n]) for n, p in run.ema_model.named_parameters())
            assert all(p.grad is None for p in run.model.parameters())
        else:
            assert torch.isfinite(losses["sst"])
    assert run.skipped_steps == 1 and run.skipped_in_a_row == 0 and run.step == 3
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert "step 2: skipped, non-finite loss or gradient (sst loss nan); 1 in a row, 1 in all" in capsys.readouterr().out


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_checkpoint_intact(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    nan_on_calls(monkeypatch, set(range(4, 100)))  # epoch 1 (3 steps) is clean, epoch 2 is not
    with pytest.raises(NonFiniteTraining, match="2 steps in a row had a non-finite loss or gradient"):
        mc.main(tiny_args(tiny, run_dir, "--epochs", "2", "--max_bad_steps", "2"))
    last = load_checkpoint(str(run_dir / "last.pt"))
    assert last["progress"]["epoch"] == 1 and last["progress"]["step"] == 3  # the end of the good epoch
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_a_resume_counts_the_earlier_time_and_refuses_changed_data_or_a_finished_run(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny, run_dir, "--epochs", "2", "--checkpoint_every", "1", "--max_bad_steps", "2")
    with monkeypatch.context() as patched:
        nan_on_calls(patched, {5, 6})  # epoch 2's second and third steps: stopped inside epoch 2
        with pytest.raises(NonFiniteTraining):
            mc.main(args)
    checkpoint = load_checkpoint(str(run_dir / "last.pt"))
    assert checkpoint["progress"]["epoch"] == 1 and 0 < checkpoint["progress"]["position"] < 3  # mid-epoch
    assert 0 < checkpoint["progress"]["epoch_seconds_before"] < checkpoint["progress"]["seconds_before"]
    # As if the first process had run long: the resumed run's figures must include its time.
    checkpoint["progress"].update(seconds_before=1000.0, epoch_seconds_before=500.0)
    atomic_save(checkpoint, str(run_dir / "last.pt"))

    data = tmp_path / "data"  # the run's data, one training row changed: not what it started on
    shutil.copytree(tiny["data"], data)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data_dir": str(data)}))
    train = data / "ids-sst-train.csv"
    train.write_text(train.read_text().replace("\t0\n", "\t1\n", 1))
    with pytest.raises(InputError, match="ids-sst-train.csv: not the file the run started on"):
        mc.main(["--resume", str(run_dir)])
    run_json = json.loads((run_dir / "run.json").read_text())  # as a run saved before the digests: two rows fewer
    (run_dir / "run.json").write_text(json.dumps({k: v for k, v in run_json.items() if k != "data_sha256"}))
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(InputError, match="the sst training rows are not those the run was saved with"):
        mc.main(["--resume", str(run_dir)])
    (run_dir / "run.json").write_text(json.dumps(run_json))
    (run_dir / "config.json").write_text(json.dumps(config))

    mc.main(["--resume", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "metrics.json").read_text())
    assert summary["wall_seconds"] > 1000 and history[1]["seconds"] >= 500 > history[0]["seconds"]
    with pytest.raises(InputError, match="the run has finished"):
        mc.main(["--resume", str(run_dir)])


@pytest.mark.parametrize("flags,encoder_lr", [([], 1e-4), (["--optimizer", "sophiag"], 5e-5),
                                              (["--optimizer", "sophiah"], 5e-5),
                                              (["--optimizer", "sophiag", "--lr", "3e-4"], 3e-4)])
def test_the_learning_rate_defaults_per_optimizer(tiny, flags, encoder_lr):
    """Sophia's default rate is half AdamW's (at AdamW's it lost 0.035-0.045 overall on the default recipe,
    at twice that it did not train); an explicit --lr wins; the heads keep --head_lr."""
    run = make_run(tiny, *flags)
    assert {group["lr"] for group in run.optimizer.param_groups} == {encoder_lr, 1e-3}


def test_pretrain_trains_heads_only(tiny, tmp_path):
    cfg = parse_args(tiny_args(tiny, tmp_path, "--option", "pretrain"))
    model = build_model(cfg)
    apply_trainable(model, cfg, epoch=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = load_datasets(cfg, BertTokenizer.from_pretrained(cfg.bert_path))
    run = Run(cfg, model, data, torch.device("cpu"), "none")
    for task in ("sst", "para", "sts"):
        train_step(run, [task])
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == name.startswith("heads."), name


def test_gradual_unfreezing_trains_only_the_unfrozen_layers(tiny, tmp_path):
    run = make_run(tiny, "--unfreeze_interval", "1", "--epochs", "3", "--pooling", "pooler")
    run.epoch = 1  # second epoch: the top layer of two
    apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = (name.startswith(("heads.sst", "bert.pooler", "bert.encoder.layer.1.")))
        assert (not torch.equal(before[name], p.detach())) == trains, name
