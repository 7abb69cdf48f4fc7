"""agents.py: the protocol, rollouts, teachers and trajectories, checked against independent references:
the mini-world's gold sub-tasks (world.py), AppWorld's own evaluator, data.py's reader and example builder,
a tokenizer built by the `tokenizers` library (conftest), and an HTTP server written here.

One mini-world, one pool of world worker processes and the gold train trajectories are shared by the
whole test session (conftest.py).
"""

import http.server
import json
import threading
from dataclasses import asdict

import pytest
from conftest import build_chatml_tokenizer

import agents
import data
import model
import miniworld
import store
import world

TINY = agents.Budgets(subtasks=2, executor_turns=2, critic_retries=1, format_retries=1, single_turns=3,
                      new_tokens=24, context=1024)
BUDGET_NAMES = {f for f in asdict(TINY)}


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    return model.Tokenizer.from_pretrained(build_chatml_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tiny_model(gold_train, tmp_path_factory):
    """A random-init micro model whose tokenizer is trained on the gold trajectories' text."""
    records = data.read_trajectories(gold_train[1])
    texts = [m["content"] for r in records for c in r["calls"] for m in c["messages"] + [
        {"content": c["output"]}]]
    return model.init_tiny(tmp_path_factory.mktemp("micro"), texts, preset="micro", seed=0)


def records_by_kind(path, kind):
    return {r["task_id"]: r for r in data.read_trajectories(path) if r["system"]["kind"] == kind}


def target_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example.ids, example.mask) if m])


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


def test_mistakes_are_realistic_and_fail_at_the_first_api_call():
    login = 'profile = apis.supervisor.show_profile()\ntok = apis.spotify.login(username=p, password=q)'
    assert agents.mutate_code(login) == login.replace("show_profile", "get_profile", 1)
    paged = "page = apis.spotify.show_playlist_library(access_token=tok, page_index=0)"
    assert agents.mutate_code(paged) == paged.replace("access_token=", "token=")
    assert agents.mutate_code("apis.supervisor.complete_task(answer=3)") is None
    assert agents.mutate_code("x = 1") is None


# ----------------------------------------------------------------------------------------------------
# The gold teacher on the whole train split.

def test_gold_teacher_trajectories_pass_and_follow_the_gold_subtasks(gold_train, mini_world):
    summary, path = gold_train
    train = world.load_split("train", root=mini_world)
    assert summary.failed == [] and sorted(summary.kept) == sorted(train)
    multi, single = records_by_kind(path, "multi"), records_by_kind(path, "single")
    assert sorted(multi) == sorted(single) == sorted(train)
    for task_id, record in multi.items():
        gold = miniworld.gold_subtasks(task_id, root=mini_world)
        assert record["evaluation"]["success"] and record["evaluation"]["failures"] == []
        assert record["budget_stops"] == []
        planner = [c["output"] for c in record["calls"] if c["role"] == "planner"]
        assert planner == [f"Sub-task: {s['text']}" for s in gold] + ["FINISH"]
        assert [s["text"] for s in record["subtasks"]] == [s["text"] for s in gold]
        for k, step in enumerate(gold, start=1):
            last_attempt = max(e["attempt"] for e in record["executions"] if e["subtask"] == k)
            final = [e for e in record["executions"] if e["subtask"] == k and e["attempt"] == last_attempt]
            assert final[-1]["code"].startswith(step["code"]) and not final[-1]["error"]
            assert record["subtasks"][k - 1]["attempts"][-1]["verdict"] == "success"


