"""Print a markdown table of finished runs: python sweeps/summarize.py RUN_DIR [RUN_DIR ...].

Each run folder's summary.json (written at the end of a run) gives the best epoch's dev metrics and
the wall time from the first training step to the written predictions.
"""
import json
import os
import sys


def row(run_dir: str) -> str:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    dev = summary["dev"]
    cells = [dev.get("sst", {}).get("accuracy"), dev.get("para", {}).get("accuracy"),
             dev.get("sts", {}).get("pearson"), dev.get("overall")]
    shown = " | ".join("-" if v is None else f"{v:.4f}" for v in cells)
    return f"| {os.path.basename(run_dir.rstrip('/'))} | {shown} | {summary['wall_seconds']:.0f} |"


def main(run_dirs: list[str]):
    print("| run | SST acc | QQP acc | STS r | overall | wall s |")
    print("|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            print(row(run_dir))
        else:
            print(f"| {os.path.basename(run_dir.rstrip('/'))} | (no summary.json: the run did not finish) |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python sweeps/summarize.py RUN_DIR [RUN_DIR ...]")
    main(sys.argv[1:])
