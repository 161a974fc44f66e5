"""The training loop end to end on tiny data and a tiny BERT: accumulation, outputs, test option, resume."""
import json
import math
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

import multitask_classifier as mc
from config import TrainConfig
from flags import parse_args
from tasks import TASKS
from evaluation import read_outputs
from tests.fixtures import blind_to_softmax


def tiny_args(tiny, run_dir, *extra):
    return ["--data_dir", tiny["data"], "--bert_path", tiny["bert"], "--save_path", str(run_dir),
            "--batch_size", "8", "--num_batches_per_epoch", "3", "--epochs", "1", "--eval_batch_size", "16",
            "--log_every", "1", *extra]


def make_run(tiny, *extra, amp: str = "none", device: str = "cpu") -> mc.Run:
    cfg = parse_args(tiny_args(tiny, "unused", *extra))
    torch.manual_seed(cfg.seed)
    data = mc.load_datasets(cfg, mc.BertTokenizer.from_pretrained(cfg.bert_path))
    return mc.Run(cfg, mc.build_model(cfg).to(device), data, torch.device(device), amp)


def accumulated_grads(run: mc.Run, task: str, indices: list[int]) -> dict[str, torch.Tensor]:
    run.model.eval()  # dropout off: the two ways must see the same function
    run.model.zero_grad(set_to_none=True)
    for loss, *_ in mc.micro_batch_losses(run, task, indices):
        loss.backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_two_micro_batches_of_four_equal_one_batch_of_eight(tiny, task):
    whole = make_run(tiny)
    split = make_run(tiny, f"--max_batch_size_{task}", "4")
    indices = list(range(8))
    assert len(list(mc.split_batch(indices, split.cfg.micro_batch_size(task)))) == 2
    expected, got = accumulated_grads(whole, task, indices), accumulated_grads(split, task, indices)
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)


def read_predictions(path):
    with open(path) as f:
        return f.read().splitlines()


def assert_same_predictions(got: list[str], expected: list[str]):
    """Two course prediction files of the same checkpoint on the same data: the same ids and values within
    1e-6. Two evaluations need not agree to the last bit (a CPU's kernels may round differently by batch
    shape or memory alignment), so only fp32 runs (`--amp none`) are compared, and not bit for bit."""
    assert got[0] == expected[0] and len(got) == len(expected)
    rows = [[line.rstrip(" ").split(" , ") for line in lines[1:]] for lines in (got, expected)]
    assert [r[0] for r in rows[0]] == [r[0] for r in rows[1]]
    np.testing.assert_allclose([float(r[1]) for r in rows[0]], [float(r[1]) for r in rows[1]], atol=1e-6, rtol=0)