def test_gold_recovery_examples_show_a_real_error_and_the_corrected_retry(gold_train, chat_tokenizer):
    _, path = gold_train
    records = list(records_by_kind(path, "multi").values())
    recovered = [r for r in records if any(e["error"] for e in r["executions"])]
    assert recovered, "the default recovery share gives some train tasks a mistake"
    examples, _ = data.build_examples(records, "executor", chat_tokenizer, 100_000)
    for record in recovered:
        mistake = next(e for e in record["executions"] if e["error"])
        k = mistake["subtask"]
        # AppWorld's own error for the wrong name (no such API, or the token missing -> 401)
        assert "No API named" in mistake["output"] or "401" in mistake["output"]
        assert [a["verdict"] for a in record["subtasks"][k - 1]["attempts"]] == ["failure", "success"]
        example = next(e for e in examples if e.task_id == record["task_id"] and e.subtask == k)
        targets = target_text(chat_tokenizer, example)
        fixed = next(e for e in record["executions"] if e["subtask"] == k and e["attempt"] == 2)
        assert fixed["code"] in targets and mistake["code"] not in targets
        assert "Done: the sub-task is complete." not in targets  # the premature report is no target


def test_gold_trajectories_rerender_into_every_role(gold_train, chat_tokenizer):
    _, path = gold_train
    records = data.read_trajectories(path)
    multi = [r for r in records if r["system"]["kind"] == "multi"]
    counts = {role: len(data.build_examples(records, role, chat_tokenizer, 100_000)[0]) for role in data.ROLES}
    n_subtasks = sum(len(r["subtasks"]) for r in multi)
    assert counts["planner"] == n_subtasks + len(multi)  # one per decision, FINISH included
    assert counts["executor"] == n_subtasks
    assert counts["critic"] == sum(len(s["attempts"]) for r in multi for s in r["subtasks"])
    assert counts["single"] == n_subtasks
    single, _ = data.build_examples(records, "single", chat_tokenizer, 100_000)
    last = max(single, key=lambda e: e.subtask)
    assert "complete_task" in target_text(chat_tokenizer, last)


def scripted_reply(prompt: str) -> str:
    """What a well-behaved model answers, read off the prompt it was given: the planner plans two sub-tasks
    and finishes, the executor prints a long output twice and then reports, the critic approves."""
    if "You are the planner" in prompt:
        return "Sub-task: print a long line" if prompt.count("Report:") < 2 else "FINISH"
    if "You are the critic" in prompt:
        return "Verdict: success\nReason: it printed."
    done = prompt.count("Output:")
    return "Done: printed twice." if done >= 2 else f"```python\nprint('{'xy'[done]}' * 200)\n```"


def test_every_recorded_call_trains_on_exactly_the_prompt_the_model_saw(tiny_preset_model, mini_world,
                                                                        world_pool, monkeypatch):
    """A LocalEngine rollout whose context budget forces fitting (the executor's second output pushes its
    first one out). model.generate is replaced by a script that keeps every prompt it is given: those token
    ids are what the model saw, and each call's training example must hold them in front of its output."""
    seen = []

    def scripted_generate(net, prompts, max_new_tokens, stop_ids=(), tokenizer=None, stop_strings=(), **kw):
        out = []
        for prompt in prompts:
            seen.append(list(prompt))
            text = scripted_reply(tokenizer.decode(prompt))
            ids = tokenizer.encode(text)
            out.append(model.Generation(ids, text, len(prompt), len(ids), "stop_string"))
        return out

    monkeypatch.setattr(model, "generate", scripted_generate)
    system = agents.build_system("multi", {r: str(tiny_preset_model) for r in data.ROLES}, {})
    engine = system.roles["planner"].engine
    task = world.load_split("dev", root=mini_world)[:1]

    def roll_out(budgets):
        seen.clear()
        records = []
        agents.run_rollouts(task, system, budgets, split="dev", root=mini_world, pool=world_pool,
                            on_trajectory=records.append)
        return records[0]

    roomy = roll_out(agents.Budgets(new_tokens=64, context=4096))
    executor = [c for c in roomy["calls"] if c["role"] == "executor" and c["conversation"] == 0]
    assert not any("more characters]" in m["content"] for c in roomy["calls"] for m in c["messages"])
    # one token less than the executor's report prompt: fitting must shorten its first output there
    budgets = agents.Budgets(new_tokens=64, context=executor[2]["prompt_tokens"] - 1 + 64)
    record = roll_out(budgets)
    data.validate_trajectory(record)
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
# Rollouts with a tiny random model.

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
    system = agents.build_system(kind, {r: str(tiny_model) for r in data.ROLES}, {})
    out = tmp_path / "run.jsonl"
    dev = world.load_split("dev", root=mini_world)[:2]
    stats = agents.run_rollouts(dev, system, TINY, split="dev", root=mini_world, pool=world_pool,
                                on_trajectory=lambda r: data.write_trajectory(out, r))
    records = data.read_trajectories(out)  # data.py's reader accepts them
    assert sorted(r["task_id"] for r in records) == sorted(dev) and stats.tasks == len(dev)
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
    records = []
    task = world.load_split("dev", root=mini_world)[0]
    agents.run_rollouts([task], system, TINY, split="dev", root=mini_world, pool=world_pool,
                        on_trajectory=records.append)
    (record,) = records
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
    data.validate_trajectory(record)


