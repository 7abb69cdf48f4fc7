"""comparison.py: several evaluations side by side, read back from their results.json files.

Where this sits: after evaluate.py, which scores one system on one split. ProST's claim is comparative
(effectiveness against efficiency), so this file puts runs next to each other: the Pareto table of TGC against
FLOPs per task (`python evaluate.py pareto`, seeds of one system averaged, Pareto-optimal systems marked, with a
plot), the systems x splits table (`python evaluate.py compare`, the demo's zero-shot vs trained vs gold), and
the per-scenario table (`python evaluate.py scenarios`: which scenarios each system solves, where the roles err),
and the paired difference of two systems' TGC with a bootstrap interval (`python evaluate.py paired`: progressive
against standard training, task by task). Runs share a table only when they were scored on the same tasks under
the same budgets (`check_comparable`).
study.py builds its report on the same rows.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from result_files import RESULTS, fmt_flops, markdown_table
from store import atomic_write

SEED_SUFFIX = re.compile(r"[-_](?:seed|s)\d+$")


def system_name(run: dict) -> str:
    """Runs that differ only by a seed suffix (-seed1, -s2) are seeds of one system."""
    return SEED_SUFFIX.sub("", run["name"])


@dataclass
class ParetoRow:
    system: str
    runs: int
    tgc: float
    tgc_sd: float
    sgc: float
    sgc_sd: float
    flops: float
    optimal: bool = False


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def pareto_rows(runs: list[dict]) -> list[ParetoRow]:
    """One row per system (mean and standard deviation over its seeds), sorted by FLOPs per task."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[system_name(r)].append(r["metrics"])
    rows = [ParetoRow(name, len(ms), statistics.fmean(m["tgc"] for m in ms), spread([m["tgc"] for m in ms]),
                      statistics.fmean(m["sgc"] for m in ms), spread([m["sgc"] for m in ms]),
                      statistics.fmean(m["flops_per_task"] for m in ms)) for name, ms in groups.items()]
    for row in rows:
        row.optimal = not any(dominates(other, row) for other in rows)
    return sorted(rows, key=lambda r: (r.flops, -r.tgc, r.system))


def dominates(a: ParetoRow, b: ParetoRow) -> bool:
    """a is at least as effective for at most the compute, and strictly better in one of them."""
    return a.tgc >= b.tgc and a.flops <= b.flops and (a.tgc > b.tgc or a.flops < b.flops)


def pareto_table(rows: list[ParetoRow]) -> str:
    lines = markdown_table(["system", "runs", "TGC", "SGC", "FLOPs/task", "Pareto"],
                           [[r.system, r.runs, f"{r.tgc:.1f} ± {r.tgc_sd:.1f}", f"{r.sgc:.1f} ± {r.sgc_sd:.1f}",
                             fmt_flops(r.flops), "*" if r.optimal else ""] for r in rows])
    return "\n".join(lines) + "\n\n* = Pareto-optimal: no other system has higher TGC for no more FLOPs per task.\n"


def load_results(paths: list[str]) -> list[dict]:
    if not paths:
        raise ValueError("give at least one results.json")
    loaded = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist (evaluate.py writes OUT/{RESULTS})")
        try:
            r = json.loads(path.read_text())
            r["metrics"]["tgc"], r["metrics"]["sgc"], r["metrics"]["flops_per_task"], r["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} is not an evaluate.py results.json") from None
        loaded.append(r)
    return loaded


# What must be equal for two runs to share a Pareto table: the tasks they were scored on and the budgets they
# ran under (a larger --max-new-tokens buys TGC with FLOPs; that is a different operating point, not a
# better system).
COMPARED = {"split": lambda r: r.get("split"), "scenarios": lambda r: r.get("scenarios"),
            "limit": lambda r: r.get("limit"),
            "budgets": lambda r: (r.get("system") or {}).get("budgets"),
            "tasks": lambda r: [t["task_id"] for t in r["tasks"]] if "tasks" in r else None}


def check_comparable(runs: list[dict], paths: list[str]) -> None:
    """Refuse runs with different splits, limits, budgets or task lists, naming the first field that differs."""
    for field, value in COMPARED.items():
        first = value(runs[0])
        for r, path in zip(runs[1:], paths[1:]):
            if value(r) != first:
                what = "the task ids" if field == "tasks" else f"{json.dumps(first)} vs {json.dumps(value(r))}"
                raise ValueError(f"{paths[0]} and {path} differ in {field} ({what}); a Pareto table compares "
                                 "systems on the same split, --scenarios, --limit and budgets")


def check_comparable_by_split(runs: list[dict], paths: list[str]) -> None:
    """check_comparable within each split: runs on different splits may share a table, as columns or rows."""
    for split in dict.fromkeys(r["split"] for r in runs):
        same = [(r, path) for r, path in zip(runs, paths) if r["split"] == split]
        check_comparable([r for r, _ in same], [path for _, path in same])


