"""Presets (--config), the Optuna search (hpo.py) and the GPU-node sweep scripts, on tiny runs."""
import json
import os
import pathlib
import subprocess
import sys

import optuna
import pytest

from errors import InputError
from flags import parse_args
import hpo
import multitask_classifier as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flags(tiny, *extra):
    return ["--data_dir", tiny["data"], "--bert_path", tiny["bert"], "--batch_size", "8", "--num_batches_per_epoch",
            "3", "--epochs", "2", "--eval_batch_size", "16", "--log_every", "1", *extra]


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_a_preset_sets_defaults_that_flags_override_and_a_saved_config_is_one(tiny, tmp_path):
    preset = write_json(tmp_path / "p.json", {"lr": 3e-4, "smart": True, "batch_size": 16, "_why": "a comment"})
    cfg = parse_args(["--config", preset, "--batch_size", "8"])
    assert (cfg.lr, cfg.smart, cfg.batch_size) == (3e-4, True, 8)
    assert parse_args(["--config", os.path.join(ROOT, "presets", "cpu-default.json")]) == parse_args([])
    assert parse_args(["--config", os.path.join(ROOT, "presets", "gpu-bert-base.json")]).epochs == 3

    mc.main(tiny_flags(tiny, "--save_path", str(tmp_path / "run"), "--lr", "2e-3", "--epochs", "1"))
    again = parse_args(["--config", str(tmp_path / "run" / "config.json")])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert again.lr == 2e-3 and again.save_path is None  # where the run went is not part of the recipe
    assert {k: v for k, v in again.__dict__.items() if k != "save_path"} == \
        {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "save_path"}


