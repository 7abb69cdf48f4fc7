"""rollout.py: the scheduler, the engines and the collect/run command line, against independent references:
the core it speeds up (agents.run_task with agents.PlainEngine records the same trajectories as run_rollouts with
LocalEngine), PEFT for an engine whose batches mix adapters (decoding.py's prompt cache, prompt lookup and
mixed-adapter batches are tested in tests/test_decoding.py), reproducible evaluation (a crafted
near-tie that batched decoding flips and deterministic decoding does not; evaluate.py's metrics and trajectories
equal with --workers 1 / --max-batch 1 and --workers 4 / --max-batch 16), and the OpenAI-compatible teacher
against local HTTP servers written here (concurrent requests, 503 retries).

One mini-world, one pool of world worker processes and the gold train trajectories are shared by the whole
test session (conftest.py).
"""

import http.server
import json
import threading

import pytest
import torch
from test_agents import TINY, Scripted
from test_decoding import two_adapters
from test_teacher import records_by_kind

import agents
import evaluate
import lora
import model as M
import model_io
import result_files
import rollout
import store
import systems
import trajectories
import world


SYSTEM = {"role": "system", "content": "The planner splits the task into sub-tasks; the executor writes code."}


# ----------------------------------------------------------------------------------------------------
# One batch across adapters.


def test_the_scheduler_sends_every_roles_pending_calls_to_a_mixing_engine_at_once(qwen2_ckpt, tmp_path):
    """Planner, executor (its code-block stop string) and critic (the base) calls pending together: one
    engine.complete call, and each reply what that call gets in a batch of its own adapter alone."""
    folder, _ = qwen2_ckpt
    two_adapters(folder, tmp_path)
    engine = rollout.LocalEngine(folder, mix_adapters=True, prompt_cache_tokens=0, prompt_lookup=0)
    for name in ("planner", "executor"):
        engine.load_adapter(str(tmp_path / name), name)
    system = agents.System("multi", {"planner": agents.Binding(engine, "planner"),
                                     "executor": agents.Binding(engine, "executor"),
                                     "critic": agents.Binding(engine)})
    budgets = agents.Budgets(new_tokens=12, context=250)
    requests = [agents.ModelRequest("t", role, [SYSTEM, {"role": "user", "content": f"Hello {role}, 0123."}],
                                    stops) for role, stops in (("planner", ()), ("executor", agents.CODE_STOP),
                                                               ("critic", ()))]
    stats = rollout.RunStats()
    replies = rollout.serve_models({i: rollout.Slot(None, r) for i, r in enumerate(requests)}, system, budgets, 16,
                                   stats)
    assert stats.batch_sizes == [3]
    alone = [engine.complete([r], [system.roles[r.role].adapter], budgets)[0] for r in requests]
    assert [replies[i].text for i in range(3)] == [r.text for r in alone]
    assert len({r.text for r in alone}) == 3
    # what ran: the base's FLOPs, plus 2 per adapter weight and computed position for the unmerged adapters
    config = engine.base.config
    per_position = {"planner": 4 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64)),
                    "executor": 4 * 2 * ((64 + 64) + (64 + 96)), None: 0}
    for r, reply in zip(requests, alone):
        positions = reply.prompt_tokens + reply.new_tokens - 1
        assert reply.flops == M.generate_flops(config, reply.prompt_tokens, reply.new_tokens)
        assert reply.flops_computed == reply.flops + 2 * per_position[system.roles[r.role].adapter] * positions
    merged = rollout.LocalEngine(folder, prompt_cache_tokens=0)
    merged.load_adapter(str(tmp_path / "planner"), "planner")
    with pytest.raises(ValueError, match="one adapter per complete"):
        merged.complete(requests[:2], ["planner", None], budgets)


# ----------------------------------------------------------------------------------------------------
# Reproducible evaluation.

