"""Rollout throughput features against independent references: the prefix KV cache (greedy ids equal
transformers' generate, which recomputes every prompt; cached lengths and evictions computed by hand), and
reproducible evaluation (a crafted near-tie that batched decoding flips and deterministic decoding does not;
evaluate.py's metrics and trajectories equal with --workers 1 / --max-batch 1 and --workers 4 / --max-batch 16),
and the OpenAI-compatible teacher against a local server on a free port (concurrent requests, 503 retries).
"""

import http.server
import json
import threading

import pytest
import torch
import transformers

import agents
import data
import evaluate
import model as M
import world


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate for exactly n tokens (no eos stop): every prompt computed from scratch."""
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_ids(tok, messages):
    return tok.chat(messages, add_generation_prompt=True)[0]


SYSTEM = {"role": "system", "content": "The planner splits the task into sub-tasks; the executor writes code."}


# ----------------------------------------------------------------------------------------------------
# The prefix cache.

def test_prefix_cache_turns_equal_transformers_and_reuse_the_previous_turn(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = M.PrefixCache(4096)
    messages = [SYSTEM, {"role": "user", "content": "The critic reads the output."}]
    fed = []  # what the previous call fed the model: its prompt and its new tokens but the last
    for turn in range(3):
        prompt = chat_ids(tok, messages)
        [g] = M.generate(ours, [prompt], 12, stop_ids=(), prefix_cache=cache, namespace="planner")
        assert g.ids == hf_greedy(hf, prompt, 12)
        assert g.n_cached == min(common_prefix(prompt, fed), len(prompt) - 1)
        assert (g.n_cached > len(prompt) // 2) == (turn > 0)  # later turns compute only their new tokens
        fed = prompt + g.ids[:-1]
        messages += [{"role": "assistant", "content": tok.decode(g.ids)},
                     {"role": "user", "content": f"Output: {turn} transactions"}]
    # another namespace (another adapter's keys/values) never reuses these
    [g] = M.generate(ours, [prompt], 4, stop_ids=(), prefix_cache=cache, namespace="critic")
    assert g.n_cached == 0


def test_prefix_cache_batches_rows_with_different_cached_lengths(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = M.PrefixCache(4096)
    first = chat_ids(tok, [SYSTEM, {"role": "user", "content": "apis.spotify.login(username='alice')"}])
    [g] = M.generate(ours, [first], 6, stop_ids=(), prefix_cache=cache)
    prompts = [first + [40, 41, 42], chat_ids(tok, [{"role": "user", "content": "Hello world!"}]), first[:9]]
    out = M.generate(ours, prompts, 10, stop_ids=(), prefix_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 10) for p in prompts]
    fed = first + g.ids[:-1]
    # the longest stored prefix (the ChatML header is shared too), at most all but the last prompt token
    assert [g.n_cached for g in out] == [common_prefix(prompts[0], fed), common_prefix(prompts[1], fed), 8]
    assert out[0].n_cached >= len(first)


def test_reuse_across_conversations_sharing_system_prompt_and_task(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = M.PrefixCache(4096)
    task = {"role": "user", "content": "Task: print(apis.venmo.show_transactions(page_index=0))"}
    a = chat_ids(tok, [SYSTEM, task])
    b = chat_ids(tok, [SYSTEM, task, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "0123"}])
    c = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Task: the critic says whether it succeeded."}])
    M.generate(ours, [a], 5, stop_ids=(), prefix_cache=cache)
    out = M.generate(ours, [b, c], 8, stop_ids=(), prefix_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 8) for p in (b, c)]
    assert out[1].n_cached == common_prefix(a, c) > len(chat_ids(tok, [SYSTEM])) - 5
    assert out[0].n_cached >= len(a) - 1


def test_rows_of_one_batch_reuse_an_earlier_rows_prompt(qwen2_ckpt):
    """Calls pending together (the first turn of every rollout) share their system prompt: with an empty cache,
    each row after the first computes only what an earlier row of the batch has not."""
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = M.PrefixCache(4096)
    prompts = [chat_ids(tok, [SYSTEM, {"role": "user", "content": text}])
               for text in ("Task: print(apis.venmo.show_transactions(page_index=0))", "Task: 0123", "Hello world!")]
    out = M.generate(ours, prompts, 8, stop_ids=(), prefix_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 8) for p in prompts]
    shared = [0, common_prefix(prompts[0], prompts[1]),
              max(common_prefix(prompts[0], prompts[2]), common_prefix(prompts[1], prompts[2]))]
    assert [g.n_cached for g in out] == shared and shared[1] > len(chat_ids(tok, [SYSTEM])) - 5


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used():
    cache = M.PrefixCache(max_tokens=10)
    kv = lambda n: ([torch.zeros(1, n, 2)], [torch.zeros(1, n, 2)])  # noqa: E731
    cache.store(None, (1, 2, 3, 4), *kv(4))
    cache.store(None, (5, 6, 7), *kv(3))
    assert cache.lookup(None, [1, 2, 3, 9], 10)[0] == 3  # touches (1, 2, 3, 4): now (5, 6, 7) is the oldest
    cache.store(None, (8, 9, 10, 11), *kv(4))  # 11 tokens > 10: the least recently used entry goes
    assert [key[1] for key in cache.entries] == [(1, 2, 3, 4), (8, 9, 10, 11)] and cache.tokens == 8
    cache.store(None, (1, 2, 3, 4, 5, 6), *kv(6))  # supersedes its own prefix (1, 2, 3, 4): 4 + 6 tokens
    assert [key[1] for key in cache.entries] == [(8, 9, 10, 11), (1, 2, 3, 4, 5, 6)] and cache.tokens == 10
    cache.store(None, (1, 2, 3), *kv(3))  # already held as a prefix: nothing new, but now the most recent
    assert cache.lookup(None, [8, 9], 10)[0] == 2 and cache.tokens == 10
    cache.store(None, (20, 21), *kv(2))  # (1, ..., 6) was used less recently than (8, 9, 10, 11)
    assert [key[1] for key in cache.entries] == [(8, 9, 10, 11), (20, 21)] and cache.tokens == 6
    cache.store(None, tuple(range(11)), *kv(11))  # larger than the whole bound: not kept
    assert cache.tokens == 6


def test_generate_under_a_small_memory_bound_still_equals_transformers(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = M.PrefixCache(40)
    prompts = [chat_ids(tok, [{"role": "user", "content": text}]) for text in
               ("Hello world!", "The critic reads the output.", "Hello world! numbers 0123456789.")]
    for p in prompts + prompts[::-1]:
        [g] = M.generate(ours, [p], 8, stop_ids=(), prefix_cache=cache)
        assert g.ids == hf_greedy(hf, p, 8)
        assert cache.tokens <= 40
    assert sum(len(key[1]) for key in cache.entries) == cache.tokens


def test_chunked_prefill_stores_the_same_bits_whether_cached_or_computed(qwen2_ckpt):
    folder, _ = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    short = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Hello world!"}])
    long = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Hello world!"}, {"role": "assistant", "content":
                          "print(apis.venmo.show_transactions(page_index=0))"}, {"role": "user", "content": "12"}])
    cold, warm = M.PrefixCache(4096), M.PrefixCache(4096)
    M.generate(ours, [short], 4, stop_ids=(), prefix_cache=warm, prefill_chunk=8)
    [a] = M.generate(ours, [long], 6, stop_ids=(), prefix_cache=cold, prefill_chunk=8)
    [b] = M.generate(ours, [long], 6, stop_ids=(), prefix_cache=warm, prefill_chunk=8)
    assert a.ids == b.ids and a.n_cached == 0 and b.n_cached == len(short) // 8 * 8 > 0
    (ka, va), (kb, vb) = (next(iter(c.entries.values())) for c in (cold, warm))
    assert len(warm.entries) == 1 and ka[0].shape[1] == len(long) // 8 * 8
    assert all(torch.equal(x, y) for x, y in zip(ka + va, kb + vb))  # bitwise


# ----------------------------------------------------------------------------------------------------
# One batch across adapters.

def two_adapters(folder, out):
    """Our model of `folder` with adapters 'planner' (every projection) and 'executor' (q and up only), random
    and non-zero, also saved under out/<name>; and PEFT on transformers with the same two adapters loaded."""
    import lora
    from peft import PeftModel
    ours = M.Transformer.from_pretrained(folder).eval()
    for name, seed, targets in (("planner", 1, lora.DEFAULT_TARGETS), ("executor", 2, ("q_proj", "up_proj"))):
        lora.add_adapter(ours, name, r=4, alpha=8, targets=targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora.lora_layers(ours).values():
                if name in layer.specs:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.3)
        lora.save_adapter(ours, out / name, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, str(out / "planner"), adapter_name="planner")
    peft.load_adapter(str(out / "executor"), adapter_name="executor")
    return ours, peft.eval()


def peft_greedy(peft, prompt: list[int], n: int, adapter: str | None) -> list[int]:
    """PEFT's greedy generate of one prompt with one adapter (or none: "__base__"), exactly n tokens."""
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = peft.generate(input_ids=torch.tensor([prompt]), generation_config=cfg,
                            adapter_names=[adapter or "__base__"])
    return out[0, len(prompt):].tolist()


