"""Evaluate a ProST system on a split of AppWorld: effectiveness (TGC, SGC) against efficiency (FLOPs per task).

Where this sits: the last stage of the pipeline. prost.py leaves one LoRA adapter per role in `ckpts/<role>/`
(each recording its base model); this file rebuilds the system from those folders, rolls it out greedily on a
split, lets AppWorld's own evaluator judge every task, and turns the trajectories into the paper's measurements:

    TGC   task goal completion: % of tasks whose every evaluation test passes
    SGC   scenario goal completion: % of scenarios (task id prefix before the "_") whose tasks all pass,
          over the scenarios with every variant of the split in the run
    per-difficulty TGC, the sub-task error rate by sub-task index and role (the share of sub-tasks at that
    index where the role erred; definitions in `subtask_errors`), tokens and FLOPs per task per role
    (model.forward_flops: what each call ran), and wall time per task.

    python evaluate.py --agents ckpts/ --split dev              # planner/executor/critic from ckpts/<role>/
    python evaluate.py --single ckpts/single --split dev        # the single-agent baseline
    python evaluate.py --model Qwen/Qwen2.5-1.5B --split dev    # untrained base model in every role
    python evaluate.py --gold --split dev                       # replay of the mini-world's gold solutions
    python evaluate.py --agents ckpts/ --split dev --plain      # every fast path off (see below)
    python evaluate.py pareto results/*/results.json            # TGC vs FLOPs per task, Pareto front
                                                                # (runs must share split, --limit, budgets)
    python evaluate.py compare results/demo/*/*/results.json    # systems x splits: TGC, SGC, FLOPs per task
    python evaluate.py scenarios results/world/*/*/results.json # per scenario: variants solved, role errors
    python evaluate.py paired results/world{,-full}/test/trained/results.json  # two systems' TGC difference, per task
    torchrun --nproc_per_node 8 evaluate.py --agents ckpts/ --split test_normal

systems.py turns the command line into an agents.System (and refuses adapters of unfinished training runs);
result_files.py owns the output folder (its files, its claim and identity, resume and shards) and the report;
comparison.py puts several evaluations side by side (the `pareto`, `compare`, `scenarios` and `paired` subcommands).
How the tasks run is the one seam between this core and its fast path (`roll_out`): by default rollout.py's scheduler
(many worlds at once, model calls batched, the fast decoding engine); with --plain, agents.py's plain sequential
driver over model.generate, one task at a time. With deterministic decoding (the default here) both record the
same trajectories (tests/test_core.py). Every metric is a function of the trajectories alone, so a resumed or
multi-process run reports exactly what one uninterrupted process would.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import agents
import comparison
import meter
import result_files
import rollout
import systems
import world
from cluster import Cluster, barrier, exit_process, gather, start_cluster, stop_cluster
from result_files import fmt_flops, fmt_seconds, in_role_order

DIST_TIMEOUT = timedelta(hours=72)  # ranks wait at the final barrier while the slowest shard finishes


# ----------------------------------------------------------------------------------------------------
# Metrics: pure functions of the trajectories (plus each task's difficulty).

def percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def passed(record: dict) -> bool:
    return bool(record["evaluation"] and record["evaluation"]["success"])


def goal_completion(records: list[dict], split_task_ids: list[str]) -> dict:
    """TGC and SGC in percent, with their counts. A scenario counts towards SGC only when every one of its
    variants in the split is in the run (with --limit some are not); those left out are counted."""
    variants: dict[str, int] = defaultdict(int)
    for task_id in split_task_ids:
        variants[world.scenario_of(task_id)] += 1
    ran: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        ran[world.scenario_of(r["task_id"])].append(passed(r))
    complete = {s: all(outcomes) for s, outcomes in ran.items() if len(outcomes) == variants[s]}
    n_passed = sum(passed(r) for r in records)
    return {"tasks": len(records), "passed": n_passed, "tgc": percent(n_passed, len(records)),
            "scenarios": len(complete), "scenarios_passed": sum(complete.values()),
            "scenarios_left_out": len(ran) - len(complete),
            "sgc": percent(sum(complete.values()), len(complete))}


def tgc_by_difficulty(records: list[dict], difficulty: dict[str, object]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(difficulty.get(r["task_id"], "unknown"))].append(r)
    return {d: {"tasks": len(rs), "tgc": percent(sum(passed(r) for r in rs), len(rs))}
            for d, rs in sorted(groups.items())}


def subtask_errors(records: list[dict]) -> dict[str, dict[str, dict]]:
    """{sub-task index k: {role: {"n", "errors", "rate"}}}: of the n sub-tasks at index k where the role's
    work can be judged, the share where it erred. One unit (sub-tasks) for every role:

        planner   the decision before sub-task k (at K + 1: FINISH) got no valid reply within its retries
        executor  the sub-task's final attempt ended without a report, or its last execution raised
        single    the sub-task's last execution raised, or no code ran for it
        critic    one of its verdicts on the sub-task's attempts contradicts the known outcome: failure when
                  the attempt's last execution raised, success when the task passed AppWorld's evaluation
                  and it was the sub-task's final attempt; attempts with neither are not judged, and a
                  sub-task with no judged verdict is not counted
    """
    counts: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))

    def tally(k: int, role: str, erred: bool) -> None:
        counts[k][role][0] += 1
        counts[k][role][1] += erred

    for r in records:
        replies: dict[int, list[bool]] = defaultdict(list)  # planner decision k -> valid reply per call
        for call in r["calls"]:
            if call["role"] == "planner":
                replies[call["subtask"]].append(agents.parse_plan(call["output"]) is not None)
        for k, valid in replies.items():
            tally(k, "planner", not any(valid))
        if r["system"]["kind"] == "single":
            for subtask in r["subtasks"]:
                runs = [e for e in r["executions"] if e["subtask"] == subtask["index"]]
                tally(subtask["index"], "single", not runs or runs[-1]["error"])
            continue
        critic_conversations = {c["conversation"] for c in r["calls"] if c["role"] == "critic"}
        judged = 0  # critic conversation ids count attempts in order, one per attempt
        for subtask in r["subtasks"]:
            k, attempts = subtask["index"], subtask["attempts"]
            critic_errors = []
            for a, attempt in enumerate(attempts, start=1):
                runs = [e for e in r["executions"] if e["subtask"] == k and e["attempt"] == a]
                raised = bool(runs) and runs[-1]["error"]
                if a == len(attempts):
                    tally(k, "executor", attempt["report"].startswith(agents.NO_REPORT) or raised)
                truth = "failure" if raised else ("success" if a == len(attempts) and passed(r) else None)
                if truth is not None and judged in critic_conversations:
                    critic_errors.append(attempt["verdict"] != truth)
                judged += 1
            if critic_errors:
                tally(k, "critic", any(critic_errors))
    return {str(k): {role: error_cell(*roles[role]) for role in in_role_order(roles)}
            for k, roles in sorted(counts.items())}


def error_cell(n: int, errors: int) -> dict:
    return {"n": n, "errors": errors, "rate": percent(errors, n)}


def by_scenario(records: list[dict]) -> dict[str, dict]:
    """{scenario: {"tasks", "passed", "role_errors": {role: {"n", "errors", "rate"}}}}: TGC's counts per
    scenario, and its sub-task errors (subtask_errors) summed over the sub-task indices: where the roles failed."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[world.scenario_of(r["task_id"])].append(r)
    scenarios = {}
    for scenario, rs in sorted(groups.items()):
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for roles in subtask_errors(rs).values():
            for role, cell in roles.items():
                totals[role][0] += cell["n"]
                totals[role][1] += cell["errors"]
        scenarios[scenario] = {"tasks": len(rs), "passed": sum(passed(r) for r in rs),
                               "role_errors": {role: error_cell(*totals[role]) for role in in_role_order(totals)}}
    return scenarios


