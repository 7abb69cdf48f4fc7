"""Evaluate a ProST system on a split of AppWorld: effectiveness (TGC, SGC) against efficiency (FLOPs per task).

Where this sits: the last stage of the pipeline. prost.py leaves one LoRA adapter per role in `ckpts/<role>/`
(each recording its base model); this file rebuilds the system from those folders, rolls it out greedily on a
split with agents.py's scheduler (many worlds at once, model calls batched), lets AppWorld's own evaluator
judge every task, and turns the trajectories into the paper's measurements:

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
    python evaluate.py pareto results/*/results.json            # TGC vs FLOPs per task, Pareto front
                                                                # (runs must share split, --limit, budgets)
    python evaluate.py compare results/demo/*/*/results.json    # systems x splits: TGC, SGC, FLOPs per task
    torchrun --nproc_per_node 8 evaluate.py --agents ckpts/ --split test_normal

Output folder (default results/<name>/): `trajectories.jsonl` (data.py's format, in split order),
`results.json` (metrics plus per-task rows), `report.md` and `timing.jsonl` (each task's wall time), all
written atomically (store.py). One evaluation writes a folder at a time (a second is refused, naming the
first). `run.json` records what the trajectories depend on: the split's world, each role's base model and
adapter (all three by content, so moved folders still resume), the weight dtype and the budgets; a different
system in the same folder is refused (use a new --out, or --overwrite). Adapters of unfinished training runs
are refused unless --allow-unfinished, and then the report names their epoch. While a run is going,
finished tasks are appended durably to `parts/rank<r>.jsonl`; a rerun with the same system skips them, so an
interrupted evaluation resumes, and since every metric is a function of the trajectories alone, a resumed or a
multi-process run reports exactly what one uninterrupted process would. Only the timing block (wall time,
where the time went) is a measurement of the run itself.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

import agents
import data
import lora
import world
import store
from cluster import Cluster, barrier, exit_process, first_error, gather, start_cluster, stop_cluster
from store import atomic_write

TRAJECTORIES = "trajectories.jsonl"
RESULTS = "results.json"
TIMINGS = "timing.jsonl"  # task id -> wall seconds of its rollout (measured, so kept apart from the trajectories)
REPORT = "report.md"
RUN_FILE = "run.json"  # which system and split the folder holds; a resume must match it
PARTS = "parts"
DIST_TIMEOUT = timedelta(hours=72)  # ranks wait at the final barrier while the slowest shard finishes


# ----------------------------------------------------------------------------------------------------
# Which system to evaluate: rebuilt from trained role folders, a base model, or the gold replay.

@dataclass
class SystemSpec:
    """What to load: the kind, each role's base model, each role's adapter folder (None = the base)."""
    kind: str  # "multi" or "single"
    models: dict[str, str | None]
    adapters: dict[str, str | None]
    label: str  # used in the default output name

    @property
    def roles(self) -> tuple[str, ...]:
        return data.MULTI_AGENT_ROLES if self.kind == "multi" else ("single",)


def role_folders(agents_dir: str | Path) -> dict[str, str]:
    """{role: adapter folder} for planner, executor and critic under `agents_dir` (prost.py's --out)."""
    root = Path(agents_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"agents folder {root} does not exist; train the roles first with "
                                f"`python prost.py --role ROLE --out {root}`")
    found = {role: str(root / role) for role in data.MULTI_AGENT_ROLES if (root / role / lora.ADAPTER_CONFIG).is_file()}
    if not found:
        raise ValueError(f"{root} holds no trained role: expected sub-folders planner/, executor/ and critic/, "
                         f"each with {lora.ADAPTER_CONFIG} (what `python prost.py --out {root}` writes)")
    missing = [role for role in data.MULTI_AGENT_ROLES if role not in found]
    if missing:
        raise ValueError(f"{root} has no adapter for the {', '.join(missing)} (no {lora.ADAPTER_CONFIG} in "
                         f"{', '.join(str(root / r) for r in missing)}); train it with prost.py --role")
    return found


def single_folder(path: str | Path) -> str:
    """The single agent's adapter folder: PATH itself, or PATH/single (a prost.py --out root)."""
    path = Path(path)
    for candidate in (path, path / "single"):
        if (candidate / lora.ADAPTER_CONFIG).is_file():
            return str(candidate)
    if not path.exists():
        raise FileNotFoundError(f"single-agent folder {path} does not exist; train it with "
                                "`python prost.py --role single --out ckpts` (then pass ckpts/single)")
    raise ValueError(f"{path} holds no trained single agent (no {lora.ADAPTER_CONFIG} in it or in {path / 'single'})")


def recorded_base(adapter: str, role: str) -> str:
    try:
        return lora.adapter_base(adapter)
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the {role}'s adapter in {adapter}: {e}") from None


def check_base_found(base: str, role: str, adapter: str | None) -> None:
    """Fail before loading anything when a base model cannot be found (a moved folder, a hub id offline)."""
    import model
    try:
        model.resolve_model_dir(base)
    except (FileNotFoundError, ValueError) as e:
        where = f"the {role}'s adapter {adapter} was trained on base '{base}'" if adapter else \
            f"the {role}'s model '{base}'"
        fix = (f"restore it, or set base_model_name_or_path in {Path(adapter) / lora.ADAPTER_CONFIG} to where it "
               "is now") if adapter else "check the id or folder"
        raise FileNotFoundError(f"{where}, which cannot be found ({e}); {fix}") from None


def system_spec(agents_dir=None, single=None, model_id=None, kind="multi") -> SystemSpec:
    """Decide every role's base and adapter from the command line, and check that all of them exist."""
    if sum(bool(x) for x in (agents_dir, single, model_id)) != 1:
        raise ValueError("give exactly one of --agents CKPTS, --single CKPTS/single, --model ID (or --gold)")
    if agents_dir:
        spec = SystemSpec("multi", {}, role_folders(agents_dir), Path(agents_dir).resolve().name)
    elif single:
        spec = SystemSpec("single", {}, {"single": single_folder(single)}, Path(single).resolve().name)
    else:
        spec = SystemSpec(kind, {}, {}, Path(str(model_id)).name)
    for role in spec.roles:
        adapter = spec.adapters.get(role)
        spec.models[role] = recorded_base(adapter, role) if adapter else model_id
        check_base_found(spec.models[role], role, adapter)
    return spec


def load_system(spec: SystemSpec, device: str, dtype: str, engine: dict | None = None) -> agents.System:
    """Load each distinct base once (roles sharing it switch adapters) with the role adapters on it;
    `engine`: LocalEngine options (agents.engine_options)."""
    return agents.build_system(spec.kind, spec.models, spec.adapters, device, dtype, **(engine or {}))


def gold_system(root=None) -> agents.System:
    """The mini-world's gold sub-tasks replayed through the multi-agent protocol: the upper bound of what
    the protocol can score (no deliberate mistakes, so no recovery detours)."""
    return agents.teacher_system("gold", root=root, recovery_share=0.0)


# ----------------------------------------------------------------------------------------------------
# Processes: under torchrun each rank rolls out its shard (cluster.py); rank 0 merges.

def rank_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


# ----------------------------------------------------------------------------------------------------
# The output folder: lock, identity, finished tasks, durable parts, atomic final files.

def adapter_provenance(folder: str, role: str, allow_unfinished: bool) -> dict:
    """The adapter's content hash and how far the prost.py run that wrote it got. An adapter of an
    unfinished run (stopped early, diverged, or its files changed after the run's last checkpoint) is
    refused unless `allow_unfinished`; a folder without a training record (a PEFT adapter made elsewhere)
    is taken as it is."""
    if not (Path(folder) / lora.ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"the {role}'s adapter folder {folder} has no {lora.ADAPTER_WEIGHTS}")
    sha = store.files_sha256(folder, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS])
    progress = store.read_progress(folder)
    if progress is None:
        return {"sha256": sha, "training": None, "unfinished": None}
    epoch, epochs = progress["epoch"], progress["epochs"]
    unfinished = None
    if progress["adapter_sha256"] != sha:
        unfinished = (f"its files are not those of the run's last checkpoint (epoch {epoch} of {epochs}): a "
                      "checkpoint write was interrupted")
    elif not progress["finished"]:
        unfinished = f"its training run stopped after epoch {epoch} of {epochs}" + (
            f" ({progress['stopped']})" if progress.get("stopped") else "")
    if unfinished and not allow_unfinished:
        raise ValueError(f"the {role}'s adapter {folder} is from an unfinished training run: {unfinished}; finish "
                         "it with `prost.py ... --resume`, or pass --allow-unfinished to evaluate it anyway")
    return {"sha256": sha, "training": {"epoch": epoch, "epochs": epochs}, "unfinished": unfinished}


