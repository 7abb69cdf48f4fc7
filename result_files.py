"""result_files.py: an evaluation's folder on disk, and the tables read back from its results.json.

Where this sits: beside evaluate.py, which rolls a system out and computes the paper's measurements (TGC, SGC,
sub-task errors, FLOPs per task). Everything that makes an evaluation folder (default `results/<name>/`)
resumable, shardable and readable lives here:

- the files: `trajectories.jsonl` (trajectories.py's format, in split order), `results.json` (metrics plus per-task
  rows), `report.md` and `timing.jsonl` (each task's wall time), all written atomically (store.py);
- the claim: one evaluation writes a folder at a time (a second is refused, naming the first), and `run.json`
  records what the trajectories depend on (`evaluation_identity`), so a different system in the same folder is
  refused (use a new --out, or --overwrite); adapters count by content (systems.adapter_provenance);
- parts: while a run is going, each process appends its finished tasks durably to `parts/rank<r>.jsonl` (their
  wall times beside); a rerun skips them (`finished_records`), and `merge_parts` folds them into the final
  files in split order, so a resumed or multi-process run writes what one uninterrupted process would;
- the Markdown report, and the number formats and tables that comparison.py and study.py share.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import model_io
import store
import trajectories
import world
from cluster import Cluster, barrier, first_error
from store import atomic_write, json_line

TRAJECTORIES = "trajectories.jsonl"
RESULTS = "results.json"
TIMINGS = "timing.jsonl"  # task id -> wall seconds of its rollout (measured, so kept apart from the trajectories)
REPORT = "report.md"
PARTS = "parts"
OUTPUTS = (TRAJECTORIES, RESULTS, REPORT, TIMINGS, store.IDENTITY_FILE)


# ----------------------------------------------------------------------------------------------------
# What an evaluation's trajectories depend on.

def evaluation_identity(system, budgets, split: str, root: Path, provenance: dict[str, dict]) -> dict:
    """What a folder's trajectories depend on: the split's world (by content, `world.split_fingerprint`), the
    system (each role's base model by content fingerprint, or by name for a model served elsewhere; its adapter
    by content hash; the weight dtype) and the budgets. A resume with anything else would mix two systems; where
    the world, models and adapters were is recorded, not compared, so a moved folder resumes. How each model
    decodes is included too (`decode_mode`): batched decoding and prompt-lookup drafts can flip a near-tie,
    deterministic decoding cannot; so is how adapters run (merged into the weights or mixed in one batch: the
    same function, rounded differently). Not included: --scenarios and --limit (a task's trajectory does not
    depend on them; results.json records them), --workers / --max-batch and the prompt cache's size."""
    loaded = {role: b.engine for role, b in system.roles.items() if network(b.engine) is not None}
    fingerprints = {e.name: model_io.fingerprint(e.name) for e in loaded.values()}  # once per shared base
    described = system.describe(budgets)
    return {"split": split, "world": world.split_fingerprint(split, root),
            "system": {k: v for k, v in described.items() if k != "roles"},
            "models": {role: fingerprints[b.engine.name] if role in loaded else b.engine.name
                       for role, b in system.roles.items()},
            "adapters": {role: p["sha256"] for role, p in provenance.items()},
            "dtype": {role: str(next(network(e).parameters()).dtype).removeprefix("torch.")
                      for role, e in loaded.items()},
            "decode": {role: decode_mode(e) for role, e in loaded.items()},
            store.PATHS: {"root": str(root), "roles": described["roles"]}}


def network(engine):
    """The Transformer an engine runs in this process (rollout.LocalEngine.base, agents.PlainEngine.net), or None
    for an engine without one (a teacher, a model served elsewhere)."""
    for attribute in ("base", "net"):
        if getattr(engine, attribute, None) is not None:
            return getattr(engine, attribute)
    return None


def decode_mode(engine) -> dict | str:
    """How a local engine decodes: "plain" (agents.py's engine over model.generate), or the fast engine's modes."""
    if not hasattr(engine, "prompt_lookup"):
        return "plain"
    return {"deterministic": engine.deterministic, "prompt_lookup": engine.prompt_lookup,
            "adapters": "mixed" if engine.mixes_adapters else "merged"}