def without_wall_times(record):
    """The record less what measures the engine rather than the rollout: wall time, and what the prefix
    cache happened to hold (which depends on the calls served before)."""
    record = json.loads(json.dumps(record))
    for call in record["calls"]:
        for measured in data.MEASURED_CALL_FIELDS:
            call.pop(measured)
    return record


@pytest.mark.parametrize("single", [False, True])
def test_batched_concurrent_rollouts_equal_one_task_at_a_time(tiny_model, mini_world, world_pool, single):
    kind = "single" if single else "multi"
    system = agents.build_system(kind, {r: str(tiny_model) for r in data.ROLES}, {})
    dev = world.load_split("dev", root=mini_world)[:2]
    results = {}
    for workers in (1, 2):
        records = []
        stats = agents.run_rollouts(dev, system, TINY, split="dev", root=mini_world, pool=world_pool,
                                    workers=workers, on_trajectory=records.append)
        results[workers] = {r["task_id"]: without_wall_times(r) for r in records}
        if workers == 2:
            assert max(stats.batch_sizes) == 2  # the two tasks' calls really shared generate calls
    assert results[1] == results[2]


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible teacher against a local HTTP server.

class ChatHandler(http.server.BaseHTTPRequestHandler):
    """Answers /v1/chat/completions by role, deterministically; records what it received."""
    received = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.received.append((self.path, self.headers.get("Authorization"), body))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such route")
            return
        system, turns = body["messages"][0]["content"], len(body["messages"])
        if system.startswith("You are the planner"):
            text = "Sub-task: Show my profile." if turns == 2 else "FINISH"
        elif system.startswith("You are the executor"):  # the endpoint drops the stop string, as OpenAI's API does
            text = "```python\nprint(apis.supervisor.show_profile()['first_name'])\n" if turns == 2 else \
                "Printed my first name."
        else:
            text = "Verdict: success\nReason: the name was printed."
        answer = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ChatHandler.received = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_openai_compatible_teacher(chat_server, mini_world, world_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("PROST_TEST_KEY", "secret")
    system = agents.teacher_system(None, url=chat_server + "/v1", url_model="teacher-x",
                                   api_key_env="PROST_TEST_KEY")
    out = tmp_path / "http.jsonl"
    task = world.load_split("train", root=mini_world)[0]
    summary = agents.collect(system, "train", out, TINY, root=mini_world, pool=world_pool, limit=1, keep_failed=True)
    assert summary.failed == [task]  # the scripted teacher never calls complete_task
    multi = records_by_kind(out, "multi")[task]
    assert [c["output"] for c in multi["calls"]] == [
        "Sub-task: Show my profile.",
        "```python\nprint(apis.supervisor.show_profile()['first_name'])\n```",  # fence put back
        "Printed my first name.", "Verdict: success\nReason: the name was printed.", "FINISH"]
    first_name = multi["executions"][0]["output"].strip()
    assert first_name and not multi["executions"][0]["error"]
    paths, keys, bodies = zip(*ChatHandler.received)
    assert set(paths) == {"/v1/chat/completions"} and set(keys) == {"Bearer secret"}
    assert all(b["temperature"] == 0 and b["model"] == "teacher-x" and b["max_tokens"] == TINY.new_tokens
               for b in bodies)
    assert bodies[1]["stop"] == list(agents.CODE_STOP) and "stop" not in bodies[0]
    assert first_name in bodies[2]["messages"][-1]["content"]  # the real output went back to the teacher
    assert multi["system"]["teacher"] == f"teacher-x @ {chat_server}/v1"


def test_endpoint_errors_are_clear(chat_server):
    engine = agents.HttpEngine(chat_server + "/wrong/chat/completions", "m")
    request = agents.ModelRequest("t_1", "planner", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="answered HTTP 404"):
        engine.complete([request], [None], TINY)


# ----------------------------------------------------------------------------------------------------
# Bad inputs.

def test_malformed_trajectory_file_is_a_clear_cli_error(gold_train, mini_world, tmp_path, capsys):
    good = gold_train[1].read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n{\"schema\": 1, \"task_id\": \n")
    assert agents.main(["collect", "--teacher", "gold", "--split", "train", "--root", str(mini_world),
                        "--out", str(bad)]) == 2
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err


def test_unknown_roles_are_clear_errors(gold_train, mini_world, tmp_path, capsys, world_pool):
    record = json.loads(gold_train[1].read_text().splitlines()[0])
    record["calls"][0]["role"] = "judge"
    bad = tmp_path / "roles.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    assert agents.main(["collect", "--teacher", "gold", "--split", "train", "--root", str(mini_world),
                        "--out", str(bad)]) == 2
    assert "unknown role 'judge'" in capsys.readouterr().err
    system = agents.System("multi", {"planner": agents.Binding(Scripted())})  # no executor, no critic
    task = world.load_split("dev", root=mini_world)[0]
    with pytest.raises(ValueError, match="no 'executor' role"):
        agents.run_rollouts([task], system, TINY, split="dev", root=mini_world, pool=world_pool)


