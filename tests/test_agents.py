"""agents.py: the protocol, the plain engine and the sequential driver, checked against independent references:
AppWorld's own evaluator (through world.py's sessions), data.py's reader and example builder, and hand-written
replies and budgets. rollout.py's scheduler is checked equal to the driver here in tests/test_rollout.py, the
gold teacher in tests/test_teacher.py.

One mini-world and one pool of world worker processes are shared by the whole test session (conftest.py).
"""

from dataclasses import asdict

import pytest

import agents
import data
import model
import trajectories
import world

TINY = agents.Budgets(subtasks=2, executor_turns=2, critic_retries=1, format_retries=1, single_turns=3,
                      new_tokens=24, context=1024)
BUDGET_NAMES = {f for f in asdict(TINY)}


def run_tasks(task_ids, system, budgets, world_pool):
    """The core's way to roll out tasks: one after another in one world session, with agents.run_task."""
    return [agents.run_task(t, system, budgets, world_pool.sessions[0], split="dev") for t in task_ids]


# ----------------------------------------------------------------------------------------------------
# Parsers (hand-written cases).

def test_planner_decisions_parse_and_malformed_ones_are_none():
    assert agents.parse_plan("Sub-task: Log in to Spotify.") == "Log in to Spotify."
    assert agents.parse_plan("Thinking first.\n**Subtask**: Find the playlist") == "Find the playlist"
    assert agents.parse_plan("FINISH") == agents.FINISH
    assert agents.parse_plan("Finished.") == agents.FINISH
    assert agents.parse_plan("I will now log in.") is None
    assert agents.parse_plan("") is None


def test_critic_verdicts_parse_and_malformed_ones_are_failures():
    assert agents.parse_verdict("Verdict: success\nReason: it printed 9.") == ("success", "it printed 9.")
    assert agents.parse_verdict("verdict: FAILURE\nreason: 401 error") == ("failure", "401 error")
    verdict, reason = agents.parse_verdict("looks fine to me")
    assert verdict == "failure" and "unparseable" in reason and "looks fine" in reason


def test_code_blocks_python_py_unclosed_and_none():
    assert agents.extract_code("Let me look.\n```python\nprint(1)\n```") == "print(1)"
    assert agents.extract_code("```py\nx = 2\nprint(x)\n```\nmore") == "x = 2\nprint(x)"
    assert agents.extract_code("```python\nprint(apis.spotify.login(") == "print(apis.spotify.login("
    assert agents.extract_code("Done: 9 songs.") is None
    assert agents.extract_code("```\nprint(1)\n```") is None  # only python / py blocks run


# ----------------------------------------------------------------------------------------------------
# What the model saw is what is recorded and trained on.

def scripted_reply(prompt: str) -> str:
    """What a well-behaved model answers, read off the prompt it was given: the planner plans two sub-tasks
    and finishes, the executor prints a long output twice and then reports, the critic approves."""
    if "You are the planner" in prompt:
        return "Sub-task: print a long line" if prompt.count("Report:") < 2 else "FINISH"
    if "You are the critic" in prompt:
        return "Verdict: success\nReason: it printed."
    done = prompt.count("Output:")
    return "Done: printed twice." if done >= 2 else f"```python\nprint('{'xy'[done]}' * 200)\n```"


