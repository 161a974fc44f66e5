"""--option ensemble: average, vote and greedy selection over finished runs' saved outputs, scored on a
dev half that selection never saw."""
import json
import os
import shutil

import numpy as np
import pytest

import ensemble
from errors import InputError
from evaluation import read_outputs
from flags import parse_args
import multitask_classifier as mc
from rundir import RunDirLocks
from tasks import TASKS
from tests.fixtures import read_predictions, tiny_args


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    for seed in (1, 2, 3):
        mc.main(tiny_args(tiny, root / f"seed{seed}", "--seed", str(seed), "--lr", "1e-3"))
    return [str(root / f"seed{seed}") for seed in (1, 2, 3)]


def ensemble_args(tiny, runs, out, *extra):
    # No --data_dir: the labels come from the folder the members were evaluated from.
    return ["--option", "ensemble", "--ensemble", *runs, "--save_path", str(out), *extra]


def member_outputs(run_dir, split):
    return read_outputs(f"{run_dir}/predictions/outputs-{split}.npz")[1]


def test_average_ensemble_writes_the_mean_of_its_members(tiny, runs, tmp_path):
    summary = mc.main(ensemble_args(tiny, runs, tmp_path / "ens", "--ensemble_method", "average"))
    assert [m["weight"] for m in summary["members"]] == pytest.approx([1 / 3] * 3)
    for split in ("dev", "test"):
        _, combined = read_outputs(str(tmp_path / "ens" / "predictions" / f"outputs-{split}.npz"))
        for task, (ids, outputs) in combined.items():
            members = [member_outputs(run, split)[task] for run in runs]
            assert ids == members[0][0]
            np.testing.assert_allclose(outputs, np.mean([m[1] for m in members], 0), rtol=1e-6)
            rows = [line.rstrip(" ").split(" , ") for line in read_predictions(
                tmp_path / "ens" / "predictions" / TASKS[task].prediction_file(split))[1:]]
            assert [r[0] for r in rows] == ids
            expected = ensemble.predictions_from_outputs(TASKS[task], outputs)
            assert np.allclose([float(r[1]) for r in rows], expected)
    written = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert written["report_half"] == summary["report_half"]
    assert sum(written["rows"]["report"].values()) + sum(written["rows"]["selection"].values()) == 72
    mean = np.mean([m["report_half"]["overall"] for m in written["members"]])
    assert written["mean_member_report_half"]["overall"] == pytest.approx(mean)
    assert (tmp_path / "ens" / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_an_ensemble_can_be_a_member_and_mismatched_runs_are_refused(tiny, runs, tmp_path, capsys):
    mc.main(ensemble_args(tiny, runs, tmp_path / "ens", "--ensemble_method", "average"))
    again = mc.main(ensemble_args(tiny, [str(tmp_path / "ens"), runs[0]], tmp_path / "ens2", "--ensemble_method",
                                  "average"))
    assert len(again["members"]) == 2

    # Each member's provenance is kept, not the first member's copied: members may be made differently.
    mc.main(tiny_args(tiny, tmp_path / "other_way", "--no-eval_both_orders", "--sst_loss", "ordinal"))
    mc.main(ensemble_args(tiny, [str(tmp_path / "ens"), str(tmp_path / "other_way")], tmp_path / "mixed"))
    for split in ("dev", "test"):
        meta, _ = read_outputs(str(tmp_path / "mixed" / "predictions" / f"outputs-{split}.npz"))
        assert meta["split"] == split and "sst_loss" not in meta and "both_orders" not in meta
        assert meta["data"] == read_outputs(f"{runs[0]}/predictions/outputs-{split}.npz")[0]["data"]
        inner, other = meta["members"]
        assert inner["path"] == str(tmp_path / "ens") and inner["ensemble"] == "average"
        assert [m["path"] for m in inner["members"]] == runs
        assert all(m["both_orders"] == ["para", "sts"] and m["sst_loss"] == "ce" for m in inner["members"])
        assert other == {"path": str(tmp_path / "other_way"), "sst_loss": "ordinal", "both_orders": []}

    fewer = tmp_path / "fewer"
    mc.main(tiny_args(tiny, fewer, "--max_dev_examples", "20"))
    with pytest.raises(InputError, match=f"{fewer} and {runs[0]} predicted different [a-z]+ dev rows \\(20 vs 24"):
        mc.main(ensemble_args(tiny, [runs[0], str(fewer)], tmp_path / "bad"))
    with pytest.raises(InputError, match="no outputs-dev.npz"):
        mc.main(ensemble_args(tiny, [runs[0], str(tmp_path)], tmp_path / "bad"))
    other = tmp_path / "other"  # a member evaluated on a copy of the data, whose dev file then changed
    shutil.copytree(tiny["data"], other)
    mc.main(tiny_args(tiny, tmp_path / "on_copy") + ["--data_dir", str(other)])
    dev = other / TASKS["sst"].files["dev"]
    dev.write_text(dev.read_text().replace("great runs it\t1", "great runs it\t2", 1))
    with pytest.raises(InputError, match="not the dev file the members were evaluated on"):
        mc.main(ensemble_args(tiny, [str(tmp_path / "on_copy"), runs[0]], tmp_path / "bad"))
    with pytest.raises(InputError, match="not the dev file the members were evaluated on"):
        mc.main(ensemble_args(tiny, [str(tmp_path / "on_copy"), runs[0]], tmp_path / "bad", "--data_dir", str(other)))
    mc.main(ensemble_args(tiny, [str(tmp_path / "on_copy"), runs[0]], tmp_path / "good", "--data_dir", tiny["data"]))
    with pytest.raises(SystemExit):
        parse_args(["--option", "ensemble", "--ensemble", runs[0]])  # one run is not an ensemble


def test_an_ensemble_never_writes_into_a_run_and_a_broken_member_is_an_input_error(tiny, runs, tmp_path,
                                                                                  monkeypatch):
    interrupted = tmp_path / "interrupted"  # a training run's folder, to be resumed: not the ensemble's
    interrupted.mkdir()
    shutil.copy(f"{runs[0]}/best.pt", interrupted / "last.pt")
    with pytest.raises(InputError, match="already holds a run"):
        mc.main(ensemble_args(tiny, runs, interrupted))
    assert sorted(p.name for p in interrupted.iterdir()) == ["last.pt"]
    with RunDirLocks() as other:  # a folder another process is using
        other.hold(str(tmp_path / "busy"))
        with pytest.raises(InputError, match="in use by another process"):
            mc.main(ensemble_args(tiny, runs, tmp_path / "busy"))

    mc.main(ensemble_args(tiny, runs, tmp_path / "ens", "--predictions_dir", str(tmp_path / "preds")))
    assert (tmp_path / "preds" / "outputs-test.npz").exists() and (tmp_path / "ens" / "summary.json").exists()
    assert not (tmp_path / "ens" / "predictions").exists()

    elsewhere = tmp_path / "elsewhere"  # a run that wrote its predictions to --predictions_dir
    mc.main(tiny_args(tiny, elsewhere, "--predictions_dir", str(tmp_path / "elsewhere-predictions")))
    assert len(mc.main(ensemble_args(tiny, [runs[0], str(elsewhere)], tmp_path / "with-elsewhere"))["members"]) == 2

    broken = tmp_path / "broken"  # a member whose outputs file was cut short
    shutil.copytree(runs[1], broken)
    npz = broken / "predictions" / "outputs-dev.npz"
    npz.write_bytes(npz.read_bytes()[:500])
    monkeypatch.chdir(tmp_path)  # the default folder, runs/<time>-ensemble, is not left behind empty
    with pytest.raises(InputError, match="outputs-dev.npz: not a readable outputs file"):
        mc.main(["--option", "ensemble", "--ensemble", runs[0], str(broken)])
    assert os.listdir(tmp_path / "runs") == []


def stacks_for(labels: dict[str, np.ndarray], members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {task: np.stack([m[task] for m in members]) for task in labels}


def one_hot(classes, num_classes, confidence=0.9):
    out = np.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1), dtype=np.float32)
    out[np.arange(len(classes)), classes] = confidence
    return out