# ----------------------------------------------------------------------------------------------------
# The folder: lock, claim, durable parts, the merge into the final files.

def folder_lock(out: Path, cluster: Cluster):
    """OUT checked and locked by rank 0 for the whole run (re-entrant); every rank fails if it cannot be."""
    return store.exclusive_output(out, is_main=cluster.is_main, first_error=lambda e: first_error(cluster, e))


def claim_folder(out: Path, identity: dict, cluster: Cluster, overwrite: bool = False) -> None:
    """Record the run's identity in OUT/run.json, or check that an existing folder holds the same run.
    With `overwrite`, an earlier evaluation in the folder is discarded and this one starts from scratch."""
    saved = store.read_identity(out)
    foreign = [p.name for p in out.iterdir() if p.name not in (*OUTPUTS, PARTS) and not store.bookkeeping(p)] \
        if out.is_dir() else []
    if foreign and saved is None:
        raise ValueError(f"{out} is not empty and holds no evaluation ({', '.join(sorted(foreign)[:3])}); "
                         "choose another --out")
    if saved is not None and not overwrite:
        store.check_identity(out, saved, identity, "use a new --out, or pass --overwrite to replace that "
                             "evaluation")
    barrier(cluster)  # every rank has checked before rank 0 writes
    if cluster.is_main:
        if overwrite:
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
            for part in (out / PARTS).glob("*") if (out / PARTS).is_dir() else []:
                part.unlink()
        if store.read_identity(out) is None:
            store.write_identity(out, identity)
    barrier(cluster)


def part_path(out: Path, rank: int) -> Path:
    return out / PARTS / f"rank{rank}.jsonl"


def part_paths(out: Path) -> list[Path]:
    return sorted((out / PARTS).glob("rank*.jsonl")) if (out / PARTS).is_dir() else []


def timing_path(part: Path) -> Path:
    return part.with_name(f"timing-{part.stem}.jsonl")


def keep_finished(part: Path, record: dict, wall_seconds: float) -> None:
    """Append a finished task to a process's part, its wall time first (so every recorded trajectory has one)."""
    store.append_lines(timing_path(part), [{"task_id": record["task_id"], "wall_seconds": round(wall_seconds, 4)}])
    trajectories.write_trajectory(part, record)


def finished_records(out: Path) -> dict[str, dict]:
    """task id -> trajectory, from the merged file and every rank's part (first occurrence wins)."""
    records: dict[str, dict] = {}
    for path in [out / TRAJECTORIES, *part_paths(out)]:
        if path.is_file():
            for record in trajectories.read_trajectories(path):
                records.setdefault(record["task_id"], record)
    return records


def finished_timings(out: Path) -> dict[str, float]:
    """task id -> wall seconds of its rollout (the last line per task: a rerun after a crash replaces it)."""
    timings = {}
    for path in [out / TIMINGS, *(timing_path(p) for p in part_paths(out))]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = store.parse_line(line)
                if row is not None:  # None: a torn last line from a crash
                    timings[row["task_id"]] = row["wall_seconds"]
    return timings