@pytest.mark.parametrize("fast", [False, True])
def test_every_recorded_call_trains_on_exactly_the_prompt_the_model_saw(tiny_preset_model, mini_world,
                                                                        world_pool, monkeypatch, fast):
    """A rollout whose context budget forces fitting (the executor's second output pushes its first one out), by
    the plain driver and engine, and by rollout.py's scheduler and LocalEngine (fast). The generate they call is
    replaced by a script that keeps every prompt it is given: those token ids are what the model saw, and each
    call's training example must hold them in front of its output."""
    seen = []

    def scripted_generate(net, prompts, max_new_tokens, stop_ids=(), tokenizer=None, stop_strings=(), **kw):
        out = []
        for prompt in prompts:
            seen.append(list(prompt))
            text = scripted_reply(tokenizer.decode(prompt))
            ids = tokenizer.encode(text)
            out.append(model.Generation(ids, text, len(prompt), len(ids), "stop_string"))
        return out

    models = {r: str(tiny_preset_model) for r in trajectories.ROLES}
    if fast:
        import decoding
        import rollout
        monkeypatch.setattr(decoding, "generate", scripted_generate)
        system = rollout.local_system("multi", models, {})
    else:
        monkeypatch.setattr(model, "generate", scripted_generate)
        system = agents.build_system("multi", models, {})
    engine = system.roles["planner"].engine
    task = world.load_split("dev", root=mini_world)[:1]

    def roll_out(budgets):
        seen.clear()
        if not fast:
            return run_tasks(task, system, budgets, world_pool)[0]
        records = []
        rollout.run_rollouts(task, system, budgets, split="dev", root=mini_world, pool=world_pool,
                             on_trajectory=records.append)
        return records[0]

    roomy = roll_out(agents.Budgets(new_tokens=64, context=4096))
    executor = [c for c in roomy["calls"] if c["role"] == "executor" and c["conversation"] == 0]
    assert not any("more characters]" in m["content"] for c in roomy["calls"] for m in c["messages"])
    # one token less than the executor's report prompt: fitting must shorten its first output there
    budgets = agents.Budgets(new_tokens=64, context=executor[2]["prompt_tokens"] - 1 + 64)
    record = roll_out(budgets)
    trajectories.validate_trajectory(record)
    calls = record["calls"]
    assert [c["role"] for c in calls].count("executor") == 6 and not record["budget_stops"]
    assert any("more characters]" in m["content"] for c in calls for m in c["messages"])  # fitting happened
    prompts = [engine.tokenizer.chat(c["messages"], add_generation_prompt=True)[0] for c in calls]
    assert prompts == seen  # the recorded messages are exactly what was tokenized for the model
    assert [c["prompt_tokens"] for c in calls] == [len(p) for p in prompts]
    by_conversation = {}
    for role in ("planner", "executor", "critic"):
        examples, report = data.build_examples([record], role, engine.tokenizer, budgets.context)
        assert not report.lines()
        for e in examples:
            by_conversation.setdefault((role, e.conversation, e.subtask), []).append(e)
    checked = 0
    for call, prompt in zip(calls, prompts):
        assert call["train"]
        output = engine.tokenizer.chat([{"role": "assistant", "content": call["output"]}])
        n_out = sum(output[1])  # its target tokens (the reply and <|im_end|>)
        holders = [e for e in by_conversation[(call["role"], call["conversation"], call["subtask"])]
                   if e.ids[:len(prompt)] == prompt and all(e.mask[len(prompt):len(prompt) + n_out])]
        assert len(holders) == 1, call
        checked += 1
    assert checked == len(calls) == len(seen)


# ----------------------------------------------------------------------------------------------------
# Rollouts with a tiny random model, and budgets.

def check_within_budgets(record, budgets):
    assert {s["budget"] for s in record["budget_stops"]} <= BUDGET_NAMES
    calls = record["calls"]
    for call in calls:
        assert call["new_tokens"] <= budgets.new_tokens
        assert call["prompt_tokens"] + call["new_tokens"] <= budgets.context
        assert call["flops"] > 0 and call["seconds"] >= 0
    planner = [c for c in calls if c["role"] == "planner"]
    assert len(planner) <= (budgets.subtasks + 1) * (budgets.format_retries + 1)
    assert len(record["subtasks"]) <= budgets.subtasks
    for s in record["subtasks"]:
        assert len(s["attempts"]) <= budgets.critic_retries + 1
    executor_calls = {}
    for c in calls:
        if c["role"] == "executor":
            executor_calls[c["conversation"]] = executor_calls.get(c["conversation"], 0) + 1
    assert all(n <= budgets.executor_turns * (budgets.critic_retries + 1) for n in executor_calls.values())
    assert len([c for c in calls if c["role"] == "single"]) <= budgets.single_turns
    assert record["evaluation"] is not None


