"""Record what a commit's command line does, bit for bit, so that two commits can be compared.

    .venv/bin/python tests/exactness.py record REV [--out FILE] [--quick]
    .venv/bin/python tests/exactness.py compare FILE_A FILE_B      # exit status 1 if anything differs
    .venv/bin/python tests/exactness.py old-runs REV [--out DIR]   # finished/interrupted runs for later checks
    .venv/bin/python tests/exactness.py check-old-runs REV [--old DIR] [--out FILE]

Why: code is being moved between files (multitask_classifier.py split into modules) and behaviour must
not change. `record` checks REV out into a temporary `git worktree` (removed afterwards, also on an error
or Ctrl-C; the main work tree is never touched) and runs everything through that worktree's command line,
`<this venv's python> multitask_classifier.py ...` with the worktree as working folder, so it works
whatever the internal layout is. Bit-identity only holds on one machine with one thread count: the
threads are fixed (OMP_NUM_THREADS, MKL_NUM_THREADS; PYTHONHASHSEED too) and written into the record
with the CPU model, and `compare` reports records from different machines or thread counts as differing.

What is recorded (the record is JSON, /tmp/exactness/<rev>.json by default):

(a) The default recipe, `--stop_at_step 100` (20 with --quick), twice: `--amp none` and `--amp auto`
    (what auto resolved to is recorded from the "run: ... amp X" line; on an AVX2-only CPU it is none,
    fp32). Overridden besides that: --data_dir (a copy of the course data whose dev and test files are
    cut to the header and their first 200 rows, byte-identical prefixes, the train files whole, so the
    evaluation takes seconds), --log_every 1 (every step's losses logged; logged steps also compute the
    techniques' diagnostics), --save_path. --num_batches_per_epoch stays at its default, so the
    learning-rate schedule is the default's.
(b) Tiny runs (the base: --max_train_examples 64 --num_batches_per_epoch 6 --batch_size 8 --epochs 1
    --log_every 1, dev and test files cut to 32 rows; every task trains in its 6 steps) of every flag of the --help groups that change the
    model, the data or the training technique: data, model, schedules, losses, training, smart, surgery.
    Left out: speed (amp, device, compile, eval_batch_size: how fast, not what; amp is covered by (a)),
    output (folders, names, logging, checkpoint cadence, profiling, resume: where results go, not what
    they are) and ensemble (--ensemble and --ensemble_method only act with --option ensemble, which is
    covered as a value of the model group's --option, on two of these tiny runs).
    The list of runs is generated from `dataclasses.fields(TrainConfig)` of the worktree being recorded
    (see FIELDS_SNIPPET; types, defaults, choices and the --help group): a choice field runs every
    other choice, a bool the flipped value, a number a changed valid value (0 -> 1 or 0.1, 1 -> 2, else
    halved) and, for an optional one, none as well. The few that need a hand: VALUES (free-text fields),
    COMPANIONS (flags that only act with another), MODES (--option values that read a finished run)
    and SKIPPED (with the reason, written into the record). Companions are otherwise derived from the
    name: smart_* turns on --smart, pal_* --use_pal, gradvac_* --projection gradvac (--augment eda for
    eda_* is in COMPANIONS: augment is free text, without choices).
    The tiny runs go two at a time, one thread each.

For every run: the exit status (a failure is a record: its last stderr line), the TensorBoard scalars
of every step (train_loss/<task>, lr and the techniques' diagnostics; not tokens_per_s, a timing), a
sha256 of each top-level entry of last.pt and best.pt (model, optimizer, generators, progress ...; in a
canonical key order, timings dropped) plus one per model tensor, the JSON files (config.json,
metrics.json, summary.json; timings dropped, folders replaced by placeholders) and a sha256 of every
prediction CSV and of the arrays of every outputs-*.npz. Wall-clock times are recorded but never
compared, and neither are folder names.

`old-runs REV` leaves, for later compatibility checks, a finished tiny run, a second one with another
seed and an interrupted one (SIGTERM after its first checkpoint) with a README.txt; `check-old-runs REV`
runs `--resume`, `--option test` and `--option ensemble` of a commit on copies of them and records the
results in the same format (compare two commits' check records with `compare`).
"""
import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable  # this venv's python runs the worktree's command line as well
COURSE_DATA = os.path.join(REPO, "data")
ROOT = "/tmp/exactness"
FORMAT = 3  # records of another format are not comparable (2: 6 tiny steps, not 4; 3: task_scheduler, warmup)

DEFAULT_THREADS = 2     # the default recipe's runs, one after the other
TINY_THREADS = 1        # the tiny runs, PARALLEL at a time
PARALLEL = 2
DEFAULT_ROWS, TINY_ROWS = 200, 32    # dev and test rows kept per file
DEFAULT_STEPS, QUICK_STEPS = 100, 20

