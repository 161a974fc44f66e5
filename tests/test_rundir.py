"""Run folders (rundir.py): checkpoints read safely, runs never overwritten, folders held by one process,
predictions never written over, a resumed run's settings."""
import json
import os

import pytest
import torch

from config import TrainConfig
from errors import InputError
from flags import parse_args
import multitask_classifier as mc
from rundir import RunDirLocks, load_checkpoint, new_run_dir, resumed_config
from tests.fixtures import tiny_args


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_checkpoint_that_would_run_code_is_refused(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    mc.main(tiny_args(tiny, run_dir))
    checkpoint = load_checkpoint(str(run_dir / "best.pt"))  # ours: tensors, numbers, strings, lists, dicts
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())
    whole = (run_dir / "best.pt").read_bytes()
    for content in (b"garbage\n", whole[:len(whole) // 2]):  # not a checkpoint; one cut short
        (tmp_path / "x.pt").write_bytes(content)
        with pytest.raises(InputError, match="x.pt: not a checkpoint .torch.save writes a zip archive"):
            mc.main(["--option", "test", "--pretrained_model_name", str(tmp_path / "x.pt"), "--data_dir", tiny["data"]])
    marker = tmp_path / "code-ran"
    torch.save({**checkpoint, "payload": RunsCodeWhenUnpickled(marker)}, run_dir / "best.pt")
    with pytest.raises(InputError, match="refused: it holds objects other than tensors"):
        mc.main(["--option", "test", "--pretrained_model_name", str(run_dir), "--data_dir", tiny["data"]])
    assert not marker.exists()


def test_an_existing_run_is_never_overwritten(tiny, tmp_path, monkeypatch):
    mc.main(tiny_args(tiny, tmp_path / "run"))
    monkeypatch.setattr(mc, "load_datasets", lambda *a: pytest.fail("the data were loaded before the check"))
    with pytest.raises(InputError, match="already holds a run"):
        mc.main(tiny_args(tiny, tmp_path / "run"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="a file is there, not a folder"):
        mc.main(tiny_args(tiny, tmp_path / "file"))


def test_a_folder_in_use_by_another_process_is_refused(tiny, tmp_path, monkeypatch):
    """In its first 200 steps a run's folder holds no checkpoint, so "already holds a run" does not protect it:
    a second run given the same --save_path must still be refused while the first lives, and a folder made
    for a run that failed before writing anything is not left behind."""
    run_dir = tmp_path / "run"
    with RunDirLocks() as first:  # what a first run holds from before its data load to its end
        first.hold(str(run_dir))
        with monkeypatch.context() as patched:
            patched.setattr(mc, "load_datasets", lambda *a: pytest.fail("the data were loaded before the check"))
            with pytest.raises(InputError, match="in use by another process"):
                mc.main(tiny_args(tiny, run_dir))
    mc.main(tiny_args(tiny, run_dir))  # free again once the first has ended
    assert (run_dir / "best.pt").exists()
    (run_dir / "summary.json").unlink()  # as a run still running: last.pt and no summary yet
    with RunDirLocks() as first, pytest.raises(InputError, match="in use by another process"):
        first.hold(str(run_dir))
        mc.main(["--resume", str(run_dir)])
    with pytest.raises(InputError):
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
            with pytest.raises(InputError, match="already holds predictions"):
                mc.main(argv)
    with pytest.raises(InputError, match="already holds predictions"):
        mc.main(["--option", "ensemble", "--ensemble", str(tmp_path / "first"), str(tmp_path / "first-again"),
                 "--predictions_dir", str(shared)])
    assert {path.name: path.read_bytes() for path in shared.iterdir()} == written
    assert not (tmp_path / "second").exists()
    busy = tmp_path / "busy"
    with RunDirLocks() as other, pytest.raises(InputError, match="another --predictions_dir"):
        other.hold(str(busy))  # a run writing its predictions there now
        mc.main(tiny_args(tiny, tmp_path / "third", "--predictions_dir", str(busy)))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Without --save_path the folder is runs/<time>-<name>: a sweep's jobs started in the same second
    must not share one (each would overwrite the other's files)."""
    monkeypatch.chdir(tmp_path)
    folders = [new_run_dir("20261204-154254", "race") for _ in range(3)]
    assert folders == [os.path.join("runs", "20261204-154254-race" + suffix) for suffix in ("", "-2", "-3")]
    assert all(os.path.isdir(f) for f in folders)


def test_resuming_a_run_saved_before_encoder_dropout_keeps_the_checkpoints_dropout(tmp_path):
    config = TrainConfig().__dict__
    del config["encoder_dropout"]  # a config.json written before the flag existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "last.pt").write_bytes(b"")
    assert resumed_config(parse_args(["--resume", str(tmp_path)])).encoder_dropout is None
