"""Trajectories in, training examples out, in the order the progressive schedule trains them.

Where this sits in ProST: agents.py records teacher trajectories (one JSON line per task, trajectories.py's
format); prost.py reads them with this file, cuts them into per-role, per-sub-task examples, lets the
progressive schedule pick each epoch's examples and batches them:

    trajectory lines --trajectories.read_trajectories--> records --build_examples--> Examples (ids + loss mask)
        --epoch_example_indices (the schedule)--> plan_batches (by length) --> collate --> (ids, mask) Batch

The progressive sub-task schedule (the paper's curriculum) comes first: with K the largest sub-task index,
epoch e (1-based) trains on the examples with sub-task index <= s(e) = min(K, e * step); `full` trains on all
of them every epoch (standard SFT, the ablation baseline). Sub-task indices are 1-based; the planner's "task
finished" decision carries index K + 1.

How an example is cut from a trajectory. A *conversation* is the calls sharing (role, conversation id);
each call sees the previous call's messages, that call's output as an assistant turn, and new user turns,
so the i-th assistant turn of any call is the output of the conversation's i-th call. Every call says
whether its output is a training target (`"train"`): format failures, replies cut by the token budget and
a teacher's deliberate mistakes are not, wherever they sit in the conversation. The example for
(role, conversation, k) is the last target call of that conversation with sub-task k, rendered as the
messages it saw plus its output; the targets (mask = 1) are the outputs of that conversation's target
calls with sub-task k. The mask itself comes from `Tokenizer.chat` while rendering.

One context-fitting rule (`fit_messages`) serves rollouts and training alike: it keeps the system prompt,
the task (first user turn), every assistant turn and the newest turn whole, and shortens the other user
turns (execution outputs, reports) oldest first. A call records the fitted messages the model saw, and an
example is made of a call's recorded messages, so a trained role sees exactly the prompts it will be given
(an earlier target whose recorded prompt is not a prefix of the later call's, because fitting shortened
something in between, gets an example of its own). Examples longer than max_seq_len are fitted by the same
rule, and reported.

The trajectory format (schema version 2) and its files are trajectories.py's. The training fast paths on this
side (nested examples merged, shared trunks, batches by task) are batching.py's.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

import trajectories

SCHEDULES = ("progressive", "full")

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


def check_coverage(max_subtask: int, epochs: int, step: int = 1, schedule: str = "progressive") -> None:
    """Refuse a schedule that would leave sub-task indices untrained (for the planner the highest index is
    its FINISH decision): the progressive schedule needs ceil(K / step) epochs to reach index K."""
    needed = 1 if schedule == "full" else epochs_to_cover(max_subtask, step)
    if epochs < needed:
        reached = subtasks_in_epoch(epochs, max_subtask, step, schedule)
        raise ValueError(f"{epochs} epoch(s) of the {schedule} schedule with {step} new sub-task(s) per epoch "
                         f"reach sub-task {reached} of {max_subtask}, so sub-tasks {reached + 1}..{max_subtask} "
                         f"would never be trained; use --epochs {needed} or more (or 0 for {needed} + 1), or "
                         f"--subtasks-per-epoch {math.ceil(max_subtask / max(epochs, 1))}")


def epoch_example_indices(examples: list[Example], epoch: int, step: int = 1,
                          schedule: str = "progressive") -> list[int]:
    """Indices of the examples trained in `epoch`, in data order."""
    max_subtask = max(e.subtask for e in examples)
    limit = subtasks_in_epoch(epoch, max_subtask, step, schedule)
    return [i for i, e in enumerate(examples) if e.subtask <= limit]


@dataclass
class EpochPlan:
    epoch: int
    max_subtask: int
    n_examples: int
    n_tokens: int
    n_targets: int


def plan_schedule(examples: list[Example], epochs: int, step: int = 1,
                  schedule: str = "progressive") -> list[EpochPlan]:
    max_subtask = max(e.subtask for e in examples)
    plans = []
    for epoch in range(1, epochs + 1):
        chosen = [examples[i] for i in epoch_example_indices(examples, epoch, step, schedule)]
        plans.append(EpochPlan(epoch, subtasks_in_epoch(epoch, max_subtask, step, schedule), len(chosen),
                               sum(e.n_tokens for e in chosen), sum(e.n_targets for e in chosen)))
    return plans


def format_schedule(plans: list[EpochPlan], schedule: str, step: int) -> str:
    head = (f"schedule: {schedule}" + (f", {step} new sub-task(s) per epoch" if schedule == "progressive"
                                       else ", every sub-task every epoch"))
    rows = [head, f"{'epoch':>5}  {'sub-tasks':>9}  {'examples':>8}  {'target tokens':>13}  {'all tokens':>10}"]
    for p in plans:
        rows.append(f"{p.epoch:>5}  {'1..' + str(p.max_subtask):>9}  {p.n_examples:>8}  {p.n_targets:>13,}  "
                    f"{p.n_tokens:>10,}")
    return "\n".join(rows)


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

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)

    @property
    def last_target(self) -> int:
        """Index of the last target token (0 without targets): the step computes positions before it only."""
        return max((i for i, m in enumerate(self.mask) if m), default=0)

    @property
    def name(self) -> str:
        return f"{self.task_id} {self.role} conversation {self.conversation} sub-task {self.subtask}"


@dataclass
class BuildReport:
    """What build_examples had to change, so nothing is altered silently."""
    max_seq_len: int
    fitted: list[tuple[str, int]] = field(default_factory=list)  # (example name, length before fitting)
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (example name, length): did not fit

    def lines(self) -> list[str]:
        out = []
        for what, rows in (("were fitted (old outputs shortened, oldest first)", self.fitted),
                           ("could not be fitted even with every old output shortened, and were dropped",
                            self.dropped)):
            if rows:
                shown = "; ".join(f"{name} ({n} tokens)" for name, n in rows[:3])
                out.append(f"{len(rows)} example(s) longer than max_seq_len {self.max_seq_len} {what}: "
                           f"{shown}" + (" ..." if len(rows) > 3 else ""))
        return out

# ----------------------------------------------------------------------------------------------------
# The one context-fitting rule (rollouts and training examples).

TRUNCATED_KEEP = 120  # characters a shortened old output keeps


def shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit} more characters]"


def fit_messages(messages: list[dict], count, limit: int) -> list[dict] | None:
    """The messages with old user turns (execution outputs, reports, feedback) shortened to TRUNCATED_KEEP
    characters, oldest first, until `count(messages) <= limit`; None if even that is not enough.

    Never shortened: the system prompt, the first user turn (the task), every assistant turn (a role's
    outputs are repeated verbatim, which build_examples relies on) and the newest turn. agents.py's engines
    fit every prompt with this before the model sees it, and build_examples fits examples longer than
    max_seq_len with it, so training and rollouts cut a long conversation the same way."""
    if count(messages) <= limit:
        return messages
    fitted = list(messages)
    first_user = next((i for i, m in enumerate(fitted) if m["role"] == "user"), None)
    for i, message in enumerate(fitted[:-1]):
        if message["role"] != "user" or i == first_user or len(message["content"]) <= TRUNCATED_KEEP:
            continue
        fitted[i] = {**message, "content": shorten(message["content"], TRUNCATED_KEEP)}
        if count(fitted) <= limit:
            return fitted
    return None

# ----------------------------------------------------------------------------------------------------
# Cutting a role's conversations into examples.

def seen_with_output(call: dict) -> list[dict]:
    """The messages a call saw followed by its output: the conversation as it stood after the call."""
    return [*call["messages"], {"role": "assistant", "content": call["output"]}]


def example_groups(calls: list[dict], members: list[int], subtask: int) -> list[tuple[int, list[int]]]:
    """[(last call, target calls)] of the (conversation, sub-task) examples, in conversation order.

    Normally one: the last target call, holding every target of the sub-task. A target call whose prompt
    and output are not a prefix of that call's messages (fitting shortened an old turn in between) would
    be trained on a prompt it never saw, so it ends an example of its own."""
    targets = [i for i in members if calls[i]["subtask"] == subtask and calls[i]["train"]]
    groups: list[tuple[int, list[int]]] = []
    for i in reversed(targets):
        if groups:
            last, held = groups[-1]
            seen = seen_with_output(calls[i])
            if calls[last]["messages"][:len(seen)] == seen:
                held.insert(0, i)
                continue
        groups.append((i, [i]))
    return groups[::-1]


def example_messages(calls: list[dict], members: list[int], last: int, targets: list[int]) -> list[dict]:
    """The messages of the example ending at call `last`, with `"train": False` (Tokenizer.chat's mask
    flag) on every assistant turn that is not the output of one of `targets`."""
    messages = [dict(m) for m in seen_with_output(calls[last])]
    outputs = iter(members)  # assistant turn t is the output of the conversation's t-th call
    for message in messages:
        if message["role"] == "assistant" and next(outputs) not in targets:
            message["train"] = False
    return messages


def build_examples(records: list[dict], role: str, tokenizer, max_seq_len: int
                   ) -> tuple[list[Example], BuildReport]:
    """Every (conversation, sub-task) example of `role` in the records, rendered with its loss mask;
    examples longer than max_seq_len are fitted with fit_messages (dropped if they cannot be)."""
    if role not in trajectories.ROLES:
        raise ValueError(f"unknown role '{role}' (expected one of {', '.join(trajectories.ROLES)})")
    examples, report = [], BuildReport(max_seq_len)
    count = lambda messages: len(tokenizer.chat(messages)[0])  # noqa: E731
    for record in records:
        calls = record["calls"]
        for (call_role, conv), members in trajectories.group_conversations(calls).items():
            if call_role != role:
                continue
            for subtask in sorted({calls[i]["subtask"] for i in members}):
                for last, targets in example_groups(calls, members, subtask):
                    messages = example_messages(calls, members, last, targets)
                    ids, mask = tokenizer.chat(messages)
                    example = Example(record["task_id"], role, conv, subtask, list(ids), [int(m) for m in mask])
                    if example.n_tokens > max_seq_len:
                        fitted = fit_messages(messages, count, max_seq_len)
                        (report.fitted if fitted else report.dropped).append((example.name, example.n_tokens))
                        if fitted is None:
                            continue
                        ids, mask = tokenizer.chat(fitted)
                        example.ids, example.mask = list(ids), [int(m) for m in mask]
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
# Micro-batches.

def plan_batches(indices: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                 window_batches: int = 64, sort_window=None) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: shuffled, then sorted by length within windows of
    `window_batches` batches (similar lengths pad little), batch order shuffled, the longest batch moved
    first so an out-of-memory shows up at the first step rather than hours in. `sort_window(chunk)` may order
    a window differently (batching.plan_batches_by_task); the number of micro-batches is the same."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # (seed, epoch) only: a resumed run sees the same order
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = sort_window(chunk) if sort_window else sorted(chunk, key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, T) right-padded with the pad id
    mask: torch.Tensor  # (B, T) True at target tokens, never at pads
    trunk: int = 0  # leading columns every row shares, computed once (batching.collate_with_trunk; 0 = none)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded ids and target mask; pads are never targets."""
    width = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)  # (B, T)
    for row, e in enumerate(examples):
        ids[row, :e.n_tokens] = torch.tensor(e.ids)
        mask[row, :e.n_tokens] = torch.tensor(e.mask, dtype=torch.bool)
    return Batch(ids, mask)

