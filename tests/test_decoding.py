"""decoding.py against the core it speeds up (model.generate: the same tokens) and against independent references:
transformers (greedy ids with the decoding layout, the prompt cache and prompt lookup: transformers recomputes
every prompt), PEFT (batches whose rows run different adapters), hand counts (cached lengths, evictions) and
float64 products (the row-split `project`)."""

import pytest
import torch
import transformers
from peft import PeftModel
from test_lora import load_hf, load_ours, randomize_adapter

import decoding
import lora
import model as M


def random_ids(*shape, seed=0, vocab=320):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


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


@pytest.fixture(params=["qwen2_ckpt", "llama_ckpt", "sharded_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


SYSTEM = {"role": "system", "content": "The planner splits the task into sub-tasks; the executor writes code."}


# ---- the fast generate equals the core's ------------------------------------------------------------------------

def stop_cases(ours, tok):
    """Prompts of different lengths (chat turns, and repeats that prompt-lookup drafts come true on), stop ids and
    per-row stop strings that end some rows early, and model.generate's 24-token greedy Generations of them."""
    texts = ("The critic reads the output.", "Hello world!", "print(apis.venmo.show_transactions(page_index=0))",
             "Task: 0123", "Hello world! numbers 0123456789.")
    prompts = [chat_ids(tok, [SYSTEM, {"role": "user", "content": t}]) for t in texts]
    prompts += [random_ids(n, seed=n).tolist() * 2 for n in (3, 11)]
    free = M.generate(ours, prompts, 24, stop_ids=(), tokenizer=tok)
    stop_ids = {free[0].ids[6], free[3].ids[15]}
    stops = [(tok.decode(free[1].ids[:5])[-2:],), (), ("\x00never",), (), (tok.decode(free[4].ids[:9])[-3:],), (), ()]
    want = [(g.ids, g.text, g.n_prompt, g.n_new, g.stop_reason)
            for g in M.generate(ours, prompts, 24, stop_ids, tok, stops)]
    return prompts, stop_ids, stops, want


@pytest.mark.parametrize("name", ["qwen2_ckpt", "llama_ckpt"])
def test_fast_generate_gives_the_core_generates_tokens(request, name):
    """decoding.generate against model.generate on a batch of rows with different prompt lengths, stop ids and
    per-row stop strings: plain, laid out for decoding, with the prompt cache (cold, then warm, then chunked) and
    with prompt lookup. Every Generation field is equal (n_cached aside, which only the prompt cache sets)."""
    folder, _ = request.getfixturevalue(name)
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    prompts, stop_ids, stops, want = stop_cases(ours, tok)
    assert {w[4] for w in want} == {"stop_id", "stop_string", "length"} and len({w[3] for w in want}) > 2

    def fast(**kwargs):
        out = decoding.generate(ours, prompts, 24, stop_ids, tok, stops, **kwargs)
        return [(g.ids, g.text, g.n_prompt, g.n_new, g.stop_reason) for g in out]

    assert fast() == want
    assert fast(prompt_lookup=4) == want
    cache = decoding.PromptCache(4096)
    assert fast(prompt_cache=cache) == want  # cold: rows reuse earlier rows' system prompt
    assert fast(prompt_cache=cache, prompt_lookup=4) == want  # warm: every prompt cached but its last token
    assert fast(prompt_cache=decoding.PromptCache(4096), prefill_chunk=8) == want
    decoding.lay_out_for_decoding(ours)
    assert fast() == want and fast(prompt_cache=cache, prompt_lookup=4) == want
    one = [decoding.generate(ours, [p], 24, stop_ids, tok, [s], prompt_lookup=4)[0] for p, s in zip(prompts, stops)]
    assert [(g.ids, g.text, g.n_prompt, g.n_new, g.stop_reason) for g in one] == want  # alone, drafting


def test_fast_generate_runs_the_active_adapter_like_the_core(qwen2_ckpt):
    """An unmerged active adapter (lora.set_adapter, as agents.PlainEngine runs roles): decoding.generate, laid out
    or not, and with that adapter routed to every row, gives model.generate's tokens."""
    ours = M.Transformer.from_pretrained(qwen2_ckpt[0])
    lora.add_adapter(ours, "a", r=4, alpha=8)
    randomize_adapter(ours, "a", seed=3)
    lora.set_adapter(ours, "a")
    prompts = [random_ids(n, seed=n).tolist() for n in (4, 13, 7)]
    want = [g.ids for g in M.generate(ours, prompts, 16)]
    assert [g.ids for g in decoding.generate(ours, prompts, 16)] == want
    assert [g.ids for g in decoding.generate(ours, prompts, 16, adapters=["a"] * 3)] == want
    decoding.lay_out_for_decoding(ours)
    assert [g.ids for g in decoding.generate(ours, prompts, 16, prompt_lookup=4)] == want
    lora.set_adapter(ours, None)
    assert [g.ids for g in decoding.generate(ours, prompts, 16)] != want  # the adapter changes the tokens


def routed_logits(model, ids, routes):
    """decoding's forward (B, T, V) of ids (B, T) from an empty cache, each row running its routed adapter."""
    with torch.no_grad():
        cache = M.KVCache(model.config, ids.shape[0], ids.shape[1], "cpu", torch.float32)
        return decoding.logits(model, decoding.hidden(model, ids, cache, routes))


# ---- decoding layouts -------------------------------------------------------------------------------------------

@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """Run the test with this many torch threads (the decoding layout's products split over them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_project_splits_short_products_over_threads_and_matches_float64(threads):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g).t().contiguous().t()  # (out, in) in the decoding layout
    bias = torch.randn(96, generator=g)
    for rows in (1, 3, decoding.SPLIT_ROWS, decoding.SPLIT_ROWS + 1):  # split up to SPLIT_ROWS rows, then not
        x = torch.randn(1, rows, 64, generator=g)  # (1, rows, in)
        product = x.double() @ weight.double().t()
        for b, want in ((bias, product + bias.double()), (None, product)):
            got = decoding.project(x, weight, b)
            assert got.shape == (1, rows, 96) and got.dtype == torch.float32
            assert (got.double() - want).abs().max() < 1e-4


def test_decoding_layout_keeps_every_value_and_still_matches_transformers(ckpt, threads):
    folder, hf = ckpt
    plain = M.Transformer.from_pretrained(folder)
    ours = decoding.lay_out_for_decoding(M.Transformer.from_pretrained(folder))
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    blocks = ours.model.layers
    joined = decoding.joined_projections(ours)
    assert len(joined) == 2 * len(blocks) and {len(layers) for layers in joined} == {2, 3}
    assert all(decoding.joint_weight(layers).t().is_contiguous() for layers in joined)  # one (in, out1 + ...) block
    alone = [ours.lm_head.weight] + [w for b in blocks for w in (b.self_attn.o_proj.weight, b.mlp.down_proj.weight)]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in alone)  # (in, out) storage
    assert decoding.joint_weight((plain.model.layers[0].mlp.gate_proj, plain.model.layers[0].mlp.up_proj)) is None
    storage = [p.data_ptr() for p in ours.parameters()]
    decoding.lay_out_for_decoding(ours)
    assert [p.data_ptr() for p in ours.parameters()] == storage  # laid out once: a second call copies nothing
    ids = random_ids(2, 100)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    prompts = [random_ids(n, seed=n).tolist() for n in (5, 17, 9)]
    want = [hf_greedy(hf, p, 20) for p in prompts]
    assert [g.ids for g in decoding.generate(ours, prompts, 20, stop_ids=())] == want  # 3 rows, then fewer
    assert [decoding.generate(ours, [p], 20, stop_ids=(), prompt_lookup=4)[0].ids for p in prompts] == want
    assert [g.ids for g in M.generate(ours, prompts, 20, stop_ids=())] == want  # the core runs on the layout too


# ---- the prompt cache ----------------------------------------------------------------------------------------------

def test_prompt_cache_turns_equal_transformers_and_reuse_the_previous_turn(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = decoding.PromptCache(4096)
    messages = [SYSTEM, {"role": "user", "content": "The critic reads the output."}]
    fed = []  # what the previous call fed the model: its prompt and its new tokens but the last
    for turn in range(3):
        prompt = chat_ids(tok, messages)
        [g] = decoding.generate(ours, [prompt], 12, stop_ids=(), prompt_cache=cache, namespace="planner")
        assert g.ids == hf_greedy(hf, prompt, 12)
        assert g.n_cached == min(common_prefix(prompt, fed), len(prompt) - 1)
        assert (g.n_cached > len(prompt) // 2) == (turn > 0)  # later turns compute only their new tokens
        fed = prompt + g.ids[:-1]
        messages += [{"role": "assistant", "content": tok.decode(g.ids)},
                     {"role": "user", "content": f"Output: {turn} transactions"}]
    # another namespace (another adapter's keys/values) never reuses these
    [g] = decoding.generate(ours, [prompt], 4, stop_ids=(), prompt_cache=cache, namespace="critic")
    assert g.n_cached == 0


def test_prompt_cache_batches_rows_with_different_cached_lengths(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = decoding.PromptCache(4096)
    first = chat_ids(tok, [SYSTEM, {"role": "user", "content": "apis.spotify.login(username='alice')"}])
    [g] = decoding.generate(ours, [first], 6, stop_ids=(), prompt_cache=cache)
    prompts = [first + [40, 41, 42], chat_ids(tok, [{"role": "user", "content": "Hello world!"}]), first[:9]]
    out = decoding.generate(ours, prompts, 10, stop_ids=(), prompt_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 10) for p in prompts]
    fed = first + g.ids[:-1]
    # the longest stored prefix (the ChatML header is shared too), at most all but the last prompt token
    assert [g.n_cached for g in out] == [common_prefix(prompts[0], fed), common_prefix(prompts[1], fed), 8]
    assert out[0].n_cached >= len(first)


def test_reuse_across_conversations_sharing_system_prompt_and_task(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = decoding.PromptCache(4096)
    task = {"role": "user", "content": "Task: print(apis.venmo.show_transactions(page_index=0))"}
    a = chat_ids(tok, [SYSTEM, task])
    b = chat_ids(tok, [SYSTEM, task, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "0123"}])
    c = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Task: the critic says whether it succeeded."}])
    decoding.generate(ours, [a], 5, stop_ids=(), prompt_cache=cache)
    out = decoding.generate(ours, [b, c], 8, stop_ids=(), prompt_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 8) for p in (b, c)]
    assert out[1].n_cached == common_prefix(a, c) > len(chat_ids(tok, [SYSTEM])) - 5
    assert out[0].n_cached >= len(a) - 1


def test_rows_of_one_batch_reuse_an_earlier_rows_prompt(qwen2_ckpt):
    """Calls pending together (the first turn of every rollout) share their system prompt: with an empty cache,
    each row after the first computes only what an earlier row of the batch has not."""
    folder, hf = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    cache = decoding.PromptCache(4096)
    prompts = [chat_ids(tok, [SYSTEM, {"role": "user", "content": text}])
               for text in ("Task: print(apis.venmo.show_transactions(page_index=0))", "Task: 0123", "Hello world!")]
    out = decoding.generate(ours, prompts, 8, stop_ids=(), prompt_cache=cache)
    assert [g.ids for g in out] == [hf_greedy(hf, p, 8) for p in prompts]
    shared = [0, common_prefix(prompts[0], prompts[1]),
              max(common_prefix(prompts[0], prompts[2]), common_prefix(prompts[1], prompts[2]))]
    assert [g.n_cached for g in out] == shared and shared[1] > len(chat_ids(tok, [SYSTEM])) - 5


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used():
    cache = decoding.PromptCache(max_tokens=10)
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
    cache = decoding.PromptCache(40)
    prompts = [chat_ids(tok, [{"role": "user", "content": text}]) for text in
               ("Hello world!", "The critic reads the output.", "Hello world! numbers 0123456789.")]
    for p in prompts + prompts[::-1]:
        [g] = decoding.generate(ours, [p], 8, stop_ids=(), prompt_cache=cache)
        assert g.ids == hf_greedy(hf, p, 8)
        assert cache.tokens <= 40
    assert sum(len(key[1]) for key in cache.entries) == cache.tokens


def test_chunked_prefill_stores_the_same_bits_whether_cached_or_computed(qwen2_ckpt):
    folder, _ = qwen2_ckpt
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    short = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Hello world!"}])
    long = chat_ids(tok, [SYSTEM, {"role": "user", "content": "Hello world!"}, {"role": "assistant", "content":
                          "print(apis.venmo.show_transactions(page_index=0))"}, {"role": "user", "content": "12"}])
    cold, warm = decoding.PromptCache(4096), decoding.PromptCache(4096)
    decoding.generate(ours, [short], 4, stop_ids=(), prompt_cache=warm, prefill_chunk=8)
    [a] = decoding.generate(ours, [long], 6, stop_ids=(), prompt_cache=cold, prefill_chunk=8)
    [b] = decoding.generate(ours, [long], 6, stop_ids=(), prompt_cache=warm, prefill_chunk=8)
    assert a.ids == b.ids and a.n_cached == 0 and b.n_cached == len(short) // 8 * 8 > 0
    (ka, va), (kb, vb) = (next(iter(c.entries.values())) for c in (cold, warm))
    assert len(warm.entries) == 1 and ka[0].shape[1] == len(long) // 8 * 8
    assert all(torch.equal(x, y) for x, y in zip(ka + va, kb + vb))  # bitwise


# ---- one batch across adapters ----------------------------------------------------------------------------------

def test_routed_rows_each_run_their_own_adapter_like_peft_mixed_batches(qwen2_ckpt, tmp_path):
    """One batch, each row its own adapter or the base. Reference: PEFT's mixed-batch forward
    (`adapter_names=[...]`, "__base__" for the plain model) on the transformers model."""
    hf_dir = qwen2_ckpt[0]
    ids = torch.randint(0, 320, (5, 7), generator=torch.Generator().manual_seed(2))
    model = load_ours(hf_dir)
    lora.add_adapter(model, "planner", r=4, alpha=8)
    lora.add_adapter(model, "executor", r=2, alpha=2, targets=("q_proj", "up_proj"))
    randomize_adapter(model, "planner", seed=8)
    randomize_adapter(model, "executor", seed=9)
    for name in ("planner", "executor"):
        lora.save_adapter(model, tmp_path / name, name)
    peft = PeftModel.from_pretrained(load_hf(hf_dir), str(tmp_path / "planner"), adapter_name="planner")
    peft.load_adapter(str(tmp_path / "executor"), adapter_name="executor")
    names = ["executor", "__base__", "planner", "executor", "__base__"]
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids, adapter_names=names).logits
    lora.set_adapter(model, "planner")  # routes take precedence over the active adapter
    routes = decoding.route_rows(model, [None if n == "__base__" else n for n in names])
    torch.testing.assert_close(routed_logits(model, ids, routes), expected, rtol=1e-4, atol=1e-5)
    routes = decoding.route_rows(model, ["planner"] * 5)  # one adapter on every row: that adapter's forward
    torch.testing.assert_close(routed_logits(model, ids, routes)[2], expected[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(routed_logits(model, ids, None)[2], expected[2], rtol=1e-4, atol=1e-5)  # planner active
    with torch.no_grad():
        torch.testing.assert_close(model(ids), routed_logits(model, ids, None), rtol=1e-5, atol=1e-6)  # the core's
    assert not torch.allclose(expected[0], routed_logits(model, ids, None)[0])
    with pytest.raises(ValueError, match="no adapter named 'critic'"):
        decoding.route_rows(model, ["critic"])
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerged adapters"):
        decoding.route_rows(model, ["planner", None])


def two_adapters(folder, out):
    """Our model of `folder` with adapters 'planner' (every projection) and 'executor' (q and up only), random
    and non-zero, also saved under out/<name>; and PEFT on transformers with the same two adapters loaded."""
    ours = M.Transformer.from_pretrained(folder).eval()
    torch.manual_seed(0)  # lora_A's kaiming init draws from the global generator
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
    folder, _ = qwen2_ckpt
    ours, peft = two_adapters(folder, tmp_path)
    decoding.lay_out_for_decoding(ours)  # as rollout.LocalEngine runs it
    tok = M.Tokenizer.from_pretrained(folder)
    texts = ("The critic reads the output.", "Hello world!", "print(apis.venmo.show_transactions())", "Task: 0123")
    prompts = [chat_ids(tok, [SYSTEM, {"role": "user", "content": t}]) for t in texts]
    adapters = ["executor", None, "planner", "executor"]
    want = [peft_greedy(peft, p, 10, a) for p, a in zip(prompts, adapters)]
    assert len({tuple(w) for w in want}) == 4 and want[0] != peft_greedy(peft, prompts[0], 10, None)
    out = decoding.generate(ours, prompts, 10, stop_ids=(), adapters=adapters)
    assert [g.ids for g in out] == want
    # per-row stop strings: the second row stops inside its own text, the others run on
    stop = tok.decode(want[1][:4])[-2:]
    assert not any(stop in tok.decode(w) for w in (want[0], want[2], want[3]))
    out = decoding.generate(ours, prompts, 10, stop_ids=(), tokenizer=tok, stop_strings=[(), (stop,), (), ("\x00",)],
                     adapters=adapters)
    assert [g.stop_reason for g in out] == ["length", "stop_string", "length", "length"]
    assert out[1].ids == want[1][:len(out[1].ids)] and out[1].text.endswith(stop)
    # the prompt cache keeps each adapter's keys/values apart: the same prompt under another adapter reuses nothing
    cache = decoding.PromptCache(4096)
    decoding.generate(ours, prompts[:1], 4, stop_ids=(), prompt_cache=cache, adapters=["executor"])
    again = decoding.generate(ours, [prompts[0], prompts[0]], 10, stop_ids=(), prompt_cache=cache,
                       adapters=["executor", "planner"])
    assert [g.n_cached for g in again] == [len(prompts[0]) - 1, 0]
    assert [g.ids for g in again] == [want[0], peft_greedy(peft, prompts[0], 10, "planner")]


# ---- prompt lookup -----------------------------------------------------------------------------------------------

def test_prompt_lookup_drafts_keep_the_greedy_tokens_in_fewer_steps(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder)
    g = torch.Generator().manual_seed(5)
    steps, saved = [], 0
    ours.lm_head.register_forward_pre_hook(lambda module, args: steps.append(1))  # decoding.logits calls it
    for n in (5, 8, 11, 14):
        prompt = torch.randint(3, 320, (n,), generator=g).tolist() * 3  # repeats: drafts can come true
        [plain] = decoding.generate(ours, [prompt], 60, stop_ids={2})  # transformers stops at the eos (2) too
        steps.clear()
        [drafted] = decoding.generate(ours, [prompt], 60, stop_ids={2}, prompt_lookup=4)
        assert drafted.ids == plain.ids == hf_greedy(hf, prompt, 60)
        saved += len(plain.ids) - len(steps)  # one lm_head call per step
    assert saved > 0  # greedy random models fall into loops: drafts copied from the context come true
    # rows of a batch that finish at different times (stop ids), the last one decoding alone with drafts
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() * 2 for n in (5, 9, 13)]
    alone = [decoding.generate(ours, [p], 30, stop_ids={7, 9, 11})[0].ids for p in prompts]
    assert [x.ids for x in decoding.generate(ours, prompts, 30, stop_ids={7, 9, 11}, prompt_lookup=4)] == alone


# ---- batch-invariant decoding -----------------------------------------------------------------------------------

def smollm_shaped(layers=2, vocab=2048, seed=0):
    """A random model with SmolLM2-135M's layer shapes (576 wide, 9/3 heads of 64, MLP 1536): at these shapes the
    CPU matmul kernels pick their blocking, and so their rounding, by the number of rows."""
    cfg = M.ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                        num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                        rope_theta=1e5, attention_bias=False, tie_word_embeddings=True, max_position_embeddings=1024,
                        rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    net = M.Transformer(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net


def prefilled(net, prompt: list[int], room: int) -> M.KVCache:
    cache = M.KVCache(net.config, 1, len(prompt) + room, "cpu", torch.float32)
    with torch.no_grad():
        net.hidden(torch.tensor([prompt]), cache)
    return cache


@pytest.mark.parametrize("laid_out", [False, True], ids=["plain layout", "decoding layout"])
def test_a_rows_hidden_states_are_the_same_bits_in_batches_of_1_3_and_8(laid_out):
    """hidden_invariant on rows of different lengths feeding 1 to 3 tokens each: every row's hidden states are
    bit-equal whether it runs alone, with 2 others or with 7; the plain padded batch (decoding.hidden) of the same
    rows is not, which is what makes batched decoding's near-ties depend on the batch."""
    net = smollm_shaped()
    if laid_out:
        decoding.lay_out_for_decoding(net)
    prompts = [random_ids(n, seed=n, vocab=2048).tolist() for n in (5, 70, 33, 130, 9, 64, 200, 17)]
    fed = [[p[-1], 7, 9][:1 + b % 3] for b, p in enumerate(prompts)]

    def run(rows):
        with torch.no_grad():
            h = decoding.hidden_invariant(net, [fed[b] for b in rows], [prefilled(net, prompts[b], 3) for b in rows])
        return list(h.split([len(fed[b]) for b in rows]))

    alone = [run([b])[0] for b in range(8)]
    for batch in ([0, 1, 2], [3, 4, 5], [6, 7], list(range(8))):
        assert all(torch.equal(h, alone[b]) for b, h in zip(batch, run(batch)))
    # the padded batch decoding.generate runs, one last prompt token per row: its rounding depends on the batch
    heads = [p[:-1] for p in prompts]
    with torch.no_grad():
        invariant = decoding.hidden_invariant(net, [[p[-1]] for p in prompts], [prefilled(net, h, 1) for h in heads])
        P = max(len(h) for h in heads)
        batch = M.KVCache(net.config, 8, P + 1, "cpu", torch.float32, torch.tensor([P - len(h) for h in heads]))
        net.hidden(torch.tensor([[0] * (P - len(h)) + h for h in heads]), batch)
        padded = decoding.hidden(net, torch.tensor([[p[-1]] for p in prompts]), batch)[:, -1]  # (8, D)
    assert torch.allclose(padded, invariant, atol=1e-4)
    assert not torch.equal(padded, invariant)


@pytest.mark.parametrize("name", ["qwen2_ckpt", "llama_ckpt"])
def test_invariant_generate_gives_the_core_tokens_alone_and_in_any_batch(request, name):
    """decoding.generate_invariant against model.generate (every Generation field but n_cached) on rows with
    different prompt lengths, stop ids and stop strings, with prompt-lookup drafts and a warm prompt cache; and
    each row's result is the same alone, in batches of 3 and in one batch of all 7."""
    folder, _ = request.getfixturevalue(name)
    ours, tok = M.Transformer.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    prompts, stop_ids, stops, want = stop_cases(ours, tok)
    assert {w[4] for w in want} == {"stop_id", "stop_string", "length"}
    decoding.lay_out_for_decoding(ours)
    cache = decoding.PromptCache(4096)

    def invariant(rows, **kwargs):
        out = decoding.generate_invariant(ours, [prompts[b] for b in rows], 24, stop_ids, tok,
                                          [stops[b] for b in rows], **kwargs)
        return [(g.ids, g.text, g.n_prompt, g.n_new, g.stop_reason) for g in out]

    assert invariant(range(7)) == want
    assert invariant(range(7), prompt_lookup=4, prompt_cache=cache) == want  # cold cache: rows share the system
    assert invariant(range(7), prompt_lookup=4, prompt_cache=cache) == want  # warm
    assert [invariant([b], prompt_lookup=4)[0] for b in range(7)] == want
    assert invariant([0, 1, 2], prompt_lookup=4) + invariant([3, 4, 5], prompt_lookup=4) + invariant([6]) == want
