"""The command line end to end (multitask_classifier.py): a short run's files and --option test, input errors
before any training, --option individual_pretrain, the exit statuses."""
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from bert import BertModel
from errors import InputError
from evaluation import read_outputs
from flags import parse_args
import multitask_classifier as mc
from rundir import load_checkpoint
from tasks import TASKS
from tests.fixtures import assert_same_metrics, assert_same_predictions, read_predictions, tiny_args


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
        with pytest.raises(InputError, match=re.escape(message)):
            mc.main(tiny_args(tiny, run_dir, *extra))
        assert not run_dir.exists()

    long_data = tmp_path / "long-data"
    shutil.copytree(tiny["data"], long_data)
    dev = long_data / "ids-sst-dev.csv"
    lines = dev.read_text().splitlines()
    fields = lines[2].split("\t")
    lines[2] = "\t".join(fields[:2] + [" ".join(["good"] * 100)] + fields[3:])
    dev.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"sst dev row '\S+' has 102 tokens, but the model has 64 positions"):
        mc.main(tiny_args(tiny, run_dir, "--data_dir", str(long_data)))
    assert not run_dir.exists()
    mc.main(tiny_args(tiny, tmp_path / "long", "--data_dir", str(long_data), "--max_length", "64"))

    mc.main(tiny_args(tiny, tmp_path / "plain"))
    with pytest.raises(InputError, match="its weights do not fit the model these flags build"):
        mc.main(tiny_args(tiny, run_dir, "--pretrained_model_name", str(tmp_path / "plain"), "--use_pal"))
    assert not run_dir.exists()
    checkpoint = load_checkpoint(str(tmp_path / "plain" / "best.pt"))
    checkpoint["model"].pop("heads.sst.net.1.weight")  # --option test rebuilds the model from the saved config
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(InputError, match=r"partial\.pt: its weights do not fit .*Missing key.*heads\.sst\.net\.1\.weight"):
        mc.main(["--option", "test", "--pretrained_model_name", str(tmp_path / "partial.pt"), "--data_dir", tiny["data"]])


def test_individual_pretrain_keeps_each_tasks_best_head(tiny, tmp_path):
    run_dir = tmp_path / "run"
    metrics = mc.main(tiny_args(tiny, run_dir, "--option", "individual_pretrain", "--epochs", "2"))
    assert set(metrics) == {"sst", "para", "sts", "overall"}
    assembled = load_checkpoint(str(run_dir / "best.pt"))["model"]
    encoder = BertModel.from_pretrained(tiny["bert"]).state_dict()
    for task in ("sst", "para", "sts"):
        best = load_checkpoint(str(run_dir / task / "best.pt"))
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
    saved = {task: load_checkpoint(str(run_dir / task / "best.pt"))["config"] for task in ("sst", "para", "sts")}
    assert {task: (c["tasks"], c["task_settings"], c["augment"], c["augment_tasks"], c["label_smoothing"])
            for task, c in saved.items()} == {"sst": ("sst", "sst.head_lr=2e-3", None, None, 0.1),
                                              "para": ("para", "", "swap", "para", 0.1),
                                              "sts": ("sts", "", None, None, 0.0)}
    with pytest.raises(SystemExit):
        parse_args(tiny_args(tiny, "x", "--option", "individual_pretrain", "--projection", "pcgrad"))
    assert "trains each task's head alone" in capsys.readouterr().err


def test_a_diverging_run_exits_with_status_3(tiny, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The command line itself, with every task loss made infinite (a rate large enough to diverge is refused).
    diverging = ("import sys, multitask_classifier as mc, train\n"
                 "real_loss = train.task_loss\n"
                 "train.task_loss = lambda *a, **k: real_loss(*a, **k) * float('inf')\n"
                 "sys.exit(mc.cli())")
    done = subprocess.run([sys.executable, "-c", diverging, *tiny_args(tiny, tmp_path / "run", "--max_bad_steps", "2")],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: 2 steps in a row had a non-finite loss")
    assert "Traceback" not in done.stderr
