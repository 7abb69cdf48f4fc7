"""trajectories.py: the trajectory record format (schema version 2), checked, and the files that hold it.

Where this sits in ProST: agents.py records one trajectory record per task (the roles' calls with the messages
each saw, the executions, the sub-tasks with their critic verdicts, the evaluation); rollout.py appends them to
JSONL files with `write_trajectories`; data.py reads them back with `read_trajectories` and cuts them into
training examples; evaluate.py scores them. Every record is checked by `validate_trajectory` on the way in and
on the way out, so a malformed record fails where it is made or read, naming its first problem. A leaf: it
imports no other prost file but store.py (durable appends).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from store import append_lines, parse_line

SCHEMA_VERSION = 2  # 2: calls carry their own training-target flag ("train")
ROLES = ("planner", "executor", "critic", "single")
MULTI_AGENT_ROLES = ("planner", "executor", "critic")
MESSAGE_ROLES = ("system", "user", "assistant")

# ----------------------------------------------------------------------------------------------------
# The trajectory format: field kinds per object, checked by validate_trajectory.

TRAJECTORY_FIELDS = {"schema": "int", "task_id": "str", "split": "str", "system": "dict",
                     "instruction": "str", "calls": "list", "executions": "list", "subtasks": "list",
                     "evaluation": "dict|null", "budget_stops": "list"}
SYSTEM_FIELDS = {"kind": "str", "teacher": "str|null", "roles": "dict", "budgets": "dict"}
ROLE_MODEL_FIELDS = {"model": "str", "adapter": "str|null"}
CALL_FIELDS = {"role": "str", "conversation": "int", "subtask": "int", "messages": "list", "output": "str",
               "prompt_tokens": "int", "new_tokens": "int", "flops": "number", "seconds": "number",
               "train": "bool"}
# Fields of a call that measure the engine that served it rather than the rollout (wall time, and what the
# prompt cache happened to hold): two runs that record the same trajectory may differ in these.
MEASURED_CALL_FIELDS = ("seconds", "cached_tokens", "flops_computed")
MESSAGE_FIELDS = {"role": "str", "content": "str"}
EXECUTION_FIELDS = {"subtask": "int", "attempt": "int", "code": "str", "output": "str", "error": "bool"}
SUBTASK_FIELDS = {"index": "int", "text": "str", "attempts": "list"}
ATTEMPT_FIELDS = {"report": "str", "verdict": "str", "reason": "str"}
EVALUATION_FIELDS = {"success": "bool", "passes": "list", "failures": "list", "num_tests": "int"}
BUDGET_STOP_FIELDS = {"budget": "str", "subtask": "int"}


def _is_kind(value, kind: str) -> bool:
    """bool is a subclass of int in Python; a JSON `true` must not pass as a count."""
    if kind.endswith("|null"):
        return value is None or _is_kind(value, kind[:-5])
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"str": str, "bool": bool, "list": list, "dict": dict}[kind])


def _check_fields(obj, fields: dict[str, str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for name, kind in fields.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field '{name}'")
        if not _is_kind(obj[name], kind):
            raise ValueError(f"{where}.{name}: expected {kind}, got {json.dumps(obj[name])[:60]}")


def _check_role(role: str, allowed: tuple[str, ...], where: str) -> None:
    if role not in allowed:
        raise ValueError(f"{where}: unknown role '{role}' (expected one of {', '.join(allowed)})")


def _check_message(message, where: str) -> None:
    _check_fields(message, MESSAGE_FIELDS, where)
    _check_role(message["role"], MESSAGE_ROLES, f"{where}.role")
    if "train" in message:
        raise ValueError(f"{where}.train: training-target flags belong to calls (calls[i].train), not to "
                         "messages")


def _check_call(call, index: int, allowed_roles: tuple[str, ...]) -> None:
    where = f"calls[{index}]"
    _check_fields(call, CALL_FIELDS, where)
    _check_role(call["role"], allowed_roles, f"{where}.role")
    if call["subtask"] < 1:
        raise ValueError(f"{where}.subtask: sub-task indices are 1-based, got {call['subtask']}")
    for m, message in enumerate(call["messages"]):
        _check_message(message, f"{where}.messages[{m}]")


def group_conversations(calls: list[dict]) -> dict[tuple[str, int], list[int]]:
    """(role, conversation id) -> indices of its calls in recording order."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault((call["role"], call["conversation"]), []).append(i)
    return groups