def adapters_provenance(adapters: dict[str, str | None], allow_unfinished: bool) -> dict[str, dict]:
    return {role: adapter_provenance(folder, role, allow_unfinished) for role, folder in adapters.items() if folder}


def run_identity(system: agents.System, budgets: agents.Budgets, split: str, root: Path,
                 provenance: dict[str, dict]) -> dict:
    """What a folder's trajectories depend on: the split's world (by content, `world.split_fingerprint`), the
    system (each role's base model by content fingerprint, or by name for a model served elsewhere; its adapter
    by content hash; the weight dtype) and the budgets. A resume with anything else would mix two systems; where
    the world, models and adapters were is recorded, not compared, so a moved folder resumes. The decode mode is
    included too: batched decoding and prompt-lookup drafts can flip a near-tie, deterministic decoding cannot;
    so is how adapters run (merged into the weights or mixed in one batch, `agents.LocalEngine`: the same
    function, rounded differently). Not included: --scenarios and --limit (a task's trajectory does not depend
    on them; results.json records them), --workers / --max-batch and the prefix cache's size."""
    import model
    loaded = {role: b.engine for role, b in system.roles.items() if hasattr(b.engine, "base")}
    fingerprints = {e.name: model.fingerprint(e.name) for e in loaded.values()}  # once per shared base
    described = system.describe(budgets)
    return {"split": split, "world": world.split_fingerprint(split, root),
            "system": {k: v for k, v in described.items() if k != "roles"},
            "models": {role: fingerprints[b.engine.name] if role in loaded else b.engine.name
                       for role, b in system.roles.items()},
            "adapters": {role: p["sha256"] for role, p in provenance.items()},
            "dtype": {role: str(next(e.base.parameters()).dtype).removeprefix("torch.")
                      for role, e in loaded.items()},
            "decode": {role: {"deterministic": e.deterministic, "prompt_lookup": e.prompt_lookup,
                              "adapters": "mixed" if e.mixes_adapters else "merged"} for role, e in loaded.items()},
            store.PATHS: {"root": str(root), "roles": described["roles"]}}


