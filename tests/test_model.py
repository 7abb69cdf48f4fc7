"""model.py (and model_io.py's loading by name) against independent references: transformers (logits, greedy ids,
chat templates, loading our saves), the tokenizers library (hand-assembled ChatML ids and masks) and hand counts
(FLOPs)."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import CORPUS, DEFAULT_SYSTEM, TEMPLATE_PLAIN, build_chatml_tokenizer
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as RawTokenizer

import model as M
import model_io

CHECKPOINTS = ["qwen2_ckpt", "llama_ckpt", "sharded_ckpt"]


@pytest.fixture(params=CHECKPOINTS)
def ckpt(request):
    return request.getfixturevalue(request.param)


def random_ids(*shape, seed=0, vocab=320):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate for exactly n tokens (no eos stop)."""
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    out = hf_model.generate(torch.tensor([prompt]), generation_config=cfg)
    return out[0, len(prompt):].tolist()


# ---- loading and parity -----------------------------------------------------------------------------------------

def test_parameter_names_and_tying(qwen2_ckpt, llama_ckpt):
    for (folder, hf), tied in ((qwen2_ckpt, True), (llama_ckpt, False)):
        ours = M.Transformer.from_pretrained(folder)
        assert set(ours.state_dict()) == set(hf.state_dict())
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours.parameters())
    assert M.Transformer.from_pretrained(qwen2_ckpt[0]).model.layers[0].self_attn.q_proj.bias is not None
    assert M.Transformer.from_pretrained(llama_ckpt[0]).model.layers[0].self_attn.q_proj.bias is None


def test_logits_match_transformers(ckpt):
    folder, hf = ckpt
    ours = M.Transformer.from_pretrained(folder)
    ids = random_ids(2, 100)  # 100 > the llama3 fixture's original context (64): scaled frequencies matter
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_llama3_rope_frequencies_match_transformers(llama_ckpt):
    folder, hf = llama_ckpt
    ours = M.Transformer.from_pretrained(folder)
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_greedy_20_tokens_match_transformers(ckpt):
    folder, hf = ckpt
    ours = M.Transformer.from_pretrained(folder)
    for seed, length in ((0, 5), (1, 17)):
        prompt = random_ids(length, seed=seed).tolist()
        [g] = M.generate(ours, [prompt], 20, stop_ids=())
        assert g.ids == hf_greedy(hf, prompt, 20)
        assert (g.n_prompt, g.n_new, g.stop_reason) == (length, 20, "length")


@pytest.mark.parametrize("name", ["qwen2_ckpt", "llama_ckpt"])
def test_batched_mixed_lengths_equal_one_at_a_time(request, name):
    folder, _ = request.getfixturevalue(name)
    ours = M.Transformer.from_pretrained(folder)
    prompts = [random_ids(n, seed=n).tolist() for n in (3, 19, 8, 1, 12)]
    alone = [M.generate(ours, [p], 20, stop_ids=())[0] for p in prompts]
    assert [g.ids for g in M.generate(ours, prompts, 20, stop_ids=())] == [g.ids for g in alone]
    # rows that stop early leave the batch; the others must not notice
    stops = {alone[0].ids[2], alone[1].ids[9]}
    alone = [M.generate(ours, [p], 20, stop_ids=stops)[0] for p in prompts]
    batched = M.generate(ours, prompts, 20, stop_ids=stops)
    assert [(g.ids, g.stop_reason) for g in batched] == [(g.ids, g.stop_reason) for g in alone]
    assert batched[0].n_new <= 3 and len({g.n_new for g in batched}) > 1  # rows really finished apart


def test_kv_cache_decode_equals_full_forward(qwen2_ckpt):
    folder, _ = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder)
    ids = random_ids(2, 30)
    with torch.no_grad():
        full = ours(ids)  # (2, 30, V)
        cache = M.KVCache(ours.config, 2, 30, "cpu", torch.float32)
        pieces = [ours(ids[:, :10], cache), ours(ids[:, 10:16], cache)]  # prefill, then a chunk after it
        pieces += [ours(ids[:, t:t + 1], cache) for t in range(16, 30)]  # one token at a time
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_bfloat16_load_keeps_fp32_rope(qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters()) and ours.inv_freq.dtype == torch.float32
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert (ours(ids).float() - theirs(ids).logits.float()).abs().max().item() <= 1e-2


# ---- generation stops -------------------------------------------------------------------------------------------