def test_dev_halves_are_disjoint_complete_seeded_and_stratified():
    rng = np.random.default_rng(0)
    labels = {"sst": rng.integers(0, 5, 1001).astype(float), "sts": rng.uniform(0, 5, 400)}
    halves = ensemble.split_halves(labels, seed=3)
    for task, (selection, report) in halves.items():
        assert len(np.intersect1d(selection, report)) == 0
        assert sorted(np.concatenate([selection, report]).tolist()) == list(range(len(labels[task])))
        strata = np.rint(labels[task])
        for value in np.unique(strata):
            count = lambda rows: int((strata[rows] == value).sum())  # noqa: E731
            assert abs(count(selection) - count(report)) <= 1
    assert np.array_equal(ensemble.split_halves(labels, seed=3)["sst"][0], halves["sst"][0])
    assert not np.array_equal(ensemble.split_halves(labels, seed=4)["sst"][0], halves["sst"][0])


def test_greedy_selection_sees_only_the_selection_half():
    # Member 0 is right on the selection half only, member 1 on the report half only, member 2 half right
    # everywhere. Selection must prefer 0; scored on the report half, that choice is then poor.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    labels = {"sst": y.astype(float)}
    selection, report = ensemble.split_halves(labels, seed=1)["sst"]
    wrong = (y + 1) % 5
    right_on = lambda rows: np.where(np.isin(np.arange(200), rows), y, wrong)  # noqa: E731
    half = np.where(rng.random(200) < 0.5, y, wrong)
    members = [{"sst": one_hot(right_on(selection), 5)}, {"sst": one_hot(right_on(report), 5)},
               {"sst": one_hot(half, 5)}]
    stacks = stacks_for(labels, members)
    weights, trajectory = ensemble.greedy_selection(stacks, labels, {"sst": selection}, rounds=6)
    assert weights.tolist() == [1.0, 0.0, 0.0] and trajectory[0] == 1.0
    combined = ensemble.combine(stacks, weights, "average")
    assert ensemble.score(combined, labels, {"sst": report})["sst"]["accuracy"] == 0.0


