"""Trajectories in, training examples out: the data side of ProST.

Where this sits: agents.py records teacher trajectories (one JSON line per task) with the writer below;
prost.py turns them into per-role, per-sub-task training examples with this file, orders them with the
progressive sub-task schedule, and batches them. The pipeline is

    trajectory lines --read_trajectories--> records --build_examples--> Examples (ids + loss mask)
        --epoch_example_indices (the curriculum)--> plan_batches --> collate --> (ids, mask) tensors

The trajectory format (schema version 1) is owned here and documented in `validate_trajectory`.
Sub-task indices are 1-based; the planner's "task finished" decision carries index K + 1.

How an example is cut from a trajectory. A *conversation* is the calls sharing (role, conversation id);
each call sees the previous call's messages, that call's output as an assistant turn, and new user turns,
so the i-th assistant turn of any call is the output of the conversation's i-th call. The example for
(role, conversation, k) is the last call of that conversation with sub-task k, rendered as its messages
plus its output; the targets (mask = 1) are the assistant turns produced by that conversation's calls
with sub-task k, except turns the teacher marked `"train": false` (deliberate mistakes shown so a role
learns to recover, never to imitate). The mask itself comes from `Tokenizer.chat` while rendering.

The curriculum (the paper's progressive sub-task training): with K the largest sub-task index, epoch e
(1-based) trains on the examples with sub-task index <= s(e) = min(K, e * step); `full` trains on all of
them every epoch (standard SFT, the ablation baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SCHEMA_VERSION = 1
ROLES = ("planner", "executor", "critic", "single")
MULTI_AGENT_ROLES = ("planner", "executor", "critic")
MESSAGE_ROLES = ("system", "user", "assistant")
SCHEDULES = ("progressive", "full")

# ----------------------------------------------------------------------------------------------------
# The trajectory format: field kinds per object, checked by validate_trajectory.

TRAJECTORY_FIELDS = {"schema": "int", "task_id": "str", "split": "str", "system": "dict",
                     "instruction": "str", "calls": "list", "executions": "list", "subtasks": "list",
                     "evaluation": "dict|null", "budget_stops": "list"}
SYSTEM_FIELDS = {"kind": "str", "teacher": "str|null", "roles": "dict", "budgets": "dict"}
ROLE_MODEL_FIELDS = {"model": "str", "adapter": "str|null"}
CALL_FIELDS = {"role": "str", "conversation": "int", "subtask": "int", "messages": "list", "output": "str",
               "prompt_tokens": "int", "new_tokens": "int", "flops": "number", "seconds": "number"}
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
        if not isinstance(message["train"], bool):
            raise ValueError(f"{where}.train: expected bool, got {json.dumps(message['train'])}")
        if message["role"] != "assistant":
            raise ValueError(f"{where}.train: only assistant turns can be marked (this is a "
                             f"{message['role']} turn)")


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
    """Raise ValueError naming the first problem in a trajectory record (schema version 1)."""
    _check_fields(record, {"schema": "int"}, "record")
    if record["schema"] != SCHEMA_VERSION:
        raise ValueError(f"schema: unsupported version {record['schema']} (this data.py reads version "
                         f"{SCHEMA_VERSION})")
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

def _parse_line(line: str):
    """The JSON object on a line, or None if the line is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def repair_torn_tail(path: str | Path) -> int:
    """Make the file end on a complete line before appending; return the bytes dropped.

    A crash in the middle of a write leaves a last line without its newline. If that tail still parses
    as a JSON object it was complete and only gets its newline back; otherwise it is cut off.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        start = data.rfind(b"\n") + 1  # 0 when the torn line is the only one
        tail = data[start:]
        if isinstance(_parse_line(tail.decode("utf-8", errors="replace")), dict):
            f.write(b"\n")
            dropped = 0
        else:
            f.truncate(start)
            dropped = len(tail)
        f.flush()
        os.fsync(f.fileno())
    return dropped


def write_trajectory(path: str | Path, record: dict) -> None:
    """Validate a record and append it as one line, durably (flush + fsync) so a crashed collection can
    resume: a torn last line left by an earlier crash is repaired first."""
    try:
        validate_trajectory(record)
    except ValueError as e:
        raise ValueError(f"trajectory for task {record.get('task_id', '?')!r} is malformed: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dropped = repair_torn_tail(path)
    if dropped:
        print(f"{path}: dropped a torn last line ({dropped} bytes) left by an interrupted write",
              file=sys.stderr)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)  # one write of a whole line: a crash can only tear the end of the file
        f.flush()
        os.fsync(f.fileno())


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
        record = _parse_line(line)
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


# ----------------------------------------------------------------------------------------------------
# Per-role, per-sub-task examples.

@dataclass
class Example:
    """One training sequence: a role's conversation as it stood after sub-task k, with its loss mask."""
    task_id: str
    role: str
    conversation: int
    subtask: int
    ids: list[int]
    mask: list[int]  # 1 where the token is a target (the role's own output for sub-task k)
    carries: int = 1  # schedule examples whose targets this sequence holds (> 1 after share_prefixes)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)

    @property
    def name(self) -> str:
        return f"{self.task_id} {self.role} conversation {self.conversation} sub-task {self.subtask}"


