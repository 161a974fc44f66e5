"""Print a markdown table of finished runs:

    python sweeps/summarize.py RUN_DIR [RUN_DIR ...]                       one row per run
    python sweeps/summarize.py --seeds RUN_DIR [...] [--ensemble ENS_DIR]  also mean and std over the
        runs (one recipe at several seeds), and the ensemble against the mean single run on the dev
        half the ensemble did not select on

Each run folder's summary.json (written at the end of a run) gives the best epoch's dev metrics and
the wall time from the first training step to the written predictions; an ensemble's summary.json
(--option ensemble) its report-half scores and those of each member.
"""
import argparse
import json
import os

import numpy as np

COLUMNS = (("sst", "accuracy", "SST acc"), ("para", "accuracy", "QQP acc"), ("sts", "pearson", "STS r"),
           ("cfimdb", "accuracy", "CFIMDB acc"))  # cfimdb's column only where a run has it


def load(folder: str) -> dict | None:
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def cells(metrics: dict, columns=COLUMNS[:3]) -> list[float | None]:
    return [metrics.get(task, {}).get(name) for task, name, _ in columns] + [metrics.get("overall")]


def why_no_row(folder: str, summary: dict | None) -> str | None:
    """Why a folder gives no run row: missing, unfinished, or an ensemble's (None: it gives one)."""
    if not os.path.isdir(folder):
        return "no such folder"
    if summary is None:
        return "no summary.json: the run did not finish"
    if "dev" not in summary:
        return "an --option ensemble folder: give it with --ensemble"
    return None


def shown(values, std=None) -> str:
    missing = lambda v: v is None or v != v  # noqa: E731  (None, or nan)
    if std is None:
        return " | ".join("-" if missing(v) else f"{v:.4f}" for v in values)
    return " | ".join("-" if missing(v) else f"{v:.4f} ± {s:.4f}" for v, s in zip(values, std))


def name_of(folder: str) -> str:
    return os.path.basename(folder.rstrip("/"))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--seeds", action="store_true", help="add mean and std rows (one recipe, several seeds)")
    parser.add_argument("--ensemble", help="an --option ensemble folder over these runs")
    args = parser.parse_args(argv)
    summaries = {run_dir: load(run_dir) for run_dir in args.runs}
    dev = {run_dir: s["dev"] for run_dir, s in summaries.items() if why_no_row(run_dir, s) is None}
    columns = [c for c in COLUMNS if c[0] != "cfimdb" or any("cfimdb" in m for m in dev.values())]
    print("| run | " + " | ".join(title for *_, title in columns) + " | overall | wall s |")
    print("|---" * (len(columns) + 3) + "|")
    for run_dir, summary in summaries.items():
        if run_dir not in dev:
            print(f"| {name_of(run_dir)} | ({why_no_row(run_dir, summary)}) |")
            continue
        print(f"| {name_of(run_dir)} | {shown(cells(dev[run_dir], columns))} | {summary['wall_seconds']:.0f} |")
    if args.seeds and len(dev) >= 2:
        if len({tuple(sorted(m)) for m in dev.values()}) > 1:  # an overall score over other tasks
            print("| mean ± std | (runs of different task sets: no mean) |")
        else:
            table = np.array([[np.nan if v is None else v for v in cells(m, columns)] for m in dev.values()])
            mean, std = table.mean(0), table.std(0, ddof=1)  # a task absent from every run stays nan: "-"
            print(f"| mean ± std ({len(dev)} runs) | {shown(mean, std)} | |")
    if args.ensemble:
        summary = load(args.ensemble)
        if summary is None or "members" not in summary:
            raise SystemExit(f"{args.ensemble}: no ensemble's summary.json (not a finished --option ensemble folder)")
        members = {os.path.realpath(m["path"]) for m in summary["members"]}
        if members != {os.path.realpath(run_dir) for run_dir in args.runs}:
            raise SystemExit(f"{args.ensemble}: its members are not the runs listed (its rows would describe other "
                             f"runs): {', '.join(sorted(m['path'] for m in summary['members']))}")
        rows = summary["rows"]["report"]
        print(f"\nOn the dev report half ({', '.join(f'{t} {n}' for t, n in rows.items())} rows), which the "
              f"ensemble did not select on (split seed {summary['split_seed']}):\n")
        print("| | " + " | ".join(title for *_, title in columns) + " | overall |")
        print("|---" * (len(columns) + 2) + "|")
        member_table = np.array([cells(m["report_half"], columns) for m in summary["members"]], dtype=float)
        print(f"| single run, mean ± std | {shown(member_table.mean(0), member_table.std(0, ddof=1))} |")
        weights = ", ".join(f"{name_of(m['path'])} {m['weight']:.2f}" for m in summary["members"] if m["weight"] > 0)
        print(f"| {summary['method']} ensemble ({weights}) | {shown(cells(summary['report_half'], columns))} |")
        print(f"\nEnsemble minus mean single run: {summary['gain_over_mean_member_report_half'] * 100:+.2f} points "
              f"overall. Plot: {os.path.join(args.ensemble, 'scores.png')}")


if __name__ == "__main__":
    main()
