"""The gold teacher: trajectories for training without a teacher model, replayed from the mini-world's
solutions, and the single-agent view that turns a teacher's multi-agent trajectory into single-agent examples.

Where this sits: rollout.py's `collect` runs a teacher (this one, a chat endpoint, or any loadable model) through
agents.py's protocol on the train split; data.py cuts the records into per-role examples and prost.py trains on
them. The gold teacher answers every role from the gold sub-tasks that miniworld.py wrote for each task, with
the real outputs of the world; some tasks get a deliberate mistake and its recovery, so that the roles also
learn to notice and fix a failed step. This is the only agents-side module that imports miniworld.py.
"""

from __future__ import annotations

import ast
import re
import zlib

import data
import miniworld
from agents import (FINISH, Budgets, ModelReply, ModelRequest, OpenRequest, code_block, extract_code,
                    multi_agent_protocol, output_turn, single_system, single_task)


class GoldEngine:
    """The gold teacher: answers every role from the mini-world's gold sub-tasks and the real outputs.

    planner: "Sub-task: <gold text>" for each gold sub-task, then FINISH. executor: the gold code of
    its sub-task, then a report derived from the output. critic: success when the attempt's last
    execution ran without error, else failure quoting the error. For a deterministic share of tasks
    one sub-task starts with a realistic mistake (wrong API name or argument name at its first API
    call, so it fails before changing anything), a premature "Done" report, the critic's failure, and
    the corrected retry; the mistaken turns are marked train: false.
    """

    name = "gold"
    mixes_adapters = False
    batches = False

    def __init__(self, root=None, recovery_share: float = 0.5):
        self.root = root
        self.recovery_share = recovery_share
        self._tasks: dict[str, tuple[list[dict], tuple[int, str] | None]] = {}

    def task(self, task_id: str) -> tuple[list[dict], tuple[int, str] | None]:
        if task_id not in self._tasks:
            subtasks = miniworld.gold_subtasks(task_id, root=self.root)
            self._tasks[task_id] = (subtasks, choose_mistake(task_id, subtasks, self.recovery_share))
        return self._tasks[task_id]

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        return [self.reply(r) for r in requests]

    def reply(self, r: ModelRequest) -> ModelReply:
        subtasks, mistake = self.task(r.task_id)
        if r.role == "planner":
            text = f"Sub-task: {subtasks[r.subtask - 1]['text']}" if r.subtask <= len(subtasks) else FINISH
            return ModelReply(text, r.messages)
        if r.role == "executor":
            if mistake and mistake[0] == r.subtask and r.attempt == 1:
                text = code_block(mistake[1]) if not r.executions else "Done: the sub-task is complete."
                return ModelReply(text, r.messages, train=False)
            if not r.executions:
                return ModelReply(code_block(with_print(subtasks[r.subtask - 1]["code"])), r.messages)
            return ModelReply(gold_report(r.executions), r.messages)
        if r.role == "critic":
            return ModelReply(gold_verdict(r.executions), r.messages)
        raise ValueError(f"the gold teacher answers planner, executor and critic, not '{r.role}' "
                         "(its single-agent trajectories come from single_view)")