def test_stops_are_per_sequence(qwen2_ckpt):
    folder, _ = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder)
    tok = M.Tokenizer.from_pretrained(folder)
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = [random_ids(n, seed=10 + n).tolist() for n in (4, 9)]
    free = M.generate(ours, prompts, 20, stop_ids=())
    stop = free[0].ids[5]
    stopped = M.generate(ours, prompts, 20, stop_ids={stop}, tokenizer=tok)
    for f, s in zip(free, stopped):
        if stop in f.ids:
            cut = f.ids.index(stop) + 1
            assert (s.ids, s.stop_reason) == (f.ids[:cut], "stop_id")
            assert s.text == raw.decode(f.ids[:cut - 1], skip_special_tokens=False)
        else:
            assert (s.ids, s.stop_reason) == (f.ids, "length")
    assert stopped[0].n_new <= 6

    text = raw.decode(free[1].ids, skip_special_tokens=False)
    needle = text[len(text) // 2: len(text) // 2 + 3]
    first = next(n for n in range(1, 21) if needle in raw.decode(free[1].ids[:n], skip_special_tokens=False))
    [g] = M.generate(ours, [prompts[1]], 20, stop_ids=(), tokenizer=tok, stop_strings=[needle, "\x00never"])
    assert g.stop_reason == "stop_string" and g.ids == free[1].ids[:first]
    assert g.text == text[:text.index(needle) + len(needle)]


def test_generate_rejects_stop_strings_without_tokenizer(qwen2_ckpt):
    ours = M.Transformer.from_pretrained(qwen2_ckpt[0])
    with pytest.raises(ValueError, match="tokenizer"):
        M.generate(ours, [[5, 6]], 3, stop_ids=(), stop_strings=["x"])


# ---- tokenizer and chat -----------------------------------------------------------------------------------------

CHAT = [
    {"role": "user", "content": "Hello world! Ünïcödé"},
    {"role": "assistant", "content": "print(apis.spotify.login(username='alice'))"},
    {"role": "user", "content": "numbers 0123456789\tand tabs"},
    {"role": "assistant", "content": "a deliberate mistake", "train": False},
    {"role": "user", "content": "The critic reads the output."},
    {"role": "assistant", "content": ""},
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return {"default": build_chatml_tokenizer(tmp_path_factory.mktemp("tok_default")),
            "plain": build_chatml_tokenizer(tmp_path_factory.mktemp("tok_plain"), template=TEMPLATE_PLAIN)}


def test_tokenizer_basics(tok_dirs):
    tok = M.Tokenizer.from_pretrained(tok_dirs["plain"])
    raw = RawTokenizer.from_file(str(tok_dirs["plain"] / "tokenizer.json"))
    text = "The executor writes code; Ünïcödé<|im_end|>!"
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (2, 0, {0, 2})  # eos <|im_end|>, <|endoftext|> also stops


def test_chat_ids_and_mask_hand_computed(tok_dirs):
    tok = M.Tokenizer.from_pretrained(tok_dirs["default"])
    raw = RawTokenizer.from_file(str(tok_dirs["default"] / "tokenizer.json"))
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    start, end, nl = 1, 2, enc("\n")
    ids, mask = [], []

    def add(piece_ids, target):
        ids.extend(piece_ids)
        mask.extend([int(target)] * len(piece_ids))

    add([start] + enc("system\n" + DEFAULT_SYSTEM) + [end] + nl, False)  # the template's default system turn
    for m in CHAT:
        add([start] + enc(m["role"] + "\n"), False)
        target = m["role"] == "assistant" and m.get("train", True)
        add(enc(m["content"]) + [end], target)
        add(nl, False)
    assert tok.chat(CHAT) == (ids, mask)
    gen_ids, gen_mask = tok.chat(CHAT[:-1], add_generation_prompt=True)
    prompt_len = len(ids) - len(nl) - 1 - len(enc("assistant\n")) - 1  # drop the last "assistant\n" + <|im_end|>\n
    assert gen_ids == ids[:prompt_len] + [start] + enc("assistant\n")
    assert gen_mask == mask[:prompt_len] + [0] * (1 + len(enc("assistant\n")))


@pytest.mark.parametrize("which", ["default", "plain"])
def test_chat_matches_apply_chat_template(tok_dirs, which):
    tok = M.Tokenizer.from_pretrained(tok_dirs[which])
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[which])
    with_system = [{"role": "system", "content": "You plan sub-tasks.\n"}] + CHAT
    for messages in (CHAT, with_system, CHAT[:1], [{"role": "user", "content": "\n\n x <|im_end|> y"}]):
        for gen in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)["input_ids"]
            assert tok.chat(messages, add_generation_prompt=gen)[0] == expected
    # "train": False never changes the ids
    untagged = [{k: v for k, v in m.items() if k != "train"} for m in CHAT]
    assert tok.chat(CHAT)[0] == tok.chat(untagged)[0] and tok.chat(CHAT)[1] != tok.chat(untagged)[1]