def one_run_each(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(name, split) -> run, refusing two runs of one system on one split."""
    cells: dict[tuple[str, str], dict] = {}
    for r in runs:
        if (r["name"], r["split"]) in cells:
            raise ValueError(f"two runs named {r['name']!r} on split {r['split']!r}; give each system one run")
        cells[r["name"], r["split"]] = r
    return cells


def compare_table(runs: list[dict]) -> str:
    """One row per system name, one group of columns per split (in the order first seen): the demo's
    zero-shot vs trained vs gold table. Runs of one split must be comparable (check_comparable)."""
    splits = list(dict.fromkeys(r["split"] for r in runs))
    systems = list(dict.fromkeys(r["name"] for r in runs))
    cells = one_run_each(runs)
    header = ["system"] + [f"{split} {col}" for split in splits for col in ("TGC", "SGC", "FLOPs/task")]
    rows = []
    for name in systems:
        row = [name]
        for split in splits:
            m = cells[name, split]["metrics"] if (name, split) in cells else None
            row += (["-"] * 3 if m is None else
                    [f"{m['tgc']:.1f} ({m['passed']}/{m['tasks']})", f"{m['sgc']:.1f} ({m['scenarios_passed']}/"
                     f"{m['scenarios']})", fmt_flops(m["flops_per_task"])])
        rows.append(row)
    return "\n".join(markdown_table(header, rows)) + "\n"


def scenario_table(runs: list[dict]) -> str:
    """One row per scenario of each split: its variants each system solved, and where the first system's
    sub-tasks went wrong (evaluate.by_scenario: each role's errors over its judged sub-tasks). On the
    mini-world a dev scenario was trained on (new variants) and a test scenario never was. A line per split
    then counts the scenarios with at least one variant solved."""
    systems = list(dict.fromkeys(r["name"] for r in runs))
    by_split: dict[str, dict[str, dict]] = defaultdict(dict)
    for (name, split), r in one_run_each(runs).items():
        if "by_scenario" not in r["metrics"]:
            raise ValueError(f"run {name!r} on {split!r} has no per-scenario metrics; score it again with "
                             "this evaluate.py (rerunning the same command rescores its finished tasks)")
        by_split[split][name] = r["metrics"]["by_scenario"]
    header = ["split", "scenario", "tasks", *(f"{name} solved" for name in systems), f"{systems[0]}: role errors"]
    rows, counts = [], []
    for split, cells in by_split.items():
        scenarios = sorted({s for per_scenario in cells.values() for s in per_scenario})
        for s in scenarios:
            first = cells.get(systems[0], {}).get(s)
            solved = [f"{cells[n][s]['passed']}/{cells[n][s]['tasks']}" if s in cells.get(n, {}) else "-"
                      for n in systems]
            errors = ", ".join(f"{role} {c['errors']}/{c['n']}" for role, c in first["role_errors"].items()) \
                if first else "-"
            rows.append([split, s, max(cells[n][s]["tasks"] for n in systems if s in cells.get(n, {})), *solved,
                         errors])
        counts.append(f"{split}: " + ", ".join(
            f"{n} solves a variant of {sum(c['passed'] > 0 for c in cells[n].values())} of {len(cells[n])} scenarios"
            for n in systems if n in cells))
    return "\n".join(markdown_table(header, rows)) + "\n\n" + "\n".join(counts) + "\n"


@dataclass
class PairedRow:
    split: str
    systems: tuple[str, str]  # the first minus the second
    tasks: int
    seeds: tuple[int, int]
    tgc: tuple[float, float]
    difference: float  # TGC points
    low: float  # the bootstrap interval of the difference
    high: float
    better: tuple[int, int]  # tasks where each system's pass rate is the higher one


def task_pass_rates(runs: list[dict]) -> dict[str, float]:
    """Task id -> the share of `runs` (seeds of one system) that passed it."""
    passes: dict[str, list[bool]] = defaultdict(list)
    for r in runs:
        if not all("success" in t for t in r.get("tasks") or [{}]):
            raise ValueError(f"run {r['name']!r} on {r['split']!r} has no per-task results; score it again with "
                             "this evaluate.py (rerunning the same command rescores its finished tasks)")
        for t in r["tasks"]:
            passes[t["task_id"]].append(t["success"])
    return {task: statistics.fmean(p) for task, p in passes.items()}


def paired_rows(runs: list[dict], rounds: int = 10_000, seed: int = 0, level: float = 0.95) -> list[PairedRow]:
    """Per split, the TGC difference of exactly two systems, the first named minus the other (seeds averaged per
    task, so each task is one pair), and its percentile bootstrap interval: the tasks are resampled with
    replacement `rounds` times. The interval covers the choice of tasks; the seeds' spread enters only through
    the per-task averages. Runs of one split must be comparable (same tasks)."""
    systems = tuple(dict.fromkeys(system_name(r) for r in runs))
    if len(systems) != 2:
        raise ValueError(f"paired needs exactly two systems, got {len(systems)} ({', '.join(systems)}); "
                         "seeds of one system end in -seedN or -sN")
    rows = []
    for split in dict.fromkeys(r["split"] for r in runs):
        a_runs, b_runs = ([r for r in runs if r["split"] == split and system_name(r) == s] for s in systems)
        if not a_runs or not b_runs:
            raise ValueError(f"split {split!r} has runs of {systems[0] if a_runs else systems[1]} only; paired "
                             "compares both systems on every split it is given")
        a_rates, b_rates = task_pass_rates(a_runs), task_pass_rates(b_runs)
        d = np.array([a_rates[t] - b_rates[t] for t in sorted(a_rates)])  # (tasks,): the paired differences
        picks = np.random.default_rng(seed).integers(0, len(d), size=(rounds, len(d)))  # (rounds, tasks)
        low, high = np.quantile(d[picks].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
        rows.append(PairedRow(split, systems, len(d), (len(a_runs), len(b_runs)),
                              (100 * statistics.fmean(a_rates.values()), 100 * statistics.fmean(b_rates.values())),
                              100 * float(d.mean()), 100 * float(low), 100 * float(high),
                              (int((d > 0).sum()), int((d < 0).sum()))))
    return rows


def paired_table(rows: list[PairedRow]) -> str:
    a, b = rows[0].systems
    header = ["split", "tasks", f"{a} TGC (seeds)", f"{b} TGC (seeds)", f"difference ({a} - {b})", "95% interval",
              f"tasks {a} better / {b} better"]
    return "\n".join(markdown_table(header, [
        [r.split, r.tasks, f"{r.tgc[0]:.1f} ({r.seeds[0]})", f"{r.tgc[1]:.1f} ({r.seeds[1]})", f"{r.difference:+.1f}",
         f"[{r.low:+.1f}, {r.high:+.1f}]", f"{r.better[0]} / {r.better[1]}"] for r in rows])) + "\n"


def plot_pareto(rows: list, path: Path) -> bool:
    """TGC against FLOPs per task (ParetoRow rows) with the front drawn; False when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, r in enumerate(rows):  # a legend, not labels on the points: systems often sit on top of each other
        ax.errorbar(max(r.flops, 1.0), r.tgc, yerr=r.tgc_sd, fmt="o" if r.optimal else "x", capsize=3,
                    color=f"C{i % 10}", label=r.system + (" *" if r.optimal else ""))
    front = [r for r in rows if r.optimal]
    ax.step([max(r.flops, 1.0) for r in front], [r.tgc for r in front], where="post", linestyle="--",
            color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_flops(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("FLOPs per task (log scale)")
    ax.set_ylabel("TGC (%)")
    ax.set_ylim(-5, 112)  # the whole percentage scale, also when every system scores 0
    ax.set_title("Effectiveness vs efficiency (* = Pareto-optimal)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".")))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# Command lines: `python evaluate.py pareto`, `compare`, `scenarios` and `paired`.

def pareto_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py pareto", description="TGC vs FLOPs per task over several "
                                "evaluations, Pareto-optimal systems marked; seeds of one system (names ending "
                                "in -seedN or -sN) are averaged.")
    p.add_argument("results", nargs="*", help="results.json files written by evaluate.py")
    p.add_argument("--plot", default=None, help="where to write the plot when matplotlib is installed "
                   "(default: pareto.png beside the first results folder)")
    args = p.parse_args(argv)
    try:
        runs = load_results(args.results)
        check_comparable(runs, args.results)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = pareto_rows(runs)
    print(pareto_table(rows), end="")
    plot = Path(args.plot) if args.plot else Path(args.results[0]).resolve().parent.parent / "pareto.png"
    if plot_pareto(rows, plot):
        print(f"plot: {plot}")
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py compare", description="TGC, SGC and FLOPs per task of "
                                "several systems on several splits in one table (a row per --name, a column "
                                "group per split).")
    p.add_argument("results", nargs="*", help="results.json files written by evaluate.py")
    args = p.parse_args(argv)
    try:
        runs = load_results(args.results)
        check_comparable_by_split(runs, args.results)
        print(compare_table(runs), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def scenarios_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py scenarios", description="Per scenario of each split: the "
                                "variants each system solved, and the sub-task errors of the first system's roles.")
    p.add_argument("results", nargs="*", help="results.json files written by evaluate.py")
    args = p.parse_args(argv)
    try:
        print(scenario_table(load_results(args.results)), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def paired_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py paired", description="The TGC difference of two systems on the "
                                "same tasks, paired per task (seeds of a system, names ending in -seedN or -sN, "
                                "averaged per task), with a percentile bootstrap interval over the tasks.")
    p.add_argument("results", nargs="*", help="results.json files of exactly two systems (any seeds, any splits)")
    p.add_argument("--rounds", type=int, default=10_000, help="bootstrap resamples of the tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (the interval is reproducible)")
    args = p.parse_args(argv)
    try:
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
        runs = load_results(args.results)
        check_comparable_by_split(runs, args.results)
        print(paired_table(paired_rows(runs, args.rounds, args.seed)), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