def test_a_mixed_adapter_batch_gives_each_row_what_its_adapter_gives_alone(qwen2_ckpt, tmp_path):
    """Rows of one generate batch run different adapters (and the base), with their own stop strings and prefix
    cache namespaces. Reference: PEFT's greedy tokens of each prompt under its adapter alone."""
    import lora
    folder, _ = qwen2_ckpt
    ours, peft = two_adapters(folder, tmp_path)
    M.lay_out_for_decoding(ours)  # as agents.LocalEngine runs it
    tok = M.Tokenizer.from_pretrained(folder)
    texts = ("The critic reads the output.", "Hello world!", "print(apis.venmo.show_transactions())", "Task: 0123")
    prompts = [chat_ids(tok, [SYSTEM, {"role": "user", "content": t}]) for t in texts]
    adapters = ["executor", None, "planner", "executor"]
    want = [peft_greedy(peft, p, 10, a) for p, a in zip(prompts, adapters)]
    assert len({tuple(w) for w in want}) == 4 and want[0] != peft_greedy(peft, prompts[0], 10, None)
    out = M.generate(ours, prompts, 10, stop_ids=(), adapters=adapters)
    assert [g.ids for g in out] == want
    # per-row stop strings: the second row stops inside its own text, the others run on
    stop = tok.decode(want[1][:4])[-2:]
    assert not any(stop in tok.decode(w) for w in (want[0], want[2], want[3]))
    out = M.generate(ours, prompts, 10, stop_ids=(), tokenizer=tok, stop_strings=[(), (stop,), (), ("\x00",)],
                     adapters=adapters)
    assert [g.stop_reason for g in out] == ["length", "stop_string", "length", "length"]
    assert out[1].ids == want[1][:len(out[1].ids)] and out[1].text.endswith(stop)
    # the prefix cache keeps each adapter's keys/values apart: the same prompt under another adapter reuses nothing
    cache = M.PrefixCache(4096)
    M.generate(ours, prompts[:1], 4, stop_ids=(), prefix_cache=cache, adapters=["executor"])
    again = M.generate(ours, [prompts[0], prompts[0]], 10, stop_ids=(), prefix_cache=cache,
                       adapters=["executor", "planner"])
    assert [g.n_cached for g in again] == [len(prompts[0]) - 1, 0]
    assert [g.ids for g in again] == [want[0], peft_greedy(peft, prompts[0], 10, "planner")]
    assert all(layer.routes is None for layer in lora.lora_layers(ours).values())  # routing ends with the call