@pytest.mark.parametrize("single", [False, True])
def test_tiny_random_model_rollout_stays_within_budgets(tiny_model, mini_world, world_pool, tmp_path, single):
    kind = "single" if single else "multi"
    system = agents.build_system(kind, {r: str(tiny_model) for r in trajectories.ROLES}, {})
    out = tmp_path / "run.jsonl"
    dev = world.load_split("dev", root=mini_world)[:2]
    for record in run_tasks(dev, system, TINY, world_pool):
        trajectories.write_trajectory(out, record)
    records = trajectories.read_trajectories(out)  # data.py's reader accepts them
    assert [r["task_id"] for r in records] == dev
    for record in records:
        check_within_budgets(record, TINY)
        assert record["system"]["kind"] == kind
        assert not record["evaluation"]["success"]  # a random model solves nothing
    if single:  # random text never completes the task: every rollout ends on the turn or context budget
        assert all({s["budget"] for s in r["budget_stops"]} & {"single_turns", "context"} for r in records)
    else:  # random text is no plan: the planner's format budget ends every rollout
        assert all(r["budget_stops"][-1]["budget"] == "format_retries" for r in records)
        # and every re-asked planner reply is recorded as no training target
        assert all(not c["train"] for r in records for c in r["calls"] if c["role"] == "planner")


class Scripted:
    """A stand-in model that always plans, always writes code and never reports: it drives every
    budget of the multi-agent protocol to its end."""
    name = "scripted"
    mixes_adapters = batches = False

    def complete(self, requests, adapters, budgets):
        replies = []
        for r in requests:
            text = {"planner": "Sub-task: look at my profile.",
                    "executor": "```python\nprint(apis.supervisor.show_profile())\n```",
                    "critic": "no idea"}[r.role]
            replies.append(agents.ModelReply(text, r.messages, 10, 5, 1.0, 0.0, "stop_id"))
        return replies


def test_every_budget_stops_the_multi_agent_protocol(mini_world, world_pool):
    system = agents.single_engine_system(Scripted())
    task = world.load_split("dev", root=mini_world)[0]
    (record,) = run_tasks([task], system, TINY, world_pool)
    stops = [(s["budget"], s["subtask"]) for s in record["budget_stops"]]
    # each sub-task: 2 attempts x 2 code turns, no report, critic unparseable -> failure
    assert stops == [("executor_turns", 1), ("executor_turns", 1), ("critic_retries", 1),
                     ("executor_turns", 2), ("executor_turns", 2), ("critic_retries", 2), ("subtasks", 3)]
    assert [len(s["attempts"]) for s in record["subtasks"]] == [2, 2]
    assert all(a["verdict"] == "failure" and "unparseable" in a["reason"]
               for s in record["subtasks"] for a in s["attempts"])
    assert len(record["executions"]) == 8 and not any(e["error"] for e in record["executions"])
    # unparseable verdicts are recorded but never learned; the well-formed replies are targets
    assert {c["role"]: c["train"] for c in record["calls"]} == {"planner": True, "executor": True, "critic": False}
    assert [c["train"] for c in record["calls"] if c["role"] == "critic"] == [False] * 4
    trajectories.validate_trajectory(record)


def test_a_role_the_system_lacks_is_a_clear_error(mini_world, world_pool):
    system = agents.System("multi", {"planner": agents.Binding(Scripted())})  # no executor, no critic
    task = world.load_split("dev", root=mini_world)[0]
    with pytest.raises(ValueError, match="no 'executor' role"):
        run_tasks([task], system, TINY, world_pool)