def _check_conversation(calls: list[dict], key: tuple[str, int], members: list[int]) -> None:
    """Each call must carry every earlier output of its conversation as its assistant turns, in order:
    this is what lets build_examples map assistant turns back to the sub-task that produced them."""
    role, conv = key
    for j, i in enumerate(members):
        where = f"calls[{i}] ({role} conversation {conv})"
        assistant = [m["content"] for m in calls[i]["messages"] if m["role"] == "assistant"]
        if len(assistant) != j:
            raise ValueError(f"{where}: has {len(assistant)} assistant turns but is call {j + 1} of its "
                             f"conversation (expected {j}: assistant turns are never dropped)")
        for turn, (content, earlier) in enumerate(zip(assistant, members)):
            if content != calls[earlier]["output"]:
                raise ValueError(f"{where}: assistant turn {turn + 1} differs from the output of "
                                 f"calls[{earlier}] (assistant turns must repeat earlier outputs verbatim)")
        if j and calls[i]["subtask"] < calls[members[j - 1]]["subtask"]:
            raise ValueError(f"{where}: sub-task {calls[i]['subtask']} after sub-task "
                             f"{calls[members[j - 1]]['subtask']} (sub-tasks never go back)")


def validate_trajectory(record) -> None:
    """Raise ValueError naming the first problem in a trajectory record (schema version 2)."""
    _check_fields(record, {"schema": "int"}, "record")
    if record["schema"] != SCHEMA_VERSION:
        raise ValueError(f"schema: unsupported version {record['schema']} (this trajectories.py reads version "
                         f"{SCHEMA_VERSION}); collect the trajectories again with rollout.py collect")
    _check_fields(record, TRAJECTORY_FIELDS, "record")
    system = record["system"]
    _check_fields(system, SYSTEM_FIELDS, "system")
    if system["kind"] not in ("multi", "single"):
        raise ValueError(f"system.kind: expected 'multi' or 'single', got '{system['kind']}'")
    allowed = MULTI_AGENT_ROLES if system["kind"] == "multi" else ("single",)
    for role, spec in system["roles"].items():
        _check_role(role, allowed, f"system.roles.{role}")
        _check_fields(spec, ROLE_MODEL_FIELDS, f"system.roles.{role}")
    for i, call in enumerate(record["calls"]):
        _check_call(call, i, allowed)
    for key, members in group_conversations(record["calls"]).items():
        _check_conversation(record["calls"], key, members)
    for i, execution in enumerate(record["executions"]):
        _check_fields(execution, EXECUTION_FIELDS, f"executions[{i}]")
    for i, subtask in enumerate(record["subtasks"]):
        _check_fields(subtask, SUBTASK_FIELDS, f"subtasks[{i}]")
        for a, attempt in enumerate(subtask["attempts"]):
            _check_fields(attempt, ATTEMPT_FIELDS, f"subtasks[{i}].attempts[{a}]")
            if attempt["verdict"] not in ("success", "failure"):
                raise ValueError(f"subtasks[{i}].attempts[{a}].verdict: expected 'success' or 'failure', "
                                 f"got '{attempt['verdict']}'")
    if record["evaluation"] is not None:
        _check_fields(record["evaluation"], EVALUATION_FIELDS, "evaluation")
    for i, stop in enumerate(record["budget_stops"]):
        _check_fields(stop, BUDGET_STOP_FIELDS, f"budget_stops[{i}]")


# ----------------------------------------------------------------------------------------------------
# Reading and appending trajectory files.

def write_trajectory(path: str | Path, record: dict) -> None:
    """Validate a record and append it as one line, durably (see write_trajectories)."""
    write_trajectories(path, [record])


def write_trajectories(path: str | Path, records: list[dict]) -> None:
    """Validate records and append them in one durable write (store.append_lines: flush + fsync, a torn
    last line left by an earlier crash repaired first), so a crashed collection can resume."""
    for record in records:
        try:
            validate_trajectory(record)
        except ValueError as e:
            raise ValueError(f"trajectory for task {record.get('task_id', '?')!r} is malformed: {e}") from None
    append_lines(path, records)


def read_trajectories(path: str | Path) -> list[dict]:
    """All validated records of a trajectory file. A malformed line raises
    ValueError("<file>:<line>: <what is wrong>"); a torn last line (no newline, not JSON) left by an
    interrupted write is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trajectory file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read trajectory file {path}: {e}") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_line(line)
        is_torn_tail = number == len(lines) and not text.endswith("\n")
        if record is None and is_torn_tail:
            print(f"{path}:{number}: skipping a torn last line (an interrupted write)", file=sys.stderr)
            continue
        if record is None:
            raise ValueError(f"{path}:{number}: not valid JSON")
        try:
            validate_trajectory(record)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        records.append(record)
    return records


def completed_task_ids(path: str | Path) -> set[str]:
    """Task ids already in a trajectory file (empty if it does not exist): what a resumed collection
    skips."""
    if not Path(path).exists():
        return set()
    return {record["task_id"] for record in read_trajectories(path)}
