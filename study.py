"""The paper's comparisons at small scale: `make study`'s evaluations and training logs -> its tables and plots.

Where this sits: after evaluate.py, at the very end of the pipeline. ProST's claims are comparative:
progressive sub-task training beats standard fine-tuning of the same roles for the same number of epochs, it
lowers the sub-task error rates, and fine-tuned multi-agent systems of small models trade effectiveness for
efficiency better than a single agent on a larger model. `make study` trains and evaluates those systems
(some with several seeds) on dev and test; this file reads what it wrote and reports, per split:

    systems    TGC and SGC as mean ± sample standard deviation over seeds, each seed's TGC, FLOPs per task
               in total and by role, and the Pareto-optimal systems (TGC vs FLOPs per task), with a plot
    ablation   for every system trained with both schedules ("<x>-progressive" and "<x>-full"): TGC per seed
               side by side, the difference paired per task with its bootstrap interval, and the sub-task
               error rates by index and role pooled over seeds (the errors of all seeds over the sub-tasks
               judged in all seeds)
    curves     the dev loss by sub-task after each epoch of the runs trained with --dev-data, progressive
               against standard (a table of the last epoch, and a plot)

    python study.py results/study --ckpts ckpts/study       # writes results/study/study.md and the PNGs

The layout is make study's: the evaluation of run R on split S in RESULTS/S/R/results.json, named R, where
R is <system>-s<seed> (evaluate.py groups seeds by that suffix); its training in CKPTS/R/<role>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import comparison
import result_files
from comparison import system_name
from result_files import fmt_flops, in_role_order, markdown_table
from store import atomic_write

TRAIN_LOG = "train_log.jsonl"


# ----------------------------------------------------------------------------------------------------
# The systems: effectiveness, efficiency, and the Pareto front.

def by_system(results: list[dict]) -> dict[str, list[dict]]:
    """{system: its runs}, runs sorted by name (seed order)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["name"]):
        groups[system_name(r)].append(r)
    return dict(groups)


def role_flops(runs: list[dict]) -> dict[str, float]:
    """Mean FLOPs per task of each role over the runs (a role a run does not have counts as 0 there)."""
    roles = in_role_order({role for r in runs for role in r["metrics"].get("roles", {})})
    return {role: statistics.fmean(r["metrics"].get("roles", {}).get(role, {}).get("flops_per_task", 0.0)
                                   for r in runs) for role in roles}


def systems_table(results: list[dict]) -> str:
    rows = comparison.pareto_rows(results)
    runs = by_system(results)
    roles = in_role_order({role for r in results for role in r["metrics"].get("roles", {})})
    header = ["system", "runs", "TGC", "TGC per seed", "SGC", "FLOPs/task", *roles, "Pareto"]
    lines = markdown_table(header, [
        [row.system, row.runs, f"{row.tgc:.1f} ± {row.tgc_sd:.1f}",
         ", ".join(f"{r['metrics']['tgc']:.0f}" for r in runs[row.system]), f"{row.sgc:.1f} ± {row.sgc_sd:.1f}",
         fmt_flops(row.flops), *(fmt_flops(role_flops(runs[row.system]).get(role, 0.0)) for role in roles),
         "*" if row.optimal else ""] for row in rows])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# The ablation: the same system trained with each schedule.

def schedule_pairs(systems: dict[str, list[dict]]) -> list[tuple[str, list[dict], list[dict]]]:
    """(name, progressive runs, standard runs) for every <name>-progressive with a <name>-full beside it
    (prost.py --schedule: the method and the paper's standard fine-tuning baseline)."""
    pairs = []
    for system, runs in systems.items():
        name = system.removesuffix("-progressive")
        if name != system and f"{name}-full" in systems:
            pairs.append((name, runs, systems[f"{name}-full"]))
    return pairs


def seed_of(result: dict) -> str:
    match = comparison.SEED_SUFFIX.search(result["name"])
    return match.group().lstrip("-_") if match else "-"


