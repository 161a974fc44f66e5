"""Hyperparameter search with Optuna: one trial is one training run, scored by its best dev overall score.

    python hpo.py --space spaces/default.json --storage sqlite:///runs/study.db --study_name NAME \\
                  --n_trials N [--timeout S] [--pruner median|hyperband|none] [any training flag...]
    python hpo.py --report --storage ... --study_name NAME      a table, importances, plots
    python hpo.py --best PRESET.json --storage ... --study_name NAME   the best trial as a --config preset

The training flags fix the rest of the recipe; the space file names each searched setting (a
TrainConfig field) with its range: {"lr": {"type": "float", "low": 1e-5, "high": 3e-4, "log": true},
"batch_size": {"type": "categorical", "choices": [16, 32]}, "num_batches_per_epoch": {"type": "int",
"low": 200, "high": 400, "step": 50}}. Each trial trains in-process through `multitask_classifier.train`
in its own folder (<--out>/trial-<number>); after each epoch the dev overall score is reported, and the
pruner may stop the trial there. Per-task dev scores, the folder and the wall time are stored as trial
attributes. The study lives in --storage: the same command run again continues it (N more trials); a
trial whose process died is marked failed by Optuna's heartbeat and tried once more; a trial that raises
is recorded as failed and the study goes on. Several processes (one per GPU) may share one study:
start the same command in each, with its own --sampler_seed (combined with the study's trial count, so a
continued study draws new points). A searched budget setting (num_batches_per_epoch, epochs) stays in
the --best preset; a fixed one does not.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import optuna

import multitask_classifier as mc
from config import TrainConfig, read_json_object
from flags import RUN_IDENTITY, parse_args, setting_type
from errors import InputError, MissingInput
from rundir import atomic_path

SPACE_TYPES = ("float", "int", "categorical")
BUDGET = ("num_batches_per_epoch", "time_budget", "stop_at_step", "epochs", "max_dev_examples",
          "max_train_examples")  # not a recipe


def load_space(path: str, fixed: list[str]) -> dict[str, dict]:
    """The search space from a JSON file, checked: every key a TrainConfig field not also fixed on the
    command line, every entry a float/int range or a list of choices."""
    space = read_json_object(path, "search space (--space)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space = {k: v for k, v in space.items() if not k.startswith("_")}
    if not space:
        raise InputError(f"--space {path}: no settings to search")
    for name, entry in space.items():
        where = f"--space {path}: {name}"
        if name not in fields or name in RUN_IDENTITY:
            raise InputError(f"{where}: not a setting that can be searched (settings are the flags' names)")
        if f"--{name}" in fixed or any(arg.startswith(f"--{name}=") for arg in fixed):
            raise InputError(f"{where}: also given as a flag; a setting is either searched or fixed")
        if not isinstance(entry, dict) or entry.get("type") not in SPACE_TYPES:
            raise InputError(f"{where}: expected {{\"type\": one of {SPACE_TYPES}, ...}}, got {entry!r}")
        if entry["type"] == "categorical":
            if not isinstance(entry.get("choices"), list) or not entry["choices"]:
                raise InputError(f"{where}: a categorical setting needs a non-empty \"choices\" list")
        elif not all(isinstance(entry.get(k), (int, float)) for k in ("low", "high")) or entry["low"] >= entry["high"]:
            raise InputError(f"{where}: a {entry['type']} setting needs numbers \"low\" < \"high\"")
        unknown = set(entry) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise InputError(f"{where}: unknown keys {sorted(unknown)}")
    return space


def check_space_acts(space: dict[str, dict], base: TrainConfig, path: str):
    """Refuse a search over settings that the fixed flags leave without effect: SMART's settings
    without --smart, Sophia's without --optimizer sophiag or sophiah (such a study would search noise)."""
    groups = {f.name: f.metadata["group"] for f in dataclasses.fields(TrainConfig)}
    for name in space:
        if groups[name] == "smart" and name != "smart" and not base.smart and "smart" not in space:
            raise InputError(f"--space {path}: {name} acts only with --smart; add it to the flags")
        if name in ("rho", "hess_interval") and not base.optimizer.startswith("sophia") and "optimizer" not in space:
            raise InputError(f"--space {path}: {name} acts only with --optimizer sophiag or sophiah; add it")