def folder_lock(out: Path, cluster: Cluster):
    """OUT checked and locked by rank 0 for the whole run (re-entrant); every rank fails if it cannot be."""
    return store.exclusive_output(out, is_main=cluster.is_main,
                                  first_error=lambda e: first_error(cluster, e))


OUTPUTS = (TRAJECTORIES, RESULTS, REPORT, TIMINGS, RUN_FILE)


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


def part_paths(out: Path) -> list[Path]:
    return sorted((out / PARTS).glob("rank*.jsonl")) if (out / PARTS).is_dir() else []


def timing_path(part: Path) -> Path:
    return part.with_name(f"timing-{part.stem}.jsonl")


def finished_records(out: Path) -> dict[str, dict]:
    """task id -> trajectory, from the merged file and every rank's part (first occurrence wins)."""
    records: dict[str, dict] = {}
    for path in [out / TRAJECTORIES, *part_paths(out)]:
        if path.is_file():
            for record in data.read_trajectories(path):
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


# ----------------------------------------------------------------------------------------------------
# Rolling out one rank's shard.

class StopEvaluation(Exception):
    """Raised after `stop_after` finished tasks, to stop a run the way a crash would (tests, demos)."""


def timed_rollouts(make_rollout, timings: dict[str, float]):
    """Wrap each rollout generator to measure its wall time from opening the task to its evaluation."""
    def rollout(task_id):
        began = time.perf_counter()
        record = yield from make_rollout(task_id)
        timings[task_id] = time.perf_counter() - began
        return record
    return rollout