def seed_comparison(progressive: list[dict], full: list[dict]) -> str:
    """TGC per seed under each schedule, how many seeds each schedule wins, whether the mean difference is
    larger than the larger of the two seed spreads, and the difference paired per task with its bootstrap
    interval (comparison.paired_rows)."""
    tgc = [{seed_of(r): r["metrics"]["tgc"] for r in runs} for runs in (progressive, full)]
    seeds = sorted(set(tgc[0]) & set(tgc[1]))
    wins = [sum(tgc[0][s] > tgc[1][s] for s in seeds), sum(tgc[1][s] > tgc[0][s] for s in seeds)]
    difference = statistics.fmean(tgc[0].values()) - statistics.fmean(tgc[1].values())
    largest_sd = max(comparison.spread(list(t.values())) for t in tgc)
    if min(len(t) for t in tgc) < 2:
        verdict = "one seed, so no spread to compare it with"
    else:
        where = "larger than" if abs(difference) > largest_sd else "within"
        verdict = f"{where} the larger seed spread, {largest_sd:.1f}"
    lines = markdown_table(["seed", "progressive TGC", "standard TGC"],
                           [[s, f"{tgc[0][s]:.1f}", f"{tgc[1][s]:.1f}"] for s in seeds])
    [paired] = comparison.paired_rows(progressive + full)  # one split
    return "\n".join(lines) + (f"\n\nProgressive wins {wins[0]} of {len(seeds)} seeds, standard {wins[1]}; mean "
                               f"difference {difference:+.1f} TGC points ({verdict}). Paired per task (each task's "
                               f"pass rate over the seeds): {paired.difference:+.1f}, 95% bootstrap interval over "
                               f"the {paired.tasks} tasks [{paired.low:+.1f}, {paired.high:+.1f}]; progressive "
                               f"better on {paired.better[0]} tasks, standard on {paired.better[1]}.\n")


def pooled_errors(runs: list[dict]) -> dict[tuple[str, int], list[int]]:
    """{(role, sub-task index): [errors, sub-tasks judged]} summed over the runs."""
    pooled: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for r in runs:
        for k, roles in r["metrics"]["subtask_errors"].items():
            for role, cell in roles.items():
                pooled[role, int(k)][0] += cell["errors"]
                pooled[role, int(k)][1] += cell["n"]
    return pooled


def pooled_error_text(errors_n: list[int] | None) -> str:
    if not errors_n or not errors_n[1]:
        return "-"
    errors, n = errors_n
    return f"{100.0 * errors / n:.0f}% ({errors}/{n})"


def error_rates_table(progressive: list[dict], full: list[dict]) -> str:
    """Sub-task error rate by role and index, progressive vs standard (the paper's ablation), and each
    role's rate over all its sub-tasks."""
    pooled = [pooled_errors(runs) for runs in (progressive, full)]
    roles = in_role_order({role for p in pooled for role, _ in p})
    rows = []
    for role in roles:
        for k in sorted({k for p in pooled for role_, k in p if role_ == role}):
            rows.append([role, k, *(pooled_error_text(p.get((role, k))) for p in pooled)])
        totals = [[sum(p[key][i] for key in p if key[0] == role) for i in (0, 1)] for p in pooled]
        rows.append([f"{role}, all", "", *(pooled_error_text(t) for t in totals)])
    return "\n".join(markdown_table(["role", "sub-task", "progressive", "standard"], rows)) + "\n"


# ----------------------------------------------------------------------------------------------------
# Learning curves: dev loss by sub-task after each epoch (prost.py --dev-data).