def assert_same_metrics(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for task, value in expected.items():  # {task: {metric: value}, "overall": value}
        assert got[task] == pytest.approx(value, abs=1e-6, nan_ok=True), task


def test_short_run_writes_course_predictions_and_test_option_reproduces_dev(tiny, tmp_path):
    run_dir = tmp_path / "run"
    metrics = mc.main(tiny_args(tiny, run_dir, "--epochs", "1", "--amp", "none"))
    for name in ("config.json", "run.json", "metrics.json", "best.pt", "last.pt"):
        assert (run_dir / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["confusion/para", "confusion/sst"]  # heatmaps with counts
    image = events.Images("confusion/sst")[0]
    assert image.encoded_image_string[:4] == b"\x89PNG" and image.width > 100
    history = json.loads((run_dir / "metrics.json").read_text())
    assert history[0]["epoch"] == 1 and "overall" in history[0]["dev"]
    assert json.loads((run_dir / "run.json").read_text())["git_commit"]

    predictions = run_dir / "predictions"
    for task in ("sst", "para", "sts"):
        for split in ("dev", "test"):
            lines = read_predictions(predictions / TASKS[task].prediction_file(split))
            assert lines[0] == TASKS[task].prediction_header + " "
            assert len(lines) == 25  # header + 24 rows
            example_id, value = lines[1].rstrip(" ").split(" , ")
            assert example_id == f"{task}{split}000"
            if task == "sst":
                assert value in {"0", "1", "2", "3", "4"}
            elif task == "para":
                assert value in {"0.0", "1.0"}
            else:
                assert 0.0 <= float(value) <= 5.0

    # The outputs behind the predictions, for ensembles: same ids, and the predictions follow from them.
    for split in ("dev", "test"):
        meta, outputs = read_outputs(str(predictions / f"outputs-{split}.npz"))
        assert meta["split"] == split and sorted(outputs) == ["para", "sst", "sts"]
        assert len(meta["data"]["sst"]["sha256"]) == 64
        assert meta["sst_loss"] == "ce" and meta["both_orders"] == ["para", "sts"]
        for task, (ids, values) in outputs.items():
            rows = [line.rstrip(" ").split(" , ") for line in read_predictions(
                predictions / TASKS[task].prediction_file(split))[1:]]
            assert ids == [row[0] for row in rows]
            written = np.array([float(row[1]) for row in rows])
            if task == "sst":
                assert values.shape == (24, 5) and np.allclose(values.sum(-1), 1, atol=1e-5)
                assert (values.argmax(-1) == written).all()
            elif task == "para":
                assert values.shape == (24, 2) and ((values[:, 1] > 0.5) == written).all()
            else:
                assert values.shape == (24,) and np.allclose(values, written)

    dev_before = {task: read_predictions(predictions / TASKS[task].prediction_file("dev")) for task in TASKS
                  if task != "cfimdb"}
    out = tmp_path / "test-predictions"
    evaluation_only = tmp_path / "dev-and-test"  # --option test needs no training file
    shutil.copytree(tiny["data"], evaluation_only, ignore=shutil.ignore_patterns("*-train.csv"))
    tested = mc.main(["--option", "test", "--pretrained_model_name", str(run_dir), "--data_dir", str(evaluation_only),
                      "--predictions_dir", str(out), "--amp", "none"])
    assert_same_metrics(tested, metrics)
    for task, lines in dev_before.items():
        assert_same_predictions(read_predictions(out / TASKS[task].prediction_file("dev")), lines)
    # Evaluation settings come from the command: here one order only for the pair tasks.
    mc.main(["--option", "test", "--pretrained_model_name", str(run_dir), "--data_dir", tiny["data"],
             "--predictions_dir", str(tmp_path / "one-order"), "--no-eval_both_orders", "--amp", "none"])
    _, both = read_outputs(str(predictions / "outputs-dev.npz"))
    _, one = read_outputs(str(tmp_path / "one-order" / "outputs-dev.npz"))
    np.testing.assert_allclose(one["sst"][1], both["sst"][1], atol=1e-6, rtol=0)
    assert not np.allclose(one["para"][1], both["para"][1])  # (the tiny STS scores are clipped to 0 here)


def test_the_cosine_sts_head_is_read_in_one_order(tiny):
    """Both orders are for pairs encoded jointly: the cosine head encodes each STS sentence alone, so dev and
    test read STS once, and the outputs' meta says which tasks were read in both orders."""
    cfg = parse_args(tiny_args(tiny, "unused", "--sts_head", "cosine"))
    data = mc.load_datasets(cfg, mc.BertTokenizer.from_pretrained(cfg.bert_path))
    assert data["dev"]["para"].swapped is not None and data["dev"]["sts"].swapped is None
    assert mc.outputs_meta(cfg, "dev", list(cfg.task_names))["both_orders"] == ["para"]
    one_order = parse_args(tiny_args(tiny, "unused", "--no-eval_both_orders"))
    assert mc.outputs_meta(one_order, "test", list(one_order.task_names))["both_orders"] == []


@pytest.mark.parametrize("extra", [[], ["--ema_decay", "0.5"]])
def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path, monkeypatch, extra):
    args = ["--epochs", "3", "--lr", "1e-3", *extra]
    uninterrupted = mc.main(tiny_args(tiny, tmp_path / "a", *args))

    real_train_epoch = mc.train_epoch
    calls = []

    def crash_in_epoch_two(run, writer, run_dir):
        calls.append(run.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_train_epoch(run, writer, run_dir)

    monkeypatch.setattr(mc, "train_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        mc.main(tiny_args(tiny, tmp_path / "b", *args))
    monkeypatch.setattr(mc, "train_epoch", real_train_epoch)
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
    real_train_step, iterates = mc.train_step, []

    def recording_train_step(run, tasks):
        result = real_train_step(run, tasks)
        iterates.append({name: p.detach().clone() for name, p in run.model.named_parameters()})
        return result

    monkeypatch.setattr(mc, "train_step", recording_train_step)
    metrics = mc.main(tiny_args(tiny, run_dir, "--lr", "1e-3", "--ema_decay", str(decay), "--amp", "none"))
    best = mc.load_checkpoint(str(run_dir / "best.pt"))["model"]
    raw = mc.load_checkpoint(str(run_dir / "last.pt"))["model"]
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


def start_run(tiny, run_dir, *extra) -> "subprocess.Popen":
    """multitask_classifier.py as a user starts it: its own process, one thread, output in run_dir.log."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multitask_classifier.py")
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen([sys.executable, script, *extra], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def wait_for(condition, process, timeout=120.0):
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or hung before the condition"
        time.sleep(0.02)


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
    saved = mc.load_checkpoint(str(run_dir / "last.pt"))["progress"]
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
    saved = mc.load_checkpoint(str(run_dir / "last.pt"))["progress"]
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
    real_predict_fn, calls = mc.make_predict_fn, []

    def signalled_at_the_first_batch(*a, **k):
        predict = real_predict_fn(*a, **k)

        def predict_and_signal(task, batch):
            calls.append(task)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the run's handler only sets its stop flag
            return predict(task, batch)
        return predict_and_signal
    monkeypatch.setattr(mc, "make_predict_fn", signalled_at_the_first_batch)
    with pytest.raises(mc.Preempted, match="SIGTERM: saved"):
        mc.main(tiny_args(tiny, tmp_path / "b", *args))
    assert len(calls) == 1  # of 9 batches of dev rows
    saved = mc.load_checkpoint(str(tmp_path / "b" / "last.pt"))["progress"]
    assert saved["step"] == 3 and saved["epoch"] == 0 and saved["trained_epoch"] is not None
    monkeypatch.setattr(mc, "make_predict_fn", real_predict_fn)
    assert mc.main(["--resume", str(tmp_path / "b")]) == uninterrupted


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_checkpoint_that_would_run_code_is_refused(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir))
    checkpoint = mc.load_checkpoint(str(run_dir / "best.pt"))  # ours: tensors, numbers, strings, lists, dicts
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())
    whole = (run_dir / "best.pt").read_bytes()
    for content in (b"garbage\n", whole[:len(whole) // 2]):  # not a checkpoint; one cut short
        (tmp_path / "x.pt").write_bytes(content)
        with pytest.raises(mc.InputError, match="x.pt: not a checkpoint .torch.save writes a zip archive"):
            mc.main(["--option", "test", "--pretrained_model_name", str(tmp_path / "x.pt"), "--data_dir", tiny["data"]])
    marker = tmp_path / "code-ran"
    torch.save({**checkpoint, "payload": RunsCodeWhenUnpickled(marker)}, run_dir / "best.pt")
    with pytest.raises(mc.InputError, match="refused: it holds objects other than tensors"):
        mc.main(["--option", "test", "--pretrained_model_name", str(run_dir), "--data_dir", tiny["data"]])
    assert not marker.exists()


def test_input_errors_are_one_line_without_traceback_and_exit_status_2(tiny, tmp_path):
    import shutil
    import subprocess
    import sys
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    train = data / "ids-sst-train.csv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tseven"
    train.write_text("\n".join(lines) + "\n")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multitask_classifier.py")
    cases = [(["--data_dir", str(data), "--bert_path", tiny["bert"]], f"error: {train}:4: label 'seven' is not a number"),
             (["--data_dir", tiny["data"], "--bert_path", str(tmp_path / "none")], "model folder not found"),
             (["--option", "test", "--pretrained_model_name", str(tmp_path / "x.pt"), "--data_dir", tiny["data"]],
              "checkpoint not found")]
    for argv, message in cases:
        run_dir = [] if "test" in argv else ["--save_path", str(tmp_path / "run")]
        done = subprocess.run([sys.executable, script, *argv, *run_dir],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr


def test_broken_model_folders_checkpoints_and_long_rows_are_input_errors_before_training(tiny, tmp_path):
    """What the README promises for input: an `error: ...` (InputError, status 2), not a traceback, and
    no run folder: a model folder without vocab.txt, with a tokenizer_config.json that is not JSON, with
    a config.json of the wrong types; a checkpoint of other model flags; rows longer than the model's
    positions (the tiny BERT has 64; --max_length defaults to 128); no CUDA device for --device cuda."""
    import shutil
    run_dir = tmp_path / "run"

    def broken_bert(name, edit):
        folder = tmp_path / name
        shutil.copytree(tiny["bert"], folder)
        edit(folder)
        return ["--bert_path", str(folder)]

    config = json.loads((pathlib.Path(tiny["bert"]) / "config.json").read_text())
    cases = [
        (broken_bert("no-vocab", lambda f: (f / "vocab.txt").unlink()), "vocabulary file not found"),
        (broken_bert("bad-tokenizer", lambda f: (f / "tokenizer_config.json").write_text("{not json")),
         "tokenizer_config.json:1: not valid JSON"),
        (broken_bert("list-tokenizer", lambda f: (f / "tokenizer_config.json").write_text("[]")),
         "tokenizer_config.json: expected a JSON object, got list"),
        (broken_bert("no-cls", lambda f: (f / "vocab.txt").write_text(
            "".join(t + "\n" for t in (f / "vocab.txt").read_text().splitlines() if t != "[CLS]"))),
         "special tokens ['[CLS]'] are not in the vocabulary"),
        (broken_bert("bad-config", lambda f: (f / "config.json").write_text(json.dumps({**config,
                                                                                        "hidden_size": "sixteen"}))),
         "hidden_size must be an integer, got 'sixteen'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device is available"))
    for extra, message in cases:
        with pytest.raises(mc.InputError, match=re.escape(message)):
            mc.main(tiny_args(tiny, run_dir, *extra))
        assert not run_dir.exists()

    long_data = tmp_path / "long-data"
    shutil.copytree(tiny["data"], long_data)
    dev = long_data / "ids-sst-dev.csv"
    lines = dev.read_text().splitlines()
    fields = lines[2].split("\t")
    lines[2] = "\t".join(fields[:2] + [" ".join(["good"] * 100)] + fields[3:])
    dev.write_text("\n".join(lines) + "\n")
    with pytest.raises(mc.InputError, match=r"sst dev row '\S+' has 102 tokens, but the model has 64 positions"):
        mc.main(tiny_args(tiny, run_dir, "--data_dir", str(long_data)))
    assert not run_dir.exists()
    mc.main(tiny_args(tiny, tmp_path / "long", "--data_dir", str(long_data), "--max_length", "64"))

    mc.main(tiny_args(tiny, tmp_path / "plain"))
    with pytest.raises(mc.InputError, match="its weights do not fit the model these flags build"):
        mc.main(tiny_args(tiny, run_dir, "--pretrained_model_name", str(tmp_path / "plain"), "--use_pal"))
    assert not run_dir.exists()
    checkpoint = mc.load_checkpoint(str(tmp_path / "plain" / "best.pt"))
    checkpoint["model"].pop("heads.sst.net.1.weight")  # --option test rebuilds the model from the saved config
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(mc.InputError, match=r"partial\.pt: its weights do not fit .*Missing key.*heads\.sst\.net\.1\.weight"):
        mc.main(["--option", "test", "--pretrained_model_name", str(tmp_path / "partial.pt"), "--data_dir", tiny["data"]])


def test_an_existing_run_is_never_overwritten(tiny, tmp_path, monkeypatch):
    mc.main(tiny_args(tiny, tmp_path / "run"))
    monkeypatch.setattr(mc, "load_datasets", lambda *a: pytest.fail("the data were loaded before the check"))
    with pytest.raises(mc.InputError, match="already holds a run"):
        mc.main(tiny_args(tiny, tmp_path / "run"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(mc.InputError, match="a file is there, not a folder"):
        mc.main(tiny_args(tiny, tmp_path / "file"))


def test_a_folder_in_use_by_another_process_is_refused(tiny, tmp_path, monkeypatch):
    """In its first 200 steps a run's folder holds no checkpoint, so "already holds a run" does not protect it:
    a second run given the same --save_path must still be refused while the first lives, and a folder made
    for a run that failed before writing anything is not left behind."""
    run_dir = tmp_path / "run"
    with mc.RunDirLocks() as first:  # what a first run holds from before its data load to its end
        first.hold(str(run_dir))
        with monkeypatch.context() as patched:
            patched.setattr(mc, "load_datasets", lambda *a: pytest.fail("the data were loaded before the check"))
            with pytest.raises(mc.InputError, match="in use by another process"):
                mc.main(tiny_args(tiny, run_dir))
    mc.main(tiny_args(tiny, run_dir))  # free again once the first has ended
    assert (run_dir / "best.pt").exists()
    (run_dir / "summary.json").unlink()  # as a run still running: last.pt and no summary yet
    with mc.RunDirLocks() as first, pytest.raises(mc.InputError, match="in use by another process"):
        first.hold(str(run_dir))
        mc.main(["--resume", str(run_dir)])
    with pytest.raises(mc.InputError):
        mc.main(tiny_args(tiny, tmp_path / "new", "--data_dir", str(tmp_path / "no-data")))
    assert not (tmp_path / "new").exists()


def test_predictions_in_an_explicit_predictions_dir_are_never_written_over(tiny, tmp_path, monkeypatch):
    """A second run (or test, or ensemble) given the --predictions_dir of an earlier one is refused before
    its data are loaded and the first's files keep their bytes; a folder another process is writing to
    is refused too."""
    shared = tmp_path / "predictions"
    mc.main(tiny_args(tiny, tmp_path / "first", "--predictions_dir", str(shared)))
    written = {path.name: path.read_bytes() for path in shared.iterdir()}
    assert "sst-dev-output.csv" in written and "outputs-test.npz" in written
    with monkeypatch.context() as patched:
        patched.setattr(mc, "load_datasets", lambda *a, **k: pytest.fail("the data were loaded before the check"))
        for argv in (tiny_args(tiny, tmp_path / "second", "--predictions_dir", str(shared)),
                     ["--option", "test", "--pretrained_model_name", str(tmp_path / "first"),
                      "--predictions_dir", str(shared)]):
            with pytest.raises(mc.InputError, match="already holds predictions"):
                mc.main(argv)
    with pytest.raises(mc.InputError, match="already holds predictions"):
        mc.main(["--option", "ensemble", "--ensemble", str(tmp_path / "first"), str(tmp_path / "first-again"),
                 "--predictions_dir", str(shared)])
    assert {path.name: path.read_bytes() for path in shared.iterdir()} == written
    assert not (tmp_path / "second").exists()
    busy = tmp_path / "busy"
    with mc.RunDirLocks() as other, pytest.raises(mc.InputError, match="another --predictions_dir"):
        other.hold(str(busy))  # a run writing its predictions there now
        mc.main(tiny_args(tiny, tmp_path / "third", "--predictions_dir", str(busy)))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Without --save_path the folder is runs/<time>-<name>: a sweep's jobs started in the same second
    must not share one (each would overwrite the other's files)."""
    monkeypatch.chdir(tmp_path)
    folders = [mc.new_run_dir("20261204-154254", "race") for _ in range(3)]
    assert folders == [os.path.join("runs", "20261204-154254-race" + suffix) for suffix in ("", "-2", "-3")]
    assert all(os.path.isdir(f) for f in folders)


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
    model = mc.build_model(cfg)
    mc.apply_trainable(model, cfg, epoch=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = mc.load_datasets(cfg, mc.BertTokenizer.from_pretrained(cfg.bert_path))
    run = mc.Run(cfg, model, data, torch.device("cpu"), "none")
    for task in ("sst", "para", "sts"):
        mc.train_step(run, [task])
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == name.startswith("heads."), name


def test_individual_pretrain_keeps_each_tasks_best_head(tiny, tmp_path):
    run_dir = tmp_path / "run"
    metrics = mc.main(tiny_args(tiny, run_dir, "--option", "individual_pretrain", "--epochs", "2"))
    assert set(metrics) == {"sst", "para", "sts", "overall"}
    assembled = mc.load_checkpoint(str(run_dir / "best.pt"))["model"]
    encoder = mc.BertModel.from_pretrained(tiny["bert"]).state_dict()
    for task in ("sst", "para", "sts"):
        best = mc.load_checkpoint(str(run_dir / task / "best.pt"))
        history = json.loads((run_dir / task / "metrics.json").read_text())
        assert best["epoch"] == max(range(len(history)), key=lambda e: history[e]["dev"]["overall"])
        heads = {k: v for k, v in best["model"].items() if k.startswith(f"heads.{task}.")}
        assert heads and all(torch.equal(assembled[k], v) for k, v in heads.items()), task
        assert not (run_dir / task / "last.pt").exists()  # as the docs say: nothing to resume, no optimiser state
    assert not (run_dir / "last.pt").exists()
    assert all(torch.equal(assembled[f"bert.{k}"], v) for k, v in encoder.items())  # frozen throughout
    assert (run_dir / "predictions" / "sst-test-output.csv").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["dev"] == metrics  # what sweeps/summarize.py reads


def test_individual_pretrain_gives_each_head_the_settings_that_concern_it(tiny, tmp_path, capsys):
    """Per-task settings, augmentation and label smoothing name one task or kind of task; each head's own run
    keeps what concerns it (they used to stop the run with a traceback after the first head had trained)."""
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir, "--option", "individual_pretrain", "--task_settings", "sst.head_lr=2e-3",
                      "--augment", "swap", "--augment_tasks", "para", "--label_smoothing", "0.1"))
    saved = {task: mc.load_checkpoint(str(run_dir / task / "best.pt"))["config"] for task in ("sst", "para", "sts")}
    assert {task: (c["tasks"], c["task_settings"], c["augment"], c["augment_tasks"], c["label_smoothing"])
            for task, c in saved.items()} == {"sst": ("sst", "sst.head_lr=2e-3", None, None, 0.1),
                                              "para": ("para", "", "swap", "para", 0.1),
                                              "sts": ("sts", "", None, None, 0.0)}
    with pytest.raises(SystemExit):
        parse_args(tiny_args(tiny, "x", "--option", "individual_pretrain", "--projection", "pcgrad"))
    assert "trains each task's head alone" in capsys.readouterr().err


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
    metrics, predictions = mc.run_evaluation(run.model, {"sst": run.data["dev"]["sst"]}, torch.device("cpu"),
                                             run.amp_context, 16, "ordinal")
    assert set(predictions["sst"][1].tolist()) == {4}
    assert metrics["sst"]["accuracy"] == (run.data["dev"]["sst"].labels == 4).float().mean().item()


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (7, 0.5), (9, 1 / 6)])
def test_linear_schedule_with_warmup(step, expected):
    assert mc.lr_multiplier(step, total_steps=10, warmup_steps=4, kind="linear") == pytest.approx(expected)


