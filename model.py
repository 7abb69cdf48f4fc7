"""model.py: the small language model under every ProST role, in plain PyTorch.

ProST trains small LMs as a planner, an executor and a critic for AppWorld tasks. Every one of those roles is
this file's `Transformer` (plus a LoRA adapter from lora.py), fed ChatML conversations rendered by this file's
`Tokenizer.chat` and decoded greedily by this file's `generate`. It imports no other prost file but two
leaves: config_checks.py (the checks on a config.json), checkpoint_checks.py (the checks that a
checkpoint's tensors fill the model) and attention_masks.py (the mask form each device's attention kernels take).

What is here, top to bottom:
  1. ModelConfig   read a Hugging Face config.json (Qwen2/Qwen2.5, Llama 2/3.x incl. "llama3" RoPE, SmolLM2),
                   every value checked (config_checks.py) with an error that names the field
  2. the network   RMSNorm, rotate-half RoPE, GQA attention, SwiGLU MLP, Transformer on plain nn.Linear;
                   parameter names equal the HF checkpoint keys, so checkpoints load strictly. A forward may
                   continue a cache: any object with `positions_and_mask(T, device)`, `attend(layer, q, k, v,
                   mask)` and a `length`; KVCache is the one for decoding (trunk.SharedTrunk, for training,
                   is another)
  3. loading       `Transformer.from_pretrained` of a local HF folder (single or sharded safetensors), tensor
                   by tensor onto a model built on the meta device
  4. Tokenizer     `tokenizers`-based; ChatML rendering with a loss mask on the assistant's own tokens
  5. generate      batched greedy decoding: left padding, per-row positions, stop ids and stop strings
  6. FLOPs         `forward_flops` (the one counting rule), `generate_flops`, `train_flops`

Beside it: model_io.py (hub ids, GGUF files, saving, the tiny preset, the CLI), decoding.py (the fast `generate`,
tested token-equal to this one), trunk.py (training rows that share a prefix).

Numerics follow transformers' Qwen2/Llama modeling: RMSNorm variance in fp32, RoPE cos/sin computed in fp32
and cast to the activation dtype, attention through `scaled_dot_product_attention` with scale head_dim**-0.5.
The product never imports transformers; the tests use it as an oracle.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import attention_masks  # torch-only leaf: the mask form each device's attention kernels take
import checkpoint_checks  # leaf: the checks that a checkpoint's tensors fill the model
import config_checks  # stdlib-only leaf: the checks on a config.json

# ----------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------------------------

# model_type -> the HF architecture name written into config.json when saving
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
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
        config_checks.check_values(self)  # a bad value fails here, with the field's name

    @classmethod
    def from_hf(cls, source: dict | str | Path) -> "ModelConfig":
        """Parse a HF config: a dict, a config.json path, or a model folder containing config.json."""
        hf, where = (source, "config") if isinstance(source, dict) else config_checks.read_config_json(source)
        config_checks.check_supported(hf, where, ARCHITECTURES, REQUIRED_FIELDS)
        model_type, n_heads = hf["model_type"], hf["num_attention_heads"]
        theta, scaling = read_rope(hf, where)
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        try:
            return cls(
                model_type=model_type, **{k: hf[k] for k in REQUIRED_FIELDS},
                num_key_value_heads=n_heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],
                head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=theta, rope_scaling=scaling,
                # transformers' Qwen2 hard-wires q/k/v bias; Llama reads the flag
                attention_bias=True if model_type == "qwen2" else hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False), tie_word_embeddings=hf.get("tie_word_embeddings", False),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                torch_dtype=dtype if isinstance(dtype, str) and dtype in DTYPES else "float32",
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def read_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the classic fields or transformers 5's `rope_parameters` dict."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if config_checks.check_rope_scaling(scaling, where) == "default":
        return theta, None
    return theta, {
        "rope_type": "llama3",
        "factor": scaling["factor"],
        "low_freq_factor": scaling["low_freq_factor"],
        "high_freq_factor": scaling["high_freq_factor"],
        "original_max_position_embeddings": scaling.get("original_max_position_embeddings")
                                            or hf.get("max_position_embeddings", 8192),
    }


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
        # does; F.rms_norm gives the same bits as spelling it out, in one call instead of five
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, T, d) and k, v (B, Hkv, S, d), each group of H / Hkv query
    heads sharing one key/value head (GQA); mask None: causal, the T queries being the last T keys."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[1] != k.shape[1])


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
        self.length = 0  # slots filled so far (the same for every row); Transformer.hidden advances it

    def positions_and_mask(self, T: int, device) -> tuple[torch.Tensor, attention_masks.Mask]:
        """RoPE positions (B, T) of the next T slots, and the mask of the keys each of them sees, in the form
        this device's attention kernels take (attention_masks.py: causal, or a boolean (B|1, 1, T, S) mask)."""
        slots = torch.arange(self.length, self.length + T, device=device)  # (T,)
        positions = (slots[None] - self.pad[:, None]).clamp(min=0)  # (B, T)
        form = attention_masks.mask_form(device.type, T, self.length + T, self.pad.tolist())
        return positions, attention_masks.build_mask(form, T, self.length + T, self.pad, device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """Write k, v (B, Hkv, T, d) at the next T slots; q (B, H, T, d) attends to every filled slot."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return attention_masks.attend(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask)  # (B, H, T, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = (
            layer, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):  # x: (B, T, D)
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, cache))

    def attend(self, q, k, v, cos, sin, mask, cache) -> torch.Tensor:
        """Attention on the projections q (B, T, H*d), k, v (B, T, Hkv*d): split into heads, rotate q and k,
        attend causally (after the cache's keys, with a cache); (B, T, H*d)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v) if cache is None else cache.attend(self.layer, q, k, v, mask)  # (B, H, T, d)
        return y.transpose(1, 2).reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


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
    """Embeddings, decoder layers and final norm: the `model.` prefix of the HF keys. Hence `model.model.layers`:
    a module's path is its tensors' key in HF checkpoints and in PEFT adapter files, so this level stays."""

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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter under two names
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(config)
        # training only: keep each block's input and recompute the block in the backward pass
        self.checkpoint_blocks = False

    def hidden(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) for input_ids (B, T); with a cache, the tokens continue it."""
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if cache is None:
            positions, mask = torch.arange(T, device=x.device)[None], None  # (1, T), causal
        else:
            positions, mask = cache.positions_and_mask(T, x.device)  # (B|1, T), the cache's own mask
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B|1, 1, T, d)
        for block in self.model.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():  # same RNG state on recomputation: same dropout
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.lm_head(self.hidden(input_ids, cache))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None) -> "Transformer":
        """Load a local HF checkpoint folder (config.json + safetensors; model_io.load_model also takes hub ids
        and GGUF files); dtype None means the checkpoint's own `torch_dtype`."""
        folder = Path(folder)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; pass a model folder (model_io.load_model also reads .gguf files)")
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        config = ModelConfig.from_hf(folder)
        with torch.device("meta"):  # parameters without storage: the checkpoint's tensors become the storage
            model = cls(config)
        load_safetensors(model, folder, torch.device(device or "cpu"), as_dtype(dtype or config.torch_dtype))
        model.inv_freq = model.inv_freq.to(device or "cpu")
        model.name_or_path = str(folder)
        return model.eval()


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------------
# 3. Loading and saving
# ----------------------------------------------------------------------------------------------------------------

def load_safetensors(model: Transformer, folder: Path, device, dtype) -> None:
    """Give each (meta) parameter of `model` its tensor from the checkpoint, converted to dtype on device,
    one tensor at a time (the peak is the finished model plus one tensor)."""
    files = checkpoint_checks.checkpoint_files(folder)
    expected = checkpoint_checks.expected_tensors(model, files, f"checkpoint in {folder}", "config.json")
    for path in sorted({files[k] for k in expected}):
        with checkpoint_checks.open_safetensors(path) as f:
            for k in sorted(k for k in expected if files[k] == path):
                if k not in f.keys():
                    raise ValueError(f"tensor {k} is missing from {path.name} although the index lists it there")
                checkpoint_checks.set_parameter(model, k, tuple(f.get_slice(k).get_shape()), path.name,
                                                "config.json", lambda: f.get_tensor(k).to(device=device, dtype=dtype))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------------------------
# 4. Tokenizer and ChatML rendering
# ----------------------------------------------------------------------------------------------------------------

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")

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
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """From a local HF model folder: tokenizer.json + tokenizer_config.json + generation_config.json
        (model_io.load_tokenizer also takes hub ids and GGUF files)."""
        from tokenizers import Tokenizer as HFTokenizer
        folder = Path(folder)
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

@dataclass
class Generation:
    ids: list[int]  # new tokens, including the stop token when one ended the sequence
    text: str | None  # decoded new tokens without a final stop token; cut right after a stop string; None w/o tok
    n_prompt: int
    n_new: int
    stop_reason: str  # "stop_id" | "stop_string" | "length"
    n_cached: int = 0  # prompt tokens whose keys/values came from a prompt cache (decoding.py), not computed


def check_prompts(prompts, stop_strings, tokenizer) -> list[tuple[str, ...]]:
    """Each prompt's stop strings (`stop_strings`: the strings that end every row, or one tuple per prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    per_row = bool(stop_strings) and not isinstance(stop_strings[0], str)
    stops = [tuple(s) for s in stop_strings] if per_row else [tuple(stop_strings)] * len(prompts)
    if any(stops) and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the new tokens")
    if len(stops) != len(prompts):
        raise ValueError("generate needs one tuple of stop strings per prompt in per-prompt stop_strings")
    return stops


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
             tokenizer: Tokenizer | None = None, stop_strings=(), pad_id: int | None = None) -> list[Generation]:
    """Greedy continuations of a batch of token-id prompts (any lengths), one KV-cache pass for the batch.

    Prompts are left-padded to a common length; each row's RoPE positions start at 0 at its first real token
    and padding slots are masked out, so every row gets the tokens it would get alone (up to fp rounding).
    A row stops on a stop id, a stop string (needs `tokenizer`) or max_new_tokens; the batch runs until every
    row has stopped. `stop_strings` holds the strings that end every row, or one tuple of them per prompt.
    decoding.generate is the fast version (prompt cache, prompt lookup, rows leaving the batch, per-row adapters).
    """
    stops = check_prompts(prompts, stop_strings, tokenizer)
    device = model.lm_head.weight.device
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer else 0)
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
    cache = KVCache(model.config, B, P + max_new_tokens, device, model.lm_head.weight.dtype, pad)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    logits = model.lm_head(model.hidden(ids, cache)[:, -1])  # (B, V): logits at the last position only
    new: list[list[int]] = [[] for _ in range(B)]
    texts: list[str | None] = [None] * B
    reasons: list[str | None] = [None] * B
    while True:
        tokens = logits.argmax(-1)  # (B,)
        for b, t in enumerate(tokens.tolist()):
            if reasons[b] is None and len(new[b]) < max_new_tokens:
                new[b].append(t)
                reasons[b], texts[b] = stop_reason(new[b], stop_ids, tokenizer, stops[b])
        if all(reasons[b] is not None or len(new[b]) == max_new_tokens for b in range(B)):
            break
        logits = model(tokens[:, None], cache)[:, -1]  # (B, V); finished rows run on, their tokens ignored
    return [finish(new[b], texts[b], reasons[b], len(prompts[b]), tokenizer) for b in range(B)]


def stop_reason(new: list[int], stop_ids, tokenizer, stop_strings) -> tuple[str | None, str | None]:
    """(stop_reason or None, the text cut right after the first stop string, or None) of a row's new tokens."""
    if new[-1] in stop_ids:
        return "stop_id", None
    text = tokenizer.decode(new) if stop_strings else ""
    hits = [text.find(s) + len(s) for s in stop_strings if s in text]
    return ("stop_string", text[:min(hits)]) if hits else (None, None)


def finish(new: list[int], text, reason, n_prompt: int, tokenizer, n_cached: int = 0) -> Generation:
    reason = reason or "length"
    if text is None and tokenizer is not None:
        text = tokenizer.decode(new[:-1] if reason == "stop_id" else new)
    return Generation(new, text, n_prompt, len(new), reason, n_cached)


# ----------------------------------------------------------------------------------------------------------------
# 6. FLOPs
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
    logits at n_new of them. With `cached` prompt tokens taken from a prompt cache (decoding.PromptCache), those
    positions are not computed, but every later position still attends to their keys. `adapter_weights`: those
    of an unmerged adapter the call ran."""
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