def test_a_near_tie_flips_with_the_batch_today_but_not_in_deterministic_mode(qwen2_ckpt):
    """The lm_head is rewritten so that two tokens tie up to the rounding that batching changes: token A wins
    when the prompt is decoded alone, token B when it shares a padded batch. Deterministic decoding gives one
    answer whatever the batch and whatever the prompt cache held."""
    folder, _ = qwen2_ckpt
    budgets = agents.Budgets(new_tokens=1, context=250)
    prompt = [SYSTEM, {"role": "user", "content": "The critic reads the output."}]
    other = [SYSTEM, {"role": "user", "content": "Hello world! Ünïcödé text, tabs\tand\nnewlines, numbers 0123."}]
    ask = lambda messages: agents.ModelRequest("t", "planner", messages)  # noqa: E731
    batched = rollout.LocalEngine(folder, prompt_cache_tokens=0)
    seen = []
    hook = batched.base.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].clone()))
    batched.complete([ask(prompt)], [None], budgets)
    batched.complete([ask(prompt), ask(other)], [None, None], budgets)
    hook.remove()
    alone, together = seen  # the final hidden state of `prompt` (D,), alone and in the batch
    assert not torch.equal(alone, together)
    # logit of A: 0 exactly; of B: d.h with d.alone < 0 < d.together; every other token far below
    delta, mid = (together - alone).double(), ((together + alone) / 2).double()
    d = delta - (delta @ mid) / (mid @ mid) * mid
    d = (d / d.norm()).float()
    tok = batched.tokenizer
    a, b = [t for t in range(3, 300) if tok.decode([t]).isalpha()][:2]  # two tokens that read differently
    head = -(mid / mid.norm()).float().expand(batched.base.config.vocab_size, -1).clone()
    head[a], head[b] = 0.0, d
    assert tok.decode([a]) != tok.decode([b])
    deterministic = rollout.LocalEngine(folder, deterministic=True)
    for engine in (batched, deterministic):
        engine.base.lm_head.weight = torch.nn.Parameter(head.clone())  # untied from the embeddings
    first = lambda engine, requests: engine.complete(requests, [None] * len(requests), budgets)[0].text  # noqa: E731
    # today (batched decoding): the answer depends on which other call shares the batch
    assert first(batched, [ask(prompt)]) == tok.decode([a])
    assert first(batched, [ask(prompt), ask(other)]) == tok.decode([b])
    # deterministic decoding: the same answer alone, in a batch, and after the cache saw a shared prefix
    answers = {first(deterministic, [ask(prompt)]), first(deterministic, [ask(prompt), ask(other)])}
    deterministic.complete([ask(other), ask(prompt)], [None, None], budgets)
    answers.add(first(deterministic, [ask(prompt)]))
    deterministic.prompt_cache.clear()
    deterministic.complete([ask(prompt[:1] + [{"role": "user", "content": "The critic reads"}])], [None], budgets)
    answers.add(first(deterministic, [ask(prompt), ask(other)]))
    assert len(answers) == 1


