"""The agents of ProST: planner, executor and critic (and the single-agent ReAct baseline), their
protocol, concurrent rollouts with batched model calls, teachers, and trajectory recording.

Where this sits: world.py gives AppWorld sessions; this file makes small language models act in them.
Teachers (the gold replay of the mini-world's solutions, any loadable model, or an OpenAI-compatible
endpoint) produce trajectories that data.py cuts into per-role examples and prost.py trains on; the
trained roles come back here for evaluation rollouts (evaluate.py drives `run_rollouts`).

The protocol (prost's concrete reading of the paper):

    planner   one conversation per task. system: role, apps, user; user: "Task: ...". Every reply is
              one line, "Sub-task: <what to do next>" or "FINISH". After each sub-task it gets
              a user turn "Report: ...\\nCritic: success|failure: <reason>".
    executor  one conversation per sub-task. system: how to call `apis`, read docs, finish the task;
              user: task, sub-tasks done so far with their reports, the current sub-task. Replies are
              ```python (or ```py) code blocks, each answered by "Output:\\n```\\n...\\n```"; a reply
              without code is the sub-task's report. On a critic failure the same conversation goes on
              with "Critic: failure: <reason>" (bounded retries).
    critic    one conversation per attempt: the sub-task, the code with its outputs, the report ->
              "Verdict: success|failure\\nReason: <why>". Unparseable verdicts count as failures.
    single    one ReAct conversation per task: code blocks and outputs until
              apis.supervisor.complete_task(...) runs; a reply may start with "Sub-task: ..." to say
              which step it is on (this is how single-agent calls get sub-task indices).

A rollout is a Python generator. It yields requests (OpenRequest, ModelRequest, ExecRequest,
EvalRequest), receives their results, and returns the finished trajectory record (data.py's format).
`run_rollouts` drives many rollouts at once: each round it sends all pending world requests to world
sessions (worker processes, called from threads) and groups all pending model requests by (engine,
adapter, stop strings), or by engine alone for one that mixes adapters, into one batched greedy
`generate` call each. Rollouts only see their own results, so with greedy fp32 decoding a batched run
records the same trajectories as one task at a time.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import data
import lora
import miniworld
import model
import store
import world

FINISH = "FINISH"
CODE_STOP = ("```\n",)  # a code block's closing fence; the opening one is "```python\n", never "```\n"
NO_REPORT = "(no report: "  # how an executor attempt that ended without a report is recorded
CRITIC_OUTPUT_CHARS = 1500  # the critic's prompt is one user turn, so its outputs are shortened up front


# ----------------------------------------------------------------------------------------------------
# Budgets: every loop below is bounded by one of these, and every stop is recorded by its name.

def budget(default: int, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Budgets:
    """Limits of one rollout. The field names are the names recorded in a trajectory's budget_stops."""
    subtasks: int = budget(10, "sub-tasks the planner may start per task")
    executor_turns: int = budget(8, "executor replies per attempt at a sub-task (code turns plus the report)")
    critic_retries: int = budget(2, "extra executor attempts at a sub-task after the critic says failure")
    format_retries: int = budget(1, "times the planner is re-asked after a reply in neither accepted format")
    single_turns: int = budget(40, "single-agent replies per task (AppWorld's ReAct agents use 40 steps)")
    new_tokens: int = budget(400, "new tokens per model call (a 'new_tokens' stop means a reply was cut)")
    context: int = budget(4096, "context length per call (prompt + new tokens); older outputs are shortened "
                                "to fit (data.fit_messages)")


BUDGET_HELP = {f.name: f.metadata["help"] for f in fields(Budgets)}


# ----------------------------------------------------------------------------------------------------
# The protocol's texts: system prompts and the formats of every turn.

def supervisor_line(task) -> str:
    s = task.supervisor
    return (f"{s.get('first_name', '')} {s.get('last_name', '')} "
            f"(email {s.get('email', '?')}, phone {s.get('phone_number', '?')})").strip()


def apps_lines(task) -> str:
    return "\n".join(f"- {name}: {description}" for name, description in task.apps.items())


API_RULES = """\
Write Python in one ```python code block per reply; it runs in a persistent session (variables stay) and \
you see what it prints.
- Call an app's API as apis.<app>.<api>(arg=value, ...); results are Python dicts and lists. Print what you \
need to see.
- Read the docs first: apis.api_docs.show_api_descriptions(app_name='<app>') lists an app's APIs, \
apis.api_docs.show_api_doc(app_name='<app>', api_name='<api>') gives one API's arguments.
- Log in with apis.<app>.login(username=<email; phone number for the phone app>, password=...); the \
passwords are in apis.supervisor.show_account_passwords(). Lists come in pages (page_index=0, 1, ...).
- When the whole task is done, call apis.supervisor.complete_task(answer=<answer>) if the task asks for \
an answer, else apis.supervisor.complete_task()."""


def planner_system(task) -> str:
    return (f"You are the planner of a team of agents that does tasks for {supervisor_line(task)} with "
            f"the apps on their phone. Today is {task.datetime}.\nApps:\n{apps_lines(task)}\n\n"
            "Split the task into sub-tasks and give them to the executor one at a time; the executor "
            "writes and runs code, and a critic checks its work. Reply with exactly one line:\n"
            "Sub-task: <the next sub-task>\nor, once the task is complete:\nFINISH")


def planner_task(task) -> str:
    return f"Task: {task.instruction}"


def planner_feedback(report: str, verdict: str, reason: str) -> str:
    return f"Report: {report}\nCritic: {verdict}: {reason}"


PLANNER_FORMAT_REMINDER = "Reply with exactly one line: 'Sub-task: <the next sub-task>' or 'FINISH'."


def executor_system(task) -> str:
    return (f"You are the executor of a team of agents that does tasks for {supervisor_line(task)} with "
            f"the apps on their phone. Today is {task.datetime}.\nApps:\n{apps_lines(task)}\n\n"
            f"You do one sub-task at a time. {API_RULES}\n"
            "When your sub-task is done, reply without code: a short report of what you did and the "
            "results the next sub-tasks need (values, variable names).")


def executor_task(task, done: list[tuple[str, str]], subtask: str) -> str:
    history = "\n".join(f"{i}. {text} -> {report}" for i, (text, report) in enumerate(done, start=1))
    return (f"Task: {task.instruction}\nSub-tasks done so far:\n{history or '(none)'}\n"
            f"Your sub-task: {subtask}")