def test_the_scheduler_sends_every_roles_pending_calls_to_a_mixing_engine_at_once(qwen2_ckpt, tmp_path):
    """Planner, executor (its code-block stop string) and critic (the base) calls pending together: one
    engine.complete call, and each reply what that call gets in a batch of its own adapter alone."""
    folder, _ = qwen2_ckpt
    two_adapters(folder, tmp_path)
    engine = agents.LocalEngine(folder, mix_adapters=True, prefix_cache_tokens=0, prompt_lookup=0)
    for name in ("planner", "executor"):
        engine.load_adapter(str(tmp_path / name), name)
    system = agents.System("multi", {"planner": agents.Binding(engine, "planner"),
                                     "executor": agents.Binding(engine, "executor"),
                                     "critic": agents.Binding(engine)})
    budgets = agents.Budgets(new_tokens=12, context=250)
    requests = [agents.ModelRequest("t", role, [SYSTEM, {"role": "user", "content": f"Hello {role}, 0123."}],
                                    stops) for role, stops in (("planner", ()), ("executor", agents.CODE_STOP),
                                                               ("critic", ()))]
    stats = agents.RunStats()
    replies = agents.serve_models({i: agents.Slot(None, r) for i, r in enumerate(requests)}, system, budgets, 16,
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
    merged = agents.LocalEngine(folder, prefix_cache_tokens=0)
    merged.load_adapter(str(tmp_path / "planner"), "planner")
    with pytest.raises(ValueError, match="one adapter per complete"):
        merged.complete(requests[:2], ["planner", None], budgets)


# ----------------------------------------------------------------------------------------------------
# Reproducible evaluation.

def test_a_near_tie_flips_with_the_batch_today_but_not_in_deterministic_mode(qwen2_ckpt):
    """The lm_head is rewritten so that two tokens tie up to the rounding that batching changes: token A wins
    when the prompt is decoded alone, token B when it shares a padded batch. Deterministic decoding gives one
    answer whatever the batch and whatever the prefix cache held."""
    folder, _ = qwen2_ckpt
    budgets = agents.Budgets(new_tokens=1, context=250)
    prompt = [SYSTEM, {"role": "user", "content": "The critic reads the output."}]
    other = [SYSTEM, {"role": "user", "content": "Hello world! Ünïcödé text, tabs\tand\nnewlines, numbers 0123."}]
    ask = lambda messages: agents.ModelRequest("t", "planner", messages)  # noqa: E731
    batched = agents.LocalEngine(folder, prefix_cache_tokens=0)
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
    deterministic = agents.LocalEngine(folder, deterministic=True)
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
    deterministic.prefix_cache.clear()
    deterministic.complete([ask(prompt[:1] + [{"role": "user", "content": "The critic reads"}])], [None], budgets)
    answers.add(first(deterministic, [ask(prompt), ask(other)]))
    assert len(answers) == 1



def test_evaluation_is_the_same_with_1_or_4_workers_and_any_max_batch(micro, mini_world, tmp_path):
    budgets = agents.Budgets(subtasks=2, executor_turns=2, critic_retries=1, format_retries=1, new_tokens=12,
                             context=1024)
    args = evaluate.build_parser().parse_args(["--model", str(micro)])
    assert args.decode == "deterministic" and not args.no_prefix_cache  # evaluation's defaults
    system = evaluate.load_system(evaluate.system_spec(None, None, str(micro), "multi"), "cpu", "float32",
                                  agents.engine_options(args))
    runs = {}
    with world.WorldPool(4, root=mini_world) as pool:
        for workers, max_batch in ((1, 1), (4, 16)):
            out = tmp_path / f"w{workers}"
            cfg = evaluate.EvalConfig(split="dev", out=str(out), root=str(mini_world), workers=workers,
                                      max_batch=max_batch, limit=4, quiet=True)
            results = evaluate.evaluate(system, budgets, cfg, pool=pool)  # the second run finds a warm cache
            records = data.read_trajectories(out / evaluate.TRAJECTORIES)
            runs[workers] = results["metrics"], [{**r, "calls": [{k: v for k, v in c.items()
                                                                  if k not in data.MEASURED_CALL_FIELDS}
                                                                 for c in r["calls"]]} for r in records]
    assert runs[1] == runs[4]
    assert sum(len(r["calls"]) for r in runs[1][1]) > 4


def test_prompt_lookup_drafts_keep_the_greedy_tokens_in_fewer_steps(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder)
    g = torch.Generator().manual_seed(5)
    steps, saved = [], 0
    ours.lm_head.register_forward_pre_hook(lambda module, args: steps.append(1))
    for n in (5, 8, 11, 14):
        prompt = torch.randint(3, 320, (n,), generator=g).tolist() * 3  # repeats: drafts can come true
        [plain] = M.generate(ours, [prompt], 60, stop_ids={2})  # transformers stops at the eos (2) too
        steps.clear()
        [drafted] = M.generate(ours, [prompt], 60, stop_ids={2}, prompt_lookup=4)
        assert drafted.ids == plain.ids == hf_greedy(hf, prompt, 60)
        saved += len(plain.ids) - len(steps)  # one lm_head call per step
    assert saved > 0  # greedy random models fall into loops: drafts copied from the context come true
    # rows of a batch that finish at different times (stop ids), the last one decoding alone with drafts
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() * 2 for n in (5, 9, 13)]
    alone = [M.generate(ours, [p], 30, stop_ids={7, 9, 11})[0].ids for p in prompts]
    assert [x.ids for x in M.generate(ours, prompts, 30, stop_ids={7, 9, 11}, prompt_lookup=4)] == alone


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible teacher: concurrent requests, retries, a clear error after the last one.

