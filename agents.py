"""The agents of ProST: planner, executor and critic (and the single-agent ReAct baseline), the protocol they
follow in a task, how a task is run and how its trajectory is recorded.

Where this sits: world.py gives AppWorld sessions; this file makes language models act in them. The records
it writes are what data.py cuts into per-role examples for prost.py to train on, and what evaluate.py scores.
Beside it: teacher.py (the gold teacher, which answers from the mini-world's solutions) and rollout.py (many
tasks at once with batched, cached decoding; the chat-endpoint engine; the collect and run command line). They
drive the same rollouts and record the same trajectories as the plain driver here.

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

A rollout is a Python generator. It yields requests (OpenRequest, ModelRequest, ExecRequest, EvalRequest),
receives their results, and returns the finished trajectory record (trajectories.py's format). A System says which
engine (and adapter) answers each role. `run_task` drives one rollout: each world request goes to a world
session, each model request to its role's engine, one at a time. The PlainEngine answers a call with the
model's plain greedy `model.generate`, the role's LoRA adapter switched on (`lora.set_adapter`). Rollouts
only see their own results, so any driver that answers the same requests records the same trajectory.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import data
import lora
import model
import model_io
import trajectories

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
    them, rule-based teachers (teacher.GoldEngine) answer from them instead of parsing the messages."""
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
    cached_tokens: int = 0  # prompt tokens whose keys/values came from a prompt cache (not computed)
    flops_computed: float = 0.0  # forward FLOPs actually computed (the cached prefix left out)

    @property
    def is_target(self) -> bool:
        """Whether the output may be learned: not a marked mistake, not cut by the new-token budget."""
        return self.train and self.stop_reason != "length"


# ----------------------------------------------------------------------------------------------------
# Recording a trajectory (the format is trajectories.py's, checked by validate_trajectory).

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
        self.record = {"schema": trajectories.SCHEMA_VERSION, "task_id": task.task_id, "split": split,
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
# The single-agent ReAct rollout.

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


# ----------------------------------------------------------------------------------------------------
# Systems: which engine and adapter answer each role. An engine has complete(requests, adapters, budgets)
# -> replies, one adapter name (or None: the base model) per request, and a `name` recorded in trajectories.

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

    def binding(self, role: str) -> Binding:
        if role not in self.roles:
            raise ValueError(f"the system has no '{role}' role (it has {', '.join(self.roles)})")
        return self.roles[role]

    def describe(self, budgets: Budgets) -> dict:
        return {"kind": self.kind, "teacher": self.teacher,
                "roles": {role: {"model": b.engine.name, "adapter": b.adapter_path}
                          for role, b in self.roles.items()},
                "budgets": asdict(budgets)}


def role_names(kind: str) -> tuple[str, ...]:
    return trajectories.MULTI_AGENT_ROLES if kind == "multi" else ("single",)


def build_system(kind: str, models: dict[str, str], adapters: dict[str, str | None], load_engine=None) -> System:
    """Load each distinct base model once (`load_engine(base)`, default: a PlainEngine); roles with an adapter
    load it into their base's engine under the role's name. `models` maps role -> model id or folder; a role
    with an adapter but no model uses the adapter's recorded base model."""
    load_engine = load_engine or PlainEngine
    engines, roles = {}, {}
    for role in role_names(kind):
        adapter = adapters.get(role)
        base = models.get(role) or (lora.adapter_base(adapter) if adapter else None)
        if base is None:
            raise ValueError(f"no model for the {role}: give --model or --{role}-model or --{role}-adapter")
        if base not in engines:
            engines[base] = load_engine(base)
        if adapter:
            engines[base].load_adapter(adapter, role)
        roles[role] = Binding(engines[base], role if adapter else None, str(adapter) if adapter else None)
    return System(kind, roles)


def single_engine_system(engine, kind: str = "multi", teacher: str | None = None) -> System:
    """Every role answered by one engine without adapters (teachers, untrained models)."""
    return System(kind, {role: Binding(engine) for role in role_names(kind)}, teacher)


# ----------------------------------------------------------------------------------------------------
# The plain engine and the sequential driver: one task, one request at a time.

class PlainEngine:
    """A model loaded in this process (model.py's Transformer), shared by the roles that run on it, each role's
    LoRA adapter loaded unmerged and switched on for that role's calls. A call's prompt is the conversation fitted
    to the context budget (data.fit_messages) in the chat template; its reply is model.generate's greedy text."""

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: str = "float32"):
        self.name = str(name_or_path)
        self.base = model_io.load_model(name_or_path, device=device, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = model_io.load_tokenizer(name_or_path)
        self.adapter_weights: dict[str | None, int] = {None: 0}  # what each call runs besides the base's weights

    def load_adapter(self, folder: str, name: str) -> None:
        lora.load_adapter(self.base, folder, name)
        self.adapter_weights[name] = sum(p.numel() for p in lora.adapter_parameters(self.base, name))

    def count(self, messages: list[dict]) -> int:
        return len(self.tokenizer.chat(messages, add_generation_prompt=True)[0])

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        return [self.complete_one(r, adapter, budgets) for r, adapter in zip(requests, adapters)]

    def complete_one(self, request: ModelRequest, adapter: str | None, budgets: Budgets) -> ModelReply:
        config = self.base.config
        limit = min(budgets.context, config.max_position_embeddings) - budgets.new_tokens
        messages = data.fit_messages(request.messages, self.count, limit)
        if messages is None:
            return ModelReply("", None)
        prompt = self.tokenizer.chat(messages, add_generation_prompt=True)[0]
        lora.set_adapter(self.base, adapter)
        start = time.perf_counter()
        with torch.no_grad():
            [g] = model.generate(self.base, [prompt], budgets.new_tokens, self.tokenizer.stop_ids,
                                 tokenizer=self.tokenizer, stop_strings=request.stop_strings)
        flops = model.generate_flops(config, g.n_prompt, g.n_new)
        computed = model.generate_flops(config, g.n_prompt, g.n_new, adapter_weights=self.adapter_weights[adapter])
        return ModelReply(g.text.rstrip(), messages, g.n_prompt, g.n_new, flops, time.perf_counter() - start,
                          g.stop_reason, flops_computed=computed)


def serve_world(session, request):
    """The result of a world request in the rollout's world session (world.WorldSession)."""
    if isinstance(request, OpenRequest):
        return session.open(request.task_id)
    if isinstance(request, ExecRequest):
        return session.execute(request.code)
    if isinstance(request, EvalRequest):
        return session.evaluate()
    raise TypeError(f"not a world request: {request!r}")


def run_task(task_id: str, system: System, budgets: Budgets, session, *, split: str, rollout=None) -> dict:
    """Run one task in `session` (a world.WorldSession) and return its trajectory record: the rollout's requests
    are answered one by one, model requests by the engine of their role. `rollout(task_id)` makes the rollout
    generator (default: the system's kind)."""
    if rollout is None:
        make = multi_agent_rollout if system.kind == "multi" else single_agent_rollout
        described = system.describe(budgets)
        rollout = lambda task_id: make(task_id, budgets, split, described)  # noqa: E731
    generator = rollout(task_id)
    request = next(generator)
    while True:
        if isinstance(request, ModelRequest):
            binding = system.binding(request.role)
            result = binding.engine.complete([request], [binding.adapter], budgets)[0]
        else:
            result = serve_world(session, request)
        try:
            request = generator.send(result)
        except StopIteration as finished:
            return finished.value