def dev_loss_curves(ckpts: Path) -> dict[str, dict[str, list[dict[int, float]]]]:
    """{run: {role: [per epoch {sub-task: dev loss}]}} for every role trained with --dev-data. Role folders
    that are links to another run's (a system reusing that run's role) are that run's curves, not new ones."""
    curves: dict[str, dict[str, list[dict[int, float]]]] = defaultdict(dict)
    for log in sorted(ckpts.glob(f"*/*/{TRAIN_LOG}")):
        if log.parent.is_symlink():
            continue
        epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [{int(k): v for k, v in e["dev_loss_by_subtask"].items()} for e in epochs
                  if e.get("dev_loss_by_subtask")]
        if losses:
            curves[log.parent.parent.name][log.parent.name] = losses
    return dict(curves)


def curve_pairs(curves: dict[str, dict]) -> list[tuple[str, str]]:
    """(progressive run, standard run) pairs that both have curves: same system, same seed."""
    standard = {run: run.replace("-progressive", "-full", 1) for run in sorted(curves) if "-progressive" in run}
    return [(run, full) for run, full in standard.items() if full in curves]


def last_loss_table(curves: dict[str, dict], pair: tuple[str, str]) -> str:
    roles = in_role_order(set(curves[pair[0]]) & set(curves[pair[1]]))
    k_max = max(k for run in pair for role in roles for k in curves[run][role][-1])
    rows = []
    for role in roles:
        for run, schedule in zip(pair, ("progressive", "standard")):
            last = curves[run][role][-1]
            rows.append([role, schedule, *(f"{last[k]:.4f}" if k in last else "" for k in range(1, k_max + 1)),
                         f"{statistics.fmean(last.values()):.4f}"])
    header = ["role", "schedule", *(str(k) for k in range(1, k_max + 1)), "mean"]
    return "\n".join(markdown_table(header, rows)) + "\n"


def plot_dev_loss(curves: dict[str, dict], pair: tuple[str, str], path: Path) -> bool:
    """One panel per role: dev loss (log scale) by sub-task against the epoch, progressive solid, standard
    dashed, one colour per sub-task; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    roles = in_role_order(set(curves[pair[0]]) & set(curves[pair[1]]))
    fig, axes = plt.subplots(1, len(roles), figsize=(4.2 * len(roles), 3.6), squeeze=False)
    for ax, role in zip(axes[0], roles):
        for run, style in zip(pair, ("-", "--")):
            epochs = curves[run][role]
            for k in sorted({k for e in epochs for k in e}):
                xs = [i for i, e in enumerate(epochs, start=1) if k in e]
                ax.plot(xs, [epochs[i - 1][k] for i in xs], style, color=f"C{k - 1}", marker=".",
                        label=f"sub-task {k}" if style == "-" else None)
        ax.set_yscale("log")
        ax.set_title(role)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dev loss (solid: progressive, dashed: standard)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# The report.

def load_study(results_dir: Path) -> dict[str, list[dict]]:
    """{split: its runs}, every split's runs checked comparable (same tasks and budgets)."""
    paths = sorted(str(p) for p in results_dir.glob(f"*/*/{result_files.RESULTS}"))
    if not paths:
        raise FileNotFoundError(f"no {results_dir}/<split>/<run>/{result_files.RESULTS} found; run `make study` "
                                "first, or pass the folder it wrote")
    splits: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for result, path in zip(comparison.load_results(paths), paths):
        splits[result["split"]].append((result, path))
    for runs in splits.values():
        comparison.check_comparable([r for r, _ in runs], [p for _, p in runs])
    return {split: [r for r, _ in runs] for split, runs in splits.items()}


def split_section(split: str, results: list[dict], out_dir: Path) -> list[str]:
    lines = [f"## {split}: {results[0]['metrics']['tasks']} tasks", "", systems_table(results),
             "* = Pareto-optimal: no other system has higher TGC for no more FLOPs per task. TGC ± the sample "
             "standard deviation over seeds; FLOPs per task as the mean over seeds, in total and by role.", ""]
    plot = out_dir / f"pareto-{split}.png"
    if comparison.plot_pareto(comparison.pareto_rows(results), plot):
        lines += [f"![TGC vs FLOPs per task on {split}]({plot.name})", ""]
    for name, progressive, full in schedule_pairs(by_system(results)):
        lines += [f"### {name}: progressive vs standard on {split}", "", seed_comparison(progressive, full),
                  f"Sub-task error rates, pooled over {len(progressive)} and {len(full)} seeds:", "",
                  error_rates_table(progressive, full)]
    return lines


