"""The prepared GPU check's work, in one process: `bash .ci/gpu [DATA_DIR] [OUT_JSON]` runs it.

1. tests/test_cuda.py: resume (exact under deterministic algorithms), every technique in fp16 and bf16
   against fp32, --compile with the Bregman teacher and SMART's replay, Sophia, GradVac, foreach AdamW.
2. The default recipe for 300 steps in fp32, bf16, fp16 and bf16 with --compile, dev capped at 2000 rows per
   task: at most one skipped step, finite parameters, and each one's dev overall within 0.01 of fp32's (each
   task within 0.02); training seconds and peak GPU memory per run.
3. bench.py encoder on bert-base's shape (12 x 768, random weights) against transformers.BertModel, per
   precision, with peak GPU memory (where transformers is installed).
4. bench.py save: the seconds last.pt takes for a bert-base-sized run on this machine's disk.
Writes the figures, torch's version and each part's seconds to OUT_JSON; exits 1 if any check failed.
"""
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import multitask_classifier as mc  # noqa: E402
from rundir import load_checkpoint  # noqa: E402

PRECISIONS = ("none", "bf16", "fp16")
VARIANTS = {amp: ["--amp", amp] for amp in PRECISIONS} | {"bf16 compiled": ["--amp", "bf16", "--compile"]}


def recipe_runs(data_dir: str, folder: str) -> tuple[dict, list[str]]:
    """Part 2: (figures per precision, failed checks)."""
    figures, failures = {}, []
    for amp, flags in VARIANTS.items():
        run_dir = os.path.join(folder, f"run-{amp.replace(' ', '-')}")
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        dev = mc.main(["--data_dir", data_dir, "--device", "cuda", *flags, "--num_batches_per_epoch", "300",
                       "--max_dev_examples", "2000", "--log_every", "100", "--save_path", run_dir])
        state = load_checkpoint(os.path.join(run_dir, "last.pt"))
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        figures[amp] = {"dev": dev, "skipped_steps": state["progress"]["skipped_steps"],
                        "training_seconds": summary["training_seconds"], "seconds": time.perf_counter() - start,
                        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
        if state["progress"]["skipped_steps"] > 1:
            failures.append(f"{amp}: {state['progress']['skipped_steps']} skipped steps (at most 1)")
        if not all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point()):
            failures.append(f"{amp}: parameters not finite")
    reference = figures["none"]["dev"]
    for amp in list(VARIANTS)[1:]:  # the compiled run draws the eager run's dropout masks: near bf16's
        dev = figures[amp]["dev"]
        if not math.isclose(dev["overall"], reference["overall"], abs_tol=0.01):
            failures.append(f"{amp}: dev overall {dev['overall']:.4f}, fp32 {reference['overall']:.4f} (within 0.01)")
        for task, values in reference.items():
            if task != "overall":
                for metric, value in values.items():
                    if not math.isclose(dev[task][metric], value, abs_tol=0.02):
                        failures.append(f"{amp}: {task} {metric} {dev[task][metric]:.4f}, fp32 {value:.4f} (within 0.02)")
    return figures, failures


def main(data_dir: str, out: str) -> int:
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "capability": list(torch.cuda.get_device_capability()), "parts": {}}

    def part(name, work):
        start = time.perf_counter()
        try:
            figures, failures = work()
        except Exception as e:  # a part that breaks is a failed check; the others still run
            figures, failures = None, [f"{type(e).__name__}: {e}"]
        report["parts"][name] = {"seconds": round(time.perf_counter() - start, 1), "figures": figures,
                                 "failures": failures}
        print(f"== {name}: {'ok' if not failures else 'FAILED'} ({report['parts'][name]['seconds']} s)"
              + "".join(f"\n   {f}" for f in failures), flush=True)

    part("cuda tests", lambda: (None, [] if pytest.main(["-q", "-p", "no:cacheprovider",
                                                         os.path.join(ROOT, "tests", "test_cuda.py")]) == 0
                                else ["tests/test_cuda.py failed (above)"]))
    with tempfile.TemporaryDirectory() as folder:
        part("recipe per precision", lambda: recipe_runs(data_dir, folder))

        def encoder():
            table = os.path.join(folder, "encoder.json")
            bench.main(["encoder", "--device", "cuda", "--shape", "bert-base", "--dtypes", "fp32,bf16,fp16",
                        "--cell-seconds", "10", "--json", table])
            return json.load(open(table)), []
        try:
            import transformers  # noqa: F401
            part("bert-base encoder vs transformers", encoder)
        except ImportError:
            report["parts"]["bert-base encoder vs transformers"] = "skipped: transformers is not installed"
        def save():
            figures = bench.main(["save", "--data_dir", data_dir])
            # The step under way and the exit need the rest of torchrun's 30 s.
            return figures, [] if figures["slowest_seconds"] < 20 else [f"last.pt took {figures['slowest_seconds']:.0f} s"]
        part("save last.pt, bert-base size", save)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"gpu check: figures in {out}", flush=True)
    return 1 if any(isinstance(p, dict) and p["failures"] for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "data", sys.argv[2] if len(sys.argv) > 2 else "gpu-check.json"))