class FlakyHandler(http.server.BaseHTTPRequestHandler):
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

    def answer(self, code: int, obj: dict) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


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
    engine = agents.HttpEngine(flaky_server, "m", retries=2, backoff=0.01)
    requests = [agents.ModelRequest("t_1", "planner", [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    replies = engine.complete(requests, [None] * len(requests), agents.Budgets())
    assert [r.text for r in replies] == [f"echo q{i}" for i in range(4)]  # in order
    assert FlakyHandler.tries == {f"q{i}": 3 for i in range(4)}  # two 503s each, then the answer


def test_http_teacher_gives_a_clear_error_after_the_last_retry(flaky_server):
    configure(failures=100, together=1)
    engine = agents.HttpEngine(flaky_server, "m", retries=3, backoff=0.01)
    request = agents.ModelRequest("t_1", "planner", [{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match=r"answered HTTP 503: .*overloaded.*gave up after 4 attempts"):
        engine.complete([request], [None], agents.Budgets())
    assert FlakyHandler.tries == {"q": 4}


def test_bad_decode_flags_give_one_clear_line(micro, mini_world, capsys):
    for flags, message in ((["--prefix-cache-tokens", "0"], "--prefix-cache-tokens must be positive"),
                           (["--prompt-lookup", "-1"], "--prompt-lookup must be 0 (off) or positive"),
                           (["--mix-adapters"], "--mix-adapters needs --decode batched")):
        code = evaluate.main(["--model", str(micro), "--root", str(mini_world), "--limit", "1", *flags])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")