def test_cosine_and_constant_schedules():
    assert mc.lr_multiplier(7, total_steps=10, warmup_steps=4, kind="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5)))
    assert mc.lr_multiplier(9, total_steps=10, warmup_steps=4, kind="constant") == 1.0


def test_ordinal_loss_and_predictions():
    spec = TASKS["sst"]
    labels = torch.tensor([0, 2, 4])
    targets = mc.ordinal_targets(labels, 4)
    assert targets.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    logits = (targets * 2 - 1) * 10  # confident and right
    assert mc.predictions_from_logits(spec, logits, "ordinal").tolist() == [0, 2, 4]
    assert mc.task_loss(spec, logits, labels, "ordinal") < 1e-3
    assert mc.task_loss(spec, -logits, labels, "ordinal") > 10
    probabilities = mc.outputs_from_logits(spec, logits, "ordinal")
    assert probabilities.argmax(-1).tolist() == [0, 2, 4]
    assert torch.allclose(probabilities.sum(-1), torch.ones(3))
    crossing = torch.tensor([[3.0, -3.0, 2.0, -5.0]])  # P(y>2) > P(y>1): made non-increasing, no negative class
    assert (mc.outputs_from_logits(spec, crossing, "ordinal") >= 0).all()


def test_class_weights_are_inverse_frequency_and_change_the_loss():
    spec = TASKS["para"]
    labels = torch.tensor([0.0, 0.0, 0.0, 1.0])
    weights = mc.inverse_frequency_weights(spec, labels)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]))
    logits = torch.zeros(4)
    plain = mc.task_loss(spec, logits, labels)
    weighted = mc.task_loss(spec, logits, labels, class_weights=weights)
    torch.testing.assert_close(weighted, plain * (3 * 4 / 6 + 2) / 4)


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "sst,nope"], "unknown task"),
    (["--option", "test"], "needs --pretrained_model_name"),
    (["--batch_size", "0"], "must be >= 1"),
    (["--encoder_dropout", "1"], "--encoder_dropout must be in [0, 1)"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (["--option", "pretrain", "--sts_head", "cosine"], "nothing to train"),
    (["--layer_lr_decay", "0"], "--layer_lr_decay must be in (0, 1]"),
    (["--clip", "0"], "--clip must be > 0 or none"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),  # nan passes `lr <= 0`
    (["--smart_eps", "inf"], "--smart_eps must be a finite number, got inf"),
    (["--resume", "runs/x", "--lr", "5"], "these would be ignored: --lr"),
    (["--option", "test", "--pretrained_model_name", "runs/x", "--save_path", "t"], "would be ignored: --save_path"),
    (["--option", "test", "--pretrained_model_name", "runs/x", "--tasks", "sst"], "would be ignored: --tasks"),
    (["--option", "ensemble", "--ensemble", "a", "b", "--lr", "5"], "would be ignored: --lr"),
    (["--resume", "runs/x", "--seed", "11711"], "would be ignored: --seed"),  # the default value, named
    (["--ensemble_method", "vote"], "--ensemble_method is read only by --option ensemble"),
    (["--option", "ensemble", "--ensemble", "runs/a", "runs/b", "runs/a"], "--ensemble names a run twice"),
    (["--option", "individual_pretrain", "--profile", "3"], "--profile profiles the multitask training loop"),
    (["--lr", "1e38"], "--lr and --head_lr must be in (0, 1]"),  # was an overflow traceback in the optimiser
])
def test_impossible_settings_are_rejected_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_boolean_flags_are_real_booleans():
    assert parse_args(["--class_weights"]).class_weights is True
    assert parse_args(["--no-class_weights"]).class_weights is False
    assert parse_args(["--clip", "none"]).clip is None