def curves_section(ckpts: Path, out_dir: Path) -> list[str]:
    curves = dev_loss_curves(ckpts)
    lines = []
    for pair in curve_pairs(curves):
        lines += [f"## Dev loss by sub-task: {pair[0]} vs {pair[1]}", "",
                  "After the last epoch (gold dev trajectories; the planner's last index is its FINISH "
                  "decision):", "", last_loss_table(curves, pair)]
        plot = out_dir / f"dev-loss-{pair[0]}.png"
        if plot_dev_loss(curves, pair, plot):
            lines += [f"![dev loss by sub-task per epoch]({plot.name})", ""]
    return lines


def training_seconds(ckpts: Path) -> dict[str, float]:
    """{run: seconds in the training loops of its roles} (a linked role is its own run's time)."""
    seconds: dict[str, float] = defaultdict(float)
    for log in sorted(ckpts.glob(f"*/*/{TRAIN_LOG}")):
        if not log.parent.is_symlink():
            seconds[log.parent.parent.name] += sum(json.loads(line)["seconds"]
                                                   for line in log.read_text().splitlines() if line.strip())
    return dict(seconds)


def time_section(splits: dict[str, list[dict]], ckpts: Path | None) -> list[str]:
    """Minutes by run: training loops (model loading not included) and each split's evaluation when one
    invocation ran all its tasks (results.json times only its last invocation)."""
    train = training_seconds(ckpts) if ckpts is not None else {}
    evals = {(split, r["name"]): r["timing"]["this_run"]["seconds"] for split, runs in splits.items() for r in runs
             if r.get("timing") and r["timing"]["this_run"].get("tasks") == r["metrics"]["tasks"]}
    runs = sorted(set(train) | {r["name"] for results in splits.values() for r in results})
    rows = [[run, f"{train[run] / 60:.1f}" if run in train else "-",
             *(f"{evals[split, run] / 60:.1f}" if (split, run) in evals else "-" for split in splits)] for run in runs]
    return ["## Time (minutes)", "", *markdown_table(["run", "training", *(f"{s} evaluation" for s in splits)], rows),
            "", "Training: the roles' training loops, model loading not included. Evaluation: the invocation that "
            "ran all of the split's tasks; \"-\" where it was resumed or rerun (results.json times its last "
            "invocation only).", ""]


def study_report(results_dir: Path, ckpts: Path | None, out_dir: Path) -> str:
    lines = ["# Study", ""]
    splits = load_study(results_dir)
    for split, results in splits.items():
        lines += split_section(split, results, out_dir)
    if ckpts is not None:
        lines += curves_section(ckpts, out_dir)
    lines += time_section(splits, ckpts)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The study's tables and plots from make study's evaluations "
                                "(RESULTS/<split>/<run>/results.json) and training logs.")
    p.add_argument("results", help="the study's results folder, e.g. results/study")
    p.add_argument("--ckpts", default=None, help="the study's checkpoints folder (e.g. ckpts/study) for the dev "
                   "loss curves of runs trained with --dev-data; without it no curves")
    p.add_argument("--out", default=None, help="the report (default: RESULTS/study.md); plots go beside it")
    args = p.parse_args(argv)
    results_dir = Path(args.results)
    out = Path(args.out) if args.out else results_dir / "study.md"
    try:
        report = study_report(results_dir, Path(args.ckpts) if args.ckpts else None, out.parent)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write(out, report)
    print(report, end="")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