def check_space_values(space: dict[str, dict], base: TrainConfig, path: str):
    """Refuse values a setting cannot take, before any trial: the wrong type (an int range over a float
    setting draws only whole numbers, a float range over an int setting makes --best write a preset that
    --config refuses) or a value the setting itself refuses (a misspelled choice, a rate <= 0). Each range
    end and each choice is checked alone on top of the fixed flags."""
    for name, entry in space.items():
        where, kind = f"--space {path}: {name}", setting_type(name)
        ranges = {int: ("int",), float: ("float",)}.get(kind, ())
        if entry["type"] != "categorical" and entry["type"] not in ranges:
            raise InputError(f"{where}: a setting of type {kind.__name__} cannot take a {entry['type']} range; use "
                             + (f"\"type\": \"{ranges[0]}\"" if ranges else "\"categorical\" choices"))
        values = entry["choices"] if entry["type"] == "categorical" else [entry["low"], entry["high"]]
        for value in values:
            fits = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if value is not None and (not fits or (kind is not bool and isinstance(value, bool))):
                raise InputError(f"{where}: {value!r} is not of type {kind.__name__}")
            try:
                dataclasses.replace(base, **{name: float(value) if kind is float and value is not None else value})
            except ValueError as e:
                raise InputError(f"{where}: {value!r} cannot be used: {e}") from None


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict:
    """One value per searched setting, drawn by the study's sampler."""
    values = {}
    for name, entry in space.items():
        if entry["type"] == "float":
            values[name] = trial.suggest_float(name, entry["low"], entry["high"], log=entry.get("log", False),
                                               step=entry.get("step"))
        elif entry["type"] == "int":
            values[name] = trial.suggest_int(name, entry["low"], entry["high"], log=entry.get("log", False),
                                             step=entry.get("step", 1))
        else:
            values[name] = trial.suggest_categorical(name, entry["choices"])
    return values


def objective(base: TrainConfig, space: dict[str, dict], out: str):
    def run_trial(trial: optuna.Trial) -> float:
        # An impossible combination raises ValueError here: a failed trial (catch=), not a crashed study.
        cfg = dataclasses.replace(base, **suggest(trial, space), save_path=os.path.join(out, f"trial-{trial.number}"))
        trial.set_user_attr("run_dir", os.path.abspath(cfg.save_path))
        start = time.perf_counter()

        def report(epoch: int, metrics: dict):
            trial.report(metrics["overall"], epoch)
            trial.set_user_attr("dev_by_epoch", trial.user_attrs.get("dev_by_epoch", []) + [metrics])
            if trial.should_prune():
                trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
                raise optuna.TrialPruned(f"epoch {epoch}: dev overall {metrics['overall']:.4f}")

        best = mc.train(cfg, on_epoch=report,
                        command=f"{sys.executable} multitask_classifier.py --config {cfg.save_path}/config.json")
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        trial.set_user_attr("dev", best)
        return best["overall"]
    return run_trial


def open_study(args, create: bool) -> optuna.Study:
    """The study in --storage: created (with its SQLite file's folder) when `create`, else loaded.
    The TPE seed is --sampler_seed combined with the number of trials the study already holds, so a
    continued study draws new startup points instead of repeating its first ones, and stays repeatable."""
    database = args.storage[len("sqlite:///"):] if args.storage.startswith("sqlite:///") else None
    if database and not create and not os.path.isfile(database):
        raise MissingInput(f"--storage {args.storage}: no such database file ({database})")
    if database and create and os.path.dirname(database):
        os.makedirs(os.path.dirname(database), exist_ok=True)
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5; it is what makes resuming safe
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                args.storage, heartbeat_interval=60, grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as e:  # a malformed URL, an unknown database driver, a file that cannot be opened
        raise InputError(f"--storage {args.storage}: cannot open it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    if not create:
        try:
            return optuna.load_study(study_name=args.study_name, storage=storage)
        except KeyError:
            raise MissingInput(f"no study {args.study_name!r} in {args.storage}") from None
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto"),
              "none": optuna.pruners.NopPruner()}[args.pruner]
    study = optuna.create_study(study_name=args.study_name, storage=storage, direction="maximize",
                                load_if_exists=True, pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=args.sampler_seed + 100_003 * len(study.trials),
                                               n_startup_trials=5)
    return study


def trials_table(study: optuna.Study) -> str:
    """Markdown: every trial, its state, score, per-task dev scores, time and parameters."""
    names = sorted({p for t in study.trials for p in t.params})
    lines = ["| trial | state | overall | SST | QQP | STS r | epochs | s | " + " | ".join(names) + " |",
             "|---" * (8 + len(names)) + "|"]
    for t in study.trials:
        dev = t.user_attrs.get("dev") or (t.user_attrs.get("dev_by_epoch") or [{}])[-1]
        task = lambda k, m: f"{dev[k][m]:.4f}" if k in dev else "-"  # noqa: E731
        value = f"{t.value:.4f}" if t.value is not None else (f"({dev['overall']:.4f})" if "overall" in dev else "-")
        params = " | ".join(f"{t.params[n]:.3g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-"))
                            for n in names)
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | {task('sst', 'accuracy')} | "
                     f"{task('para', 'accuracy')} | {task('sts', 'pearson')} | {len(t.intermediate_values)} | "
                     f"{t.user_attrs.get('seconds', '-')} | {params} |")
    return "\n".join(lines)