def near_tied(folder, out):
    """The model at `folder` with an untied vocabulary projection whose rows come in twins: token 2j+1's row is
    token 2j's plus a perturbation a millionth of its size, so that nearly every greedy step is a near-tie between
    two tokens that the rounding of the hidden state decides. (Tokenizer files are copied along.)"""
    net = M.Transformer.from_pretrained(folder)
    head = net.lm_head.weight.detach().clone()  # (V, D)
    noise = torch.randn(head[1::2].shape, generator=torch.Generator().manual_seed(0))
    head[1::2] = head[0::2] + 1e-6 * head.abs().mean() * noise
    net.lm_head.weight = torch.nn.Parameter(head)
    net.config.tie_word_embeddings = False
    model_io.save_pretrained(net, out)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_evaluation_is_the_same_with_1_or_4_workers_and_any_max_batch(micro, mini_world, tmp_path):
    """On a model whose every greedy step is a near-tie (`near_tied`), evaluation's deterministic decoding gives
    the same metrics and trajectories with --workers 1 --max-batch 1 (every call decoded alone) and --workers 4
    --max-batch 16 (calls of up to four tasks decoded together), while batched decoding does not."""
    budgets = agents.Budgets(subtasks=2, executor_turns=2, critic_retries=1, format_retries=1, new_tokens=12,
                             context=1024)
    base = near_tied(micro, tmp_path / "near-tied")
    runs = {}
    with world.WorldPool(4, root=mini_world) as pool:
        for decode in ("deterministic", "batched"):
            argv = ["--model", str(base)] + (["--decode", decode] if decode == "batched" else [])
            args = evaluate.build_parser().parse_args(argv)
            assert decode == "batched" or args.decode == "deterministic" and not args.no_prompt_cache  # defaults
            system = systems.load_system(systems.system_spec(None, None, str(base), "multi"), "cpu", "float32",
                                         rollout.engine_options(args))
            for workers, max_batch in ((1, 1), (4, 16)):
                out = tmp_path / f"{decode}-w{workers}"
                cfg = evaluate.EvalConfig(split="dev", out=str(out), root=str(mini_world), workers=workers,
                                          max_batch=max_batch, limit=4, quiet=True)
                results = evaluate.evaluate(system, budgets, cfg, pool=pool)  # the second run finds a warm cache
                records = trajectories.read_trajectories(out / result_files.TRAJECTORIES)
                runs[decode, workers] = results["metrics"], [
                    {**r, "calls": [{k: v for k, v in c.items() if k not in trajectories.MEASURED_CALL_FIELDS}
                                    for c in r["calls"]]} for r in records]
    assert runs["deterministic", 1] == runs["deterministic", 4]
    assert sum(len(r["calls"]) for r in runs["deterministic", 1][1]) > 4
    assert runs["batched", 1][1] != runs["batched", 4][1]  # the near-ties are real: padded batches flip them


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible teacher: concurrent requests, retries, a clear error after the last one.

class JSONHandler(http.server.BaseHTTPRequestHandler):
    """A quiet HTTP handler that answers with JSON bodies."""

    def answer(self, code: int, obj: dict) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class FlakyHandler(JSONHandler):
    """Answers 503 to the first `failures` tries of each request (by its user message), then an answer once all
    `together` requests are waiting at the same time (a barrier: requests sent one by one never get past it)."""
    failures, together, tries, barrier = 0, 1, {}, None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = body["messages"][-1]["content"]
        cls = FlakyHandler
        cls.tries[key] = cls.tries.get(key, 0) + 1
        if cls.tries[key] <= cls.failures:
            return self.answer(503, {"error": "overloaded"})
        try:
            cls.barrier.wait(timeout=20)
        except threading.BrokenBarrierError:
            return self.answer(500, {"error": "requests did not arrive together"})
        self.answer(200, {"choices": [{"message": {"content": f"echo {key}"}, "finish_reason": "stop"}]})


@pytest.fixture
def flaky_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)  # a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def configure(failures: int, together: int) -> None:
    FlakyHandler.failures, FlakyHandler.together, FlakyHandler.tries = failures, together, {}
    FlakyHandler.barrier = threading.Barrier(together)