def assigned_names(code: str) -> list[str]:
    """Top-level variable names a piece of code assigns (what later sub-tasks can reuse)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name) and leaf.id not in names:
                    names.append(leaf.id)
    return names


def with_print(code: str) -> str:
    """Gold code that ends by assigning a variable also prints it, the way an agent looks at its result
    (so reports and critic verdicts can rest on a real output)."""
    try:
        last = ast.parse(code).body[-1]
    except (SyntaxError, IndexError):
        return code
    if isinstance(last, ast.Assign) and len(last.targets) == 1 and isinstance(last.targets[0], ast.Name):
        return f"{code}\nprint({last.targets[0].id})"
    return code


def gold_report(executions: list[dict]) -> str:
    last = executions[-1]
    if last["error"]:
        return f"The code failed: {last_line(last['output'])}"
    names = [n for e in executions for n in assigned_names(e["code"])]
    parts = ["Done."]
    if names:
        parts.append(f"Variables: {', '.join(dict.fromkeys(names))}.")
    if last["output"].strip():
        parts.append(f"Output: {data.shorten(last['output'].strip(), 200)}")
    return " ".join(parts)


def gold_verdict(executions: list[dict]) -> str:
    if not executions:
        return "Verdict: failure\nReason: no code ran for this sub-task."
    if executions[-1]["error"]:
        error = last_line(executions[-1]["output"])
        return f"Verdict: failure\nReason: the code raised an error ({error}), so the sub-task is not done."
    return "Verdict: success\nReason: the code ran without errors and its output shows the sub-task done."


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return data.shorten(lines[-1], 200) if lines else "(no output)"


API_CALL_RE = re.compile(r"apis\.(\w+)\.(\w+)\(")
WRONG_VERBS = {"show_": "get_", "create_": "add_", "delete_": "remove_", "update_": "edit_",
               "search_": "find_", "add_": "create_", "login": "log_in"}
WRONG_ARGUMENTS = {"access_token": "token", "username": "email"}


def mutate_code(code: str) -> str | None:
    """A realistic mistake at the first API call of `code` (not complete_task): a required argument
    under a wrong name, else a wrong API name. Both fail at that call, before any state changes."""
    for call in API_CALL_RE.finditer(code):
        app, api = call.groups()
        if app == "supervisor" and api == "complete_task":
            continue
        rest = code[call.end():]
        for right, wrong in WRONG_ARGUMENTS.items():
            argument = re.match(rf"[^)]*?\b({right})\s*=", rest)
            if argument:
                at = call.end() + argument.start(1)
                return code[:at] + wrong + code[at + len(right):]
        wrong_api = next((api.replace(v, w, 1) for v, w in WRONG_VERBS.items() if api.startswith(v)),
                         api + "s")
        return code[:call.start(2)] + wrong_api + code[call.end(2):]
    return None


def choose_mistake(task_id: str, subtasks: list[dict], share: float) -> tuple[int, str] | None:
    """(sub-task index, mistaken code) for a stable `share` of tasks, chosen by a hash of the task id."""
    h = zlib.crc32(task_id.encode())
    if (h % 1000) >= share * 1000:
        return None
    options = [(k, mutated) for k, s in enumerate(subtasks, start=1) if (mutated := mutate_code(s["code"]))]
    return options[(h // 1000) % len(options)] if options else None


# ----------------------------------------------------------------------------------------------------
# What a teacher records: a multi-agent rollout and its single-agent view.

def teacher_rollout(task_id: str, budgets: Budgets, split: str, multi: dict, single: dict):
    """Generator: a multi-agent rollout plus its single-agent view. Returns both records."""
    task = yield OpenRequest(task_id)
    record = yield from multi_agent_protocol(task, budgets, split, multi)
    return [record, single_view(record, task, single)]


def single_view(record: dict, task, system: dict) -> dict:
    """The single-agent ReAct conversation hidden in a multi-agent trajectory: the executor's code turns
    in order, each answered by its real output, the first of each sub-task prefixed with
    "Sub-task: <text>". Deliberate mistakes stay marked train: false. Returned as a record of its own
    (system kind "single") so that data.py builds single-agent examples from the same file."""
    texts = {s["index"]: s["text"] for s in record["subtasks"]}
    code_turns = [i for i, c in enumerate(record["calls"])
                  if c["role"] == "executor" and extract_code(c["output"])]
    messages = [{"role": "system", "content": single_system(task)},
                {"role": "user", "content": single_task(task)}]
    calls, seen = [], set()
    for i, execution in zip(code_turns, record["executions"]):  # one execution per code turn, in order
        k = execution["subtask"]
        output = code_block(execution["code"])
        if k not in seen:
            seen.add(k)
            output = f"Sub-task: {texts[k]}\n{output}"
        calls.append({"role": "single", "conversation": 0, "subtask": k, "messages": list(messages),
                      "output": output, "prompt_tokens": 0, "new_tokens": 0, "flops": 0.0, "seconds": 0.0,
                      "train": record["calls"][i]["train"]})
        messages = messages + [{"role": "assistant", "content": output},
                               {"role": "user", "content": output_turn(execution["output"])}]
    return {**record, "system": system, "calls": calls,
            "subtasks": [{"index": s["index"], "text": s["text"], "attempts": []}
                         for s in record["subtasks"]]}