def output_turn(output: str) -> str:
    return f"Output:\n```\n{output}\n```"


def critic_feedback(reason: str) -> str:
    return f"Critic: failure: {reason}\nFix the problem and finish the sub-task, then report again."


def critic_system(task) -> str:
    return (f"You are the critic of a team of agents that does tasks for {supervisor_line(task)} with "
            "the apps on their phone. You check whether the executor really did its sub-task, from its "
            "code, the outputs and its report. Reply with exactly two lines:\n"
            "Verdict: success (or: Verdict: failure)\nReason: <why, in one sentence>")


def critic_task(task, subtask: str, executions: list[dict], report: str) -> str:
    steps = "\n".join(f"```python\n{e['code']}\n```\n"
                      f"{output_turn(data.shorten(e['output'], CRITIC_OUTPUT_CHARS))}" for e in executions)
    return (f"Task: {task.instruction}\nSub-task: {subtask}\nCode and outputs:\n{steps or '(no code ran)'}\n"
            f"Report: {report}")


def single_system(task) -> str:
    return (f"You are an agent that does tasks for {supervisor_line(task)} with the apps on their phone. "
            f"Today is {task.datetime}.\nApps:\n{apps_lines(task)}\n\n{API_RULES}\n"
            "You may start a reply with one line 'Sub-task: <what this step does>' before the code.")


def single_task(task) -> str:
    return f"Task: {task.instruction}"


SINGLE_CODE_REMINDER = ("No code block found. Reply with one ```python code block; when the task is done, "
                        "call apis.supervisor.complete_task(...).")


