"""Run folders and the files in them: atomic writes (a crash never leaves a partial file), the folders' locks,
new run folders with config.json and run.json, checkpoints read safely, and the data files' digests that a
--resume checks.
"""
import contextlib
import datetime
import fcntl
import hashlib
import itertools
import json
import os
import pickle
import subprocess
import tempfile
import zipfile

import torch
from torch import nn

from config import TrainConfig
from errors import InputError, MissingInput
from tasks import TASKS


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in `path`'s folder; once the block has written it completely, it is
    flushed to disk and renamed over `path`. On any error it is removed and `path` is untouched, so a
    crash never leaves a partial file (checkpoints, metrics, predictions all go through here)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(temp_path, 0o644)  # mkstemp makes it owner-only
        yield temp_path
        with open(temp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def file_sha256(path: str) -> str:
    """A file's content digest: how outputs, ensembles and --resume tell data files apart."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def atomic_save(obj, path: str):
    """torch.save through a temporary file and a rename: never a truncated checkpoint."""
    with atomic_path(path) as temp:
        torch.save(obj, temp)


def atomic_write_json(obj, path: str):
    with atomic_path(path) as temp, open(temp, "w") as f:
        json.dump(obj, f, indent=2)


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_digests(cfg: TrainConfig) -> dict[str, str]:
    """sha256 of each data file of the run's tasks that is there (train, dev, test), by file name."""
    digests = {}
    for task in cfg.task_names:
        for name in TASKS[task].files.values():
            path = os.path.join(cfg.data_dir, name)
            if os.path.isfile(path):
                digests[name] = file_sha256(path)
    return digests


def load_checkpoint(path: str) -> dict:
    """A checkpoint this program wrote, read safely: on the CPU (the caller moves what it needs; RNG
    states must stay CPU tensors) and with weights_only=True, so a file holding anything but tensors,
    numbers, strings, lists and dicts is refused instead of unpickled (unpickling can run code)."""
    if not zipfile.is_zipfile(path):  # what torch.save writes; anything else would fail below as "unsafe"
        raise InputError(f"{path}: not a checkpoint (torch.save writes a zip archive and this file is not one: "
                         f"cut short while copying, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:300]
        raise InputError(f"{path}: refused: it holds objects other than tensors, numbers, strings, lists "
                         f"and dicts, which this program never writes and which could run code when loaded "
                         f"({reason})") from None
    except (RuntimeError, EOFError) as e:
        raise InputError(f"{path}: not a readable checkpoint ({str(e).strip().splitlines()[0][:300]})") from None


def load_weights(model: nn.Module, state: dict, path: str):
    """A checkpoint's weights into `model`, or an InputError naming what does not fit (a checkpoint of
    other model flags, --use_pal or --separate_encoders say, or of another --bert_path)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise InputError(f"{path}: its weights do not fit the model these flags build (trained with other model "
                         f"flags or another --bert_path?): " + "; ".join(details)[:600]) from None


def checkpoint_path(name_or_dir: str) -> str:
    """A checkpoint file from a .pt path or a run folder (its best.pt)."""
    path = os.path.join(name_or_dir, "best.pt") if os.path.isdir(name_or_dir) else name_or_dir
    if not os.path.isfile(path):
        raise MissingInput(f"{path}: checkpoint not found (a .pt file or a run folder with best.pt)")
    return path


def check_run_dir(run_dir: str | None):
    """Refuse, before any work, a --save_path that is a file or already holds a run."""
    if run_dir is None:
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise InputError(f"--save_path {run_dir}: a file is there, not a folder")
    if os.path.exists(os.path.join(run_dir, "last.pt")) or os.path.exists(os.path.join(run_dir, "best.pt")):
        raise InputError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         f"or pick another --save_path")


class RunDirLocks:
    """The run folders this process writes, each held by an exclusive flock: a second process given the same
    --save_path, or a --resume of a run that is still running, is refused instead of writing over it. The lock
    is on the folder itself, so nothing is added to it, and the system releases it when the process ends,
    however it ends. A folder this process created for a run that then failed before writing anything is
    removed again. On a file system without flock the run goes on unprotected."""

    def __init__(self):
        self.held: dict[str, int] = {}  # real path -> the open descriptor that holds its lock
        self.created: list[str] = []

    def hold(self, run_dir: str, new: bool = False, flag: str = "--save_path") -> str:
        """Lock `run_dir`, creating it if missing, and return it; `new`: the caller has just created it for
        this run; `flag`: the flag that named it, for the message when another process holds it."""
        path = os.path.realpath(run_dir)
        if path in self.held:
            return run_dir
        if new or not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            self.created.append(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{run_dir} is in use by another process (a run, or a --resume of it, still "
                             f"running); wait for it to end, or give a new run another {flag}") from None
        except OSError:
            os.close(fd)
            return run_dir
        self.held[path] = fd
        return run_dir

    def __enter__(self):
        return self

    def __exit__(self, failure, *_):
        for fd in self.held.values():
            os.close(fd)
        self.held = {}
        for path in self.created:
            if failure is not None and os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)


def claim_folders(folders: RunDirLocks, cfg: TrainConfig):
    """The run's folders checked and held (rank 0's work): a new --save_path must not hold a run, a resumed
    one must not be running, and an explicit --predictions_dir must not hold predictions."""
    if not cfg.resume:
        check_run_dir(cfg.save_path)
    if cfg.resume or cfg.save_path:
        folders.hold(cfg.resume or cfg.save_path)
    claim_predictions_dir(folders, cfg.predictions_dir, resuming=bool(cfg.resume))


def claim_predictions_dir(folders: RunDirLocks, predictions_dir: str | None, resuming: bool = False):
    """An explicit --predictions_dir is held like a run folder while this process runs (a second run given
    the same folder is refused), and prediction files already in it, another run's or an earlier test's,
    are never written over: refused before any work, except by a --resume of the run that wrote them."""
    if predictions_dir is None:
        return
    if os.path.exists(predictions_dir) and not os.path.isdir(predictions_dir):
        raise InputError(f"--predictions_dir {predictions_dir}: a file is there, not a folder")
    present = sorted(name for name in os.listdir(predictions_dir) if name.endswith("-output.csv")
                     or (name.startswith("outputs-") and name.endswith(".npz"))) \
        if os.path.isdir(predictions_dir) and not resuming else []
    if present:
        raise InputError(f"--predictions_dir {predictions_dir} already holds predictions ({', '.join(present[:2])}"
                         f"{', ...' if len(present) > 2 else ''}); move them away or give another folder")
    folders.hold(predictions_dir, flag="--predictions_dir")


def new_run_dir(stamp: str, name: str) -> str:
    """runs/<stamp>-<name>, created here and by no one else: runs started in the same second (a sweep's
    jobs) take runs/<stamp>-<name>-2, -3, ... instead of sharing a folder."""
    os.makedirs("runs", exist_ok=True)
    for n in itertools.count(1):
        run_dir = os.path.join("runs", f"{stamp}-{name}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(run_dir)  # atomic: exactly one process creates a given folder
            return run_dir
        except FileExistsError:
            continue


def prepare_run_dir(cfg: TrainConfig, command: str, calibration: dict | None = None) -> str:
    """A new run folder with config.json and run.json (command, git commit, start time, and the
    --time_budget calibration's figures).
    An existing folder with checkpoints is never overwritten: resume it or choose another."""
    if cfg.resume:
        return cfg.resume
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if cfg.save_path:
        check_run_dir(cfg.save_path)
        run_dir = cfg.save_path
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = new_run_dir(stamp, cfg.name)
    atomic_write_json(cfg.__dict__, os.path.join(run_dir, "config.json"))
    atomic_write_json({"command": command, "git_commit": git_commit(), "started": stamp, "torch": torch.__version__,
                       "data_sha256": data_digests(cfg),
                       **({"time_budget": calibration} if calibration else {})}, os.path.join(run_dir, "run.json"))
    return run_dir


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The interrupted run's own settings (its config.json), so a resume cannot silently change them; refused
    for a finished run and where a data file differs from the one the run started on (run.json)."""
    path = os.path.join(cfg.resume, "config.json")
    if not os.path.isfile(os.path.join(cfg.resume, "last.pt")):
        raise MissingInput(f"--resume {cfg.resume}: no last.pt there (nothing to resume)")
    if os.path.isfile(os.path.join(cfg.resume, "summary.json")):
        raise InputError(f"--resume {cfg.resume}: the run has finished (summary.json), nothing to resume; its "
                         f"predictions can be made again with --option test --pretrained_model_name {cfg.resume}")
    with open(path) as f:
        saved = json.load(f)
    resumed = TrainConfig.from_saved(saved, resume=cfg.resume, save_path=None)
    started_on = {}  # runs saved before the digests were recorded: the batch iterators' check below
    if os.path.isfile(os.path.join(cfg.resume, "run.json")):
        with open(os.path.join(cfg.resume, "run.json")) as f:
            started_on = json.load(f).get("data_sha256", {})
    now = data_digests(resumed)
    for name, digest in started_on.items():
        if name in now and now[name] != digest:
            raise InputError(f"{os.path.join(resumed.data_dir, name)}: not the file the run started on (sha256 "
                             f"{digest[:12]}... then, {now[name][:12]}... now); a resume must read the same data")
    return resumed
