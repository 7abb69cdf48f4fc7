"""memory_estimate.py: how much device memory a prost.py training step takes at its peak, before it runs.

Where this sits in ProST: prost.py trains one role's LoRA adapter on a frozen base. Its peak memory is the
first micro-batch's (the longest come first), at the start of the backward pass: the base weights, the fp32
adapter with its gradient and AdamW's two moments, every tensor autograd keeps for the backward pass, and the
vocabulary projection's logits of the target tokens. prost.py prints `estimate`'s answer at start, turns on
activation checkpointing where the estimate needs it (`plan`), refuses with one line naming the flags to
change when even that does not fit, and `prost.py --dry-run` prints it and exits.

What autograd keeps per token and decoder layer (`saved_bytes_per_token_per_layer`), with a = 2 bytes under bf16
autocast and 4 in fp32, D the hidden size, Q = heads x head_dim, K = kv heads x head_dim, I the MLP width:

    both RMSNorm inputs, in fp32                          8 D
    the normed inputs of q/k/v and of gate/up (LoRA A)    2 a D
    q, k, v after RoPE, attention output (o_proj's input  a (2 Q + 2 K), plus 4 bytes x heads (log-sum-exp)
      is a view of it)
    gate, up, silu(gate), their product                   4 a I
    each of the 7 adapters' rank-r activations            7 a r
    adapter dropout (p > 0)                               a (8 D + 2 Q + I) more: each of the 7 adapters
                                                          keeps its dropped input and a mask as wide as an
                                                          element, instead of the inputs shared above

Under bf16 autocast each layer also keeps bf16 copies of its adapter matrices (2 bytes per adapter parameter).
With activation checkpointing only each block's input (a D) is kept per layer, plus one block's full set while
it is recomputed, and the logits are computed LOSS_CHUNK targets at a time. Logits: per target token
V x (a + 12) bytes at the peak (the autocast logits, their fp32 copy and log-softmax, and its gradient).
tests/test_memory_estimate.py checks the per-layer figure against what autograd really saves (saved-tensor hooks,
CPU), and the 1.5B default configuration against an 80 GB GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

import lora
from model import ModelConfig
from model_io import resolve_model_dir

GB = 1e9
FIT_SHARE = 0.9  # of the device's memory an estimate may fill: the allocator fragments, kernels need workspace
CUDA_OVERHEAD = 1.0 * GB  # CUDA context, cuBLAS and attention workspaces
ADAPTER_TENSORS = 4  # fp32 adapter, its gradient, AdamW's two moments

# Real architectures by hub id (fields as in each model's config.json), so that an estimate needs no download.
ARCHITECTURES = {
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                                       intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                                       tie_word_embeddings=True, max_position_embeddings=8192),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=32768),
}


@dataclass
class Workload:
    """One training micro-batch as prost.py runs it."""
    rows: int  # --micro-batch-size
    tokens: int  # per row (the longest row: rows are padded to it)
    targets: int  # target tokens of the micro-batch (at most rows x tokens)
    checkpointing: bool
    dropout: float  # --lora-dropout
    precision: str  # bf16 (autocast over a bf16 base) or fp32
    lora_r: int
    loss_chunk: int  # targets per recomputed piece of the vocabulary projection under checkpointing


@dataclass
class Estimate:
    """Bytes at the peak, by what holds them."""
    weights: float
    adapter: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        return (f"{self.total / GB:.1f} GB (weights {self.weights / GB:.1f}, adapter and AdamW "
                f"{self.adapter / GB:.2f}, saved activations {self.activations / GB:.1f}, logits "
                f"{self.logits / GB:.1f}, overhead {self.overhead / GB:.1f})")


def model_config(model: str) -> ModelConfig:
    """The architecture of --model: from ARCHITECTURES for a known hub id (no download), else its config.json."""
    if model in ARCHITECTURES:
        return ModelConfig.from_hf(ARCHITECTURES[model])
    return ModelConfig.from_hf(resolve_model_dir(model))


def parameter_count(config: ModelConfig) -> int:
    """Base parameters: embeddings, the untied head, and per layer the projections, biases and norms."""
    D, Q, K, I = (config.hidden_size, config.num_attention_heads * config.head_dim,
                  config.num_key_value_heads * config.head_dim, config.intermediate_size)
    per_layer = D * Q + 2 * D * K + Q * D + 3 * D * I + 2 * D + (Q + 2 * K if config.attention_bias else 0)
    head = 0 if config.tie_word_embeddings else config.vocab_size * D
    return config.vocab_size * D + head + config.num_hidden_layers * per_layer + D


def saved_bytes_per_token_per_layer(config: ModelConfig, precision: str, dropout: float, lora_r: int) -> float:
    """What autograd keeps per token for one decoder layer's backward pass (the table in the docstring)."""
    a = 2 if precision == "bf16" else 4
    D, Q, K, I = (config.hidden_size, config.num_attention_heads * config.head_dim,
                  config.num_key_value_heads * config.head_dim, config.intermediate_size)
    kept = 8 * D + 2 * a * D + a * (2 * Q + 2 * K) + 4 * config.num_attention_heads + 4 * a * I + 7 * a * lora_r
    return kept + (a * (8 * D + 2 * Q + I) if dropout > 0 else 0)