# ----------------------------------------------------------------------------------------------------
# CLI: inspect a trajectory file.

def trajectory_texts(records: list[dict]) -> list[str]:
    """Every distinct non-empty line of every message and output, in order of first appearance: the corpus a
    tokenizer for these conversations is trained on (model_io.py init-tiny --texts)."""
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
    parser.add_argument("--role", default="planner", choices=trajectories.ROLES, help="role whose examples to build")
    parser.add_argument("--model", default="Qwen/Qwen2.5-1.5B",
                        help="model id or folder whose tokenizer renders the examples")
    parser.add_argument("--max-seq-len", type=int, default=4096,
                        help="longer examples are fitted by shortening old outputs (fit_messages)")
    parser.add_argument("--schedule", default="progressive", choices=SCHEDULES, help="curriculum kind")
    parser.add_argument("--subtasks-per-epoch", type=int, default=1,
                        help="sub-task indices introduced per epoch by the progressive schedule")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs to plan (0: until every sub-task is in, plus one)")
    parser.add_argument("--index", type=int, default=0, help="which example `show` prints")
    args = parser.parse_args(argv)
    try:
        records = trajectories.read_trajectories(args.path)
        if args.command == "check":
            calls = sum(len(r["calls"]) for r in records)
            print(f"{args.path}: {len(records)} valid trajectories, {calls} model calls")
            return 0
        if args.command == "texts":
            print("\n".join(trajectory_texts(records)))
            return 0
        from model_io import load_tokenizer  # a folder, hub id or GGUF file
        tokenizer = load_tokenizer(args.model)
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
        check_coverage(max_subtask, epochs, args.subtasks_per_epoch, args.schedule)
        plans = plan_schedule(examples, epochs, args.subtasks_per_epoch, args.schedule)
        print(format_schedule(plans, args.schedule, args.subtasks_per_epoch))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