def test_http_teacher_sends_pending_requests_together_and_retries_503(flaky_server):
    configure(failures=2, together=4)
    engine = rollout.HttpEngine(flaky_server, "m", retries=2, backoff=0.01)
    requests = [agents.ModelRequest("t_1", "planner", [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    replies = engine.complete(requests, [None] * len(requests), agents.Budgets())
    assert [r.text for r in replies] == [f"echo q{i}" for i in range(4)]  # in order
    assert FlakyHandler.tries == {f"q{i}": 3 for i in range(4)}  # two 503s each, then the answer


def test_http_teacher_gives_a_clear_error_after_the_last_retry(flaky_server):
    configure(failures=100, together=1)
    engine = rollout.HttpEngine(flaky_server, "m", retries=3, backoff=0.01)
    request = agents.ModelRequest("t_1", "planner", [{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match=r"answered HTTP 503: .*overloaded.*gave up after 4 attempts"):
        engine.complete([request], [None], agents.Budgets())
    assert FlakyHandler.tries == {"q": 4}


def test_bad_decode_flags_give_one_clear_line(micro, mini_world, capsys):
    for flags, message in ((["--prompt-cache-tokens", "0"], "--prompt-cache-tokens must be positive"),
                           (["--prompt-lookup", "-1"], "--prompt-lookup must be 0 (off) or positive"),
                           (["--mix-adapters"], "--mix-adapters needs --decode batched")):
        code = evaluate.main(["--model", str(micro), "--root", str(mini_world), "--limit", "1", *flags])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")


# ----------------------------------------------------------------------------------------------------
# The scheduler and LocalEngine against the core's sequential driver and plain engine.

def without_wall_times(record):
    """The record less what measures the engine rather than the rollout: wall time, and what the prompt
    cache happened to hold (which depends on the calls served before)."""
    record = json.loads(json.dumps(record))
    for call in record["calls"]:
        for measured in trajectories.MEASURED_CALL_FIELDS:
            call.pop(measured)
    return record


def random_adapters(folder, out) -> dict[str, str]:
    """Adapters "a" and "b" on the model in `folder`, random and far from a no-op, saved under out/<name>."""
    base = M.Transformer.from_pretrained(folder)
    for name, seed in (("a", 1), ("b", 2)):
        lora.add_adapter(base, name, r=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora.lora_layers(base).values():
                layer.lora_B[name].normal_(0.0, 0.5)  # a fresh adapter is a no-op; make these matter
        lora.save_adapter(base, out / name, name)
    return {name: str(out / name) for name in ("a", "b")}


@pytest.mark.parametrize("single", [False, True])
def test_the_scheduler_and_local_engine_record_what_the_plain_driver_records(tiny_model, mini_world, world_pool,
                                                                             tmp_path, single):
    """The core: agents.run_task, one task after another, every call answered by agents.PlainEngine (the role's
    adapter switched on, model.generate on that one prompt). The fast path: rollout.run_rollouts with two worlds
    at once and LocalEngine in its deterministic mode (adapters merged into copies of the weights, decoding
    layouts, the prompt cache, chunked prefill, prompt-lookup drafts). Both record the same trajectories: the
    same calls, prompts, outputs, token counts, FLOPs, executions and evaluations. In the multi-agent system a
    scripted planner always plans, so that the executor (with an adapter) and the critic (the base) both run."""
    adapters = random_adapters(tiny_model, tmp_path)
    kind = "single" if single else "multi"
    models = {r: str(tiny_model) for r in trajectories.ROLES}
    roles = {"single": adapters["a"]} if single else {"executor": adapters["a"], "critic": None}
    plain = agents.build_system(kind, models, roles)
    fast = rollout.local_system(kind, models, roles, deterministic=True)
    assert fast.roles[kind if single else "executor"].engine.prompt_cache is not None  # every fast path is on
    if not single:
        plain.roles["planner"] = fast.roles["planner"] = agents.Binding(Scripted())
    dev = world.load_split("dev", root=mini_world)[:2]
    core = [agents.run_task(t, plain, TINY, world_pool.sessions[0], split="dev") for t in dev]
    records = []
    rollout.run_rollouts(dev, fast, TINY, split="dev", root=mini_world, pool=world_pool, workers=2,
                         on_trajectory=records.append)
    assert {r["task_id"]: without_wall_times(r) for r in records} == {r["task_id"]: without_wall_times(r)
                                                                      for r in core}
    calls = [c for r in core for c in r["calls"]]
    roles_run = {c["role"] for c in calls}
    assert roles_run == ({"single"} if single else {"planner", "executor", "critic"}) and len(calls) > len(dev)


@pytest.mark.parametrize("single", [False, True])
def test_batched_concurrent_rollouts_equal_one_task_at_a_time(tiny_model, mini_world, world_pool, single):
    kind = "single" if single else "multi"
    system = rollout.local_system(kind, {r: str(tiny_model) for r in trajectories.ROLES}, {})
    dev = world.load_split("dev", root=mini_world)[:2]
    results = {}
    for workers in (1, 2):
        records = []
        stats = rollout.run_rollouts(dev, system, TINY, split="dev", root=mini_world, pool=world_pool,
                                     workers=workers, on_trajectory=records.append)
        results[workers] = {r["task_id"]: without_wall_times(r) for r in records}
        if workers == 2:
            assert max(stats.batch_sizes) == 2  # the two tasks' calls really shared generate calls
    assert results[1] == results[2]


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible teacher against a local HTTP server.

class ChatHandler(JSONHandler):
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
        self.answer(200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


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
    system = rollout.teacher_system(None, url=chat_server + "/v1", url_model="teacher-x",
                                    api_key_env="PROST_TEST_KEY")
    out = tmp_path / "http.jsonl"
    task = world.load_split("train", root=mini_world)[0]
    summary = rollout.collect(system, "train", out, TINY, root=mini_world, pool=world_pool, limit=1, keep_failed=True)
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
    engine = rollout.HttpEngine(chat_server + "/wrong/chat/completions", "m")
    request = agents.ModelRequest("t_1", "planner", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="answered HTTP 404"):
        engine.complete([request], [None], TINY)


# ----------------------------------------------------------------------------------------------------
# Bad inputs.

def test_malformed_trajectory_file_is_a_clear_cli_error(gold_train, mini_world, tmp_path, capsys):
    good = gold_train[1].read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n{\"schema\": 1, \"task_id\": \n")
    assert rollout.main(["collect", "--teacher", "gold", "--split", "train", "--root", str(mini_world),
                         "--out", str(bad)]) == 2
    assert f"error: {bad}:2: not valid JSON" in capsys.readouterr().err


def test_unknown_roles_are_clear_errors(gold_train, mini_world, tmp_path, capsys, world_pool):
    record = json.loads(gold_train[1].read_text().splitlines()[0])
    record["calls"][0]["role"] = "judge"
    bad = tmp_path / "roles.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    assert rollout.main(["collect", "--teacher", "gold", "--split", "train", "--root", str(mini_world),
                         "--out", str(bad)]) == 2
    assert "unknown role 'judge'" in capsys.readouterr().err
    system = agents.System("multi", {"planner": agents.Binding(Scripted())})  # no executor, no critic
    task = world.load_split("dev", root=mini_world)[0]
    with pytest.raises(ValueError, match="no 'executor' role"):
        rollout.run_rollouts([task], system, TINY, split="dev", root=mini_world, pool=world_pool)


def test_every_flag_has_help():
    parser = rollout.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} --{action.dest} has no help"


def test_roles_sharing_a_base_share_one_engine_and_answer_like_separate_or_mixing_engines(tiny_model, mini_world,
                                                                                          world_pool, tmp_path):
    random = random_adapters(tiny_model, tmp_path)
    adapters = {"executor": random["a"], "critic": random["b"]}
    shared = rollout.local_system("multi", {r: str(tiny_model) for r in trajectories.ROLES}, adapters)
    assert shared.roles["executor"].engine is shared.roles["critic"].engine
    shared.roles["planner"] = agents.Binding(Scripted())  # plans always parse, so executor and critic run
    separate = {}  # the reference: one engine per adapter, nothing shared
    for role in ("executor", "critic"):
        engine = rollout.LocalEngine(str(tiny_model))
        engine.load_adapter(adapters[role], role)
        separate[role] = agents.Binding(engine, role, adapters[role])
    separate = agents.System("multi", {"planner": agents.Binding(Scripted()), **separate})
    plain = agents.System("multi", {"planner": agents.Binding(Scripted()),
                                    **{r: agents.Binding(shared.roles["executor"].engine) for r in
                                       ("executor", "critic")}})
    dev = world.load_split("dev", root=mini_world)[:2]
    runs = {}
    mixed = rollout.local_system("multi", {r: str(tiny_model) for r in trajectories.ROLES}, adapters, mix_adapters=True)
    mixed.roles["planner"] = agents.Binding(Scripted())
    for name, system in (("shared", shared), ("separate", separate), ("base", plain), ("mixed", mixed)):
        records = []
        rollout.run_rollouts(dev, system, TINY, split="dev", root=mini_world, pool=world_pool,
                             on_trajectory=records.append)
        runs[name] = {r["task_id"]: [(c["role"], c["output"]) for c in r["calls"]] for r in records}
    assert runs["shared"] == runs["separate"] == runs["mixed"]  # mixed: executor and critic calls share batches
    assert runs["shared"] != runs["base"]  # the adapters change what the roles say


@pytest.mark.parametrize("in_step", [None, True])
def test_a_slow_world_call_does_not_hold_back_other_rollouts_model_calls(in_step):
    """Rollout "slow" runs code whose world call only returns once rollout "fast" has had all three of its model
    calls answered (or after a timeout). A scheduler that waited for every world call of a round before serving
    the next model calls would answer the fast rollout's second call only after that timeout. The engine does not
    batch, so by default rounds are not in step; in step (as engines that batch, and collect, run them) the slow
    call times out and its rollout finishes first."""
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

    def make_rollout(task_id):
        if task_id == "slow":
            return (yield agents.ExecRequest("print(1)"))
        for k in range(3):
            yield agents.ModelRequest(task_id, "planner", [{"role": "user", "content": f"turn {k}"}])
        return "fast finished"

    finished = []
    system = agents.System("multi", {"planner": agents.Binding(Counting())})
    stats = rollout.run_rollouts(["slow", "fast"], system, TINY, split="dev", workers=2, pool=Pool(),
                                 rollout=make_rollout, on_trajectory=finished.append, in_step=in_step)
    assert finished == (["fast finished", "released"] if in_step is None else ["timed out", "fast finished"])
    assert stats.tasks == 2


def test_collect_limit_takes_the_splits_first_tasks_and_a_rerun_adds_nothing(mini_world, world_pool, tmp_path):
    out = tmp_path / "train.jsonl"
    system = rollout.teacher_system("gold", root=mini_world)
    rollout.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
    first = out.read_bytes()
    assert {r["task_id"] for r in trajectories.read_trajectories(out)} == set(world.load_split("train", mini_world)[:2])
    summary = rollout.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
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
    system = rollout.teacher_system("gold", root=mini_world)
    summary = rollout.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool, limit=2)
    assert summary.skipped == 1 and summary.kept == [second]
    assert out.read_text().startswith("".join(complete))
    kinds = [(r["task_id"], r["system"]["kind"]) for r in trajectories.read_trajectories(out)]
    assert kinds == [(first, "multi"), (first, "single"), (second, "multi"), (second, "single")]


def test_collect_refuses_a_file_another_collection_is_writing(mini_world, world_pool, tmp_path):
    from test_store import lock_held_elsewhere
    out = tmp_path / "train.jsonl"
    with lock_held_elsewhere(out, folder=False) as proc:
        with pytest.raises(store.OutputBusy, match=f"{out} is in use by process {proc.pid}"):
            rollout.collect(rollout.teacher_system("gold", root=mini_world), "train", out, agents.Budgets(),
                            root=mini_world, pool=world_pool, limit=1)
    assert not out.exists()