def code_block(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


# ----------------------------------------------------------------------------------------------------
# Parsers. A reply that does not parse is a recorded failure, never an exception.

CODE_RE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
SUBTASK_RE = re.compile(r"^\s*\**sub-?task\**\s*:\s*(\S.*?)\s*$", re.IGNORECASE)
FINISH_RE = re.compile(r"^\s*\**finish(ed)?\**\W*$", re.IGNORECASE)
VERDICT_RE = re.compile(r"verdict\s*:\s*\**\s*(success|failure)", re.IGNORECASE)
REASON_RE = re.compile(r"reason\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)


def extract_code(text: str) -> str | None:
    """The first ```python / ```py block (an unclosed block runs to the end of the reply), or None."""
    match = CODE_RE.search(text)
    return match.group(1).strip("\n") if match else None


def parse_plan(text: str) -> str | None:
    """The planner's decision: the sub-task text, FINISH, or None when the reply is in neither format.
    The first line in either format decides."""
    for line in text.splitlines():
        if SUBTASK_RE.match(line):
            return SUBTASK_RE.match(line).group(1)
        if FINISH_RE.match(line):
            return FINISH
    return None


def declared_subtask(text: str) -> str | None:
    """A 'Sub-task: ...' line before any code (how a single-agent reply names its step)."""
    before_code = text.split("```")[0]
    for line in before_code.splitlines():
        if SUBTASK_RE.match(line):
            return SUBTASK_RE.match(line).group(1)
    return None


def parse_verdict(text: str) -> tuple[str, str]:
    """(verdict, reason) from a critic reply; an unparseable reply is a failure that says so."""
    verdict = VERDICT_RE.search(text)
    if verdict is None:
        return "failure", f"unparseable critic reply: {data.shorten(text.strip(), 100)!r}"
    reason = REASON_RE.search(text, verdict.end())
    return verdict.group(1).lower(), (reason.group(1).strip() if reason else "")


def completes_task(code: str, error: bool) -> bool:
    """Whether an execution finished the task: it called complete_task and did not fail."""
    return "supervisor.complete_task(" in code and not error


# ----------------------------------------------------------------------------------------------------
# Requests a rollout yields, and the replies it gets back.

@dataclass
class OpenRequest:
    """Open the task in the rollout's world session; the result is world.TaskInfo."""
    task_id: str


@dataclass
class ExecRequest:
    """Run code in the task's world; the result is world.Execution(output, error)."""
    code: str


@dataclass
class EvalRequest:
    """Run AppWorld's evaluation of the task; the result is world.Evaluation."""


@dataclass
class ModelRequest:
    """One model call. subtask/attempt/executions say where in the protocol it is: models ignore
    them, rule-based teachers (GoldEngine) answer from them instead of parsing the messages."""
    task_id: str
    role: str
    messages: list[dict]
    stop_strings: tuple[str, ...] = ()
    subtask: int = 1
    attempt: int = 1
    executions: list[dict] = field(default_factory=list)  # this attempt's executions so far


@dataclass
class ModelReply:
    text: str
    messages: list[dict] | None  # what the model saw (old outputs maybe shortened); None = did not fit
    prompt_tokens: int = 0
    new_tokens: int = 0
    flops: float = 0.0  # forward FLOPs of the call as if nothing were cached
    seconds: float = 0.0
    stop_reason: str = "stop_id"  # "length" means the new-token budget cut the reply
    train: bool = True  # False marks a teacher's deliberate mistake (never a training target)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (not computed)
    flops_computed: float = 0.0  # forward FLOPs actually computed (the cached prefix left out)

    @property
    def is_target(self) -> bool:
        """Whether the output may be learned: not a marked mistake, not cut by the new-token budget."""
        return self.train and self.stop_reason != "length"


# ----------------------------------------------------------------------------------------------------
# Recording a trajectory (the format is data.py's; see data.validate_trajectory).

@dataclass
class Conversation:
    role: str
    id: int
    messages: list[dict]

    def add_user(self, content: str) -> None:
        self.messages.append({"role": "user", "content": content})


class Recorder:
    """Builds one trajectory record while a rollout runs."""

    def __init__(self, task, split: str, system: dict):
        self.task = task
        self.completed = False  # complete_task ran without error
        self.record = {"schema": data.SCHEMA_VERSION, "task_id": task.task_id, "split": split,
                       "system": system, "instruction": task.instruction, "calls": [], "executions": [],
                       "subtasks": [], "evaluation": None, "budget_stops": []}
        self._conversations: dict[str, int] = {}

    def conversation(self, role: str, messages: list[dict]) -> Conversation:
        """A new conversation of `role`; ids count from 0 per role."""
        cid = self._conversations.get(role, 0)
        self._conversations[role] = cid + 1
        return Conversation(role, cid, messages)

    def add_call(self, conv: Conversation, subtask: int, reply: ModelReply) -> None:
        self.record["calls"].append({
            "role": conv.role, "conversation": conv.id, "subtask": subtask, "messages": reply.messages,
            "output": reply.text, "prompt_tokens": reply.prompt_tokens, "new_tokens": reply.new_tokens,
            "cached_tokens": reply.cached_tokens, "flops": reply.flops,
            "flops_computed": reply.flops_computed, "seconds": reply.seconds, "train": reply.is_target})

    def not_a_target(self) -> None:
        """The last call's output failed the protocol's format (a re-asked planner reply, an unparseable
        verdict, a single-agent reply without code): recorded, never learned."""
        self.record["calls"][-1]["train"] = False

    def add_execution(self, subtask: int, attempt: int, code: str, result) -> dict:
        execution = {"subtask": subtask, "attempt": attempt, "code": code, "output": result.output,
                     "error": bool(result.error)}
        self.record["executions"].append(execution)
        self.completed = self.completed or completes_task(code, result.error)
        return execution

    def start_subtask(self, index: int, text: str) -> None:
        self.record["subtasks"].append({"index": index, "text": text, "attempts": []})

    def add_attempt(self, report: str, verdict: str, reason: str) -> None:
        self.record["subtasks"][-1]["attempts"].append({"report": report, "verdict": verdict,
                                                        "reason": reason})

    def stop(self, budget: str, subtask: int) -> None:
        self.record["budget_stops"].append({"budget": budget, "subtask": subtask})

    def set_evaluation(self, evaluation) -> None:
        self.record["evaluation"] = {"success": bool(evaluation.success), "passes": list(evaluation.passes),
                                     "failures": list(evaluation.failures),
                                     "num_tests": int(evaluation.num_tests)}


def ask(rec: Recorder, conv: Conversation, subtask: int, attempt: int = 1, executions=(),
        stop_strings: tuple[str, ...] = ()):
    """Generator: one model call of a conversation. Returns the reply text (recorded, and appended to
    the conversation as an assistant turn), or None when the prompt does not fit the context budget."""
    reply = yield ModelRequest(rec.task.task_id, conv.role, list(conv.messages), stop_strings, subtask,
                               attempt, list(executions))
    return record_reply(rec, conv, subtask, reply)


def record_reply(rec: Recorder, conv: Conversation, subtask: int, reply: ModelReply) -> str | None:
    if reply.messages is None:
        rec.stop("context", subtask)
        return None
    rec.add_call(conv, subtask, reply)
    conv.messages.append({"role": "assistant", "content": reply.text})
    if reply.stop_reason == "length":
        rec.stop("new_tokens", subtask)
    return reply.text


# ----------------------------------------------------------------------------------------------------
# The multi-agent rollout: planner -> (executor attempts -> critic)* per sub-task -> evaluation.

def multi_agent_rollout(task_id: str, budgets: Budgets, split: str, system: dict):
    """Generator: one task solved by planner, executor and critic. Returns the trajectory record."""
    task = yield OpenRequest(task_id)
    return (yield from multi_agent_protocol(task, budgets, split, system))


def multi_agent_protocol(task, budgets: Budgets, split: str, system: dict):
    """Generator: the protocol on an opened task (world.TaskInfo). Returns the trajectory record."""
    rec = Recorder(task, split, system)
    planner = rec.conversation("planner", [{"role": "system", "content": planner_system(task)},
                                           {"role": "user", "content": planner_task(task)}])
    done: list[tuple[str, str]] = []  # (sub-task, report) of the sub-tasks so far
    k = 1
    while True:
        decision = yield from plan_next(rec, planner, k, budgets)
        # Once complete_task has run, the planner's next decision is its last: the world is finished.
        if decision is None or decision == FINISH or rec.completed:
            break
        if k > budgets.subtasks:
            rec.stop("subtasks", k)
            break
        report, verdict, reason = yield from solve_subtask(rec, task, k, decision, done, budgets)
        planner.add_user(planner_feedback(report, verdict, reason))
        done.append((decision, report))
        k += 1
    rec.set_evaluation((yield EvalRequest()))
    return rec.record


def plan_next(rec: Recorder, planner: Conversation, k: int, budgets: Budgets):
    """Generator: the planner's decision before sub-task k (text or FINISH), None on a budget stop."""
    for retry in range(budgets.format_retries + 1):
        text = yield from ask(rec, planner, k)
        if text is None:
            return None
        decision = parse_plan(text)
        if decision is not None:
            return decision
        rec.not_a_target()
        if retry < budgets.format_retries:
            planner.add_user(PLANNER_FORMAT_REMINDER)
    rec.stop("format_retries", k)
    return None


def solve_subtask(rec: Recorder, task, k: int, text: str, done: list, budgets: Budgets):
    """Generator: executor attempts at sub-task k, each judged by a fresh critic conversation, until
    success or the retry budget. Returns (report, verdict, reason) of the last attempt."""
    rec.start_subtask(k, text)
    executor = rec.conversation("executor", [{"role": "system", "content": executor_system(task)},
                                             {"role": "user", "content": executor_task(task, done, text)}])
    for attempt in range(1, budgets.critic_retries + 2):
        report, executions = yield from executor_attempt(rec, executor, k, attempt, budgets)
        verdict, reason = yield from critique(rec, task, k, attempt, text, executions, report)
        rec.add_attempt(report, verdict, reason)
        if verdict == "success" or rec.completed:
            break
        if attempt == budgets.critic_retries + 1:
            rec.stop("critic_retries", k)
            break
        executor.add_user(critic_feedback(reason))
    return report, verdict, reason


def executor_attempt(rec: Recorder, conv: Conversation, k: int, attempt: int, budgets: Budgets):
    """Generator: code turns until a reply without code (the report). Returns (report, executions)."""
    executions: list[dict] = []
    for _ in range(budgets.executor_turns):
        text = yield from ask(rec, conv, k, attempt, executions, CODE_STOP)
        if text is None:
            return f"{NO_REPORT}the context budget ran out)", executions
        code = extract_code(text)
        if code is None:
            return text.strip() or "(empty report)", executions
        result = yield ExecRequest(code)
        executions.append(rec.add_execution(k, attempt, code, result))
        conv.add_user(output_turn(result.output))
    rec.stop("executor_turns", k)
    return f"{NO_REPORT}the executor ran out of turns)", executions


def critique(rec: Recorder, task, k: int, attempt: int, text: str, executions: list[dict], report: str):
    """Generator: a fresh critic conversation judging one attempt. Returns (verdict, reason)."""
    conv = rec.conversation("critic", [{"role": "system", "content": critic_system(task)},
                                       {"role": "user", "content": critic_task(task, text, executions,
                                                                               report)}])
    reply = yield from ask(rec, conv, k, attempt, executions)
    if reply is None:
        return "failure", "the critic's prompt did not fit the context budget"
    if VERDICT_RE.search(reply) is None:
        rec.not_a_target()
    return parse_verdict(reply)


# ----------------------------------------------------------------------------------------------------
# The single-agent ReAct rollout, and the single-agent view of a multi-agent trajectory.

def single_agent_rollout(task_id: str, budgets: Budgets, split: str, system: dict):
    """Generator: one task solved in one ReAct conversation. Returns the trajectory record."""
    task = yield OpenRequest(task_id)
    rec = Recorder(task, split, system)
    conv = rec.conversation("single", [{"role": "system", "content": single_system(task)},
                                       {"role": "user", "content": single_task(task)}])
    k = 0  # sub-tasks the agent has declared so far
    for _ in range(budgets.single_turns):
        reply = yield ModelRequest(task_id, "single", list(conv.messages), CODE_STOP, max(k, 1))
        declared = declared_subtask(reply.text) if reply.messages is not None else None
        if declared is not None:
            k += 1
            rec.start_subtask(k, declared)
        text = record_reply(rec, conv, max(k, 1), reply)
        if text is None:
            break
        code = extract_code(text)
        if code is None:
            rec.not_a_target()
            conv.add_user(SINGLE_CODE_REMINDER)
            continue
        result = yield ExecRequest(code)
        rec.add_execution(max(k, 1), 1, code, result)
        if rec.completed:
            break
        conv.add_user(output_turn(result.output))
    else:
        rec.stop("single_turns", max(k, 1))
    rec.set_evaluation((yield EvalRequest()))
    return rec.record


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


# ----------------------------------------------------------------------------------------------------
# Engines: what answers model requests. Each has complete(requests, adapters, budgets) -> replies, with one
# adapter name (or None: the base) per request; `mixes_adapters` says whether requests of different adapters
# may share one call (the scheduler groups by adapter otherwise), `batches` whether requests pending together
# run faster as one call (the scheduler then keeps rollouts in step, see run_rollouts).

PREFIX_CACHE_TOKENS = 16384  # default bound of a LocalEngine's prefix cache (SmolLM2-135M fp32: 46 KiB/token)
DETERMINISTIC_CHUNK = 64  # prefill chunk of deterministic decoding: the prefix cache's reuse granularity
PROMPT_LOOKUP = 4  # draft tokens a lone row verifies per step (model.generate's prompt_lookup)


class LocalEngine:
    """A model loaded in this process (prost's own Transformer), shared by the roles that run on it.

    By default each role's adapter runs merged into its own copy of the weights the adapter changes
    (`lora.merged_copy`; embeddings, norms and the vocabulary projection stay shared): a call then costs exactly
    the base model's FLOPs, and decoding skips the adapter's narrow matmuls, about a fifth of SmolLM2-135M's
    decode time on a CPU. The price is one copy of the adapted projections per role (SmolLM2-135M fp32:
    425 MB), and calls of different roles run as separate batches. With `mix_adapters` the adapters stay
    unmerged on the one base and each batch row runs its own (`lora.route_rows`): calls of every role share
    a batch, at the cost of the adapters' matmuls. All weights are stored the way one-row products read
    fastest (`model.lay_out_for_decoding`).

    A prefix cache (per adapter, `prefix_cache_tokens` tokens at most, 0 = off) lets each call compute only the
    prompt tokens no earlier call has computed. `deterministic` decodes every call on its own (batch 1, prompt
    prefilled in aligned chunks): a call's tokens then depend on its prompt alone, not on which calls shared its
    batch or what the cache held, so results do not change with --workers or --max-batch (see generate).
    `prompt_lookup` drafts that many tokens from a lone row's own context per step (0 = off).
    """

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: str = "float32",
                 prefix_cache_tokens: int = PREFIX_CACHE_TOKENS, deterministic: bool = False,
                 prompt_lookup: int = PROMPT_LOOKUP, mix_adapters: bool = False):
        self.name = str(name_or_path)
        self.base = model.lay_out_for_decoding(
            model.Transformer.from_pretrained(name_or_path, device=device, dtype=getattr(torch, dtype)).eval())
        self.tokenizer = model.Tokenizer.from_pretrained(name_or_path)
        self.models: dict[str | None, model.Transformer] = {None: self.base}  # adapter name -> what runs it
        self.adapter_weights: dict[str | None, int] = {None: 0}  # what each call runs besides the base's weights
        self.prefix_cache = model.PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.deterministic = deterministic
        self.prompt_lookup = prompt_lookup
        self.mixes_adapters = mix_adapters
        self.batches = not deterministic

    def load_adapter(self, folder: str, name: str) -> None:
        if self.mixes_adapters:  # unmerged on the base, inactive until a batch routes rows to it
            lora.load_adapter(self.base, folder, name)
            self.models[name] = self.base
            self.adapter_weights[name] = sum(p.numel() for p in lora.adapter_parameters(self.base, name))
        else:  # in eval mode (no adapter dropout); the merged weights are new tensors, laid out like the base's
            self.models[name] = model.lay_out_for_decoding(lora.merged_copy(self.base, folder, name))
            self.adapter_weights[name] = 0
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # keys/values cached under this name may come from other weights

    def count(self, messages: list[dict]) -> int:
        return len(self.tokenizer.chat(messages, add_generation_prompt=True)[0])

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        if not self.mixes_adapters and len(set(adapters)) > 1:
            raise ValueError("this engine runs adapters merged: one adapter per complete() call")
        net = self.models[adapters[0]]
        limit = min(budgets.context, net.config.max_position_embeddings) - budgets.new_tokens
        fitted = [data.fit_messages(r.messages, self.count, limit) for r in requests]
        runnable = [i for i, m in enumerate(fitted) if m is not None]
        replies = [ModelReply("", None) for _ in requests]
        if not runnable:
            return replies
        prompts = [self.tokenizer.chat(fitted[i], add_generation_prompt=True)[0] for i in runnable]
        start = time.perf_counter()
        decode = lambda rows: model.generate(  # noqa: E731
            net, [prompts[j] for j in rows], budgets.new_tokens, self.tokenizer.stop_ids, tokenizer=self.tokenizer,
            stop_strings=[requests[runnable[j]].stop_strings for j in rows], prefix_cache=self.prefix_cache,
            namespace=None if self.mixes_adapters else adapters[0],
            adapters=[adapters[runnable[j]] for j in rows] if self.mixes_adapters else None,
            prefill_chunk=DETERMINISTIC_CHUNK if self.deterministic else None, prompt_lookup=self.prompt_lookup)
        with torch.no_grad():
            if self.deterministic:
                generations = [decode([j])[0] for j in range(len(prompts))]
            else:  # rows of one adapter side by side: lora.route_rows then updates them as one slice
                order = sorted(range(len(prompts)), key=lambda j: str(adapters[runnable[j]]))
                generations = [g for _, g in sorted(zip(order, decode(order)), key=lambda pair: pair[0])]
        share = (time.perf_counter() - start) / len(runnable)  # each call's share of the batch's time
        for i, g in zip(runnable, generations):
            computed = model.generate_flops(net.config, g.n_prompt, g.n_new, cached=g.n_cached,
                                            adapter_weights=self.adapter_weights[adapters[i]])
            replies[i] = ModelReply(g.text.rstrip(), fitted[i], g.n_prompt, g.n_new,
                                    model.generate_flops(net.config, g.n_prompt, g.n_new), share, g.stop_reason,
                                    cached_tokens=g.n_cached, flops_computed=computed)
        return replies


class HttpEngine:
    """An OpenAI-compatible chat endpoint (POST <base>/v1/chat/completions, temperature 0), stdlib only.
    Token counts and FLOPs are not known for a remote model: they are recorded as 0 (collect can fill
    token counts with the tokenizer of the model being trained). Each request is sent on its own, so pending
    requests of every role can share one complete() call."""

    mixes_adapters = True
    batches = True  # sent concurrently: an endpoint like vLLM batches them

    def __init__(self, url: str, model_name: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 300,
                 count=None, retries: int = 5, backoff: float = 1.0, concurrency: int = 16):
        self.url = chat_completions_url(url)
        self.name = f"{model_name} @ {url}"
        self.model_name = model_name
        self.api_key = os.environ.get(api_key_env, "")
        self.timeout = timeout
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency
        # Without the trained model's tokenizer, about 4 characters per token decides what fits.
        self.count = count or (lambda messages: sum(len(m["content"]) for m in messages) // 4)

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        """All pending requests at once (an endpoint like vLLM batches concurrent requests), replies in order."""
        if len(requests) <= 1:
            return [self.complete_one(r, budgets) for r in requests]
        with ThreadPoolExecutor(max_workers=min(len(requests), self.concurrency)) as threads:
            return list(threads.map(lambda r: self.complete_one(r, budgets), requests))

    def complete_one(self, request: ModelRequest, budgets: Budgets) -> ModelReply:
        messages = data.fit_messages(request.messages, self.count, budgets.context - budgets.new_tokens)
        if messages is None:
            return ModelReply("", None)
        body = {"model": self.model_name, "temperature": 0, "max_tokens": budgets.new_tokens,
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        if request.stop_strings:
            body["stop"] = list(request.stop_strings)
        start = time.perf_counter()
        answer = post_json(self.url, body, self.api_key, self.timeout, self.retries, self.backoff)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.url} answered without choices[0].message.content: "
                             f"{json.dumps(answer)[:200]}") from None
        text = close_code_block(text.rstrip())
        stop_reason = "length" if choice.get("finish_reason") == "length" else "stop_string"
        return ModelReply(text, messages, seconds=time.perf_counter() - start, stop_reason=stop_reason)


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


RETRY_STATUS = {429, 500, 502, 503, 504}  # rate limits and overloaded or restarting servers: worth another try


def post_json(url: str, body: dict, api_key: str, timeout: float, retries: int = 0, backoff: float = 1.0) -> dict:
    """POST body as JSON and parse the JSON answer. HTTP 429/5xx and failed connections are retried `retries`
    times, waiting backoff * 2^i seconds (or the server's Retry-After, if shorter than a minute) before try i+1;
    after the last, a ValueError says what the endpoint answered."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    for attempt in range(retries + 1):
        wait = backoff * 2 ** attempt
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            problem = f"{url} answered HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
            if e.code not in RETRY_STATUS:
                raise ValueError(problem) from None
            after = e.headers.get("Retry-After", "")
            wait = min(float(after), 60.0) if after.replace(".", "", 1).isdigit() else wait
        except json.JSONDecodeError as e:
            raise ValueError(f"{url} answered something that is not JSON: {e}") from None
        except (urllib.error.URLError, OSError) as e:
            problem = f"cannot use the chat endpoint {url}: {e}"
        if attempt < retries:
            time.sleep(wait)
    raise ValueError(f"{problem} (gave up after {retries + 1} attempts)")


def close_code_block(text: str) -> str:
    """OpenAI-style endpoints drop the stop string; put the closing fence back so the recorded turn has
    the same shape as a local model's."""
    if CODE_RE.search(text) and text.count("```") % 2 == 1:
        return text + "\n```"
    return text


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
# Systems: which engine and adapter answer each role.

@dataclass
class Binding:
    engine: object
    adapter: str | None = None  # adapter name inside the engine (None = the base model)
    adapter_path: str | None = None  # the folder it came from (recorded in trajectories)


@dataclass
class System:
    kind: str  # "multi" or "single"
    roles: dict[str, Binding]
    teacher: str | None = None

    def describe(self, budgets: Budgets) -> dict:
        return {"kind": self.kind, "teacher": self.teacher,
                "roles": {role: {"model": b.engine.name, "adapter": b.adapter_path}
                          for role, b in self.roles.items()},
                "budgets": asdict(budgets)}


def build_system(kind: str, models: dict[str, str], adapters: dict[str, str | None], device: str = "cpu",
                 dtype: str = "float32", teacher: str | None = None, **engine) -> System:
    """Load each distinct base model once; roles with an adapter load it under the role's name.
    `models` maps role -> model id or folder; a role with an adapter but no model uses the adapter's
    recorded base model. `engine`: LocalEngine options (engine_options)."""
    role_names = ("planner", "executor", "critic") if kind == "multi" else ("single",)
    engines: dict[str, LocalEngine] = {}
    roles = {}
    for role in role_names:
        adapter = adapters.get(role)
        base = models.get(role) or (lora.adapter_base(adapter) if adapter else None)
        if base is None:
            raise ValueError(f"no model for the {role}: give --model or --{role}-model or --{role}-adapter")
        if base not in engines:
            engines[base] = LocalEngine(base, device, dtype, **engine)
        if adapter:
            engines[base].load_adapter(adapter, role)
        roles[role] = Binding(engines[base], role if adapter else None, str(adapter) if adapter else None)
    return System(kind, roles, teacher)


def single_engine_system(engine, kind: str = "multi", teacher: str | None = None) -> System:
    """Every role answered by one engine without adapters (teachers, untrained models)."""
    role_names = ("planner", "executor", "critic") if kind == "multi" else ("single",)
    return System(kind, {role: Binding(engine) for role in role_names}, teacher)


# ----------------------------------------------------------------------------------------------------
# The scheduler: many rollouts at once, world calls in parallel, model calls batched.

@dataclass
class RunStats:
    tasks: int = 0
    seconds: float = 0.0  # wall time of the whole run
    startup_seconds: float = 0.0  # of which starting world worker processes (0 with a pool passed in)
    model_seconds: float = 0.0  # time inside engine.complete (the main thread)
    world_seconds: float = 0.0  # time world sessions spent on requests (summed over sessions)
    batch_sizes: list[int] = field(default_factory=list)  # requests per engine.complete call

    def summary(self) -> str:
        per_minute = self.tasks / self.seconds * 60 if self.seconds else 0.0
        mean_batch = sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0
        outside = 1 - self.model_seconds / self.seconds if self.seconds else 0.0
        return (f"{self.tasks} tasks in {self.seconds:.1f} s ({per_minute:.1f} tasks/minute; "
                f"{self.startup_seconds:.1f} s of it starting world workers); "
                f"{len(self.batch_sizes)} model batches, mean size {mean_batch:.2f}, "
                f"max {max(self.batch_sizes, default=0)}; {outside:.0%} of wall time outside the model")


@dataclass
class Slot:
    """One running rollout and the request it is waiting on."""
    rollout: object
    request: object


def serve_world(session, request):
    """Answer a world request in the rollout's session (called from a thread); returns (result, seconds)."""
    start = time.perf_counter()
    if isinstance(request, OpenRequest):
        result = session.open(request.task_id)
    elif isinstance(request, ExecRequest):
        result = session.execute(request.code)
    elif isinstance(request, EvalRequest):
        result = session.evaluate()
    else:
        raise TypeError(f"not a world request: {request!r}")
    return result, time.perf_counter() - start


def serve_models(slots: dict[int, Slot], system: System, budgets: Budgets, max_batch: int,
                 stats: RunStats) -> dict[int, ModelReply]:
    """One engine.complete call per group of pending model requests, in chunks of at most max_batch: a group
    is every request for one engine when it mixes adapters, else those of one (engine, adapter, stop strings)."""
    groups: dict[tuple, list[int]] = {}
    for i, slot in slots.items():
        binding = system.roles.get(slot.request.role)
        if binding is None:
            raise ValueError(f"the system has no '{slot.request.role}' role (it has "
                             f"{', '.join(system.roles)})")
        engine = binding.engine
        key = (id(engine),) if engine.mixes_adapters else (id(engine), binding.adapter, slot.request.stop_strings)
        groups.setdefault(key, []).append(i)
    replies = {}
    for members in groups.values():
        engine = system.roles[slots[members[0]].request.role].engine
        for start in range(0, len(members), max_batch):
            chunk = members[start:start + max_batch]
            requests = [slots[i].request for i in chunk]
            began = time.perf_counter()
            answers = engine.complete(requests, [system.roles[r.role].adapter for r in requests], budgets)
            stats.model_seconds += time.perf_counter() - began
            stats.batch_sizes.append(len(chunk))
            replies.update(zip(chunk, answers))
    return replies


def run_rollouts(task_ids: list[str], system: System, budgets: Budgets, *, split: str, root=None,
                 workers: int = 4, max_batch: int = 16, on_trajectory=None, rollout=None,
                 pool=None, session_options: dict | None = None, in_step: bool | None = None) -> RunStats:
    """Roll out every task with `workers` world sessions at once; call on_trajectory(record) as each
    finishes. `rollout(task_id)` makes a rollout generator (default: the system's kind). A running
    world.WorldPool can be passed in (its first `workers` sessions are used, and it stays open).
    `in_step`: whether every world call of a round finishes before the next model calls (default: when an
    engine batches; see below). In step, the order in which tasks finish does not depend on timing."""
    if rollout is None:
        make = multi_agent_rollout if system.kind == "multi" else single_agent_rollout
        described = system.describe(budgets)
        rollout = lambda task_id: make(task_id, budgets, split, described)  # noqa: E731
    stats, queue, active = RunStats(), deque(task_ids), {}
    began = time.perf_counter()
    n = max(1, min(workers, len(task_ids)))
    own_pool = pool is None
    if own_pool:
        pool = world.WorldPool(n, root=root, **(session_options or {}))
        stats.startup_seconds = time.perf_counter() - began
    sessions = pool.sessions[:n]  # a rollout keeps its session from open to evaluate
    in_world: dict[int, Future] = {}  # world calls running, by session
    if in_step is None:
        in_step = any(binding.engine.batches for binding in system.roles.values())
    try:
        with ThreadPoolExecutor(max_workers=len(sessions)) as threads:
            while queue or active:
                for i in range(len(sessions)):
                    if i not in active and queue:
                        generator = rollout(queue.popleft())
                        active[i] = Slot(generator, next(generator))
                waiting = {i: s for i, s in active.items() if isinstance(s.request, ModelRequest)}
                for i, s in active.items():
                    if i not in waiting and i not in in_world:
                        in_world[i] = threads.submit(serve_world, sessions[i], s.request)
                # Model calls are served while world calls run. Engines that batch get rounds in step: every
                # world call of a round finishes before the next model calls, which then share batches. Others
                # (each call decoded alone) gain nothing from waiting: a rollout whose world call is still
                # running waits for it, the rest go on, and the scheduler only waits when the model is idle.
                results = serve_models(waiting, system, budgets, max_batch, stats) if waiting else {}
                if in_step or not results:
                    wait(in_world.values(), return_when=ALL_COMPLETED if in_step else FIRST_COMPLETED)
                for i in [i for i, job in in_world.items() if job.done()]:
                    results[i], seconds = in_world.pop(i).result()
                    stats.world_seconds += seconds
                for i in sorted(results):
                    try:
                        active[i].request = active[i].rollout.send(results[i])
                    except StopIteration as finished:
                        del active[i]
                        stats.tasks += 1
                        if on_trajectory is not None:
                            on_trajectory(finished.value)
    finally:
        if own_pool:
            pool.close()
    stats.seconds = time.perf_counter() - began
    return stats


# ----------------------------------------------------------------------------------------------------
# Teachers: collect trajectories for training.

def teacher_rollout(task_id: str, budgets: Budgets, split: str, multi: dict, single: dict):
    """Generator: a multi-agent rollout plus its single-agent view. Returns both records."""
    task = yield OpenRequest(task_id)
    record = yield from multi_agent_protocol(task, budgets, split, multi)
    return [record, single_view(record, task, single)]


def count_tokens(record: dict, tokenizer) -> None:
    """Fill a teacher's calls' token counts with the tokenizer of the model being trained. FLOPs stay
    0: no model of ours ran."""
    for call in record["calls"]:
        call["prompt_tokens"] = len(tokenizer.chat(call["messages"], add_generation_prompt=True)[0])
        call["new_tokens"] = len(tokenizer.encode(call["output"]))


def teacher_system(teacher: str | None, url: str | None = None, url_model: str | None = None,
                   api_key_env: str = "OPENAI_API_KEY", root=None, recovery_share: float = 0.5,
                   device: str = "cpu", dtype: str = "float32", tokenizer=None, engine: dict | None = None
                   ) -> System:
    """The system a teacher runs as: gold, a chat endpoint, or a loadable model, as every role.
    `tokenizer` (of the model being trained) measures an endpoint's prompts against the context budget."""
    if url:
        if not url_model:
            raise ValueError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        count = None
        if tokenizer is not None:
            count = lambda messages: len(tokenizer.chat(messages, add_generation_prompt=True)[0])  # noqa: E731
        return single_engine_system(HttpEngine(url, url_model, api_key_env, count=count),
                                    teacher=f"{url_model} @ {url}")
    if teacher == "gold":
        return single_engine_system(GoldEngine(root, recovery_share), teacher="gold")
    if not teacher:
        raise ValueError("give a teacher: --teacher gold, --teacher MODEL or --teacher-url URL")
    return single_engine_system(LocalEngine(teacher, device, dtype, **(engine or {})), teacher=teacher)


@dataclass
class CollectSummary:
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # failed AppWorld's evaluation (dropped unless kept)
    skipped: int = 0  # already in the output file
    stats: RunStats | None = None


def collect(system: System, split: str, out, budgets: Budgets, *, root=None, workers: int = 4,
            max_batch: int = 16, keep_failed: bool = False, limit: int | None = None,
            scenarios: int | None = None, tokenizer=None, pool=None) -> CollectSummary:
    """Roll out the teacher on a split and append the trajectories (multi-agent and single-agent view)
    of tasks that pass evaluation to `out`, a task's two records in one write. Tasks already in `out`
    are skipped (resume). One collection per file at a time (store.OutputLock)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the trajectory file to write, e.g. {out / 'train.jsonl'}")
    store.check_writable(out.parent)
    with store.OutputLock(out, folder=False):
        task_ids = world.select_tasks(split, root, scenarios=scenarios, limit=limit)  # run or not
        done = collected_task_ids(out)
        todo = [t for t in task_ids if t not in done]
        summary = CollectSummary(skipped=len(task_ids) - len(todo))
        multi = system.describe(budgets)
        single = {**multi, "kind": "single", "teacher": f"{system.teacher} (single-agent view)",
                  "roles": {"single": multi["roles"]["executor"]}}

        def keep(records: list[dict]) -> None:
            passed = records[0]["evaluation"]["success"]
            (summary.kept if passed else summary.failed).append(records[0]["task_id"])
            if passed or keep_failed:
                for record in records:
                    if tokenizer is not None:
                        count_tokens(record, tokenizer)
                data.write_trajectories(out, records)  # one write; if a crash tears it, see collected_task_ids

        # in step: trajectories are appended as tasks finish, and training follows the file's order
        summary.stats = run_rollouts(todo, system, budgets, split=split, root=root, workers=workers,
                                     max_batch=max_batch, on_trajectory=keep, pool=pool, in_step=True,
                                     rollout=lambda t: teacher_rollout(t, budgets, split, multi, single))
    return summary


def collected_task_ids(out: Path) -> set[str]:
    """Tasks whose teacher records are all in `out` (the multi-agent rollout and its single-agent view).
    A task with only one of them (its write was torn by a crash) loses that record here and runs again."""
    if not out.exists():
        return set()
    kinds: dict[str, set[str]] = {}
    for record in data.read_trajectories(out):
        if record["system"].get("teacher") is not None:
            kinds.setdefault(record["task_id"], set()).add(record["system"]["kind"])
    partial = {t for t, k in kinds.items() if k != {"multi", "single"}}
    if partial:
        store.drop_lines(out, lambda r: isinstance(r, dict) and r.get("task_id") in partial)
        print(f"{out}: {len(partial)} task(s) had only part of their records (an interrupted write); "
              f"running them again: {', '.join(sorted(partial))}", file=sys.stderr)
    return data.completed_task_ids(out)


def run(system: System, split: str, out, budgets: Budgets, *, root=None, workers: int = 4,
        max_batch: int = 16, limit: int | None = None, scenarios: int | None = None, pool=None) -> RunStats:
    """Roll out a system on a split, appending every trajectory to `out` (tasks already there are
    skipped)."""
    done = data.completed_task_ids(out)
    todo = [t for t in world.select_tasks(split, root, scenarios=scenarios, limit=limit) if t not in done]
    return run_rollouts(todo, system, budgets, split=split, root=root, workers=workers, max_batch=max_batch,
                        pool=pool, on_trajectory=lambda record: data.write_trajectory(out, record))


# ----------------------------------------------------------------------------------------------------
# Command line.

def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, help="task split of the world (train, dev, test, ...)")
    parser.add_argument("--out", required=True, help="trajectory file (JSONL) to append to; tasks "
                        "already in it are skipped, so an interrupted run resumes")
    parser.add_argument("--root", default=None, help="APPWORLD_ROOT of the world (default: "
                        "$APPWORLD_ROOT, else the repo's miniworld/)")
    parser.add_argument("--workers", type=int, default=4, help="world sessions (worker processes) "
                        "running tasks at once")
    parser.add_argument("--max-batch", type=int, default=16, help="most model calls batched into one "
                        "generate call")
    parser.add_argument("--scenarios", type=int, default=None, help="only the split's first N scenarios "
                        "(all their variants)")
    parser.add_argument("--limit", type=int, default=None, help="only the split's first N tasks (after --scenarios) "
                        "(a rerun with the same N adds nothing)")
    parser.add_argument("--device", default="cpu", help="torch device for local models")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype for local models")
    add_decode_flags(parser, "batched")
    defaults = Budgets()
    for f in fields(Budgets):
        parser.add_argument(f"--max-{f.name.replace('_', '-')}", dest=f.name, type=int,
                            default=getattr(defaults, f.name),
                            help=f"budget: {BUDGET_HELP[f.name]} (default {getattr(defaults, f.name)})")


def add_decode_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """Flags of how local models decode (agents.py and evaluate.py; evaluation defaults to deterministic)."""
    parser.add_argument("--decode", choices=("batched", "deterministic"), default=default,
                        help="batched: pending calls share one generate batch (fastest; near-ties can go either "
                        "way depending on the batch); deterministic: every call decoded on its own, so results "
                        f"do not depend on --workers/--max-batch (default: {default})")
    parser.add_argument("--prefix-cache-tokens", type=int, default=PREFIX_CACHE_TOKENS,
                        help="tokens of keys/values kept to reuse across calls (least recently used evicted "
                        f"first; default {PREFIX_CACHE_TOKENS})")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt from scratch (for ablations)")
    parser.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP,
                        help="draft tokens a call decoding alone copies from its own prompt and verifies in one "
                        f"step (0 = off; default {PROMPT_LOOKUP})")
    parser.add_argument("--mix-adapters", action="store_true",
                        help="keep the roles' adapters unmerged on their shared base, so pending calls of every "
                        "role share one batch (needs --decode batched; each call also runs its adapter's matmuls); "
                        "default: each adapter merged into its own copy of the weights it changes")


def engine_options(args) -> dict:
    """LocalEngine keyword arguments from the decode flags."""
    if args.prefix_cache_tokens < 1:
        raise ValueError("--prefix-cache-tokens must be positive (use --no-prefix-cache to turn it off)")
    if args.prompt_lookup < 0:
        raise ValueError("--prompt-lookup must be 0 (off) or positive")
    if args.mix_adapters and args.decode == "deterministic":
        raise ValueError("--mix-adapters needs --decode batched (deterministic decoding runs every call alone)")
    return {"prefix_cache_tokens": 0 if args.no_prefix_cache else args.prefix_cache_tokens,
            "deterministic": args.decode == "deterministic", "prompt_lookup": args.prompt_lookup,
            "mix_adapters": args.mix_adapters}


def budgets_from(args) -> Budgets:
    budgets = Budgets(**{f.name: getattr(args, f.name) for f in fields(Budgets)})
    for f in fields(Budgets):
        if getattr(budgets, f.name) < (0 if f.name.endswith("retries") else 1):
            raise ValueError(f"--max-{f.name.replace('_', '-')} must be positive")
    if budgets.new_tokens >= budgets.context:
        raise ValueError("--max-new-tokens must be smaller than --max-context")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ProST agents: collect teacher trajectories or roll "
                                     "out a (trained) system on a split of the world.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("collect", help="record teacher trajectories for training")
    c.add_argument("--teacher", default=None, help="'gold' (replay the mini-world's gold sub-tasks) or a "
                   "model id / folder that plays every role")
    c.add_argument("--teacher-url", default=None, help="OpenAI-compatible endpoint (base URL, e.g. "
                   "http://host:8000/v1) that plays every role")
    c.add_argument("--teacher-model", default=None, help="model name to request from --teacher-url")
    c.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the "
                   "endpoint's API key")
    c.add_argument("--count-with", default=None, help="model id / folder whose tokenizer counts the "
                   "teacher's tokens (FLOPs stay 0 for teachers)")
    c.add_argument("--keep-failed", action="store_true", help="also keep trajectories whose task fails "
                   "AppWorld's evaluation")
    c.add_argument("--recovery-share", type=float, default=0.5, help="gold teacher: share of tasks that "
                   "get a mistake-and-recovery sub-task")
    add_common_flags(c)
    r = commands.add_parser("run", help="roll out a system of models (with optional LoRA adapters)")
    r.add_argument("--model", default=None, help="base model id or folder for every role")
    r.add_argument("--single", action="store_true", help="run the single-agent ReAct baseline instead "
                   "of planner/executor/critic")
    for role in data.ROLES:
        r.add_argument(f"--{role}-model", default=None, help=f"base model for the {role} (overrides --model)")
        r.add_argument(f"--{role}-adapter", default=None, help=f"LoRA adapter folder for the {role}")
    add_common_flags(r)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budgets = budgets_from(args)
        if args.command == "collect":
            tokenizer = model.Tokenizer.from_pretrained(args.count_with) if args.count_with else None
            system = teacher_system(args.teacher, args.teacher_url, args.teacher_model, args.api_key_env,
                                    args.root, args.recovery_share, args.device, args.dtype, tokenizer,
                                    engine_options(args))
            summary = collect(system, args.split, args.out, budgets, root=args.root, workers=args.workers,
                              max_batch=args.max_batch, keep_failed=args.keep_failed, limit=args.limit,
                              scenarios=args.scenarios, tokenizer=tokenizer)
            fate = "kept" if args.keep_failed else "dropped"
            print(f"kept {len(summary.kept)}, failed evaluation {len(summary.failed)} ({fate}), "
                  f"already in {args.out}: {summary.skipped}")
            if summary.failed:
                print("failed:", " ".join(summary.failed))
            print(summary.stats.summary())
        else:
            kind = "single" if args.single else "multi"
            models = {role: getattr(args, f"{role}_model") or args.model for role in data.ROLES}
            adapters = {role: getattr(args, f"{role}_adapter") for role in data.ROLES}
            system = build_system(kind, models, adapters, args.device, args.dtype, **engine_options(args))
            stats = run(system, args.split, args.out, budgets, root=args.root, workers=args.workers,
                        max_batch=args.max_batch, limit=args.limit, scenarios=args.scenarios)
            records = [r for r in data.read_trajectories(args.out) if r["split"] == args.split]
            passed = sum(r["evaluation"]["success"] for r in records if r["evaluation"])
            print(f"{passed}/{len(records)} tasks of {args.split} in {args.out} pass evaluation")
            print(stats.summary())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
