"""--time_budget: the steps that fit, chosen from timed calibration steps, and a run that repeats exactly
with the recorded count. (How close a real run comes to its budget is measured by runs, not tests.)"""
import json

import pytest
import torch

import budget
from budget import steps_within_budget
from errors import InputError
import multitask_classifier as mc
from rundir import load_checkpoint
import train


def tiny_args(tiny, run_dir, *extra):
    return ["--data_dir", tiny["data"], "--bert_path", tiny["bert"], "--save_path", str(run_dir),
            "--batch_size", "8", "--eval_batch_size", "16", "--log_every", "1000", "--checkpoint_every", "none",
            *extra]


def test_steps_within_budget_by_hand():
    # 600 s budget, 5% reserve = 570 s; 100 s spent, 170 s of evaluation: 300 s at 0.5 s per step
    assert steps_within_budget(600, 100, 0.5, 170, epochs=1) == 600
    assert steps_within_budget(600, 100, 0.5, 170, epochs=2) == 300
    assert steps_within_budget(600, 500, 0.5, 170, epochs=1) == 0


def test_a_budgeted_run_records_its_count_and_repeats_exactly_with_it(tiny, tmp_path, capsys, monkeypatch):
    # The count itself depends on the machine's speed and load: keep it small here (the arithmetic is
    # tested above); the calibration still runs, on a copy of the model.
    chosen = []
    monkeypatch.setattr(budget, "steps_within_budget", lambda *args, **kwargs: chosen.append(args) or 5)
    monkeypatch.setattr(train, "past_deadline", lambda run: False)  # (the deadline's own test is below)
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 3)
    monkeypatch.setattr(budget, "CALIBRATION_SHARE", 0.1)  # timed steps go on for 0.9 s (or 300 steps), beyond 3
    budgeted = mc.main(tiny_args(tiny, tmp_path / "budget", "--time_budget", "0.15"))
    budget_s, spent_s, step_s, evaluation_s, epochs = chosen[0]
    assert budget_s == 9.0 and spent_s > 0 and step_s > 0 and evaluation_s > 0 and epochs == 1
    printed = capsys.readouterr().out
    config = json.loads((tmp_path / "budget" / "config.json").read_text())
    steps = config["num_batches_per_epoch"]
    assert config["time_budget"] == 0.15 and steps == 5
    assert f"{steps} steps per epoch (the same run: --num_batches_per_epoch {steps} --time_budget none)" in printed
    figures = json.loads((tmp_path / "budget" / "run.json").read_text())["time_budget"]
    assert figures["budget_s"] == 9.0 and figures["steps_per_epoch"] == steps and figures["step_s"] > 0
    assert figures["timed_steps"] > 3 and (figures["timed_s"] >= 0.9 or figures["timed_steps"] == 300)
    assert 0 < figures["deadline_s"] < 9.0
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["steps"] == steps  # and where the wall time went (a tiny run's parts round to 0.0 s)
    assert {"training_seconds", "evaluation_seconds", "prediction_seconds"} <= summary.keys()
    repeated = mc.main(tiny_args(tiny, tmp_path / "again", "--config", str(tmp_path / "budget" / "config.json"),
                                 "--time_budget", "none"))
    assert repeated == budgeted  # calibration consumed none of the run's randomness
    a = load_checkpoint(str(tmp_path / "budget" / "best.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "again" / "best.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_too_small_to_train_stops_before_the_run_folder(tiny, tmp_path):
    with pytest.raises(InputError, match="leaves no time to train"):
        mc.main(tiny_args(tiny, tmp_path / "run", "--time_budget", "0.0001"))
    assert not (tmp_path / "run").exists()


def test_a_run_slower_than_calibrated_stops_at_the_deadline_and_repeats_exactly(tiny, tmp_path, capsys, monkeypatch):
    """The count is planned for 10 steps; the deadline (here: after step 4) stops training, the dev
    evaluation and predictions follow, and config.json records the stop so that the run repeats exactly."""
    monkeypatch.setattr(budget, "steps_within_budget", lambda *args, **kwargs: 10)
    monkeypatch.setattr(train, "past_deadline", lambda run: run.step >= 4)
    budgeted = mc.main(tiny_args(tiny, tmp_path / "budget", "--time_budget", "0.15", "--checkpoint_every", "2"))
    printed = capsys.readouterr().out
    assert ("stopped at the budget's deadline, at step 4 of 10, to leave time for the evaluation and predictions "
            "(the same run: --num_batches_per_epoch 10 --stop_at_step 4 --time_budget none)") in printed
    config = json.loads((tmp_path / "budget" / "config.json").read_text())
    assert config["num_batches_per_epoch"] == 10 and config["stop_at_step"] == 4
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    assert summary["steps"] == 4 and budgeted["overall"] == summary["dev"]["overall"]
    assert sorted(p.name for p in (tmp_path / "budget" / "predictions").glob("*.csv"))  # written all the same
    assert len(json.loads((tmp_path / "budget" / "metrics.json").read_text())) == 1  # one dev evaluation
    repeated = mc.main(tiny_args(tiny, tmp_path / "again", "--config", str(tmp_path / "budget" / "config.json"),
                                 "--time_budget", "none"))
    assert repeated == budgeted
    a = load_checkpoint(str(tmp_path / "budget" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "again" / "last.pt"))
    assert a["progress"]["step"] == b["progress"]["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_stop_at_step_ends_a_two_epoch_run_inside_its_first_epoch(tiny, tmp_path):
    mc.main(tiny_args(tiny, tmp_path / "run", "--epochs", "2", "--num_batches_per_epoch", "6", "--stop_at_step", "4"))
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in history] == [4]
    (tmp_path / "run" / "summary.json").unlink()  # as if killed after its last checkpoint, before the summary
    mc.main(["--resume", str(tmp_path / "run")])  # a stopped run is finished: nothing more to train
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == history
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