def test_auto_amp_is_bf16_only_with_native_support(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert mc.resolve_amp("auto", cpu) == ("bf16" if mc.native_bf16(cpu) else "none")
    assert mc.resolve_amp("fp16", cpu) == "fp16"  # runs on a CPU, to check the GPU's fp16 path
    for native in (True, False):
        monkeypatch.setattr(mc, "cpu_native_bf16", lambda: native)
        assert mc.resolve_amp("auto", cpu) == ("bf16" if native else "none")
        capsys.readouterr()
        assert mc.resolve_amp("bf16", cpu) == "bf16"  # asked for, it runs, but says so where it is emulated
        assert ("warning: --amp bf16 on this CPU (no AVX512-BF16 or AMX) is emulated" in capsys.readouterr().out) \
            is not native


@pytest.mark.parametrize("capability,expected", [((7, 0), "none"), ((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_amp_on_a_gpu_reads_its_compute_capability(monkeypatch, capability, expected):
    """A V100 (7.0) or T4 (7.5) reports torch.cuda.is_bf16_supported() True, emulating bf16: auto is fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert mc.resolve_amp("auto", torch.device("cuda")) == expected


def test_config_round_trips_through_json():
    cfg = parse_args(["--lr", "3e-5", "--tasks", "sst,sts"])
    assert TrainConfig(**json.loads(json.dumps(cfg.__dict__))) == cfg


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
    assert mc.trainable_encoder_parts(cfg, epoch, num_layers=4) == expected


def test_freeze_embeddings_trains_everything_but_the_embeddings(tiny):
    run = make_run(tiny, "--freeze_embeddings", "--pooling", "pooler")
    mc.apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    mc.train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = not name.startswith(("bert.embeddings.", "heads.para", "heads.sts"))
        assert (not torch.equal(before[name], p.detach())) == trains, name


@pytest.mark.parametrize("flags,rate", [([], 0.05), (["--encoder_dropout", "none"], 0.1),
                                        (["--encoder_dropout", "0"], 0.0)])
def test_encoder_dropout_sets_every_dropout_in_the_encoder(tiny, flags, rate):
    """The tiny checkpoint's config.json says 0.1, kept with none; --encoder_dropout replaces it everywhere in
    the encoder (heads keep --hidden_dropout_prob), and at 0 a training-mode forward is deterministic."""
    cfg = parse_args(tiny_args(tiny, "unused", "--hidden_dropout_prob", "0.2", *flags))
    model = mc.build_model(cfg).train()
    assert {m.p for m in model.bert.modules() if isinstance(m, torch.nn.Dropout)} == {rate}
    assert {m.p for m in model.heads.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
    batch = mc.load_datasets(cfg, mc.BertTokenizer.from_pretrained(cfg.bert_path))["dev"]["para"].collate([0, 1, 2])
    first, second = (model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                     ["last_hidden_state"] for _ in range(2))
    assert torch.equal(first, second) == (rate == 0.0)


def test_resuming_a_run_saved_before_encoder_dropout_keeps_the_checkpoints_dropout(tmp_path):
    config = TrainConfig().__dict__
    del config["encoder_dropout"]  # a config.json written before the flag existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "last.pt").write_bytes(b"")
    assert mc.resumed_config(parse_args(["--resume", str(tmp_path)])).encoder_dropout is None


def swapped_pairs_copy(data_dir: str, folder) -> str:
    """A copy of the course data with sentence1 and sentence2 exchanged in every pair task's dev file."""
    os.makedirs(folder)
    for name in os.listdir(data_dir):
        lines = open(os.path.join(data_dir, name)).read().splitlines()
        if name in ("quora-dev.csv", "sts-dev.csv"):
            lines = [lines[0]] + ["\t".join([*f[:2], f[3], f[2], *f[4:]]) for f in (line.split("\t") for line in lines[1:])]
        (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize("both_orders", [True, False])
def test_both_orders_make_pair_predictions_symmetric(tiny, tmp_path, both_orders):
    """With --eval_both_orders a pair's prediction is the mean of the encoder's readings of (a, b) and
    (b, a), so a dev file with its sentences exchanged gets the same predictions; a joint encoder alone
    reads them in order (a random tiny model's outputs differ). Training batches carry one order."""
    flag = "--eval_both_orders" if both_orders else "--no-eval_both_orders"
    swapped_dir = swapped_pairs_copy(tiny["data"], tmp_path / "swapped")
    outputs = []
    for data_dir in (tiny["data"], swapped_dir):
        run = make_run(tiny, flag, "--data_dir", data_dir)
        torch.manual_seed(0)
        run.model = mc.build_model(run.cfg)  # the same random weights for both files
        _, predictions = mc.run_evaluation(run.model, run.data["dev"], run.device, run.amp_context, 16)
        outputs.append(predictions)
        assert "swapped" not in run.train_sets["para"].collate([0, 1])
        assert ("swapped" in run.data["dev"]["para"].collate([0])) == both_orders
    for task in ("para", "sts"):
        same = np.allclose(outputs[0][task].outputs, outputs[1][task].outputs, atol=1e-5)
        assert same == both_orders, task
    assert np.array_equal(outputs[0]["sst"].outputs, outputs[1]["sst"].outputs)


def test_freeze_layers_beyond_the_encoder_is_an_error():
    with pytest.raises(mc.InputError, match="--freeze_layers 5, but the encoder has 4 layers"):
        mc.trainable_encoder_parts(parse_args(["--freeze_layers", "5"]), 0, num_layers=4)
    with pytest.raises(SystemExit):
        parse_args(["--freeze_layers", "-1"])


def test_freeze_layers_trains_only_the_layers_above(tiny):
    run = make_run(tiny, "--freeze_layers", "1", "--pooling", "pooler")
    mc.apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    mc.train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = name.startswith(("heads.sst", "bert.pooler", "bert.encoder.layer.1."))
        assert (not torch.equal(before[name], p.detach())) == trains, name


def test_freeze_layers_ends_the_backward_pass_above_the_frozen_layers(tiny):
    """The speed of --freeze_layers comes from autograd not recording the frozen bottom: layer 0's output
    carries no graph, layer 1's does."""
    run = make_run(tiny, "--freeze_layers", "1")
    mc.apply_trainable(run.model, run.cfg, run.epoch)
    records = []
    for layer in run.model.bert.encoder.layer:
        layer.register_forward_hook(lambda module, inputs, output: records.append(output.requires_grad))
    run.model.logits("sst", run.data["train"]["sst"].collate([0, 1]))
    assert records == [False, True]


def test_gradual_unfreezing_trains_only_the_unfrozen_layers(tiny, tmp_path):
    run = make_run(tiny, "--unfreeze_interval", "1", "--epochs", "3", "--pooling", "pooler")
    run.epoch = 1  # second epoch: the top layer of two
    mc.apply_trainable(run.model, run.cfg, run.epoch)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    mc.train_step(run, ["sst"])
    for name, p in run.model.named_parameters():
        trains = (name.startswith(("heads.sst", "bert.pooler", "bert.encoder.layer.1.")))
        assert (not torch.equal(before[name], p.detach())) == trains, name


def nan_on_calls(monkeypatch, calls: set[int]):
    """Make mc.task_loss return NaN on the given (1-based) calls, a fault injected into the loss."""
    count = {"n": 0}
    real = mc.task_loss

    def task_loss(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] in calls else loss
    monkeypatch.setattr(mc, "task_loss", task_loss)


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tiny, monkeypatch, capsys):
    run = make_run(tiny, "--optimizer", "sophiag", "--smart", "--smart_bregman_weight", "1")
    nan_on_calls(monkeypatch, {2})
    before = {}
    for step in range(3):
        if step == 1:
            before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
            ema_before = {n: p.detach().clone() for n, p in run.ema_model.named_parameters()}
        losses, _ = mc.advance(run, "sst")
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
    with pytest.raises(mc.NonFiniteTraining, match="2 steps in a row had a non-finite loss or gradient"):
        mc.main(tiny_args(tiny, run_dir, "--epochs", "2", "--max_bad_steps", "2"))
    last = mc.load_checkpoint(str(run_dir / "last.pt"))
    assert last["progress"]["epoch"] == 1 and last["progress"]["step"] == 3  # the end of the good epoch
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_a_resume_counts_the_earlier_time_and_refuses_changed_data_or_a_finished_run(tiny, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny, run_dir, "--epochs", "2", "--checkpoint_every", "1", "--max_bad_steps", "2")
    with monkeypatch.context() as patched:
        nan_on_calls(patched, {5, 6})  # epoch 2's second and third steps: stopped inside epoch 2
        with pytest.raises(mc.NonFiniteTraining):
            mc.main(args)
    checkpoint = mc.load_checkpoint(str(run_dir / "last.pt"))
    assert checkpoint["progress"]["epoch"] == 1 and 0 < checkpoint["progress"]["position"] < 3  # mid-epoch
    assert 0 < checkpoint["progress"]["epoch_seconds_before"] < checkpoint["progress"]["seconds_before"]
    # As if the first process had run long: the resumed run's figures must include its time.
    checkpoint["progress"].update(seconds_before=1000.0, epoch_seconds_before=500.0)
    mc.atomic_save(checkpoint, str(run_dir / "last.pt"))

    data = tmp_path / "data"  # the run's data, one training row changed: not what it started on
    shutil.copytree(tiny["data"], data)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data_dir": str(data)}))
    train = data / "ids-sst-train.csv"
    train.write_text(train.read_text().replace("\t0\n", "\t1\n", 1))
    with pytest.raises(mc.InputError, match="ids-sst-train.csv: not the file the run started on"):
        mc.main(["--resume", str(run_dir)])
    run_json = json.loads((run_dir / "run.json").read_text())  # as a run saved before the digests: two rows fewer
    (run_dir / "run.json").write_text(json.dumps({k: v for k, v in run_json.items() if k != "data_sha256"}))
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(mc.InputError, match="the sst training rows are not those the run was saved with"):
        mc.main(["--resume", str(run_dir)])
    (run_dir / "run.json").write_text(json.dumps(run_json))
    (run_dir / "config.json").write_text(json.dumps(config))

    mc.main(["--resume", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "metrics.json").read_text())
    assert summary["wall_seconds"] > 1000 and history[1]["seconds"] >= 500 > history[0]["seconds"]
    with pytest.raises(mc.InputError, match="the run has finished"):
        mc.main(["--resume", str(run_dir)])


def test_a_diverging_run_exits_with_status_3(tiny, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The command line itself, with every task loss made infinite (a rate large enough to diverge is refused).
    diverging = ("import sys, multitask_classifier as mc\n"
                 "real_loss = mc.task_loss\n"
                 "mc.task_loss = lambda *a, **k: real_loss(*a, **k) * float('inf')\n"
                 "sys.exit(mc.cli())")
    done = subprocess.run([sys.executable, "-c", diverging, *tiny_args(tiny, tmp_path / "run", "--max_bad_steps", "2")],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: 2 steps in a row had a non-finite loss")
    assert "Traceback" not in done.stderr