@dataclass
class BuildReport:
    """What build_examples had to change, so nothing is altered silently."""
    max_seq_len: int
    truncated: list[tuple[str, int]] = field(default_factory=list)  # (example name, original length)
    lost_targets: list[tuple[str, int]] = field(default_factory=list)  # (example name, target tokens lost)

    def lines(self) -> list[str]:
        out = []
        if self.truncated:
            longest = max(n for _, n in self.truncated)
            shown = "; ".join(f"{name} ({n} tokens)" for name, n in self.truncated[:3])
            out.append(f"{len(self.truncated)} example(s) longer than max_seq_len {self.max_seq_len} "
                       f"(longest {longest} tokens) were truncated from the left of their context: {shown}"
                       + (" ..." if len(self.truncated) > 3 else ""))
        for name, lost in self.lost_targets:
            out.append(f"{name}: its targets alone exceed max_seq_len {self.max_seq_len}; kept the "
                       f"rightmost {self.max_seq_len} tokens, losing {lost} target tokens")
        return out


def example_messages(calls: list[dict], members: list[int], subtask: int) -> list[dict] | None:
    """The messages of the (role, conversation, sub-task) example, with `"train": False` on every
    assistant turn that is not a target; None if the conversation has no call for that sub-task."""
    produced_here = [j for j, i in enumerate(members) if calls[i]["subtask"] == subtask]
    if not produced_here:
        return None
    last = members[produced_here[-1]]
    messages = [dict(m) for m in calls[last]["messages"]] + [
        {"role": "assistant", "content": calls[last]["output"]}]
    turn = 0  # assistant turn t is the output of the conversation's t-th call
    for message in messages:
        if message["role"] != "assistant":
            continue
        if turn in produced_here and message.get("train", True):
            message.pop("train", None)
        else:
            message["train"] = False
        turn += 1
    return messages


def truncate_left(ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int], int]:
    """Keep the rightmost max_len tokens; return (ids, mask, target tokens lost).

    Targets sit at the end of the conversation, so cutting from the left removes context first. The
    first kept token has nothing before it to predict it from, so it cannot be a target."""
    if len(ids) <= max_len:
        return ids, mask, 0
    ids, kept_mask = ids[-max_len:], list(mask[-max_len:])
    kept_mask[0] = 0
    return ids, kept_mask, sum(mask) - sum(kept_mask)


def build_examples(records: list[dict], role: str, tokenizer, max_seq_len: int
                   ) -> tuple[list[Example], BuildReport]:
    """Every (conversation, sub-task) example of `role` in the records, rendered with its loss mask."""
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}' (expected one of {', '.join(ROLES)})")
    examples, report = [], BuildReport(max_seq_len)
    for record in records:
        calls = record["calls"]
        for (call_role, conv), members in group_conversations(calls).items():
            if call_role != role:
                continue
            for subtask in sorted({calls[i]["subtask"] for i in members}):
                messages = example_messages(calls, members, subtask)
                ids, mask = tokenizer.chat(messages)
                example = Example(record["task_id"], role, conv, subtask, list(ids), [int(m) for m in mask])
                if example.n_tokens > max_seq_len:
                    report.truncated.append((example.name, example.n_tokens))
                    example.ids, example.mask, lost = truncate_left(example.ids, example.mask, max_seq_len)
                    if lost:
                        report.lost_targets.append((example.name, lost))
                examples.append(example)
    return examples, report