def roll_out_shard(task_ids: list[str], system: agents.System, budgets: agents.Budgets, split: str, root: Path,
                   part: Path, *, workers: int, max_batch: int, pool=None, stop_after: int | None = None,
                   progress=None) -> agents.RunStats:
    """Roll out `task_ids`, appending each finished trajectory to `part` (its wall time to the timing file
    first, so every recorded trajectory has one)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    described = system.describe(budgets)
    make = agents.multi_agent_rollout if system.kind == "multi" else agents.single_agent_rollout
    timings: dict[str, float] = {}
    finished = []

    def keep(record: dict) -> None:
        task_id = record["task_id"]
        store.append_lines(timing_path(part), [{"task_id": task_id, "wall_seconds": round(timings[task_id], 4)}])
        data.write_trajectory(part, record)
        finished.append(task_id)
        if progress:
            progress(len(finished), len(task_ids), record)
        if stop_after is not None and len(finished) >= stop_after:
            raise StopEvaluation(f"stopped after {len(finished)} tasks as asked")

    if not task_ids:
        return agents.RunStats()
    rollout = timed_rollouts(lambda t: make(t, budgets, split, described), timings)
    return agents.run_rollouts(task_ids, system, budgets, split=split, root=root, workers=workers,
                               max_batch=max_batch, on_trajectory=keep, rollout=rollout, pool=pool)


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


def in_role_order(roles) -> list[str]:
    """Roles in protocol order (planner, executor, critic, single), whatever order they were found in."""
    return sorted(roles, key=lambda r: data.ROLES.index(r) if r in data.ROLES else len(data.ROLES))


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
            "roles": costs,
            "flops_per_task": sum(c.get("flops_per_task", 0.0) for c in costs.values()),
            "tokens_per_task": sum(c.get("prompt_tokens_per_task", 0.0) + c.get("new_tokens_per_task", 0.0)
                                   for c in costs.values()),
            "budget_stops": budget_stops(records)}


def task_rows(records: list[dict], difficulty: dict[str, object], timings: dict[str, float]) -> list[dict]:
    return [{"task_id": r["task_id"], "success": passed(r), "difficulty": difficulty.get(r["task_id"]),
             "subtasks": len(r["subtasks"]), "calls": len(r["calls"]), "executions": len(r["executions"]),
             "flops": sum(c["flops"] for c in r["calls"]),
             "tests": f"{len(r['evaluation']['passes'])}/{r['evaluation']['num_tests']}" if r["evaluation"] else None,
             "wall_seconds": timings.get(r["task_id"])} for r in records]


def timing_summary(records: list[dict], timings: dict[str, float], stats: list[agents.RunStats]) -> dict:
    """Measured, not derived: wall time per task (each rollout from open to evaluation, averaged), model time
    per task (each call's share of its batch), FLOPs per task actually computed (the prompt tokens the prefix
    cache supplied left out: this depends on which calls the engine served before, so it is a measurement of
    the run, not a metric of the system), and where this invocation's wall time went."""
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
                         "processes": len(stats)}}


# ----------------------------------------------------------------------------------------------------
# The whole evaluation.

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
    stop_after: int | None = None  # stop after this many finished tasks, as if interrupted
    quiet: bool = False
    overwrite: bool = False  # discard an earlier evaluation in `out` (of this or another system)
    allow_unfinished: bool = False  # evaluate adapters of unfinished training runs (the report says so)