def test_default_system_message_is_read_from_the_template():
    # written in SmolLM2's style: a raw newline inside the literal, double quotes
    template = ("{% if messages[0]['role'] != 'system' %}{{ \"<|im_start|>system\nBe brief, don't ramble.<|im_end|>\n\" }}"
                "{% endif %}{% for m in messages %}...{% endfor %}")
    assert M.default_system_message(template) == "Be brief, don't ramble."
    assert M.default_system_message(TEMPLATE_PLAIN) is None
    # Qwen2.5's layout: a tools branch opens the system turn in pieces; the full literal comes later
    qwen_like = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
                 "{{- messages[0]['content'] }}{%- else %}{{- 'Default.' }}{%- endif %}{%- else %}"
                 "{%- if messages[0]['role'] == 'system' %}"
                 "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
                 "{%- else %}{{- '<|im_start|>system\\nDefault.<|im_end|>\\n' }}{%- endif %}{%- endif %}")
    assert M.default_system_message(qwen_like) == "Default."
    assert M.default_system_message(
        "{{- '<|im_start|>system\\nYou are \\'X\\'.<|im_end|>\\n' }}") == "You are 'X'."


def test_chat_rejects_non_chatml(tmp_path, tok_dirs):
    folder = tmp_path / "tok"
    shutil.copytree(tok_dirs["plain"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ChatML"):
        M.Tokenizer.from_pretrained(folder).chat(CHAT)


# ---- bad inputs -------------------------------------------------------------------------------------------------

def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.Transformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.Transformer.from_pretrained(tmp_path / "empty")
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="hub"):
        model_io.load_model("someone/not-cached")


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch, qwen2_ckpt):
    import huggingface_hub.constants as hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-qwen"
    shutil.copytree(qwen2_ckpt[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = model_io.load_model("acme/tiny-qwen")
    assert model.name_or_path == "acme/tiny-qwen" and model.config.hidden_size == 64


def test_bad_config(tmp_path, qwen2_ckpt):
    folder = copy_ckpt(qwen2_ckpt[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*qwen2, llama"):
        M.Transformer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="hidden_size"):
        M.Transformer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        M.Transformer.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "192"}, 'hidden_size must be a positive integer (got "192")'),
    ({"num_attention_heads": -4}, "num_attention_heads must be a positive integer (got -4)"),
    ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive integer (got -2)"),
    ({"num_hidden_layers": None}, "num_hidden_layers must be a positive integer (got null)"),
    ({"vocab_size": 320.0}, "vocab_size must be a positive integer (got 320.0)"),
    ({"intermediate_size": True}, "intermediate_size must be a positive integer (got true)"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ({"hidden_size": 66}, "hidden_size (66) must be a multiple of num_attention_heads (4)"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta must be a finite positive number (got 0)"),
    ({"rope_theta": "1e6"}, 'rope_theta must be a finite positive number (got "1e6")'),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite positive number (got -1e-06)"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer (got 0)"),
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings must be true or false (got "false")'),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
])
def test_every_config_value_is_validated_with_a_one_line_error_naming_the_field(tmp_path, qwen2_ckpt, change,
                                                                                  message):
    folder = copy_ckpt(qwen2_ckpt[0], tmp_path / "m")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_theta", None)  # so that rope_parameters is what is read
    path.write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError) as error:
        M.Transformer.from_pretrained(folder)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, qwen2_ckpt):
    folder = copy_ckpt(qwen2_ckpt[0], tmp_path / "m")
    (folder / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="config.json must hold a JSON object of config fields .got list."):
        M.Transformer.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        M.Transformer.from_pretrained(folder)


def test_a_llama3_rope_scaling_with_bad_factors_is_refused(tmp_path, llama_ckpt):
    folder = copy_ckpt(llama_ckpt[0], tmp_path / "m")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    scaling = cfg.get("rope_parameters") or cfg["rope_scaling"]
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    path.write_text(json.dumps({**cfg, key: {**scaling, "factor": -8.0}}))
    with pytest.raises(ValueError, match="rope_scaling.factor must be a finite positive number .got -8.0."):
        M.Transformer.from_pretrained(folder)