def merge_parts(out: Path, task_ids: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Merge the parts into trajectories.jsonl (split order) and timing.jsonl; returns the records of
    `task_ids` and every task's wall time. Tasks of an earlier run with a larger --limit are kept after them."""
    found = finished_records(out)
    missing = [t for t in task_ids if t not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks have no trajectory after the run (first: {missing[0]})")
    records = [found[t] for t in task_ids]
    chosen = set(task_ids)
    extra = [r for t, r in found.items() if t not in chosen]
    timings = finished_timings(out)
    atomic_write(out / TRAJECTORIES, "".join(json_line(r) for r in records + extra))
    atomic_write(out / TIMINGS, "".join(json.dumps({"task_id": t, "wall_seconds": s}) + "\n"
                                        for t, s in timings.items()))
    for part in part_paths(out):  # now in the merged files
        timing_path(part).unlink(missing_ok=True)
        part.unlink()
    if (out / PARTS).is_dir() and not any((out / PARTS).iterdir()):
        (out / PARTS).rmdir()
    return records, timings


def write_results(out: Path, results: dict) -> None:
    atomic_write(out / RESULTS, json.dumps(results, indent=2) + "\n")
    atomic_write(out / REPORT, markdown_report(results))


# ----------------------------------------------------------------------------------------------------
# The rows of results.json besides the metrics: per task, and the timing of the run (measured, not derived).

def task_rows(records: list[dict], difficulty: dict[str, object], timings: dict[str, float]) -> list[dict]:
    return [{"task_id": r["task_id"], "success": bool(r["evaluation"] and r["evaluation"]["success"]),
             "difficulty": difficulty.get(r["task_id"]), "subtasks": len(r["subtasks"]), "calls": len(r["calls"]),
             "executions": len(r["executions"]), "flops": sum(c["flops"] for c in r["calls"]),
             "tests": f"{len(r['evaluation']['passes'])}/{r['evaluation']['num_tests']}" if r["evaluation"] else None,
             "wall_seconds": timings.get(r["task_id"])} for r in records]


def timing_summary(records: list[dict], timings: dict[str, float], stats: list, machines: list[str]) -> dict:
    """Wall time per task (each rollout from open to evaluation, averaged), model time per task (each call's
    share of its batch), FLOPs per task actually computed (the prompt tokens the prompt cache supplied left out:
    this depends on which calls the engine served before, so it is a measurement of the run, not a metric of
    the system), and where this invocation's wall time went and on what (`stats`: each process's
    rollout.RunStats; `machines`: each process's meter.machine)."""
    walls = [timings[r["task_id"]] for r in records if r["task_id"] in timings]
    model_seconds = sum(c["seconds"] for r in records for c in r["calls"])
    computed = sum(c.get("flops_computed", c["flops"]) for r in records for c in r["calls"])  # teachers cache nothing
    run_seconds = max((s.seconds for s in stats), default=0.0)
    return {"wall_seconds_per_task": statistics.fmean(walls) if walls else None,
            "model_seconds_per_task": model_seconds / max(len(records), 1),
            "flops_computed_per_task": computed / max(len(records), 1),
            "this_run": {"tasks": sum(s.tasks for s in stats), "seconds": run_seconds,
                         "model_seconds": sum(s.model_seconds for s in stats),
                         "world_seconds": sum(s.world_seconds for s in stats),
                         "tasks_per_minute": sum(s.tasks for s in stats) / run_seconds * 60 if run_seconds else None,
                         "processes": len(stats), "machines": sorted(set(machines))}}


# ----------------------------------------------------------------------------------------------------
# The Markdown report.

def in_role_order(roles) -> list[str]:
    """Roles in protocol order (planner, executor, critic, single), whatever order they were found in."""
    order = trajectories.ROLES
    return sorted(roles, key=lambda r: order.index(r) if r in order else len(order))


def fmt_flops(x: float) -> str:
    if not x:
        return "0"
    exponent = int(math.floor(math.log10(abs(x)) / 3) * 3)
    units = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}
    return f"{x / 10 ** exponent:.3g} {units.get(exponent, f'e{exponent}')}".strip()


def fmt_seconds(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def error_text(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['errors']}/{cell['n']}" + (f" ({cell['rate']:.0f}%)" if cell["n"] else "")


def training_text(provenance: dict | None) -> str:
    if not provenance:
        return "-"
    if provenance["training"] is None:
        return "not by prost.py"
    t = provenance["training"]
    return f"epoch {t['epoch']} of {t['epochs']}" + (" **(unfinished)**" if provenance["unfinished"] else "")


def markdown_report(results: dict) -> str:
    m, t = results["metrics"], results["timing"]
    system = results["system"]
    lines = [f"# Evaluation: {results['name']}", "",
             f"Split `{results['split']}` of the world at `{results['root']}`; system kind `{system['kind']}`"
             + (f" (teacher `{system['teacher']}`)" if system.get("teacher") else "") + ".", ""]
    adapters = results.get("adapters", {})
    lines += markdown_table(["role", "model", "adapter", "adapter sha256", "trained"],
                            [[role, f"`{b['model']}`", f"`{b['adapter']}`" if b["adapter"] else "(base)",
                              f"`{adapters[role]['sha256'][:12]}`" if role in adapters else "-",
                              training_text(adapters.get(role))] for role, b in system["roles"].items()])
    unfinished = [f"the {role}'s ({p['unfinished']})" for role, p in adapters.items() if p["unfinished"]]
    if unfinished:
        lines += ["", f"**Unfinished training** (evaluated with --allow-unfinished): {'; '.join(unfinished)}."]
    lines += ["", "## Effectiveness", "",
              f"- **TGC {m['tgc']:.1f}** ({m['passed']}/{m['tasks']} tasks pass every evaluation test)",
              f"- **SGC {m['sgc']:.1f}** ({m['scenarios_passed']}/{m['scenarios']} scenarios with all tasks passing)"
              + (f"; {m['scenarios_left_out']} scenario(s) with only some variants in this run are left out"
                 if m["scenarios_left_out"] else ""),
              ""]
    lines += markdown_table(["difficulty", "tasks", "TGC"],
                            [[d, v["tasks"], f"{v['tgc']:.1f}"] for d, v in m["by_difficulty"].items()])
    lines += ["", "## Efficiency", "",
              f"- FLOPs per task: **{fmt_flops(m['flops_per_task'])}** (what every model call ran: prefill and decode "
              "matmuls, attention over the actual context, the vocabulary projection only where logits were "
              "computed; model.forward_flops), counted as if no prompt were cached: a property of the system and "
              "the task, whatever the engine cached or batched. The Pareto table uses this one.",
              f"- FLOPs per task computed in this run: {fmt_flops(t['flops_computed_per_task'])} (the same, "
              "without the prompt tokens whose keys and values came from the prompt cache; a measurement, like "
              "wall time)",
              f"- tokens per task: {m['tokens_per_task']:.0f}",
              f"- wall time per task: {fmt_seconds(t['wall_seconds_per_task'])} (each rollout from open to "
              f"evaluation; rollouts overlap), model time per task {fmt_seconds(t['model_seconds_per_task'])}", ""]
    lines += markdown_table(["role", "calls/task", "prompt tokens/task", "new tokens/task", "FLOPs/task"],
                            [[role, f"{c['calls_per_task']:.1f}", f"{c['prompt_tokens_per_task']:.0f}",
                              f"{c['new_tokens_per_task']:.0f}", fmt_flops(c["flops_per_task"])]
                             for role, c in m["roles"].items()])
    run = t["this_run"]
    if run["tasks"]:
        lines += ["", f"This invocation: {run['tasks']} tasks in {run['seconds']:.1f} s on {run['processes']} "
                  f"process(es) ({'; '.join(run['machines'])}); model {run['model_seconds']:.1f} s, world sessions "
                  f"{run['world_seconds']:.1f} s (summed over sessions)."]
    lines += ["", "## Sub-task error rates", "",
              "Per sub-task index, errors/n (%) where n counts sub-tasks: planner, no valid decision within its "
              "format retries (row K+1 is its FINISH decision); executor, the final attempt ended without a report "
              "or with its last execution raising; single agent, the sub-task's last execution raised or none ran; "
              "critic, a verdict contradicts the known outcome (an execution that raised, or a passed task's final "
              "attempts), sub-tasks with no known outcome not counted.",
              ""]
    roles = in_role_order({role for row in m["subtask_errors"].values() for role in row})
    lines += markdown_table(["sub-task"] + roles,
                            [[k] + [error_text(row.get(r)) for r in roles] for k, row in m["subtask_errors"].items()])
    if m["budget_stops"]:
        lines += ["", "Budget stops: " + ", ".join(f"{k} {v}" for k, v in m["budget_stops"].items()) + "."]
    return "\n".join(lines) + "\n"