def evaluate(system: agents.System, budgets: agents.Budgets, cfg: EvalConfig, *, pool=None,
             cluster: Cluster | None = None) -> dict | None:
    """Evaluate (or finish evaluating) `system` on cfg.split into cfg.out; returns results on rank 0."""
    cluster = cluster or Cluster()
    root = Path(cfg.root or world.world_root()).resolve()
    task_ids = world.select_tasks(cfg.split, root, scenarios=cfg.scenarios, limit=cfg.limit)
    out = Path(cfg.out)
    adapters = {role: b.adapter_path for role, b in system.roles.items()}
    provenance = adapters_provenance(adapters, cfg.allow_unfinished)
    identity = run_identity(system, budgets, cfg.split, root, provenance)
    with folder_lock(out, cluster):
        claim_folder(out, identity, cluster, cfg.overwrite)
        done = finished_records(out)
        barrier(cluster)  # every rank has read the same finished set before anyone appends to it
        todo = [t for t in task_ids if t not in done]
        mine = todo[cluster.rank::cluster.world]
        log = (lambda *a: None) if cfg.quiet or not cluster.is_main else print
        log(f"{cfg.split}: {len(task_ids)} tasks, {len(task_ids) - len(todo)} already evaluated in {out}, "
            f"{len(todo)} to run" + (f" on {cluster.world} processes" if cluster.world > 1 else ""))
        progress = None if cfg.quiet else (lambda i, n, r: log(
            f"  [{i}/{n}] {r['task_id']}: {'pass' if passed(r) else 'fail'}"))
        stats, stopped = agents.RunStats(), None
        try:
            stats = roll_out_shard(mine, system, budgets, cfg.split, root, out / PARTS / f"rank{cluster.rank}.jsonl",
                                   workers=cfg.workers, max_batch=cfg.max_batch, pool=pool, stop_after=cfg.stop_after,
                                   progress=progress)
        except StopEvaluation as e:
            stopped = str(e)
        all_stats = gather(cluster, stats)
        stops = [s for s in gather(cluster, stopped) if s]
        barrier(cluster)
        if not cluster.is_main:
            return None
        if stops:
            raise StopEvaluation(f"{stops[0]}; rerun the same command to resume")
        return finish(out, task_ids, cfg, system.describe(budgets), all_stats, root, provenance)


def finish(out: Path, task_ids: list[str], cfg: EvalConfig, system: dict, stats: list, root: Path,
           provenance: dict[str, dict]) -> dict:
    """Merge the parts into trajectories.jsonl (split order), compute the metrics, write results and report."""
    found = finished_records(out)
    missing = [t for t in task_ids if t not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks have no trajectory after the run (first: {missing[0]})")
    records = [found[t] for t in task_ids]
    chosen = set(task_ids)
    extra = [r for t, r in found.items() if t not in chosen]  # from an earlier run with a larger --limit
    merged = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records + extra)
    timings = finished_timings(out)
    atomic_write(out / TRAJECTORIES, merged)
    atomic_write(out / TIMINGS, "".join(json.dumps({"task_id": t, "wall_seconds": s}) + "\n"
                                                for t, s in timings.items()))
    for part in part_paths(out):  # now in the merged files
        timing_path(part).unlink(missing_ok=True)
        part.unlink()
    if (out / PARTS).is_dir() and not any((out / PARTS).iterdir()):
        (out / PARTS).rmdir()
    difficulty = {t: world.task_metadata(t, root=root).get("difficulty") for t in task_ids}
    results = {"name": cfg.name or out.name, "split": cfg.split, "scenarios": cfg.scenarios, "limit": cfg.limit,
               "root": str(root), "system": system, "adapters": provenance,
               "metrics": compute_metrics(records, difficulty, world.load_split(cfg.split, root=root)),
               "timing": timing_summary(records, timings, stats),
               "tasks": task_rows(records, difficulty, timings)}
    atomic_write(out / RESULTS, json.dumps(results, indent=2) + "\n")
    atomic_write(out / REPORT, markdown_report(results))
    return results


# ----------------------------------------------------------------------------------------------------
# The Markdown report.

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
              "without the prompt tokens whose keys and values came from the prefix cache; a measurement, like "
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
                  f"process(es); model {run['model_seconds']:.1f} s, world sessions {run['world_seconds']:.1f} s "
                  "(summed over sessions)."]
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