def test_greedy_selection_adds_with_replacement_and_keeps_the_best_round():
    # Three members, each right on a different third of the rows: any two of them averaged beat one,
    # and all three beat any two.
    y = np.arange(300) % 5
    labels = {"sst": y.astype(float)}
    thirds = np.array_split(np.arange(300), 3)
    members = []
    for k in range(3):
        predicted = (y + 1 + np.arange(300) % 3) % 5  # wrong, and differently so from row to row
        predicted[thirds[k]] = y[thirds[k]]
        members.append({"sst": one_hot(predicted, 5, confidence=0.6)})
    stacks = stacks_for(labels, members)
    weights, trajectory = ensemble.greedy_selection(stacks, labels, {"sst": np.arange(300)}, rounds=6)
    assert trajectory[0] == pytest.approx(1 / 3) and max(trajectory) > trajectory[0]
    assert (weights > 0).sum() >= 2 and weights.sum() == pytest.approx(1)


def test_vote_is_the_majority_with_ties_to_the_average_probability():
    spec = TASKS["sst"]
    stack = np.stack([one_hot([1, 1, 2], 5, 0.5), one_hot([1, 3, 2], 5, 0.9), one_hot([4, 0, 0], 5, 0.6)])
    votes = ensemble.vote(spec, stack)
    # row 0: two votes for 1; row 1: 1, 3, 0 tie, the average probability favours 3 (0.9); row 2: 2 twice.
    assert ensemble.predictions_from_outputs(spec, votes).tolist() == [1, 3, 2]
    assert np.allclose(votes.sum(-1), 1)
    sts = np.array([[1.0, 2.0], [2.0, 4.0], [6.0, 0.0]])
    assert ensemble.vote(TASKS["sts"], sts).tolist() == [3.0, 2.0]


