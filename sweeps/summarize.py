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

COLUMNS = (("sst", "accuracy"), ("para", "accuracy"), ("sts", "pearson"))


def load(folder: str) -> dict | None:
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def cells(metrics: dict) -> list[float | None]:
    return [metrics.get(task, {}).get(name) for task, name in COLUMNS] + [metrics.get("overall")]


def shown(values, std=None) -> str:
    if std is None:
        return " | ".join("-" if v is None else f"{v:.4f}" for v in values)
    return " | ".join("-" if v is None else f"{v:.4f} ± {s:.4f}" for v, s in zip(values, std))


def name_of(folder: str) -> str:
    return os.path.basename(folder.rstrip("/"))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--seeds", action="store_true", help="add mean and std rows (one recipe, several seeds)")
    parser.add_argument("--ensemble", help="an --option ensemble folder over these runs")
    args = parser.parse_args(argv)
    print("| run | SST acc | QQP acc | STS r | overall | wall s |")
    print("|---|---|---|---|---|---|")
    finished = []
    for run_dir in args.runs:
        summary = load(run_dir)
        if summary is None:
            print(f"| {name_of(run_dir)} | (no summary.json: the run did not finish) |")
            continue
        finished.append(cells(summary["dev"]))
        print(f"| {name_of(run_dir)} | {shown(cells(summary['dev']))} | {summary['wall_seconds']:.0f} |")
    if args.seeds and len(finished) >= 2:
        table = np.array([[np.nan if v is None else v for v in row] for row in finished], dtype=float)
        mean, std = np.nanmean(table, 0), np.nanstd(table, 0, ddof=1)
        print(f"| mean ± std ({len(finished)} runs) | {shown(mean, std)} | |")
    if args.ensemble:
        summary = load(args.ensemble)
        if summary is None:
            raise SystemExit(f"{args.ensemble}: no summary.json (not a finished --option ensemble folder)")
        rows = summary["rows"]["report"]
        print(f"\nOn the dev report half ({', '.join(f'{t} {n}' for t, n in rows.items())} rows), which the "
              f"ensemble did not select on (split seed {summary['split_seed']}):\n")
        print("| | SST acc | QQP acc | STS r | overall |")
        print("|---|---|---|---|---|")
        member_table = np.array([cells(m["report_half"]) for m in summary["members"]], dtype=float)
        print(f"| single run, mean ± std | {shown(member_table.mean(0), member_table.std(0, ddof=1))} |")
        weights = ", ".join(f"{name_of(m['path'])} {m['weight']:.2f}" for m in summary["members"] if m["weight"] > 0)
        print(f"| {summary['method']} ensemble ({weights}) | {shown(cells(summary['report_half']))} |")
        print(f"\nEnsemble minus mean single run: {summary['gain_over_mean_member_report_half'] * 100:+.2f} points "
              f"overall. Plot: {os.path.join(args.ensemble, 'scores.png')}")


if __name__ == "__main__":
    main()