# ----------------------------------------------------------------------------------------------------
# Pareto analysis over several results.json files.

SEED_SUFFIX = re.compile(r"[-_](?:seed|s)\d+$")


def system_name(results: dict) -> str:
    """Runs that differ only by a seed suffix (-seed1, -s2) are seeds of one system."""
    return SEED_SUFFIX.sub("", results["name"])


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


def pareto_rows(results: list[dict]) -> list[ParetoRow]:
    """One row per system (mean and standard deviation over its seeds), sorted by FLOPs per task."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
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


def plot_pareto(rows: list[ParetoRow], path: Path) -> bool:
    """TGC against FLOPs per task with the front drawn; False when matplotlib is not installed."""
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


def load_results(paths: list[str]) -> list[dict]:
    if not paths:
        raise ValueError("give at least one results.json")
    results = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist (evaluate.py writes OUT/{RESULTS})")
        try:
            r = json.loads(path.read_text())
            r["metrics"]["tgc"], r["metrics"]["sgc"], r["metrics"]["flops_per_task"], r["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} is not an evaluate.py results.json") from None
        results.append(r)
    return results


# What must be equal for two runs to share a Pareto table: the tasks they were scored on and the budgets they
# ran under (a larger --max-new-tokens buys TGC with FLOPs; that is a different operating point, not a
# better system).
COMPARED = {"split": lambda r: r.get("split"), "scenarios": lambda r: r.get("scenarios"),
            "limit": lambda r: r.get("limit"),
            "budgets": lambda r: (r.get("system") or {}).get("budgets"),
            "tasks": lambda r: [t["task_id"] for t in r["tasks"]] if "tasks" in r else None}


def check_comparable(results: list[dict], paths: list[str]) -> None:
    """Refuse runs with different splits, limits, budgets or task lists, naming the first field that differs."""
    for field, value in COMPARED.items():
        first = value(results[0])
        for r, path in zip(results[1:], paths[1:]):
            if value(r) != first:
                what = "the task ids" if field == "tasks" else f"{json.dumps(first)} vs {json.dumps(value(r))}"
                raise ValueError(f"{paths[0]} and {path} differ in {field} ({what}); a Pareto table compares "
                                 "systems on the same split, --scenarios, --limit and budgets")


def pareto_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py pareto", description="TGC vs FLOPs per task over several "
                                "evaluations, Pareto-optimal systems marked; seeds of one system (names ending "
                                "in -seedN or -sN) are averaged.")
    p.add_argument("results", nargs="*", help="results.json files written by evaluate.py")
    p.add_argument("--plot", default=None, help="where to write the plot when matplotlib is installed "
                   "(default: pareto.png beside the first results folder)")
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        check_comparable(results, args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = pareto_rows(results)
    print(pareto_table(rows), end="")
    plot = Path(args.plot) if args.plot else Path(args.results[0]).resolve().parent.parent / "pareto.png"
    if plot_pareto(rows, plot):
        print(f"plot: {plot}")
    return 0


def compare_table(results: list[dict]) -> str:
    """One row per system name, one group of columns per split (in the order first seen): the demo's
    zero-shot vs trained vs gold table. Runs of one split must be comparable (check_comparable)."""
    splits = list(dict.fromkeys(r["split"] for r in results))
    systems = list(dict.fromkeys(r["name"] for r in results))
    cells: dict[tuple[str, str], dict] = {}
    for r in results:
        if (r["name"], r["split"]) in cells:
            raise ValueError(f"two runs named {r['name']!r} on split {r['split']!r}; give each system one run")
        cells[r["name"], r["split"]] = r
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


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py compare", description="TGC, SGC and FLOPs per task of "
                                "several systems on several splits in one table (a row per --name, a column "
                                "group per split).")
    p.add_argument("results", nargs="*", help="results.json files written by evaluate.py")
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
        for split in dict.fromkeys(r["split"] for r in results):
            same = [(r, path) for r, path in zip(results, args.results) if r["split"] == split]
            check_comparable([r for r, _ in same], [path for _, path in same])
        print(compare_table(results), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
    p.add_argument("--workers", type=int, default=4, help="world sessions (worker processes) per process")
    p.add_argument("--max-batch", type=int, default=16, help="most model calls batched into one generate call")
    p.add_argument("--scenarios", type=int, default=None, help="evaluate only the split's first N scenarios "
                   "(all their variants; on the mini-world, dev's first N are the train split's first N)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the split's first N tasks (after "
                   "--scenarios)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N finished tasks as if interrupted "
                   "(rerun the same command to resume)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else the CPU), cpu or cuda "
                                                    "(under torchrun: the GPU of LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weight dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--overwrite", action="store_true", help="discard the evaluation already in --out (of this "
                   "or another system) and start from scratch; without it a changed system is refused")
    p.add_argument("--allow-unfinished", action="store_true", help="evaluate adapters whose training run did not "
                   "finish (stopped early or diverged); the report names their epoch")
    agents.add_decode_flags(p, "deterministic")
    defaults = agents.Budgets()
    for f in fields(agents.Budgets):
        p.add_argument(f"--max-{f.name.replace('_', '-')}", dest=f.name, type=int, default=getattr(defaults, f.name),
                       help=f"budget: {agents.BUDGET_HELP[f.name]} (default {getattr(defaults, f.name)})")
    return p


def planned_system(args) -> tuple[SystemSpec | None, str]:
    """(what to load, its default name), checked but not loaded yet (None: the gold replay). An adapter of
    an unfinished training run is refused here, before any model loads."""
    if args.gold:
        if args.agents or args.single or args.model:
            raise ValueError("give exactly one of --agents CKPTS, --single CKPTS/single, --model ID or --gold")
        return None, "gold"
    spec = system_spec(args.agents, args.single, args.model, args.kind)
    adapters_provenance(spec.adapters, args.allow_unfinished)
    return spec, spec.label


def load_planned(spec: SystemSpec | None, args, device: str) -> agents.System:
    if spec is None:
        return gold_system(args.root)
    return load_system(spec, device, rank_dtype(args.dtype, device), agents.engine_options(args))


def summary_line(results: dict) -> str:
    m, t = results["metrics"], results["timing"]
    return (f"{results['name']}: TGC {m['tgc']:.1f} ({m['passed']}/{m['tasks']}), SGC {m['sgc']:.1f} "
            f"({m['scenarios_passed']}/{m['scenarios']}), {fmt_flops(m['flops_per_task'])} FLOPs/task, "
            f"{fmt_seconds(t['wall_seconds_per_task'])} wall/task")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pareto"]:
        return pareto_main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    cluster = None
    try:
        # gloo on any device: evaluation only exchanges small objects; ranks wait at the end for the slowest
        cluster = start_cluster(args.device, backend="gloo", timeout=DIST_TIMEOUT)
        budgets = agents.budgets_from(args)
        # an unknown split or an empty selection fails before any model loads
        world.select_tasks(args.split, args.root, scenarios=args.scenarios, limit=args.limit)
        spec, label = planned_system(args)
        name = args.name or f"{label}-{args.split}"
        cfg = EvalConfig(split=args.split, out=args.out or str(Path("results") / name), name=name, root=args.root,
                         workers=args.workers, max_batch=args.max_batch, limit=args.limit,
                         scenarios=args.scenarios, stop_after=args.stop_after, quiet=args.quiet,
                         overwrite=args.overwrite, allow_unfinished=args.allow_unfinished)
        with folder_lock(Path(cfg.out), cluster):  # a folder in use is refused before any model loads
            results = evaluate(load_planned(spec, args, str(cluster.device)), budgets, cfg, cluster=cluster)
        if results is not None:
            print(summary_line(results))
            print(f"wrote {Path(cfg.out) / RESULTS}, {Path(cfg.out) / REPORT}, {Path(cfg.out) / TRAJECTORIES}")
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