# The modules where TrainConfig may live, tried in order (config.py before the split; add new homes here).
CONFIG_MODULES = ["config", "flags", "settings", "train_config"]

# Run in the worktree: TrainConfig's fields as JSON. If the flags' metadata (help, choices, group) moves
# out of the fields into a table of their own, read it here.
FIELDS_SNIPPET = r"""
import dataclasses, importlib, json, sys
for name in %r:
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    cls = getattr(module, "TrainConfig", None)
    if cls is not None and dataclasses.is_dataclass(cls):
        break
else:
    sys.exit("TrainConfig not found in any of %r")
def plain(value):
    return list(value) if isinstance(value, tuple) else value
print(json.dumps({"module": name, "fields": [
    {"name": f.name, "type": str(f.type), "default": plain(f.default), "group": f.metadata.get("group"),
     "choices": plain(f.metadata.get("choices"))} for f in dataclasses.fields(cls)]}))
""" % (CONFIG_MODULES, CONFIG_MODULES)

COVERED_GROUPS = ("data", "model", "schedules", "losses", "training", "smart", "surgery")

# 6 steps: the default scheduler's first draws at the default seed are para, sts, sts, sts, sst, sst, so every
# task trains (with 4, sst would not, and its flags would change nothing).
TINY_BASE = {"max_train_examples": 64, "num_batches_per_epoch": 6, "batch_size": 8, "epochs": 1, "log_every": 1}

# What to run instead of the default where the generic rules (`variant_values`) cannot say: free-text
# fields, and numbers whose generic value is refused, useless or no change in the tiny run.
VALUES = {
    "tasks": ["sts", "sst,para,sts,cfimdb"],
    "augment": ["eda", "swap", "eda,swap"],
    "augment_tasks": ["sts"],       # with --augment swap (COMPANIONS): one of the two symmetric tasks
    "task_settings": ["sst.lr=5e-5,sst.head_lr=5e-4,para.weight_decay=0.1,sts.head_dropout=0.3,sst.rdrop=0.5,"
                      "para.label_smoothing=0.1"],   # every key of config.TaskSettings once
    "lr": [5e-5],                   # an optional float whose generic value (0.5) would be no learning rate
    "pal_size": [192],              # halved (102) is refused: a multiple of the 12 attention heads
    "hess_interval": [2],           # halved (5) is hardly a change in 6 steps: refreshes within them
    "warmup_ratio": [0.5],          # 0.1 and halved 0.05 both make int(ratio * 6) = 0 warm-up steps
    "pretrained_model_name": ["@base"],   # finetune from the base tiny run's best.pt
}
NONE_DEFAULT = {int: 2, float: 0.5}   # the value of an optional number whose default is none

# Flags that only act together with another, beyond the name rule (`name_companions`); "x_*": every x_ flag.
COMPANIONS = {
    "eda_*": {"augment": "eda"},                    # augment is free text: the name rule cannot see its values
    "freeze_bert": {"use_pal": True},               # refused alone: it trains PALs or adapters
    "freeze_bert_last_epochs": {"epochs": 2},       # must be < --epochs (and is not a part of --freeze_bert)
    "adapter_sharing": {"adapter_size": 2},         # adapters' option; adapter_size is a number, not a switch
    "augment_tasks": {"augment": "swap"},
    "hess_interval": {"optimizer": "sophiag"},      # Sophia's
    "rho": {"optimizer": "sophiag"},
    # with 64 rows of every task, random, proportional and pal draw alike, and pal anneals only from a
    # second epoch on: every row (unequal task sizes) and two epochs
    "task_scheduler": {"max_train_examples": None, "epochs": 2},
}

# --option values that read a finished run instead of training: they accept only their own flags (config's
# MODE_FLAGS), so they run without the tiny base, on the base tiny run ("@base") and the --seed run ("@seed").
MODES = {
    "test": {"settings": {"pretrained_model_name": "@base"}, "output": "predictions_dir"},
    "ensemble": {"settings": {"ensemble": ["@base", "@seed"]}, "output": "save_path"},
}

SKIPPED = {
    "data_dir": "where the data is: every run sets it (to the cut copies of the course data)",
    "bert_path": "a model folder: the only one here is the embedded default, which every run uses",
    "time_budget": "sets the steps from timed calibration steps, so it is not reproducible by design; what it "
                   "chooses is repeated with --num_batches_per_epoch and --stop_at_step, which are covered",
}