def role_costs(records: list[dict]) -> dict[str, dict]:
    """Per role, averaged over tasks: model calls, prompt and new tokens, forward FLOPs (as if nothing were
    cached: what the call needs, whatever the engine held)."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        for call in r["calls"]:
            t = totals[call["role"]]
            t["calls"] += 1
            t["prompt_tokens"] += call["prompt_tokens"]
            t["new_tokens"] += call["new_tokens"]
            t["flops"] += call["flops"]
    n = max(len(records), 1)
    return {role: {f"{k}_per_task": v / n for k, v in totals[role].items()} for role in in_role_order(totals)}


def budget_stops(records: list[dict]) -> dict[str, int]:
    stops: dict[str, int] = defaultdict(int)
    for r in records:
        for stop in r["budget_stops"]:
            stops[stop["budget"]] += 1
    return dict(sorted(stops.items()))


def compute_metrics(records: list[dict], difficulty: dict[str, object], split_task_ids: list[str]) -> dict:
    """Everything the report shows that depends only on the trajectories and the split (so resume and
    sharding cannot change it)."""
    costs = role_costs(records)
    return {**goal_completion(records, split_task_ids),
            "by_difficulty": tgc_by_difficulty(records, difficulty),
            "subtask_errors": subtask_errors(records),
            "by_scenario": by_scenario(records),
            "roles": costs,
            "flops_per_task": sum(c.get("flops_per_task", 0.0) for c in costs.values()),
            "tokens_per_task": sum(c.get("prompt_tokens_per_task", 0.0) + c.get("new_tokens_per_task", 0.0)
                                   for c in costs.values()),
            "budget_stops": budget_stops(records)}


# ----------------------------------------------------------------------------------------------------
# The whole evaluation: claim the folder, roll out this process's share of the unfinished tasks, merge, score.

@dataclass
class EvalConfig:
    split: str = "dev"
    out: str = "results/run"
    name: str | None = None
    root: str | None = None
    workers: int = 4
    max_batch: int = 16
    limit: int | None = None
    scenarios: int | None = None  # only the split's first N scenarios (all their variants)
    stop_after_tasks: int | None = None  # stop after this many finished tasks, as if interrupted
    quiet: bool = False
    overwrite: bool = False  # discard an earlier evaluation in `out` (of this or another system)
    allow_unfinished: bool = False  # evaluate adapters of unfinished training runs (the report says so)
    plain: bool = False  # agents.run_task, one task at a time, instead of rollout.run_rollouts


class StopEvaluation(Exception):
    """Raised after `stop_after_tasks` finished tasks, to stop a run the way a crash would (tests, demos)."""


def evaluate(system: agents.System, budgets: agents.Budgets, cfg: EvalConfig, *, pool=None,
             cluster: Cluster | None = None) -> dict | None:
    """Evaluate (or finish evaluating) `system` on cfg.split into cfg.out; returns the results on rank 0."""
    cluster = cluster or Cluster()
    root = Path(cfg.root or world.world_root()).resolve()
    task_ids = world.select_tasks(cfg.split, root, scenarios=cfg.scenarios, limit=cfg.limit)
    out = Path(cfg.out)
    provenance = systems.adapters_provenance({role: b.adapter_path for role, b in system.roles.items()},
                                             cfg.allow_unfinished)
    identity = result_files.evaluation_identity(system, budgets, cfg.split, root, provenance)
    with result_files.folder_lock(out, cluster):
        result_files.claim_folder(out, identity, cluster, cfg.overwrite)
        done = result_files.finished_records(out)
        barrier(cluster)  # every rank has read the same finished set before anyone appends to it
        todo = [t for t in task_ids if t not in done]
        mine = todo[cluster.rank::cluster.world]
        log = (lambda *a: None) if cfg.quiet or not cluster.is_main else print
        log(f"{cfg.split}: {len(task_ids)} tasks, {len(task_ids) - len(todo)} already evaluated in {out}, "
            f"{len(todo)} to run" + (f" on {cluster.world} processes" if cluster.world > 1 else ""))
        part = result_files.part_path(out, cluster.rank)

        def keep(record: dict, wall_seconds: float) -> None:
            result_files.keep_finished(part, record, wall_seconds)
            finished.append(record["task_id"])
            if not cfg.quiet:
                log(f"  [{len(finished)}/{len(mine)}] {record['task_id']}: {'pass' if passed(record) else 'fail'}")
            if cfg.stop_after_tasks is not None and len(finished) >= cfg.stop_after_tasks:
                raise StopEvaluation(f"stopped after {len(finished)} tasks as asked")

        finished, stats, stopped = [], rollout.RunStats(), None
        try:
            if mine:
                stats = roll_out(mine, system, budgets, cfg, root, keep, pool)
        except StopEvaluation as e:
            stopped = str(e)
        all_stats, machines = gather(cluster, stats), gather(cluster, meter.machine(cluster.device))
        stops = [s for s in gather(cluster, stopped) if s]
        barrier(cluster)
        if not cluster.is_main:
            return None
        if stops:
            raise StopEvaluation(f"{stops[0]}; rerun the same command to resume")
        records, timings = result_files.merge_parts(out, task_ids)
        difficulty = {t: world.task_metadata(t, root=root).get("difficulty") for t in task_ids}
        scored = {"name": cfg.name or out.name, "split": cfg.split, "scenarios": cfg.scenarios, "limit": cfg.limit,
                  "root": str(root), "system": system.describe(budgets), "adapters": provenance,
                  "metrics": compute_metrics(records, difficulty, world.load_split(cfg.split, root=root)),
                  "timing": result_files.timing_summary(records, timings, all_stats, machines),
                  "tasks": result_files.task_rows(records, difficulty, timings)}
        result_files.write_results(out, scored)
        return scored


def roll_out(task_ids: list[str], system: agents.System, budgets: agents.Budgets, cfg: EvalConfig, root: Path,
             keep, pool=None) -> rollout.RunStats:
    """Roll out `task_ids`, calling keep(record, wall seconds from opening the task to its evaluation) as each
    finishes. With cfg.plain: agents.run_task in one world session, task after task (its RunStats counts the
    time outside the model as the world's); else the fast path, rollout.run_rollouts (cfg.workers sessions at
    once, pending model calls batched up to cfg.max_batch). `pool`: a running world.WorldPool to use."""
    if cfg.plain:
        stats, began = rollout.RunStats(), time.perf_counter()
        session = pool.sessions[0] if pool is not None else world.WorldSession(root=root)
        try:
            for task_id in task_ids:
                start = time.perf_counter()
                record = agents.run_task(task_id, system, budgets, session, split=cfg.split)
                stats.tasks += 1
                stats.model_seconds += sum(c["seconds"] for c in record["calls"])
                keep(record, time.perf_counter() - start)
        finally:
            if pool is None:
                session.close()
        stats.seconds = time.perf_counter() - began
        stats.world_seconds = stats.seconds - stats.model_seconds
        return stats
    make = agents.multi_agent_rollout if system.kind == "multi" else agents.single_agent_rollout
    described = system.describe(budgets)
    timings: dict[str, float] = {}

    def timed(task_id: str):
        began = time.perf_counter()
        record = yield from make(task_id, budgets, cfg.split, described)
        timings[task_id] = time.perf_counter() - began
        return record
    return rollout.run_rollouts(task_ids, system, budgets, split=cfg.split, root=root, workers=cfg.workers,
                                max_batch=cfg.max_batch, rollout=timed, pool=pool,
                                on_trajectory=lambda record: keep(record, timings[record["task_id"]]))


# ----------------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a ProST system on a split (TGC, SGC, sub-task errors, FLOPs "
                                "per task). `python evaluate.py pareto results/*/results.json` compares runs.",
                                epilog="Under `torchrun --nproc_per_node N` each process rolls out a shard and "
                                "rank 0 writes the merged results.")
    which = p.add_argument_group("system (one of)")
    which.add_argument("--agents", default=None, help="prost.py output folder with planner/, executor/, critic/ "
                       "adapters (each records its base model)")
    which.add_argument("--single", default=None, help="single-agent adapter folder (e.g. ckpts/single)")
    which.add_argument("--model", default=None, help="base model id or folder that every role runs without "
                       "adapters (the untrained baseline)")
    which.add_argument("--kind", default="multi", choices=("multi", "single"),
                       help="with --model: planner/executor/critic, or the single-agent baseline")
    which.add_argument("--gold", action="store_true", help="replay the mini-world's gold sub-tasks through the "
                       "multi-agent protocol (the protocol's upper bound; no model runs)")
    p.add_argument("--split", default="dev", help="task split (mini-world: train, dev, test; AppWorld: dev, "
                   "test_normal, test_challenge)")
    p.add_argument("--out", default=None, help="output folder (default: results/<name>)")
    p.add_argument("--name", default=None, help="system name in the report and the Pareto table (default: the "
                   "ckpts folder or model name plus the split); end it with -seedN to group seeds")
    p.add_argument("--root", default=None, help="APPWORLD_ROOT of the world (default: $APPWORLD_ROOT, else the "
                   "repo's miniworld/)")
    p.add_argument("--plain", action="store_true", help="every fast path off: agents.py's plain engine over "
                   "model.generate, one task at a time in one world session (the decode flags, --workers and "
                   "--max-batch do not apply)")
    p.add_argument("--workers", type=int, default=4, help="world sessions (worker processes) per process")
    p.add_argument("--max-batch", type=int, default=16, help="most model calls batched into one generate call")
    p.add_argument("--scenarios", type=int, default=None, help="evaluate only the split's first N scenarios "
                   "(all their variants; on the mini-world, dev's first N are the train split's first N)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the split's first N tasks (after "
                   "--scenarios)")
    p.add_argument("--stop-after-tasks", type=int, default=None, help="stop after N finished tasks as if "
                   "interrupted (rerun the same command to resume)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else the CPU), cpu or cuda "
                                                    "(under torchrun: the GPU of LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weight dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--overwrite", action="store_true", help="discard the evaluation already in --out (of this "
                   "or another system) and start from scratch; without it a changed system is refused")
    p.add_argument("--allow-unfinished", action="store_true", help="evaluate adapters whose training run did not "
                   "finish (stopped early or diverged); the report names their epoch")
    rollout.add_decode_flags(p, "deterministic")
    rollout.add_budget_flags(p)
    return p


def summary_line(scored: dict) -> str:
    m, t = scored["metrics"], scored["timing"]
    return (f"{scored['name']}: TGC {m['tgc']:.1f} ({m['passed']}/{m['tasks']}), SGC {m['sgc']:.1f} "
            f"({m['scenarios_passed']}/{m['scenarios']}), {fmt_flops(m['flops_per_task'])} FLOPs/task, "
            f"{fmt_seconds(t['wall_seconds_per_task'])} wall/task")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pareto"]:
        return comparison.pareto_main(argv[1:])
    if argv[:1] == ["compare"]:
        return comparison.compare_main(argv[1:])
    if argv[:1] == ["scenarios"]:
        return comparison.scenarios_main(argv[1:])
    if argv[:1] == ["paired"]:
        return comparison.paired_main(argv[1:])
    args = build_parser().parse_args(argv)
    cluster = None
    try:
        # gloo on any device: evaluation only exchanges small objects; ranks wait at the end for the slowest
        cluster = start_cluster(args.device, backend="gloo", timeout=DIST_TIMEOUT)
        budgets = rollout.budgets_from(args)
        # an unknown split or an empty selection fails before any model loads
        world.select_tasks(args.split, args.root, scenarios=args.scenarios, limit=args.limit)
        spec, label = systems.planned_system(args)
        name = args.name or f"{label}-{args.split}"
        cfg = EvalConfig(split=args.split, out=args.out or str(Path("results") / name), name=name, root=args.root,
                         workers=args.workers, max_batch=args.max_batch, limit=args.limit,
                         scenarios=args.scenarios, stop_after_tasks=args.stop_after_tasks, quiet=args.quiet,
                         overwrite=args.overwrite, allow_unfinished=args.allow_unfinished, plain=args.plain)
        with result_files.folder_lock(Path(cfg.out), cluster):  # a folder in use is refused before any model loads
            scored = evaluate(systems.load_planned(spec, args, str(cluster.device)), budgets, cfg,
                              cluster=cluster)
        if scored is not None:
            out = Path(cfg.out)
            print(summary_line(scored))
            written = (result_files.RESULTS, result_files.REPORT, result_files.TRAJECTORIES)
            print("wrote " + ", ".join(str(out / name) for name in written))
    except StopEvaluation as e:
        print(str(e), file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # OSError: a full disk or a vanished folder mid-run
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if cluster is not None:
            stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    exit_process(main())