@pytest.mark.parametrize("content,message", [
    ({"lr": "fast"}, "lr must be float or null, got 'fast'"),
    ({"learning_rate": 1e-4}, "unknown setting 'learning_rate'"),
    ({"epochs": 1.5}, "epochs must be int"),
    ({"smart": 1}, "smart must be bool"),
    ({"scheduler": "cosnie"}, "scheduler must be one of linear, cosine, plateau, constant, got 'cosnie'"),
    ({"ensemble": "runs/a"}, "ensemble must be a list of strings, got 'runs/a'"),
    ([1, 2], "expected a JSON object \\(preset"),
], ids=["float-type", "unknown", "int-type", "bool-type", "misspelled-choice", "string-for-a-list", "not-an-object"])
def test_a_bad_preset_names_the_file_and_the_setting(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(InputError, match=f"{path}: .*{message}"):
        parse_args(["--config", path])


def study_args(tmp_path, space, *extra):
    return ["--space", space, "--storage", f"sqlite:///{tmp_path}/studies/study.db", "--study_name", "s",
            "--out", str(tmp_path / "trials"), *extra]


def test_a_study_trains_each_trial_in_its_folder_continues_and_reports(tiny, tmp_path, capsys):
    space = write_json(tmp_path / "space.json", {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                                 "hidden_dropout_prob": {"type": "float", "low": 0.0, "high": 0.3}})
    study = hpo.main(study_args(tmp_path, space, "--n_trials", "2", "--pruner", "none") + tiny_flags(tiny))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:
        run_dir = t.user_attrs["run_dir"]
        summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
        assert t.value == summary["dev"]["overall"] and t.user_attrs["dev"]["sst"] == summary["dev"]["sst"]
        assert len(t.intermediate_values) == 2  # one report per epoch
        config = json.loads(open(os.path.join(run_dir, "config.json")).read())
        assert config["lr"] == t.params["lr"] and config["num_batches_per_epoch"] == 3  # searched and fixed
    assert len({t.params["lr"] for t in study.trials}) == 2

    again = hpo.main(study_args(tmp_path, space, "--n_trials", "1", "--pruner", "none") + tiny_flags(tiny))
    assert len(again.trials) == 3  # the same command continues the study
    assert len({t.params["lr"] for t in again.trials}) == 3  # with new points, not its first ones again

    capsys.readouterr()
    hpo.main(["--report", *study_args(tmp_path, space)[2:]])
    out = capsys.readouterr().out
    assert "| 2 | complete |" in out and "importances" in out and "best: trial" in out
    assert (tmp_path / "trials" / "history.png").is_file() and (tmp_path / "trials" / "importances.png").is_file()

    best_config = pathlib.Path(again.best_trial.user_attrs["run_dir"]) / "config.json"
    stopped = {**json.loads(best_config.read_text()), "stop_at_step": 2}  # as a --time_budget deadline writes it
    write_json(best_config, stopped)
    preset = tmp_path / "best.json"
    hpo.main(["--best", str(preset), *study_args(tmp_path, space)[2:]])
    written = json.loads(preset.read_text())
    assert written["lr"] == again.best_trial.params["lr"] and "num_batches_per_epoch" not in written
    assert "stop_at_step" not in written  # a budget, not a recipe
    assert "ensemble" not in written and "data_dir" in written  # only what differs from the defaults
    assert parse_args(["--config", str(preset)]).lr == again.best_trial.params["lr"]


def test_a_trial_reports_each_epoch_and_the_pruner_stops_it(tiny, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}
    study.optimize(hpo.objective(parse_args(tiny_flags(tiny)), space, str(tmp_path)), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    history = json.loads((tmp_path / "trial-0" / "metrics.json").read_text())
    assert len(history) == 1  # stopped after the first of two epochs


def test_an_impossible_trial_fails_and_the_study_goes_on(tiny, tmp_path):
    # Each value alone is possible (a value impossible on the fixed flags is refused before any trial);
    # together they leave nothing to train.
    space = write_json(tmp_path / "space.json", {"sts_head": {"type": "categorical", "choices": ["cosine"]},
                                                 "option": {"type": "categorical", "choices": ["pretrain"]}})
    study = hpo.main(study_args(tmp_path, space, "--n_trials", "2") + tiny_flags(tiny))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2


@pytest.mark.parametrize("space,flags,message", [
    ({"learning_rate": {"type": "float", "low": 0.1, "high": 1}}, [], "not a setting that can be searched"),
    ({"lr": {"type": "float", "low": 0.1, "high": 1}}, ["--lr", "1e-4"], "also given as a flag"),
    ({"lr": {"type": "float", "low": 1, "high": 0.1}}, [], "numbers \"low\" < \"high\""),
    ({"pooling": {"type": "categorical"}}, [], "non-empty \"choices\""),
    ({"smart_eps": {"type": "float", "low": 0.01, "high": 0.3}}, [], "smart_eps acts only with --smart"),
    ({"rho": {"type": "float", "low": 0.1, "high": 10}}, [], "rho acts only with --optimizer sophiag or sophiah"),
    ({"scheduler": {"type": "categorical", "choices": ["cosnie", "linear"]}}, [], "'cosnie' cannot be used"),
    ({"sts_head": {"type": "categorical", "choices": ["cosine"]}}, ["--option", "pretrain"], "nothing to train"),
    ({"lr": {"type": "float", "low": 0, "high": 1e-3}}, [], "0 cannot be used: --lr and --head_lr must be in \\(0, 1\\]"),
    ({"n_hidden_layers": {"type": "float", "low": 0, "high": 2}}, [], "type int cannot take a float range"),
    ({"hidden_dropout_prob": {"type": "int", "low": 0, "high": 1}}, [], "type float cannot take a int range"),
    ({"n_hidden_layers": {"type": "int", "low": 0.5, "high": 2}}, [], "0.5 is not of type int"),
    ({"freeze_embeddings": {"type": "categorical", "choices": [True, 0]}}, [], "0 is not of type bool"),
], ids=["unknown", "also-fixed", "empty-range", "no-choices", "smart-off", "not-sophia", "misspelled-choice",
        "impossible-alone", "out-of-range", "float-range-of-int", "int-range-of-float", "float-bound-of-int",
        "int-choice-of-bool"])
def test_a_bad_space_is_refused_before_any_trial(tiny, tmp_path, space, flags, message):
    path = write_json(tmp_path / "space.json", space)
    with pytest.raises(InputError, match=message):
        hpo.main(study_args(tmp_path, path, "--n_trials", "1") + tiny_flags(tiny, *flags))
    assert not (tmp_path / "studies" / "study.db").exists()


def test_study_script_runs_one_process_per_gpu_in_one_study(tiny, tmp_path):
    space = write_json(tmp_path / "space.json", {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    storage = f"sqlite:///{tmp_path}/study.db"
    env = {**os.environ, "PYTHON": sys.executable, "GPUS": "2", "STORAGE": storage}
    done = subprocess.run(["bash", "sweeps/study.sh", f"t{os.getpid()}", space, "1", *tiny_flags(tiny, "--epochs", "1")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out_dir = os.path.join(ROOT, "runs", f"hpo-t{os.getpid()}")
    try:
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
        study = optuna.load_study(study_name=f"t{os.getpid()}", storage=storage)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert os.path.isfile(os.path.join(out_dir, "report.md"))
        assert {t.user_attrs["run_dir"] for t in study.trials} == {os.path.join(out_dir, "trial-0"),
                                                                  os.path.join(out_dir, "trial-1")}
    finally:
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)


def test_slurm_array_task_runs_its_preset_and_seed_once(tiny, tmp_path):
    preset = write_json(tmp_path / "tiny.json", {"epochs": 1, "num_batches_per_epoch": 2})
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_ARRAY_TASK_ID": "1", "PRESETS": preset, "SEEDS": "1 2",
           "OUT": str(tmp_path), "FLAGS": " ".join(tiny_flags(tiny)[:6])}
    run = lambda: subprocess.run(["bash", "sweeps/slurm-array.sh"], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=300)
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "array-tiny-seed2" / "config.json").read_text())
    assert (config["seed"], config["num_batches_per_epoch"], config["batch_size"]) == (2, 2, 8)
    assert "finished earlier" in run().stdout
    env["SLURM_ARRAY_TASK_ID"] = "2"
    assert run().returncode == 2  # beyond 1 preset x 2 seeds


def test_storage_errors_are_input_errors_and_a_database_folder_is_made(tmp_path):
    args = lambda url: ["--storage", url, "--study_name", "s"]  # noqa: E731
    with pytest.raises(InputError, match="no such database file"):
        hpo.main(["--report", *args(f"sqlite:///{tmp_path}/none/study.db")])
    with pytest.raises(InputError, match="cannot open it"):
        hpo.main(["--report", *args("bogus://x")])
    study = hpo.open_study(hpo.parse(args(f"sqlite:///{tmp_path}/new/folder/study.db"))[0], create=True)
    assert study.study_name == "s" and (tmp_path / "new" / "folder" / "study.db").is_file()


def test_the_best_preset_keeps_a_searched_step_count_and_drops_a_fixed_one(tmp_path):
    """A full-length study that searches num_batches_per_epoch has found a recipe that includes it."""
    study = optuna.create_study(direction="maximize")
    for number, (steps, value) in enumerate([(6, 0.7), (9, 0.6)]):
        run_dir = tmp_path / f"trial-{number}"
        run_dir.mkdir()
        write_json(run_dir / "config.json", {"lr": 3e-4, "num_batches_per_epoch": steps, "epochs": 2})
        study.add_trial(optuna.trial.create_trial(
            params={"num_batches_per_epoch": steps}, value=value, user_attrs={"run_dir": str(run_dir)},
            distributions={"num_batches_per_epoch": optuna.distributions.IntDistribution(3, 12)}))
    hpo.write_best(study, str(tmp_path / "best.json"))
    written = json.loads((tmp_path / "best.json").read_text())
    assert written["num_batches_per_epoch"] == 6 and written["lr"] == 3e-4
    assert "epochs" not in written  # fixed by the study's flags: its budget, not its finding