TIMING_TAGS = ("tokens_per_s",)   # TensorBoard scalars that are measured times, never compared


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record", help="record REV's behaviour")
    p.add_argument("rev")
    p.add_argument("--out", help="record file (default /tmp/exactness/<rev>.json)")
    p.add_argument("--quick", action="store_true", help="a handful of flag runs and 20 steps of the default")
    p = sub.add_parser("compare", help="print the differences of two records; exit status 1 if any")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("old-runs", help="finished and interrupted tiny runs of REV, for compatibility checks")
    p.add_argument("rev")
    p.add_argument("--out", default=os.path.join(ROOT, "old_runs"))
    p = sub.add_parser("check-old-runs", help="REV's --resume, --option test, --option ensemble on old runs")
    p.add_argument("rev")
    p.add_argument("--old", default=os.path.join(ROOT, "old_runs"))
    p.add_argument("--out", help="record file (default <old>/check-<rev>.json)")
    args = parser.parse_args(argv)
    with stop_on_sigterm(), interrupted_quietly():
        if args.command == "record":
            record(args.rev, args.out or os.path.join(ROOT, f"{args.rev}.json"), args.quick)
        elif args.command == "compare":
            return compare(args.a, args.b)
        elif args.command == "old-runs":
            old_runs(args.rev, args.out)
        else:
            check_old_runs(args.rev, args.old, args.out or os.path.join(args.old, f"check-{args.rev}.json"))
    return 0


@contextlib.contextmanager
def interrupted_quietly():
    try:
        yield
    except KeyboardInterrupt as e:
        raise SystemExit(f"interrupted ({e or 'Ctrl-C'}): children stopped, worktree removed")


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM and SIGHUP become KeyboardInterrupt, so the cleanup (children, worktree) runs as on Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- record

def record(rev: str, out: str, quick: bool):
    began = time.perf_counter()
    os.makedirs(ROOT, exist_ok=True)
    data = {"default": make_data(os.path.join(ROOT, "data", f"dev{DEFAULT_ROWS}"), DEFAULT_ROWS),
            "tiny": make_data(os.path.join(ROOT, "data", f"dev{TINY_ROWS}"), TINY_ROWS)}
    with worktree(rev) as (tree, commit), tempfile.TemporaryDirectory(prefix="runs-", dir=ROOT) as work:
        fields_info = read_fields(tree)
        runs, skipped = flag_runs(fields_info["fields"], quick)
        print(f"{commit[:12]}: TrainConfig in {fields_info['module']}.py, {len(fields_info['fields'])} fields; "
              f"{len(runs)} flag runs, {len(skipped)} flags skipped", flush=True)
        result = {"format": FORMAT, "rev": rev, "commit": commit, "machine": machine(),
                  "threads": {"default_recipe": DEFAULT_THREADS, "flag_runs": TINY_THREADS},
                  "quick": quick, "data": {name: data_digests(folder) for name, folder in data.items()},
                  "config_module": fields_info["module"],
                  "fields": {f["name"]: f["group"] for f in fields_info["fields"]},
                  "skipped": skipped, "default_recipe": {}, "flag_runs": {}}
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
        for amp in ("none", "auto"):
            settings = {"data_dir": data["default"], "stop_at_step": steps, "log_every": 1, "amp": amp}
            key = f"--stop_at_step {steps} --amp {amp}"
            entry = run_and_collect(tree, work, key, settings, DEFAULT_THREADS, {"<data>": data["default"]})
            result["default_recipe"][key] = entry
            print(f"default recipe {key}: {status_line(entry)}", flush=True)
        result["flag_runs"] = run_flag_runs(tree, work, runs, data["tiny"])
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"wrote {out} ({result['wall_seconds']:.0f} s)", flush=True)