def estimate(config: ModelConfig, work: Workload, device_type: str) -> Estimate:
    """The peak of one training step of `work` on a device of this type."""
    a = 2 if work.precision == "bf16" else 4
    tokens = work.rows * work.tokens
    per_layer = saved_bytes_per_token_per_layer(config, work.precision, work.dropout, work.lora_r) * tokens
    final_norm = 4 * config.hidden_size * tokens  # the last RMSNorm's fp32 input
    if work.checkpointing:  # block inputs, and one block recomputed at a time
        activations = a * config.hidden_size * tokens * config.num_hidden_layers + per_layer + final_norm
        live_targets = min(work.targets, work.loss_chunk)
    else:
        activations = per_layer * config.num_hidden_layers + final_norm
        live_targets = work.targets
    logits = live_targets * config.vocab_size * (a + 12) + work.targets * a * config.hidden_size
    adapter_parameters = lora.count_adapter_parameters(config, work.lora_r)
    adapter = (ADAPTER_TENSORS * 4 + (2 if work.precision == "bf16" else 0)) * adapter_parameters
    return Estimate(weights=a * parameter_count(config), adapter=adapter, activations=activations, logits=logits,
                    overhead=CUDA_OVERHEAD if device_type == "cuda" else 0.0)


def device_memory(device: torch.device) -> float:
    """Bytes the device holds: a GPU's memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class Plan:
    checkpointing: bool
    estimate: Estimate
    lines: list[str]  # what prost.py prints
    refusal: str | None  # set when nothing fits: the one-line error


def plan(config: ModelConfig, work: Workload, device_type: str, memory: float, name: str) -> Plan:
    """Checkpointing as asked if the step fits in FIT_SHARE of `memory`; else on, if that fits; else a refusal
    naming the flags that lower the peak."""
    budget = FIT_SHARE * memory
    shape = f"{work.rows} x {work.tokens} tokens ({work.targets} targets)"
    asked = estimate(config, work, device_type)
    if asked.total <= budget:
        on = "on" if work.checkpointing else "off"
        return Plan(work.checkpointing, asked, [f"memory estimate for {shape}, activation checkpointing {on}: "
                                                f"{asked.describe()} of {memory / GB:.0f} GB on {name}"], None)
    if not work.checkpointing:
        checked = estimate(config, _with_checkpointing(work), device_type)
        if checked.total <= budget:
            return Plan(True, checked, [
                f"memory estimate for {shape} without activation checkpointing: {asked.total / GB:.1f} GB, over "
                f"{FIT_SHARE:.0%} of {memory / GB:.0f} GB on {name}; checkpointing turned on: {checked.describe()}"],
                None)
        asked = checked
    return Plan(True, asked, [], f"a training step of {shape} needs about {asked.total / GB:.1f} GB even with "
                                 f"activation checkpointing, over {FIT_SHARE:.0%} of {memory / GB:.0f} GB on {name}; "
                                 f"lower --micro-batch-size or --max-seq-len"
                                 + (" (or use --precision bf16)" if work.precision == "fp32" else ""))


def plan_run(cfg, device: torch.device, precision: str, loss_chunk: int, tokens: int | None = None) -> Plan:
    """The plan of prost.py's run `cfg` (a TrainConfig) on `device`: its longest micro-batch, `tokens` per row
    (default --max-seq-len), every position counted as a target (the worst case)."""
    tokens = tokens or cfg.max_seq_len
    rows = cfg.micro_batch_size
    work = Workload(rows, tokens, rows * tokens, cfg.checkpoint_activations, cfg.lora_dropout, precision, cfg.lora_r,
                    loss_chunk)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (RAM)"
    return plan(model_config(cfg.model), work, device.type, device_memory(device), name)


def _with_checkpointing(work: Workload) -> Workload:
    return Workload(**{**work.__dict__, "checkpointing": True})


def table(models: list[str], tokens: int, rows: int, memory: float, dropout: float, lora_r: int,
          loss_chunk: int) -> list[str]:
    """Markdown rows: model, sequence, micro-batch, checkpointing (as the plan chooses), estimated peak."""
    lines = ["| model | sequence | micro-batch | checkpointing | estimated peak | without checkpointing |",
             "|---|---|---|---|---|---|"]
    for name in models:
        config = model_config(name)
        work = Workload(rows, tokens, rows * tokens, False, dropout, "bf16", lora_r, loss_chunk)
        chosen = plan(config, work, "cuda", memory, "GPU")
        off = estimate(config, work, "cuda").total / GB
        verdict = "does not fit" if chosen.refusal else f"{chosen.estimate.total / GB:.1f} GB"
        lines.append(f"| {name} | {tokens} | {rows} | {'on' if chosen.checkpointing else 'off'} | {verdict} | "
                     f"{off:.1f} GB |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The estimated peak memory of prost.py's training step on a GPU for "
                                            "known architectures, as a markdown table (every target position "
                                            "counted as a target: the worst case).")
    p.add_argument("--models", nargs="+", default=list(ARCHITECTURES),
                   help=f"hub ids ({', '.join(ARCHITECTURES)}) or local model folders")
    p.add_argument("--max-seq-len", type=int, default=4096, help="tokens per row")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--memory-gb", type=float, default=80.0, help="the GPU's memory in GB")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout (prost.py's default)")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank (prost.py's default)")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="targets per recomputed piece of the vocabulary projection (prost.LOSS_CHUNK)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print("\n".join(table(args.models, args.max_seq_len, args.micro_batch_size, args.memory_gb * GB,
                              args.lora_dropout, args.lora_r, args.loss_chunk)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