def test_truncated_safetensors(tmp_path, qwen2_ckpt):
    folder = copy_ckpt(qwen2_ckpt[0], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 20):  # data cut short; header cut short
        (folder / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            M.Transformer.from_pretrained(folder)


def test_missing_tensor_and_wrong_shape(tmp_path, qwen2_ckpt):
    folder = copy_ckpt(qwen2_ckpt[0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    dropped = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(dropped, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        M.Transformer.from_pretrained(folder)
    reshaped = {**tensors, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    save_file(reshaped, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj.weight .*shape \(64, 64\).*\(32, 64\)"):
        M.Transformer.from_pretrained(folder)


def test_missing_shard(tmp_path, sharded_ckpt):
    folder = copy_ckpt(sharded_ckpt[0], tmp_path / "m")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002"):
        M.Transformer.from_pretrained(folder)


# ---- saving, tiny preset, FLOPs, CLI ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2_ckpt", "llama_ckpt"])
def test_save_pretrained_loads_in_transformers(tmp_path, request, name):
    folder, hf = request.getfixturevalue(name)
    model_io.save_pretrained(M.Transformer.from_pretrained(folder), tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in saved) == (name == "llama_ckpt")  # tied: stored once, as the embedding
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = random_ids(1, 24)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_init_tiny_loads_in_transformers(tmp_path):
    out = model_io.init_tiny(tmp_path / "tiny", CORPUS * 3, preset="micro")
    ours = M.Transformer.from_pretrained(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(theirs, transformers.Qwen2ForCausalLM) and theirs.config.tie_word_embeddings
    ids = random_ids(2, 40, vocab=ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
    tok, hf_tok = M.Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat(CHAT, True)[0] == hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert tok.stop_ids == {tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]}


def test_flops_count_what_runs_by_hand_and_by_torchs_flop_counter(qwen2_ckpt):
    """Hand count for the tiny Qwen2 (2 layers, 4 heads x 16 dims, vocab 320), then torch's own FLOP counter
    around `generate` confirms the matmuls: every projection at every position, lm_head only where logits
    were computed (the prompt's last position and each decode step)."""
    from conftest import flop_counter
    folder, hf = qwen2_ckpt
    config = M.ModelConfig.from_hf(folder)
    projections = sum(m.weight.numel() for name, m in hf.named_modules()
                      if isinstance(m, torch.nn.Linear) and name != "lm_head")
    lm_head = hf.lm_head.weight.numel()  # 64 x 320
    # a 5-token prompt and 3 new tokens: positions 0..6 run (prefill 5, decode 2), position p sees p + 1 keys
    attention = 2 * 4 * (4 * 16) * sum(range(1, 8))  # layers x (q.k + weights.v: 4 per query dim) x keys
    assert M.generate_flops(config, 5, 3) == 2 * projections * 7 + attention + 2 * lm_head * 3
    assert M.forward_flops(config, 2, 0, past=5) == 2 * projections * 2 + 2 * 4 * (4 * 16) * (6 + 7)
    assert M.train_flops(config, 8, 3) == 2 * (2 * projections * 7 + attention + 2 * lm_head * 3) + attention

    ours = M.Transformer.from_pretrained(folder)
    prompt = [5, 17, 42, 99, 7]
    with flop_counter() as counter:
        (g,) = M.generate(ours, [prompt], 3)
    assert g.n_new == 3  # no stop ids: all three decoded
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if "mm" in str(op) and "attention" not in str(op))
    assert matmuls == 2 * projections * 7 + 2 * lm_head * 3

    import lora  # an unmerged adapter (training) runs its A and B matmuls at every position too
    lora.add_adapter(ours, "a", r=2, alpha=4, targets=("q_proj", "v_proj"))
    lora.set_adapter(ours, "a")
    adapter = sum(p.numel() for p in lora.adapter_parameters(ours, "a"))
    assert adapter == 2 * (2 * (64 + 64) + 2 * (64 + 32))  # layers x (q: r x (64 + 64), v: r x (64 + 32))
    with flop_counter() as counter:
        M.generate(ours, [prompt], 3)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if "mm" in str(op) and "attention" not in str(op))
    assert matmuls == 2 * (projections + adapter) * 7 + 2 * lm_head * 3
    assert M.forward_flops(config, 7, 3, adapter_weights=adapter) - M.forward_flops(config, 7, 3) == 2 * adapter * 7


def test_legacy_rope_fields():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=128)
    config = M.ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}})
    assert config.rope_theta == 5e5 and config.rope_scaling["original_max_position_embeddings"] == 128
    assert config.num_key_value_heads == 2 and config.head_dim == 4 and not config.tie_word_embeddings


def test_cli(qwen2_ckpt, capsys, tmp_path):
    model_io.main(["--model", str(qwen2_ckpt[0]), "--prompt", "Hello", "--chat", "--max-new-tokens", "4"])
    assert "tokens/s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        model_io.main(["init-tiny", "--texts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "error: text file" in capsys.readouterr().err
