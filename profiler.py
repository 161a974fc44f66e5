"""--profile: the PyTorch profiler over a window of training steps, and the check that the window fits
the epoch; without --profile, `NullProfiler`, whose steps cost nothing.
"""
import contextlib
import math
import os

import torch

from config import TrainConfig
from errors import InputError
from rundir import atomic_path


class StepProfiler:
    """--profile N: the PyTorch profiler over N training steps after WAIT + WARMUP steps (the first
    steps pay for allocations and kernel choices). The trace goes to <run>/tensorboard/profile (the
    TensorBoard profiler plugin and Perfetto read it); the top operators by self time are printed and
    kept in <run>/profile.txt and the run's TensorBoard text."""
    WAIT, WARMUP, TOP = 5, 2, 25

    def __init__(self, steps: int, run_dir: str, writer, device: torch.device):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.steps, self.run_dir, self.writer, self.done = steps, run_dir, writer, False
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.profiler = torch.profiler.profile(
            activities=activities, on_trace_ready=self._report,
            schedule=torch.profiler.schedule(wait=self.WAIT, warmup=self.WARMUP, active=steps, repeat=1))

    def _report(self, profiler):
        torch.profiler.tensorboard_trace_handler(os.path.join(self.run_dir, "tensorboard", "profile"))(profiler)
        table = profiler.key_averages().table(sort_by=self.sort_by, row_limit=self.TOP)
        heading = f"profile: {self.steps} training steps after {self.WAIT + self.WARMUP}, top operators by self time"
        print(f"{heading}\n{table}", flush=True)
        with atomic_path(os.path.join(self.run_dir, "profile.txt")) as temp, open(temp, "w") as f:
            f.write(f"{heading}\n{table}\n")
        self.writer.add_text("profile", f"{heading}\n\n```\n{table}\n```")
        self.done = True

    def step(self):
        self.profiler.step()

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        if not self.done and exc[0] is None:
            print(f"profile: the run ended before its {self.steps} profiled steps (they start after "
                  f"{self.WAIT + self.WARMUP}): nothing recorded", flush=True)
        return False


class NullProfiler(contextlib.nullcontext):
    """No --profile: steps cost nothing."""

    def step(self):
        """Nothing to record."""


def check_profile_window(cfg: TrainConfig, num_batches: int, position: int = 0, step: int = 0):
    """--profile's window must lie inside the current epoch's training steps (from `position` of it, `step`
    steps into the run): one that ran past them would time the dev evaluation (or the predictions) as a
    training step."""
    steps_left = min(num_batches - position, (cfg.stop_at_step or math.inf) - step)
    before = StepProfiler.WAIT + StepProfiler.WARMUP
    if cfg.profile + before > steps_left:
        raise InputError(f"--profile {cfg.profile}: the profile needs {cfg.profile} steps after {before} within "
                         f"one epoch's training, and this epoch has {steps_left} left; profile at most "
                         f"{max(steps_left - before, 0)} steps")
