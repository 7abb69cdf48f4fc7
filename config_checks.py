"""config_checks.py: every check on a Hugging Face config.json before model.py builds a network from it.

A bad config should fail where it is read, with the field's name and the value as config.json spells it, rather
than as a shape error deep in the model or (a zero RoPE theta, a negative eps) as silently wrong numbers.
model.ModelConfig calls these while it reads a config (`from_hf`) and whenever one is made (`__post_init__`);
the network itself never needs them. A stdlib-only leaf: it imports no prost file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROPE_TYPES = ("default", "llama3")
# Every number the network uses, by the check it must pass.
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
FLAGS = ("attention_bias", "mlp_bias", "tie_word_embeddings")


def read_config_json(source: str | Path) -> tuple[dict, str]:
    """(the config dict, where it came from) of a config.json path or a model folder holding one."""
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}: a model folder needs config.json + *.safetensors")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def check_supported(hf, where: str, model_types, required: tuple[str, ...]) -> None:
    """The config describes a network model.py builds: a known model_type, the required fields, SwiGLU, no
    sliding window."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} must hold a JSON object of config fields (got {type(hf).__name__})")
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"unsupported model_type {model_type!r} in {where}; supported: "
                         f"{', '.join(model_types)} (Qwen2/Qwen2.5, Llama 2/3.x, SmolLM2)")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{where} lacks required field(s) {', '.join(missing)} for model_type {model_type!r}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {where}; only silu (SwiGLU) is supported")
    if hf.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true in {where} is not supported; set it to false")


def check_rope_scaling(scaling: dict, where: str) -> str:
    """The RoPE type of a rope_scaling (or rope_parameters) dict, which must be one model.py implements."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r} in {where}; supported: {', '.join(ROPE_TYPES)}")
    need = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
    if rope_type == "llama3" and need:
        raise ValueError(f"llama3 rope scaling in {where} lacks {', '.join(need)}")
    return rope_type


def check_values(config) -> None:
    """Check every value a model.ModelConfig gives the network, and complete it: head_dim when it is None, floats
    given as JSON integers as floats."""
    for name in POSITIVE_INTS:
        check_positive_int(name, getattr(config, name))
    if config.head_dim is None:  # the usual case: hidden_size / num_attention_heads
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                             f"({config.num_attention_heads}), or give head_dim")
        config.head_dim = config.hidden_size // config.num_attention_heads
    check_positive_int("head_dim", config.head_dim)
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even, since RoPE rotates pairs of dimensions (got {config.head_dim})")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    for name in POSITIVE_FLOATS:
        setattr(config, name, positive_float(name, getattr(config, name)))
    for name in FLAGS:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false (got {shown(getattr(config, name))})")
    if config.rope_scaling is not None:
        s = config.rope_scaling
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            s[key] = positive_float(f"rope_scaling.{key}", s.get(key))
        check_positive_int("rope_scaling.original_max_position_embeddings", s.get("original_max_position_embeddings"))
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ValueError(f"rope_scaling.high_freq_factor ({s['high_freq_factor']}) must exceed "
                             f"low_freq_factor ({s['low_freq_factor']})")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if not all(is_int(i) and 0 <= i for i in ids):
            raise ValueError(f"{name} must be a token id, a list of them, or null (got {shown(value)})")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def shown(value) -> str:
    """A config value as it reads in config.json (null, "192", ...)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {shown(value)})")


def positive_float(name: str, value) -> float:
    if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number (got {shown(value)})")
    return float(value)