def format_example(tokenizer, example: Example, color: bool = False) -> str:
    """The decoded example with its targets highlighted: green when `color`, else between ⟦ and ⟧."""
    pieces, start = [], 0
    for i in range(1, len(example.ids) + 1):
        if i == len(example.ids) or example.mask[i] != example.mask[start]:
            text = tokenizer.decode(example.ids[start:i])
            if example.mask[start]:
                text = f"\033[42m{text}\033[0m" if color else f"⟦{text}⟧"
            pieces.append(text)
            start = i
    header = f"# {example.name}: {example.n_tokens} tokens, {example.n_targets} targets"
    return header + "\n" + "".join(pieces)


# ----------------------------------------------------------------------------------------------------
# The progressive sub-task schedule.

def subtasks_in_epoch(epoch: int, max_subtask: int, step: int = 1, schedule: str = "progressive") -> int:
    """s(e): the largest sub-task index trained in 1-based epoch e."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}' (expected one of {', '.join(SCHEDULES)})")
    if epoch < 1 or step < 1:
        raise ValueError(f"epochs are 1-based and step >= 1 (got epoch {epoch}, step {step})")
    return max_subtask if schedule == "full" else min(max_subtask, epoch * step)


def epochs_to_cover(max_subtask: int, step: int = 1) -> int:
    """The first epoch at which the progressive schedule trains on every sub-task."""
    return math.ceil(max_subtask / step)


def epoch_example_indices(examples: list[Example], epoch: int, step: int = 1,
                          schedule: str = "progressive") -> list[int]:
    """Indices of the examples trained in `epoch`, in data order."""
    max_subtask = max(e.subtask for e in examples)
    limit = subtasks_in_epoch(epoch, max_subtask, step, schedule)
    return [i for i, e in enumerate(examples) if e.subtask <= limit]


def share_prefixes(examples: list[Example]) -> list[Example]:
    """Fold every example that is an exact token prefix of a longer example of the same conversation into
    that longer one: the longer sequence carries both sets of targets (the union of the masks) and the
    prefix is dropped. Order is kept; a merged sequence stands where its longest member stood.

    Why this is exact: under causal attention, position t sees only tokens 0..t, at the same RoPE
    positions in both sequences. If A.ids == B.ids[:len(A)], each of A's positions computes the same
    logits inside B as in A alone, so every loss term of A's targets is the same function of the weights
    inside B, and so is its gradient. The sum of token losses over the step, and its gradient, are those
    of the separate examples; A's context is just computed once instead of twice. The loss is a mean over
    target tokens, so each target must still count once: A is folded only when none of its targets is a
    target of B already (a planner's earlier decisions are context, not targets, in its later examples),
    so the union holds exactly the target tokens of the separate examples. Examples that are not exact
    prefixes (truncated or fitted differently) stay as they are.
    """
    merged = list(examples)
    dropped: set[int] = set()
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault((e.task_id, e.role, e.conversation), []).append(i)
    for members in groups.values():
        by_length = sorted(members, key=lambda i: merged[i].n_tokens)
        for pos, i in enumerate(by_length):
            a = merged[i]
            for j in by_length[pos + 1:]:
                b = merged[j]
                if b.ids[:a.n_tokens] == a.ids and not any(x and y for x, y in zip(a.mask, b.mask)):
                    union = [x | y for x, y in zip(a.mask, b.mask)] + b.mask[a.n_tokens:]
                    merged[j] = replace(b, mask=union, carries=a.carries + b.carries)
                    dropped.add(i)
                    break  # the longer sequence is visited later and folds on into a still longer one
    return [e for i, e in enumerate(merged) if i not in dropped]


@dataclass
class EpochPlan:
    epoch: int
    max_subtask: int
    n_examples: int
    n_tokens: int  # of the separate examples
    n_targets: int
    n_sequences: int  # after share_prefixes
    n_shared_tokens: int


def plan_schedule(examples: list[Example], epochs: int, step: int = 1,
                  schedule: str = "progressive") -> list[EpochPlan]:
    max_subtask = max(e.subtask for e in examples)
    plans = []
    for epoch in range(1, epochs + 1):
        chosen = [examples[i] for i in epoch_example_indices(examples, epoch, step, schedule)]
        shared = share_prefixes(chosen)
        plans.append(EpochPlan(epoch, subtasks_in_epoch(epoch, max_subtask, step, schedule), len(chosen),
                               sum(e.n_tokens for e in chosen), sum(e.n_targets for e in chosen),
                               len(shared), sum(e.n_tokens for e in shared)))
    return plans


def format_schedule(plans: list[EpochPlan], schedule: str, step: int) -> str:
    head = (f"schedule: {schedule}" + (f", {step} new sub-task(s) per epoch" if schedule == "progressive"
                                       else ", every sub-task every epoch"))
    rows = [head, f"{'epoch':>5}  {'sub-tasks':>9}  {'examples':>8}  {'target tokens':>13}  {'all tokens':>10}  "
                  f"{'shared sequences':>16}  {'shared tokens':>13}"]
    for p in plans:
        rows.append(f"{p.epoch:>5}  {'1..' + str(p.max_subtask):>9}  {p.n_examples:>8}  {p.n_targets:>13,}  "
                    f"{p.n_tokens:>10,}  {p.n_sequences:>16}  {p.n_shared_tokens:>13,}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Shuffling and batching.

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch), so a resumed run sees the same data order."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def plan_batches(indices: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                 window_batches: int = 64) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: shuffled, then sorted by length within windows of
    `window_batches` batches (similar lengths pad little), batch order shuffled, the longest batch moved
    first so an out-of-memory shows up at the first step rather than hours in."""
    g = epoch_generator(seed, epoch)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) tensors; pads are never targets."""
    width = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)  # (B, T)
    for row, e in enumerate(examples):
        ids[row, :e.n_tokens] = torch.tensor(e.ids)
        mask[row, :e.n_tokens] = torch.tensor(e.mask, dtype=torch.bool)
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# CLI: inspect a trajectory file.

def trajectory_texts(records: list[dict]) -> list[str]:
    """Every distinct non-empty line of every message and output, in order of first appearance: the corpus a
    tokenizer for these conversations is trained on (model.py init-tiny --texts)."""
    lines = (line for r in records for c in r["calls"] for text in [*(m["content"] for m in c["messages"]),
             c["output"]] for line in text.splitlines() if line.strip())
    return list(dict.fromkeys(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect ProST trajectory files: validate them, print the "
                                                 "progressive schedule of one role, or show an example "
                                                 "with its loss mask.")
    parser.add_argument("command", choices=("check", "schedule", "show", "texts"),
                        help="check: validate and count; schedule: print the per-epoch plan; "
                             "show: print one tokenised example with its targets highlighted; "
                             "texts: print every distinct line of the conversations (a tokenizer corpus)")
    parser.add_argument("path", help="trajectory JSONL file")
    parser.add_argument("--role", default="planner", choices=ROLES, help="role whose examples to build")
    parser.add_argument("--model", default="Qwen/Qwen2.5-1.5B",
                        help="model id or folder whose tokenizer renders the examples")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="longer examples are left-truncated")
    parser.add_argument("--schedule", default="progressive", choices=SCHEDULES, help="curriculum kind")
    parser.add_argument("--subtasks-per-epoch", type=int, default=1,
                        help="sub-task indices introduced per epoch by the progressive schedule")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs to plan (0: until every sub-task is in, plus one)")
    parser.add_argument("--index", type=int, default=0, help="which example `show` prints")
    args = parser.parse_args(argv)
    try:
        records = read_trajectories(args.path)
        if args.command == "check":
            calls = sum(len(r["calls"]) for r in records)
            print(f"{args.path}: {len(records)} valid trajectories, {calls} model calls")
            return 0
        if args.command == "texts":
            print("\n".join(trajectory_texts(records)))
            return 0
        from model import Tokenizer
        tokenizer = Tokenizer.from_pretrained(args.model)
        examples, report = build_examples(records, args.role, tokenizer, args.max_seq_len)
        if not examples:
            raise ValueError(f"{args.path} holds no {args.role} calls")
        for line in report.lines():
            print(line)
        if args.command == "show":
            if not 0 <= args.index < len(examples):
                raise ValueError(f"--index must be in 0..{len(examples) - 1}")
            print(format_example(tokenizer, examples[args.index], color=sys.stdout.isatty()))
            return 0
        max_subtask = max(e.subtask for e in examples)
        epochs = args.epochs or epochs_to_cover(max_subtask, args.subtasks_per_epoch) + 1
        plans = plan_schedule(examples, epochs, args.subtasks_per_epoch, args.schedule)
        print(format_schedule(plans, args.schedule, args.subtasks_per_epoch))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