def test_every_flag_has_help():
    parser = agents.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"


def test_roles_sharing_a_base_share_one_engine_and_answer_like_separate_or_mixing_engines(tiny_model, mini_world,
                                                                                          world_pool, tmp_path):
    import lora
    import torch
    base = model.Transformer.from_pretrained(tiny_model)
    for name, seed in (("a", 1), ("b", 2)):
        lora.add_adapter(base, name, r=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora.lora_layers(base).values():
                layer.lora_B[name].normal_(0.0, 0.5)  # a fresh adapter is a no-op; make these matter
        lora.save_adapter(base, tmp_path / name, name)
    adapters = {"executor": str(tmp_path / "a"), "critic": str(tmp_path / "b")}
    shared = agents.build_system("multi", {r: str(tiny_model) for r in data.ROLES}, adapters)
    assert shared.roles["executor"].engine is shared.roles["critic"].engine
    shared.roles["planner"] = agents.Binding(Scripted())  # plans always parse, so executor and critic run
    separate = {}  # the reference: one engine per adapter, nothing shared
    for role in ("executor", "critic"):
        engine = agents.LocalEngine(str(tiny_model))
        engine.load_adapter(adapters[role], role)
        separate[role] = agents.Binding(engine, role, adapters[role])
    separate = agents.System("multi", {"planner": agents.Binding(Scripted()), **separate})
    plain = agents.System("multi", {"planner": agents.Binding(Scripted()),
                                    **{r: agents.Binding(shared.roles["executor"].engine) for r in
                                       ("executor", "critic")}})
    dev = world.load_split("dev", root=mini_world)[:2]
    runs = {}
    mixed = agents.build_system("multi", {r: str(tiny_model) for r in data.ROLES}, adapters, mix_adapters=True)
    mixed.roles["planner"] = agents.Binding(Scripted())
    for name, system in (("shared", shared), ("separate", separate), ("base", plain), ("mixed", mixed)):
        records = []
        agents.run_rollouts(dev, system, TINY, split="dev", root=mini_world, pool=world_pool,
                            on_trajectory=records.append)
        runs[name] = {r["task_id"]: [(c["role"], c["output"]) for c in r["calls"]] for r in records}
    assert runs["shared"] == runs["separate"] == runs["mixed"]  # mixed: executor and critic calls share batches
    assert runs["shared"] != runs["base"]  # the adapters change what the roles say


@pytest.mark.parametrize("in_step", [None, True])
def test_a_slow_world_call_does_not_hold_back_other_rollouts_model_calls(in_step):
    """Rollout "slow" runs code whose world call only returns once rollout "fast" has had all three of its model
    calls answered (or after a timeout). A scheduler that waited for every world call of a round before serving
    the next model calls would answer the fast rollout's second call only after that timeout. The engine decodes
    each call alone, like evaluation's deterministic default, so by default rounds are not in step; in step (as
    engines that batch, and collect, run them) the slow call times out and its rollout finishes first."""
    fast_done = threading.Event()

    class Session:
        def execute(self, code):
            return "released" if fast_done.wait(timeout=10 if in_step is None else 0.5) else "timed out"

    class Counting:
        name, mixes_adapters, batches, calls = "counting", False, False, 0

        def complete(self, requests, adapters, budgets):
            Counting.calls += len(requests)
            if Counting.calls == 3:
                fast_done.set()
            return [agents.ModelReply("ok", r.messages) for r in requests]

    class Pool:
        sessions = [Session(), Session()]

    def rollout(task_id):
        if task_id == "slow":
            return (yield agents.ExecRequest("print(1)"))
        for k in range(3):
            yield agents.ModelRequest(task_id, "planner", [{"role": "user", "content": f"turn {k}"}])
        return "fast finished"

    finished = []
    system = agents.System("multi", {"planner": agents.Binding(Counting())})
    stats = agents.run_rollouts(["slow", "fast"], system, TINY, split="dev", workers=2, pool=Pool(), rollout=rollout,
                                on_trajectory=finished.append, in_step=in_step)
    assert finished == (["fast finished", "released"] if in_step is None else ["timed out", "fast finished"])
    assert stats.tasks == 2


def test_collect_limit_takes_the_splits_first_tasks_and_a_rerun_adds_nothing(mini_world, world_pool, tmp_path):
    out = tmp_path / "train.jsonl"
    system = agents.teacher_system("gold", root=mini_world)
    agents.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
    first = out.read_bytes()
    assert {r["task_id"] for r in data.read_trajectories(out)} == set(world.load_split("train", mini_world)[:2])
    summary = agents.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
    assert summary.skipped == 2 and not summary.kept and out.read_bytes() == first


def test_collect_writes_a_tasks_records_as_one_unit_and_reruns_a_task_left_incomplete(mini_world, world_pool,
                                                                                        gold_train, tmp_path):
    """A crash that tore the second of a task's two records leaves only its multi-agent record: the resumed
    collection drops it and runs the task again, keeping the complete tasks byte for byte."""
    lines = gold_train[1].read_text().splitlines(keepends=True)
    first, second = world.load_split("train", mini_world)[:2]
    records = [json.loads(line) for line in lines]
    complete = [line for line, r in zip(lines, records) if r["task_id"] == first]
    partial = next(line for line, r in zip(lines, records) if r["task_id"] == second and r["system"]["kind"] == "multi")
    out = tmp_path / "train.jsonl"
    out.write_text("".join(complete) + partial + partial[: len(partial) // 2])  # plus a torn copy at the end
    system = agents.teacher_system("gold", root=mini_world)
    summary = agents.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
    assert summary.skipped == 1 and summary.kept == [second]
    assert out.read_text().startswith("".join(complete))
    kinds = [(r["task_id"], r["system"]["kind"]) for r in data.read_trajectories(out)]
    assert kinds == [(first, "multi"), (first, "single"), (second, "multi"), (second, "single")]


def test_collect_refuses_a_file_another_collection_is_writing(mini_world, world_pool, tmp_path):
    from test_store import lock_held_elsewhere
    out = tmp_path / "train.jsonl"
    with lock_held_elsewhere(out, folder=False) as proc:
        with pytest.raises(store.OutputBusy, match=f"{out} is in use by process {proc.pid}"):
            agents.collect(agents.teacher_system("gold", root=mini_world), "train", out, agents.Budgets(),
                           root=mini_world, pool=world_pool, limit=1)
    assert not out.exists()