def make_data(folder: str, rows: int) -> str:
    """A copy of the course data with each dev and test file cut to its header and first `rows` rows (a
    byte-identical prefix; a quoted field may span lines) and the train files whole. Rewritten only where
    a file differs, so run folders that point here stay valid."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(COURSE_DATA)):
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(COURSE_DATA, name), "rb") as f:
            raw = f.read()
        content = raw if "-train" in name else csv_prefix(raw, rows)
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read() == content:
                    continue
        temp = f"{path}.{os.getpid()}.tmp"  # another record may be writing the same folder
        with open(temp, "wb") as f:
            f.write(content)
        os.replace(temp, path)
    return folder


def csv_prefix(raw: bytes, rows: int) -> bytes:
    """The bytes of the header and the first `rows` non-blank records, as the data loader's csv reader
    (tab-separated, CSV quoting) reads them."""
    lines = list(io.StringIO(raw.decode("utf-8"), newline=""))  # split as open(newline="") splits a file
    reader = csv.reader(iter(lines), delimiter="\t")
    next(reader)  # the header
    taken = 0
    for row in reader:
        taken += bool(row)
        if taken == rows:
            break
    return "".join(lines[:reader.line_num]).encode("utf-8")


def data_digests(folder: str) -> dict:
    return {name: file_sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


@contextlib.contextmanager
def worktree(rev: str):
    """(folder, commit) of a detached `git worktree` of `rev`, removed afterwards whatever happens."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    os.makedirs(ROOT, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"worktree-{commit[:12]}-", dir=ROOT)
    os.rmdir(folder)  # git creates it
    git("worktree", "add", "--detach", "--quiet", folder, commit)
    try:
        yield folder, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", folder], cwd=REPO, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    import torch
    return {"cpu": model, "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def read_fields(tree: str) -> dict:
    out = subprocess.run([PYTHON, "-c", FIELDS_SNIPPET], cwd=tree, env=run_env(1), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"reading TrainConfig's fields in {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- the flag runs

@dataclasses.dataclass
class FlagRun:
    key: str            # the flags it adds, as typed; "(base)" for the tiny base alone
    settings: dict      # field -> value, applied over the tiny base (or alone, for a mode)
    mode: str | None = None   # a MODES entry: no tiny base, its own output flag
    field: str | None = None  # the field it varies


def flag_runs(fields: list[dict], quick: bool) -> tuple[list[FlagRun], dict]:
    """The tiny runs to make, generated from TrainConfig's fields, and the covered flags skipped (reasons)."""
    by_name = {f["name"]: {**f, "kind": kind_of(f["type"]), "optional": "None" in f["type"]} for f in fields}
    runs, skipped = [FlagRun("(base)", {})], {}
    for f in by_name.values():
        if f["group"] not in COVERED_GROUPS:
            continue
        if f["name"] in SKIPPED:
            skipped[f"--{f['name']}"] = SKIPPED[f["name"]]
            continue
        values, why_not = variant_values(f)
        if not values:
            skipped[f"--{f['name']}"] = why_not
            continue
        for value in values:
            if f["name"] == "option" and value in MODES:
                settings = {"option": value, **MODES[value]["settings"]}
                runs.append(FlagRun(flags_text(settings), settings, mode=value, field="option"))
                continue
            settings = {f["name"]: value}
            for name, companion in {**name_companions(f["name"], by_name), **companions_of(f["name"])}.items():
                if name not in settings:
                    settings[name] = companion
            runs.append(FlagRun(flags_text(settings), settings, field=f["name"]))
    unknown = [name for name in {**COMPANIONS, **VALUES} if name not in by_name and not name.endswith("_*")]
    if unknown:
        print(f"note: COMPANIONS/VALUES name fields TrainConfig no longer has: {unknown}", flush=True)
    if quick:
        quick_fields = {"seed", "option", "smart_norm", "pal_size"}
        runs = [r for r in runs if r.field is None or r.field in quick_fields]
    return runs, skipped


def kind_of(annotation: str):
    if "tuple" in annotation:
        return tuple
    text = annotation.replace("None", "")
    return next((k for k in (bool, int, float, str) if k.__name__ in text), None)


def variant_values(f: dict) -> tuple[list, str]:
    """The values to run instead of the default (the tiny base's value where it sets the field)."""
    current = TINY_BASE.get(f["name"], f["default"])
    if f["name"] in VALUES:
        return VALUES[f["name"]], ""
    if f["choices"]:
        return [c for c in f["choices"] if c != current], ""
    if f["kind"] is bool:
        return [not current], ""
    if f["kind"] in (int, float):
        if current is None:
            return [NONE_DEFAULT[f["kind"]]], ""
        changed = (1 if current == 0 else 2 if current == 1 else current // 2) if f["kind"] is int \
            else (0.1 if current == 0 else current / 2)
        return [changed] + ([None] if f["optional"] else []), ""
    return [], f"{f['type']} without a value table (VALUES)"


def name_companions(name: str, by_name: dict) -> dict:
    """What a flag named <prefix>_... needs on: the bool field <prefix> or use_<prefix> (smart_eps -> --smart,
    pal_size -> --use_pal), or the field that has <prefix> among its choices (gradvac_beta -> --projection
    gradvac)."""
    prefix = name.split("_")[0]
    if prefix == name or companions_of(name):
        return {}
    for switch in (prefix, f"use_{prefix}"):
        if switch in by_name and by_name[switch]["kind"] is bool and switch != name:
            return {switch: not by_name[switch]["default"]}
    for other in by_name.values():
        if prefix in (other["choices"] or ()) and other["name"] != name:
            return {other["name"]: prefix}
    return {}


def companions_of(name: str) -> dict:
    return {**next((c for key, c in COMPANIONS.items() if key.endswith("_*") and name.startswith(key[:-1])), {}),
            **COMPANIONS.get(name, {})}


def flags_text(settings: dict) -> str:
    return " ".join(argv_of(settings))


def argv_of(settings: dict) -> list[str]:
    """Command-line flags for field values (bools as --x/--no-x, None as none, a list as several values)."""
    argv = []
    for name, value in settings.items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", "none" if value is None else str(value)]
    return argv


def run_flag_runs(tree: str, work: str, runs: list[FlagRun], tiny_data: str) -> dict:
    """Every tiny run, PARALLEL at a time: first those that need no other run's folder, then the rest."""
    folders = {}   # "@base", "@seed" -> run folder
    seed_run = next((r for r in runs if r.field == "seed"), None)
    first = [r for r in runs if not needs_inputs(r)]
    later = [r for r in runs if needs_inputs(r)]
    results, done, total, lock = {}, [0], len(runs), threading.Lock()

    def one(run: FlagRun, index: int) -> tuple[str, dict]:
        folder = os.path.join(work, f"flag-{index:03d}")
        settings = {"data_dir": tiny_data, **({} if run.mode else TINY_BASE), **run.settings}
        settings = {k: resolve(v, folders) for k, v in settings.items()}
        labels = {"<data>": tiny_data, **{f"<{k[1:]}>": v for k, v in folders.items()}}
        entry = run_and_collect(tree, work, run.key, settings, TINY_THREADS, labels, folder,
                                output=MODES[run.mode]["output"] if run.mode else "save_path")
        with lock:
            done[0] += 1
            print(f"[{done[0]}/{total}] {run.key}: {status_line(entry)}", flush=True)
        if run.key == "(base)":
            folders["@base"] = folder
        elif seed_run is not None and run is seed_run:
            folders["@seed"] = folder
        elif not run.mode:
            shutil.rmtree(folder, ignore_errors=True)  # checkpoints are large; the record has their hashes
        return run.key, entry

    indexed = list(enumerate(runs))
    for batch in ([(i, r) for i, r in indexed if r in first], [(i, r) for i, r in indexed if r in later]):
        results.update(parallel([lambda i=i, r=r: one(r, i) for i, r in batch]))
    return {run.key: results[run.key] for run in runs}


def needs_inputs(run: FlagRun) -> bool:
    return any(isinstance(v, str) and v.startswith("@") or isinstance(v, list) and any(
        str(x).startswith("@") for x in v) for v in run.settings.values())


def resolve(value, folders: dict):
    if isinstance(value, list):
        return [resolve(v, folders) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        if value not in folders:
            raise RuntimeError(f"{value}: the run it names was not made")
        return folders[value]
    return value


RUNNING: set = set()   # the children running now, killed on Ctrl-C


def parallel(jobs: list) -> dict:
    results = {}
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                key, entry = future.result()
                results[key] = entry
        except BaseException:
            for future in futures:
                future.cancel()
            kill_running()
            raise
    return results


def kill_running():
    for process in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            process.kill()


# ----------------------------------------------------------------------------- one run and its record

def run_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def run_cli(tree: str, argv: list[str], threads: int, timeout: float = 3600, on_start=None):
    """(exit status, stdout, stderr) of `python multitask_classifier.py ARGV` in the worktree."""
    process = subprocess.Popen([PYTHON, "multitask_classifier.py", *argv], cwd=tree, env=run_env(threads),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    RUNNING.add(process)
    try:
        if on_start is not None:
            on_start(process)
        out, err = process.communicate(timeout=timeout)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    finally:
        RUNNING.discard(process)
    return process.returncode, out, err


def run_and_collect(tree: str, work: str, key: str, settings: dict, threads: int, labels: dict,
                    folder: str | None = None, output: str = "save_path") -> dict:
    folder = folder or os.path.join(work, re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-"))
    began = time.perf_counter()
    rc, out, err = run_cli(tree, argv_of({**settings, output: folder}), threads)
    entry = {"argv": None, "rc": rc, "seconds": round(time.perf_counter() - began, 1)}
    entry.update(collect(folder, rc, out, err, {folder: "<run>", **{v: k for k, v in labels.items()}, tree: "<tree>",
                                            work: "<work>"}))
    entry["argv"] = scrub(argv_of(settings), entry.pop("_labels"))
    return entry


def collect(folder: str, rc: int, out: str, err: str, labels: dict) -> dict:
    """What a finished (or failed) run left: see the module's docstring."""
    labels = dict(sorted(labels.items(), key=lambda item: -len(item[0])))  # longest path first
    entry = {"_labels": labels}
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(" ")]
    entry["error"] = scrub(lines[-1], labels) if rc and lines else None  # a traceback's file lines move
    amp = re.search(r"^run: .*?, amp (\w+),", out, re.M)
    entry["amp"] = amp.group(1) if amp else None
    if not os.path.isdir(folder):
        return entry
    entry["scalars"] = scalars(folder)
    entry["checkpoints"], entry["json"], entry["files"] = {}, {}, {}
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(".pt"):
                entry["checkpoints"][rel] = checkpoint_digests(path, labels)
            elif name.endswith(".json") and name != "run.json":  # run.json: the command, commit and start time
                with open(path) as f:
                    entry["json"][rel] = scrub(json.load(f), labels)
            elif name.endswith(".csv"):
                entry["files"][rel] = file_sha256(path)
            elif name.endswith(".npz"):
                entry["files"][rel] = npz_digests(path, labels)
    return entry


def status_line(entry: dict) -> str:
    what = "ok" if entry["rc"] == 0 else f"exit {entry['rc']}: {entry['error']}"
    return f"{what} ({entry['seconds']:.0f} s" + (f", amp {entry['amp']})" if entry.get("amp") else ")")


def scalars(folder: str) -> dict:
    """TensorBoard scalars of the run, {tag: [[step, value], ...]} in the order written."""
    logs = os.path.join(folder, "tensorboard")
    if not os.path.isdir(logs):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(logs, size_guidance={"scalars": 0}, purge_orphaned_data=False)
    accumulator.Reload()
    return {tag: [[e.step, e.value] for e in accumulator.Scalars(tag)]
            for tag in sorted(accumulator.Tags()["scalars"]) if not tag.endswith(TIMING_TAGS)}


def checkpoint_digests(path: str, labels: dict) -> dict:
    """sha256 of each top-level entry of a checkpoint (timings dropped, folders as placeholders), and one
    (16 hex digits) per tensor of its model, to tell which one differs."""
    import torch
    torch.set_num_threads(1)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        return {"all": tree_sha256(scrub(state, labels))}
    digests = {key: tree_sha256(scrub(value, labels)) for key, value in state.items()}
    if isinstance(state.get("model"), dict):
        digests["model_tensors"] = {name: tree_sha256(t)[:16] for name, t in state["model"].items()}
    return digests


def tree_sha256(value) -> str:
    h = hashlib.sha256()
    feed(h, value)
    return h.hexdigest()


def feed(h, value):
    """Hash a nested value canonically: dict keys in sorted order, tensors as dtype, shape and bytes."""
    import torch
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode() + b":")
            feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            feed(h, item)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def npz_digests(path: str, labels: dict) -> dict:
    import numpy as np
    with np.load(path, allow_pickle=False) as arrays:
        return {name: hashlib.sha256(scrub(str(arrays[name]), labels).encode() if name == "meta"
                                     else np.ascontiguousarray(arrays[name]).tobytes()
                                     + str(arrays[name].dtype).encode()).hexdigest()
                for name in sorted(arrays.files)}


def scrub(value, labels: dict):
    """Timings dropped (keys with "seconds"), folders replaced by their labels."""
    if isinstance(value, dict):
        return {k: scrub(v, labels) for k, v in value.items() if not (isinstance(k, str) and "seconds" in k)}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, labels) for v in value)
    if isinstance(value, str):
        for path, label in labels.items():
            value = value.replace(path, label)
    return value


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- compare

NOT_COMPARED = {"seconds", "wall_seconds", "rev", "commit", "config_module"}


def compare(path_a: str, path_b: str) -> int:
    with open(path_a) as f:
        a = json.load(f)
    with open(path_b) as f:
        b = json.load(f)
    print(f"A: {path_a} ({a.get('rev')} {str(a.get('commit'))[:12]})\nB: {path_b} ({b.get('rev')} "
          f"{str(b.get('commit'))[:12]})")
    problems = []
    for key in ("format", "machine", "threads", "quick", "data"):
        if a.get(key) != b.get(key):
            problems.append(f"{key}: {json.dumps(a.get(key))} vs {json.dumps(b.get(key))} (bit-identity needs the "
                            f"same machine, threads and inputs)")
    for key in ("fields", "skipped"):
        problems += [f"{key}: {line}" for line in diff(a.get(key), b.get(key), "")]
    for section in ("default_recipe", "flag_runs"):
        runs_a, runs_b = a.get(section, {}), b.get(section, {})
        for key in runs_a.keys() | runs_b.keys():
            if key not in runs_b or key not in runs_a:
                problems.append(f"{section} [{key}]: only in {'A' if key in runs_a else 'B'}")
                continue
            lines = run_differences(runs_a[key], runs_b[key])
            if lines:
                problems.append(f"{section} [{key}]:\n" + "\n".join(f"    {line}" for line in lines))
    for problem in problems:
        print(problem)
    total = len(a.get("default_recipe", {})) + len(a.get("flag_runs", {}))
    print(f"{len(problems)} difference(s)" if problems else f"identical ({total} runs)")
    return 1 if problems else 0


def run_differences(a: dict, b: dict) -> list[str]:
    lines = []
    for tag in sorted(a.get("scalars", {}).keys() | b.get("scalars", {}).keys()):
        sa, sb = a.get("scalars", {}).get(tag), b.get("scalars", {}).get(tag)
        if sa is None or sb is None:
            lines.append(f"scalar {tag}: only in {'A' if sb is None else 'B'}")
        elif sa != sb:
            i = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            at = sa[i] if i < len(sa) else sb[i]
            lines.append(f"scalar {tag}: first differs at step {at[0]} ("
                         + (f"{sa[i][1]!r} vs {sb[i][1]!r}" if i < min(len(sa), len(sb))
                            else f"{len(sa)} vs {len(sb)} values") + ")")
    for name in sorted(a.get("checkpoints", {}).keys() | b.get("checkpoints", {}).keys()):
        ca, cb = a.get("checkpoints", {}).get(name), b.get("checkpoints", {}).get(name)
        if ca is None or cb is None:
            lines.append(f"{name}: only in {'A' if cb is None else 'B'}")
            continue
        for key in sorted(ca.keys() | cb.keys()):
            if key == "model_tensors" or ca.get(key) == cb.get(key):
                continue
            lines.append(f"{name} {key}: sha256 differs")
            if key == "model":
                tensors = diff(ca.get("model_tensors"), cb.get("model_tensors"), "")
                lines += [f"  tensor {t}" for t in tensors[:5]] + ([f"  ... {len(tensors) - 5} more"]
                                                                   if len(tensors) > 5 else [])
    rest_a = {k: v for k, v in a.items() if k not in ("scalars", "checkpoints") and k not in NOT_COMPARED}
    rest_b = {k: v for k, v in b.items() if k not in ("scalars", "checkpoints") and k not in NOT_COMPARED}
    return lines + diff(rest_a, rest_b, "")


def diff(a, b, where: str) -> list[str]:
    """Paths at which two JSON values differ (NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys(), key=str):
            if key in NOT_COMPARED:
                continue
            if key not in a or key not in b:
                out.append(f"{where}{key}: only in {'A' if key in a else 'B'}")
            else:
                out += diff(a[key], b[key], f"{where}{key}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in diff(x, y, f"{where}{i}.")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{where.rstrip('.')}: {short(a)} vs {short(b)}"]


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------- old runs

OLD_BASE = {**TINY_BASE}
OLD_INTERRUPTED = {"num_batches_per_epoch": 8, "checkpoint_every": 2}
SECOND_SEED = 2


def old_runs(rev: str, out: str):
    """In `out`: finished/ and finished-seed2/ (tiny runs with best.pt, summary.json, predictions) and
    interrupted/ (SIGTERM after its first checkpoint: last.pt, no summary.json), a data/ folder they
    read, and README.txt with the commands; then `check-old-runs` of the same commit."""
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} is not empty: move it away first")
    data = make_data(os.path.join(out, "data"), TINY_ROWS)
    commands = []
    with worktree(rev) as (tree, commit):
        for name, extra in (("finished", {}), ("finished-seed2", {"seed": SECOND_SEED})):
            argv = argv_of({"data_dir": data, **OLD_BASE, **extra, "save_path": os.path.join(out, name)})
            rc, stdout, err = run_cli(tree, argv, TINY_THREADS)
            if rc:
                raise RuntimeError(f"{name}: exit {rc}\n{err}")
            commands.append(argv)
            print(f"{name}: done", flush=True)
        folder = os.path.join(out, "interrupted")
        argv = argv_of({"data_dir": data, **OLD_BASE, **OLD_INTERRUPTED, "save_path": folder})
        rc, stdout, err = run_cli(tree, argv, TINY_THREADS, on_start=lambda p: terminate_after_checkpoint(p, folder))
        stopped = re.search(r"at step (\d+)", stdout)
        if rc != 75 or not os.path.isfile(os.path.join(folder, "last.pt")) \
                or os.path.exists(os.path.join(folder, "summary.json")):
            raise RuntimeError(f"interrupted: expected exit status 75, last.pt and no summary.json; got {rc}\n"
                               f"{stdout}\n{err}")
        commands.append(argv)
        print(f"interrupted: stopped at step {stopped.group(1) if stopped else '?'}", flush=True)
    write_old_readme(out, rev, commit, commands, stopped.group(1) if stopped else "?")
    check_old_runs(rev, out, os.path.join(out, f"check-{rev}.json"))


def terminate_after_checkpoint(process, folder: str):
    """SIGTERM to the run once its first mid-epoch last.pt is there (the run saves again and exits with 75)."""
    def watch():
        while process.poll() is None:
            if os.path.isfile(os.path.join(folder, "last.pt")):
                process.send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


def write_old_readme(out: str, rev: str, commit: str, commands: list, step: str):
    env = f"OMP_NUM_THREADS={TINY_THREADS} MKL_NUM_THREADS={TINY_THREADS} PYTHONHASHSEED=0"
    made = "\n".join(f"    {env} {PYTHON} multitask_classifier.py {' '.join(argv)}" for argv in commands)
    text = f"""Tiny runs made by commit {commit} ({rev}), for checking that a newer commit still reads them.
Made by `{PYTHON} tests/exactness.py old-runs {rev} --out {out}`, in a worktree of {rev}:

{made}

The last was stopped with SIGTERM as soon as its first checkpoint (step 2) was written; it saved
last.pt again after step {step} and exited with status 75. data/ is the course data with dev and test
cut to {TINY_ROWS} rows (train files whole); the runs' config.json name it, so leave it here.

finished/         a finished run (best.pt, last.pt, summary.json, metrics.json, predictions/)
finished-seed2/   the same with --seed {SECOND_SEED}
interrupted/      last.pt, no summary.json: what --resume continues

Checks with a newer commit (run in its tree; each on a copy or into a new folder, so these stay as
they are):

    cp -r {out}/interrupted /tmp/resumed && python multitask_classifier.py --resume /tmp/resumed
    python multitask_classifier.py --option test --pretrained_model_name {out}/finished \\
        --data_dir {out}/data --predictions_dir /tmp/tested   # without it: into finished/predictions
    python multitask_classifier.py --option ensemble --ensemble {out}/finished {out}/finished-seed2 \\
        --data_dir {out}/data --save_path /tmp/ensembled

All three at once, recorded like `record` does (compare with check-{rev}.json, made by {rev} itself):

    {PYTHON} tests/exactness.py check-old-runs NEWREV --out /tmp/exactness/check-NEWREV.json
    {PYTHON} tests/exactness.py compare {out}/check-{rev}.json /tmp/exactness/check-NEWREV.json
"""
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(text)


def check_old_runs(rev: str, old: str, out: str):
    """REV's --resume (on a copy of interrupted/), --option test and --option ensemble on the old runs,
    recorded as flag runs of a record."""
    began = time.perf_counter()
    data = os.path.join(old, "data")
    with worktree(rev) as (tree, commit), tempfile.TemporaryDirectory(prefix="check-", dir=ROOT) as work:
        labels = {"<old>": old, "<data>": data}
        entries = {}
        copy = os.path.join(work, "resumed")
        shutil.copytree(os.path.join(old, "interrupted"), copy)
        for key, settings, output in (
                ("--resume <old>/interrupted", {"resume": copy}, None),
                ("--option test --pretrained_model_name <old>/finished",
                 {"option": "test", "pretrained_model_name": os.path.join(old, "finished"), "data_dir": data},
                 "predictions_dir"),
                ("--option ensemble --ensemble <old>/finished <old>/finished-seed2",
                 {"option": "ensemble", "ensemble": [os.path.join(old, "finished"),
                                                     os.path.join(old, "finished-seed2")], "data_dir": data},
                 "save_path")):
            folder = copy if output is None else os.path.join(work, key.split()[1])
            t = time.perf_counter()
            rc, stdout, err = run_cli(tree, argv_of({**settings, **({output: folder} if output else {})}),
                                      TINY_THREADS)
            entry = {"rc": rc, "seconds": round(time.perf_counter() - t, 1)}
            entry.update(collect(folder, rc, stdout, err, {folder: "<run>", **{v: k for k, v in labels.items()},
                                                       tree: "<tree>", work: "<work>"}))
            entry.pop("_labels")
            entries[key] = entry
            print(f"{key}: {status_line(entry)}", flush=True)
    result = {"format": FORMAT, "rev": rev, "commit": commit, "machine": machine(),
              "threads": {"flag_runs": TINY_THREADS}, "quick": False, "data": {"old_runs": data_digests(data)},
              "flag_runs": entries, "wall_seconds": round(time.perf_counter() - began, 1)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