def report(study: optuna.Study, out: str):
    """Print the trials and the parameter importances; write history and importance plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    print(f"study {study.study_name}: {len(study.trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())})")
    print(trials_table(study))
    seconds = [t.user_attrs.get("seconds", 0) for t in study.trials]
    print(f"\ntrial time: {sum(seconds):.0f} s in all")
    if complete:
        best = study.best_trial
        print(f"best: trial {best.number}, dev overall {best.value:.4f}, {best.params}")
    os.makedirs(out, exist_ok=True)
    written = []
    if complete:
        plots.plot_optimization_history(study)
        written.append(os.path.join(out, "history.png"))
        plt.gcf().savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close("all")
    if len(complete) >= 2 and any(len({str(t.params.get(n)) for t in complete}) > 1 for n in complete[0].params):
        importances = optuna.importance.get_param_importances(study)
        print("importances (fANOVA, share of the score's variance): "
              + ", ".join(f"{name} {value:.2f}" for name, value in importances.items()))
        plots.plot_param_importances(study)
        written.append(os.path.join(out, "importances.png"))
        plt.gcf().savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close("all")
    if written:
        print("plots: " + ", ".join(written))


def write_best(study: optuna.Study, path: str):
    """The best trial's recipe as a --config preset: its run's settings that differ from the defaults,
    less the folder settings and the study's budget (steps, epochs, dev and train subsets) unless the
    study searched it."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise InputError(f"study {study.study_name}: no finished trial yet")
    best = study.best_trial
    with open(os.path.join(best.user_attrs["run_dir"], "config.json")) as f:
        settings = json.load(f)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    same = lambda k, v: (tuple(v) if isinstance(v, list) else v) == defaults[k]  # noqa: E731  (JSON lists)
    preset = {k: v for k, v in settings.items()
              if k in defaults and not same(k, v) and k not in RUN_IDENTITY and k != "seed"
              and (k not in BUDGET or k in best.params)}
    preset = {"_study": f"{study.study_name}: trial {best.number}, dev overall {best.value:.4f} at its budget "
                        f"({', '.join(f'{k} {settings[k]}' for k in BUDGET if settings.get(k) is not None)})",
              **preset}
    with atomic_path(path) as temp_path, open(temp_path, "w") as f:
        json.dump(preset, f, indent=2)
    print(f"{path}: trial {best.number}'s recipe ({len(preset) - 1} settings); run it with "
          f"python multitask_classifier.py --config {path}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="Optuna search over multitask_classifier.py's settings; "
                                     "other flags go to training.", allow_abbrev=False)
    parser.add_argument("--space", help="JSON search space (spaces/*.json)")
    parser.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///runs/study.db")
    parser.add_argument("--study_name", required=True)
    parser.add_argument("--n_trials", type=int, help="trials to run in this process (more on a later call)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                        help="stop trials whose per-epoch dev overall score falls behind")
    parser.add_argument("--sampler_seed", type=int, default=0, help="TPE sampler seed, one per process sharing a study "
                        "(combined with the trials already in it)")
    parser.add_argument("--out", help="folder for the trials' runs and the plots (default runs/hpo-<study_name>)")
    parser.add_argument("--report", action="store_true", help="print the trials and importances, write plots")
    parser.add_argument("--best", metavar="PRESET.json", help="write the best trial's recipe as a --config preset")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None):
    args, training_flags = parse(sys.argv[1:] if argv is None else argv)
    out = args.out or os.path.join("runs", f"hpo-{args.study_name}")
    if args.report or args.best:
        study = open_study(args, create=False)
        if args.report:
            report(study, out)
        if args.best:
            write_best(study, args.best)
        return study
    if not args.space or not args.n_trials:
        raise SystemExit("hpo.py: a search needs --space FILE and --n_trials N (or use --report / --best)")
    space = load_space(args.space, training_flags)
    base = parse_args(training_flags)  # the fixed settings, checked before any trial
    check_space_acts(space, base, args.space)
    check_space_values(space, base, args.space)
    for name in ("save_path", "resume"):
        if getattr(base, name) is not None:
            raise InputError(f"--{name}: each trial gets its own folder under --out ({out})")
    study = open_study(args, create=True)
    study.set_user_attr("fixed_flags", " ".join(training_flags))
    study.optimize(objective(base, space, out), n_trials=args.n_trials, timeout=args.timeout,
                   catch=(Exception,), gc_after_trial=True)
    report(study, out)
    return study


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