def test_greedy_ensemble_command_reports_both_halves(tiny, runs, tmp_path, capsys):
    summary = mc.main(ensemble_args(tiny, runs, tmp_path / "greedy"))
    assert summary["method"] == "greedy" and sum(m["weight"] for m in summary["members"]) == pytest.approx(1)
    assert {"selection_half", "report_half", "whole_dev", "greedy_selection_half_by_round"} <= set(summary)
    assert max(summary["greedy_selection_half_by_round"]) == pytest.approx(summary["selection_half"]["overall"])
    out = capsys.readouterr().out
    assert "mean of members" in out and "greedy ensemble" in out
    with pytest.raises(InputError, match="already holds an ensemble"):
        mc.main(ensemble_args(tiny, runs, tmp_path / "greedy"))


def test_seeds_script_runs_each_seed_once_tabulates_and_ensembles(tiny, tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "sweep"), "METHOD": "average"}
    flags = ["--data_dir", tiny["data"], "--bert_path", tiny["bert"], "--batch_size", "8",
             "--num_batches_per_epoch", "3", "--eval_batch_size", "16"]
    run = lambda: subprocess.run(["bash", "sweeps/seeds.sh", "2", *flags], cwd=root, env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=300)
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| seed1 |" in table and "| seed2 |" in table and "| mean ± std (2 runs) |" in table
    assert "| average ensemble (seed1 0.50, seed2 0.50) |" in table
    seeds = [json.loads((tmp_path / "sweep" / f"seed{s}" / "config.json").read_text())["seed"] for s in (1, 2)]
    assert seeds == [1, 2]
    assert (tmp_path / "sweep" / "ensemble-2-average" / "scores.png").is_file()
    (tmp_path / "sweep" / "seed2" / "summary.json").unlink()  # as if stopped before its end
    again = run()
    assert again.returncode == 0, again.stderr[-2000:]
    assert "seed 1: finished earlier" in again.stdout and "seed 2: resuming" in again.stdout
    assert (tmp_path / "sweep" / "seed2" / "summary.json").is_file()
    env["METHOD"] = "vote"  # another method: its own ensemble beside the first, in the table
    voted = run()
    assert voted.returncode == 0 and "| vote ensemble (" in (tmp_path / "sweep" / "table.md").read_text()
    assert (tmp_path / "sweep" / "ensemble-2-average" / "summary.json").is_file()
    flags.append("--lr=1e-3")  # another recipe in the same folder: refused
    other = run()
    assert other.returncode == 2 and "holds runs of the flags" in other.stderr


def test_summarize_names_what_is_not_a_run_and_refuses_what_it_cannot_compare(tiny, runs, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(os.path.dirname(__file__), "..",
                                                                            "sweeps", "summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    ens = tmp_path / "ens"
    mc.main(ensemble_args(tiny, runs, ens, "--ensemble_method", "average"))
    capsys.readouterr()
    summarize.main(["--seeds", *runs, "--ensemble", str(ens)])
    out = capsys.readouterr().out
    assert "| mean ± std (3 runs) |" in out and "| average ensemble (" in out and "CFIMDB" not in out
    summarize.main([runs[0], str(ens), str(tmp_path / "missing")])
    out = capsys.readouterr().out
    assert "| ens | (an --option ensemble folder: give it with --ensemble) |" in out
    assert "| missing | (no such folder) |" in out
    other = tmp_path / "other"  # another task set: its own column, and no mean over different overall scores
    mc.main(tiny_args(tiny, other, "--tasks", "sst,cfimdb"))
    capsys.readouterr()
    summarize.main(["--seeds", runs[0], str(other)])
    out = capsys.readouterr().out
    assert "| run | SST acc | QQP acc | STS r | CFIMDB acc | overall | wall s |" in out
    assert "(runs of different task sets: no mean)" in out
    with pytest.raises(SystemExit, match="its members are not the runs listed"):
        summarize.main(["--seeds", runs[0], runs[1], "--ensemble", str(ens)])
