"""gpu_check.py: every CUDA path of prost, checked in one command and printed as one table.

ProST is meant for GPUs (Qwen2.5 on CUDA, bf16 autocast, fused AdamW, nccl data parallel), while prost is
developed and tested on CPUs. A GPU is lent only now and then, for minutes, so this file answers everything
in one run sized to take at most five minutes on one H100 (not yet timed on one): `make gpu-check`.

It downloads nothing and needs no weights: each model is built at a real architecture (SmolLM2-135M,
Qwen2.5-0.5B, Qwen2.5-1.5B; config fields as in their config.json) with seeded random weights, written to a
temporary folder and loaded back by prost's own loader. Every check runs prost's own code, never a copy of it:
model.py's forward, decoding.py's `generate`, lora.py's adapters, prost.py's `build_model`, `make_optimizer`,
`run_epoch` and cluster.py's `start_cluster` (under torch.distributed.run for data parallel), evaluate.py for
rollouts. The checks:

  logits       prost on CUDA (fp32, bf16; with a LoRA adapter) against prost on the CPU in fp32, and against
               transformers on CUDA given the same (merged) weights
  train        LoRA steps on the 1.5B shape at 4k tokens: bf16 autocast losses equal the fp32 losses within
               tolerance; fused AdamW; tokens/s, MFU against the GPU's bf16 dense peak, peak memory; a
               micro-batch whose rows share a trunk (computed once) gives the separate rows' fp32 gradients
  recipe       one step of prost.py's defaults: 4 rows of different lengths up to 4k tokens (a padded batch),
               adapter dropout 0.05, checkpointing as memory_estimate.py chooses it; the real peak memory must
               stay under the estimate prost.py prints
  resume       prost.save_checkpoint after one epoch (fused AdamW state, CUDA RNG state), restored into a fresh
               model: the second epoch equals an uninterrupted run's (bit-exactness reported)
  compile      --compile (torch.compile per decoder block) against eager, compilation time included
  ddp          prost.py's data parallel over every visible GPU (nccl) against one process accumulating the same
               micro-batches: the epoch losses and the step-1 gradients (compared before AdamW, whose first
               step moves every element by about lr, so that reordered near-zero gradients cannot flip it)
  collectives  cluster.py's group under torchrun (one GPU: a group of one, so nccl runs anyway): a barrier, an
               all_gather_object and an all_reduce
  generate     batched greedy generation equals one prompt at a time, and a batch mixing two adapters and the
               base equals each adapter's rows alone; decode tokens/s at batch 1 and 32
  decoding     evaluation's decoding path (rollout.py): a merged bf16/fp32 adapter copy laid out for decoding,
               the prompt cache with deterministic chunked prefill, prompt lookup, rows leaving the batch,
               against plain batched decoding of the same model
  world        a short mini-world evaluation on CUDA, only when appworld is importable

Rows that run attention name the kernels they ran (flash, memory-efficient, cudnn, math; profiled):
attention_masks.py decides which mask form each call hands to the kernels, and this is where that shows.
It exits 1 when any check fails. Without CUDA it says so in one line and exits 0; a torch too old for prost
(before 2.5) gets one line and exit code 1. `--device cpu --tiny`
runs the same checks at tiny shapes on the CPU (tests/test_gpu_check.py does), so this file cannot rot
between GPU loans.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import batching
import data
import decoding
import lora
import memory_estimate
import meter
import prost
import run_folder
from cluster import Cluster, child_env, exit_process, join_process_group, start_cluster, stop_cluster
from decoding import generate
from model import ModelConfig, Transformer
from model_io import init_tiny, save_pretrained
from train_config import TrainConfig

HERE = Path(__file__).resolve().parent

# The architectures, as in each model's config.json (weights are random).
SHAPES = {name.split("/")[1]: memory_estimate.ARCHITECTURES[name]
          for name in ("HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B")}
# The same families at a size a CPU runs in seconds (--tiny): GQA, q/k/v bias, tied and untied heads.
TINY_SHAPES = {
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       rope_theta=100000.0, tie_word_embeddings=False, max_position_embeddings=1024),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=1024),
}

# TrainConfig fields the training checks set on top of Sizes; a new training feature of prost.py (activation
# checkpointing, say) joins the check by adding its field here.
TRAIN_FLAGS: dict = {"checkpoint_activations": True}  # prost.py's flags the training checks run with
# Extra keyword arguments of decoding.generate, one decode measurement each (the prompt cache joins here).
DECODE_VARIANTS: dict[str, dict] = {"": {}}


@dataclass
class Sizes:
    """How big each check runs: the real shapes on a GPU, or tiny ones for a CPU test."""
    shapes: dict
    train_shape: str
    ddp_shape: str
    generate_shape: str
    logits_batch: tuple[int, int]  # (rows, tokens)
    train_tokens: int  # tokens per sequence; the second half are targets
    train_steps: int  # measured steps, after one warm-up step
    ddp_tokens: int
    ddp_steps: int
    generate_prompts: int  # prompts of the batched-vs-one-at-a-time check
    generate_new: int
    decode_batches: tuple[int, int]
    decode_prompt: int
    decode_new: int


FULL = Sizes(SHAPES, "Qwen2.5-1.5B", "SmolLM2-135M", "Qwen2.5-1.5B", (2, 256), 4096, 4, 512, 3, 8, 24,
             (1, 32), 128, 64)
TINY = Sizes(TINY_SHAPES, "tiny-qwen2", "tiny-llama", "tiny-qwen2", (2, 32), 64, 2, 32, 2, 4, 8, (1, 4), 16, 8)

# Tolerances. Errors are max |x - reference| / std(reference) over all logits.
FP32_LOGITS_TOL = 1e-3  # fp32 on CUDA vs fp32 on the CPU (or transformers): summation order only
BF16_VS_TRANSFORMERS = 2.0  # prost's bf16 error may be at most this multiple of transformers' bf16 error ...
BF16_LOGITS_FLOOR = 2e-2  # ... or this, whichever is larger
BF16_LOSS_TOL = 2e-2  # relative difference of bf16-autocast and fp32 training losses, per step
DDP_LOSS_TOL = 1e-3  # relative difference of the data-parallel and the one-process epoch losses
DDP_GRAD_TOL = 5e-3  # max |difference| of the step-1 gradients / max |gradient|: before AdamW, whose first step
# moves every element by about lr whatever its size, so a reordered near-zero gradient could flip its sign
RESUME_LOSS_TOL = 1e-3  # relative difference of a resumed run's epoch loss and an uninterrupted run's
MIN_TORCH = (2, 5)  # scaled_dot_product_attention's enable_gqa (grouped K/V heads)
TIE_TOL = 1e-3  # fp32 greedy tokens may differ only where two logits are closer than this x their std
CHILD_TIMEOUT_S = 180  # a torchrun or evaluate.py child; a hang must not eat the GPU loan


@dataclass
class Row:
    check: str
    shape: str
    status: str  # PASS, FAIL, SKIP or INFO (measured, nothing to compare)
    figures: str


# ----------------------------------------------------------------------------------------------------
# Models with random weights at real shapes.

@torch.no_grad()
def make_checkpoint(hf_config: dict, folder: Path, device: torch.device, seed: int) -> Path:
    """Write a bf16 HF-layout folder of `hf_config` with seeded random weights; return the folder.

    Scales keep activations of unit size through every layer (each linear N(0, 1/fan_in)) and the logits
    varied rather than dominated by the input token (embeddings N(0, 0.02), as in Qwen's own init), so
    greedy decoding picks content-dependent tokens and the losses are those of an untrained model."""
    config = ModelConfig.from_hf({**hf_config, "torch_dtype": "bfloat16"})
    with torch.device(device):  # initialising 1.5B parameters takes a GPU milliseconds, a CPU many seconds
        model = Transformer(config)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1, generator=g)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    save_pretrained(model.to("cpu", torch.bfloat16), folder)
    return folder


def random_ids(vocab: int, rows: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))  # (B, T)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transformers_or_none():
    return __import__("transformers") if importlib.util.find_spec("transformers") else None


# The aten operator behind each scaled_dot_product_attention kernel (what the profiler records).
SDPA_KERNELS = {"aten::_scaled_dot_product_flash_attention": "flash",
                "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
                "aten::_efficient_attention_forward": "memory-efficient",
                "aten::_scaled_dot_product_cudnn_attention": "cudnn",
                "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu flash",
                "aten::_scaled_dot_product_attention_math": "math"}


@contextmanager
def attention_kernels():
    """Collect, into the yielded set, the attention kernels the code inside ran (profiled on the host side)."""
    found: set[str] = set()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        yield found
    names = {event.key for event in profile.key_averages()}
    found.update(kernel for op, kernel in SDPA_KERNELS.items() if op in names)


def kernels(found: set[str]) -> str:
    return "attention: " + (", ".join(sorted(found)) or "none")


# ----------------------------------------------------------------------------------------------------
# Logits.

def logits_error(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |x - ref| / std(ref), share of positions whose top-1 token agrees)."""
    x, ref = x.float().cpu(), ref.float().cpu()
    return ((x - ref).abs().max() / ref.std()).item(), (x.argmax(-1) == ref.argmax(-1)).float().mean().item()


def add_random_adapter(model, seed: int, name: str = "check") -> None:
    """A LoRA adapter `name` with non-zero B (a fresh one changes nothing), active."""
    lora.add_adapter(model, name, r=8, alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            b = layer.lora_B[name]
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    lora.set_adapter(model, name)


def transformers_logits(transformers, folder: Path, state: dict, ids: torch.Tensor, device, dtype):
    """transformers' logits for `ids` with the weights `state` (HF keys)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device(device):  # built in fp32 whatever config.json says, so the weights load unrounded
        hf = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"transformers model keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf = hf.to(dtype).eval()
    with torch.no_grad():
        out = hf(ids.to(device)).logits.float().cpu()
    del hf
    return out


def check_logits(name: str, folder: Path, sizes: Sizes, device: torch.device) -> list[Row]:
    rows, tokens = sizes.logits_batch
    cpu = Transformer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ids = random_ids(cpu.config.vocab_size, rows, tokens, seed=1)
    add_random_adapter(cpu, seed=2)
    adapter_dir = folder.parent / f"{name}-adapter"
    lora.save_adapter(cpu, adapter_dir, "check")
    with torch.no_grad():
        ref = cpu(ids)  # (B, T, V) fp32 on the CPU: the reference
    merged = lora.merged_state_dict(cpu)
    del cpu
    transformers = transformers_or_none()
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer.from_pretrained(folder, device=device, dtype=dtype)
        lora.load_adapter(model, adapter_dir, "check")
        lora.set_adapter(model, "check")
        with torch.no_grad():
            found[dtype] = model(ids.to(device)).float().cpu()
        del model
    hf = {}
    if transformers is not None:
        hf = {dtype: transformers_logits(transformers, folder, merged, ids, device, dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    err32, agree32 = logits_error(found[torch.float32], ref)
    out = [Row(f"logits fp32 {device.type} vs cpu fp32", name, "PASS" if err32 <= FP32_LOGITS_TOL else "FAIL",
               f"err {err32:.1e} (tol {FP32_LOGITS_TOL:.0e}), top-1 {agree32:.1%}")]
    err16, agree16 = logits_error(found[torch.bfloat16], ref)
    if transformers is None:
        out.append(Row(f"logits bf16 {device.type} vs cpu fp32", name, "INFO",
                       f"err {err16:.1e}, top-1 {agree16:.1%} (no transformers to compare with)"))
        out.append(Row("logits vs transformers", name, "SKIP", "transformers is not installed"))
        return out
    hf_err16, hf_agree16 = logits_error(hf[torch.bfloat16], ref)
    tol16 = max(BF16_VS_TRANSFORMERS * hf_err16, BF16_LOGITS_FLOOR)
    out.append(Row(f"logits bf16 {device.type} vs cpu fp32", name, "PASS" if err16 <= tol16 else "FAIL",
                   f"err {err16:.1e}, top-1 {agree16:.1%}; transformers bf16: err {hf_err16:.1e}, "
                   f"top-1 {hf_agree16:.1%} (tol {tol16:.1e})"))
    hf_err32, _ = logits_error(found[torch.float32], hf[torch.float32])
    out.append(Row(f"logits fp32 vs transformers {device.type}", name,
                   "PASS" if hf_err32 <= FP32_LOGITS_TOL else "FAIL", f"err {hf_err32:.1e} (tol {FP32_LOGITS_TOL:.0e})"))
    return out


# ----------------------------------------------------------------------------------------------------
# Training: prost.py's own loop, one optimizer step per run_epoch call.

def synthetic_examples(vocab: int, n: int, tokens: int, seed: int) -> list[data.Example]:
    """`n` sequences of random tokens whose second half is the target (a role's output)."""
    ids = random_ids(vocab, n, tokens, seed)
    mask = [0] * (tokens - tokens // 2) + [1] * (tokens // 2)
    return [data.Example(f"synthetic-{i}", "planner", 0, 1, ids[i].tolist(), mask) for i in range(n)]


def train_config(folder: Path, tokens: int, grad_accum: int, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(model=str(folder), max_seq_len=tokens, micro_batch_size=1,
                                 grad_accum=grad_accum, lr=1e-3, warmup_ratio=0.0, lora_dropout=0.0,
                                 schedule="full", seed=0, progress=False, save_every_minutes=0), **TRAIN_FLAGS,
                          **overrides})


def train_steps(cfg: TrainConfig, cluster: Cluster, precision: str, steps: list[list[data.Example]],
                out_dir: Path, first_gradients: dict | None = None):
    """Run each entry of `steps` as one epoch of prost.run_epoch; returns (model, optimizer, stats per epoch).
    `first_gradients` receives the first optimizer step's gradients (summed over ranks), by parameter name."""
    model = prost.build_model(cfg, cluster.device, precision)
    named = prost.trainable_parameters(model)
    params = list(named.values())
    optimizer = prost.make_optimizer(params, cfg)
    if first_gradients is not None:
        def keep_first(optimizer, args, kwargs):
            if not first_gradients:
                first_gradients.update({k: p.grad.detach().float().cpu() for k, p in named.items()})
        optimizer.register_step_pre_hook(keep_first)
    model.train()
    per_step = cfg.grad_accum * cluster.world
    total = sum(math.ceil(math.ceil(len(e) / cfg.micro_batch_size) / per_step) for e in steps)
    cycles = [(0, total)]  # one learning-rate cycle over the run (prost.lr_cycles with --lr-schedule cosine)
    stats, step = [], 0
    for epoch, examples in enumerate(steps, start=1):
        s, step = prost.run_epoch(model, optimizer, params, examples, epoch, len(steps), step, cycles, cfg,
                                  cluster, precision, 0, out_dir, epoch - 1, resumed=None, save=None)
        stats.append(s)
    return model, optimizer, stats


def check_training(name: str, folder: Path, sizes: Sizes, device: torch.device, work: Path) -> list[Row]:
    cfg = train_config(folder, sizes.train_tokens, 1)
    vocab = ModelConfig.from_hf(folder).vocab_size
    steps = [[e] for e in synthetic_examples(vocab, 1 + sizes.train_steps, sizes.train_tokens, seed=3)]
    cluster = Cluster(0, 1, device)
    losses, measured = {}, None
    for precision in ("bf16", "fp32"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with attention_kernels() as found:
            model, optimizer, stats = train_steps(cfg, cluster, precision, steps, work / f"train-{precision}")
        losses[precision] = [s.loss_sum / s.targets for s in stats]
        if precision == "bf16":
            fused = bool(optimizer.defaults.get("fused"))
            timed = stats[1:]  # the first step pays for kernel selection and allocator warm-up
            measured = prost.EpochStats(*(sum(getattr(s, f.name) for s in timed)
                                          for f in dataclasses.fields(prost.EpochStats)))
            mfu = meter.model_flops_utilisation(measured, meter.peak_flops(device, 0.0), 1)
            train_kernels = kernels(found)
            memory = meter.peak_memory_gb(device)
        del model, optimizer
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"]))
    flags = ", ".join(f"{k}={v}" for k, v in TRAIN_FLAGS.items()) or "no extra flags"
    loss_row = Row(f"train bf16 autocast vs fp32, {sizes.train_tokens} tokens", name,
                   "PASS" if worst <= BF16_LOSS_TOL else "FAIL",
                   f"{len(steps)} steps, worst loss diff {worst:.1e} (tol {BF16_LOSS_TOL:.0e}); losses bf16 "
                   + " ".join(f"{x:.4f}" for x in losses["bf16"]) + " fp32 " + " ".join(f"{x:.4f}" for x in losses["fp32"]))
    fused_row = Row("train fused AdamW", name, "PASS" if fused or device.type != "cuda" else "FAIL",
                    f"fused={fused} ({flags})")
    speed = (f"{measured.tokens / measured.seconds:,.0f} tokens/s, "
             + (f"MFU {mfu:.1%} of {meter.peak_flops(device, 0.0) / 1e12:.0f} TFLOP/s" if mfu is not None
                else "MFU n/a (no peak known for this device)") + f", peak memory {memory:.1f} GB; {train_kernels}")
    return [loss_row, fused_row, Row(f"train speed bf16, {sizes.train_tokens} tokens", name, "INFO", speed),
            check_shared_trunk(name, folder, sizes, device)]


def check_shared_trunk(name: str, folder: Path, sizes: Sizes, device: torch.device) -> Row:
    """One micro-batch of 4 rows sharing their first half (computed once, trunk.SharedTrunk) against each row
    alone: the same fp32 gradients, through the attention form rows after a trunk take on the device
    (attention_masks.py: causal_lower_right on CUDA)."""
    vocab, half = ModelConfig.from_hf(folder).vocab_size, sizes.train_tokens // 2
    shared, tails = random_ids(vocab, 1, half, seed=5)[0].tolist(), random_ids(vocab, 4, half, seed=6).tolist()
    mask = [0] * (half + half // 2) + [1] * (half - half // 2)
    rows = [data.Example("shared", "executor", i, 1, shared + tail, mask) for i, tail in enumerate(tails)]
    model = prost.build_model(train_config(folder, sizes.train_tokens, 1), device, "fp32").train()
    params = list(prost.trainable_parameters(model).values())
    with torch.no_grad():
        for p in params:  # B starts at zero: give every adapter gradient a value
            p.normal_(0.0, 0.02)
    grads = []
    for batches in ([batching.collate_with_trunk(rows, 0)], [data.collate([e], 0) for e in rows]):
        model.zero_grad(set_to_none=True)
        prost.accumulate_gradients(model, batches, sum(e.n_targets for e in rows), device, "fp32")
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    trunk = batching.trunk_length(rows)
    error = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    return Row(f"train shared trunk vs separate rows fp32, 4 x {sizes.train_tokens} tokens", name,
               "PASS" if trunk > 0 and error <= FP32_LOGITS_TOL else "FAIL",
               f"trunk {trunk} tokens, max |grad difference| / max |grad| {error:.1e} (tol {FP32_LOGITS_TOL:.0e})")


# ----------------------------------------------------------------------------------------------------
# Data parallel: prost.py's path under torch.distributed.run against one process.

def ddp_run(folder: Path, sizes: Sizes, device_flag: str, grad_accum: int, out: Path) -> None:
    """Two epochs of `ddp_steps` optimizer steps, each of `world x grad_accum` micro-batches of one sequence;
    rank 0 saves the epoch losses, the first step's gradients and the adapter to `out`. Runs under torchrun or
    alone."""
    cluster = start_cluster(device_flag)
    try:
        cfg = train_config(folder, sizes.ddp_tokens, grad_accum)
        vocab = ModelConfig.from_hf(folder).vocab_size
        n = sizes.ddp_steps * grad_accum * cluster.world
        examples = synthetic_examples(vocab, n, sizes.ddp_tokens, seed=4)
        precision = prost.resolve_precision("auto", cluster.device)  # bf16 autocast on CUDA, as prost.py trains
        grads: dict = {}
        model, _, stats = train_steps(cfg, cluster, precision, [examples, examples], out.parent / "ddp-unused",
                                      grads)
        if cluster.is_main:
            adapter = {k: p.detach().float().cpu() for k, p in prost.trainable_parameters(model).items()}
            torch.save({"losses": [s.loss_sum / s.targets for s in stats], "adapter": adapter, "grads": grads,
                        "world": cluster.world}, out)
    finally:
        stop_cluster(cluster)


def run_child(args: list[str], timeout: float = CHILD_TIMEOUT_S) -> tuple[int | None, str]:
    """(exit code or None on timeout, the end of its output). The child leads its own session, so a timeout
    kills every process it started."""
    proc = subprocess.Popen(args, cwd=HERE, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    return rc, output[-3000:]


def check_ddp(name: str, folder: Path, sizes: Sizes, device: torch.device, tiny: bool, work: Path) -> list[Row]:
    world = torch.cuda.device_count() if device.type == "cuda" else 2  # 2 gloo processes on a CPU
    one, many = work / "ddp-one.pt", work / "ddp-many.pt"
    ddp_run(folder, sizes, device.type, world, one)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            str(HERE / "gpu_check.py"), "--ddp-worker", str(many), "--ddp-model", str(folder),
            "--device", device.type] + (["--tiny"] if tiny else [])
    start = time.perf_counter()
    rc, output = run_child(args)
    seconds = time.perf_counter() - start
    label = f"ddp {'nccl' if device.type == 'cuda' else 'gloo'} x{world} vs 1 process"
    if rc != 0 or not many.exists():
        why = "timed out" if rc is None else f"exit code {rc}"
        lines = output.strip().splitlines()
        errors = [line for line in lines if "Error" in line or "error:" in line][-2:]  # the cause, not the summary
        return [Row(label, name, "FAIL", f"torchrun {why}: " + " | ".join(errors + lines[-2:]))]
    a, b = torch.load(one), torch.load(many)
    loss_diff = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    grad_diff = relative_difference(a["grads"], b["grads"])
    adapter_diff = relative_difference(a["adapter"], b["adapter"])
    ok = b["world"] == world and loss_diff <= DDP_LOSS_TOL and grad_diff <= DDP_GRAD_TOL
    note = "; one GPU: see the collectives row" if world == 1 else ""
    return [Row(label, name, "PASS" if ok else "FAIL",
                f"loss diff {loss_diff:.1e} (tol {DDP_LOSS_TOL:.0e}), step-1 gradient diff {grad_diff:.1e} "
                f"(tol {DDP_GRAD_TOL:.0e}), final adapter diff {adapter_diff:.1e}, torchrun {seconds:.0f} s{note}")]


def relative_difference(a: dict, b: dict) -> float:
    """max |a - b| / max |a| over tensors of the same names."""
    scale = max(t.abs().max().item() for t in a.values())
    return max((a[k] - b[k]).abs().max().item() for k in a) / scale


# ----------------------------------------------------------------------------------------------------
# Generation.

def greedy_mismatches(model, prompts: list[list[int]], batched, singles) -> tuple[int, int]:
    """(rows whose tokens differ, of them rows where the first difference is a near-tie of the two best
    logits in the one-at-a-time run, so rounding may pick either)."""
    differ = ties = 0
    for prompt, b, s in zip(prompts, batched, singles):
        if b.ids == s.ids:
            continue
        differ += 1
        k = next(i for i, (x, y) in enumerate(zip(b.ids, s.ids)) if x != y)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.ids[:k]], device=model.lm_head.weight.device))[0, -1].float()
        if (logits[s.ids[k]] - logits[b.ids[k]]).abs().item() <= TIE_TOL * logits.std().item():
            ties += 1
    return differ, ties


def check_generation(name: str, folder: Path, sizes: Sizes, device: torch.device) -> list[Row]:
    out = []
    vocab = ModelConfig.from_hf(folder).vocab_size
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(4, sizes.decode_prompt // 2, (sizes.generate_prompts,), generator=g).tolist()  # ragged
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    for dtype, strict in ((torch.float32, True), (torch.bfloat16, False)):
        model = Transformer.from_pretrained(folder, device=device, dtype=dtype)
        with attention_kernels() as found:
            batched = generate(model, prompts, sizes.generate_new)
        singles = [generate(model, [p], sizes.generate_new)[0] for p in prompts]
        differ, ties = greedy_mismatches(model, prompts, batched, singles)
        same = sum(b.ids == s.ids for b, s in zip(batched, singles))
        figures = (f"{same}/{len(prompts)} prompts identical over {sizes.generate_new} tokens"
                   + (f", {ties} of {differ} differences at near-ties" if differ else "")
                   + f"; batched {kernels(found)}")
        label = f"generate batched vs one-at-a-time {str(dtype).removeprefix('torch.')}"
        if strict:
            out.append(Row(label, name, "PASS" if differ == ties else "FAIL", figures))
        else:  # bf16 rounding depends on the batch's shape, so tokens may part where logits are close
            out.append(Row(label, name, "INFO", figures))
        if dtype == torch.bfloat16:
            out += decode_speed(name, model, vocab, sizes, device)
        del model
    out.append(check_mixed_adapters(name, folder, prompts, sizes, device))
    return out


def check_mixed_adapters(name: str, folder: Path, prompts: list[list[int]], sizes: Sizes, device) -> Row:
    """One fp32 batch whose rows run adapters a, b or the base (decoding.route_rows) against each adapter's rows
    generated as a batch of their own."""
    model = Transformer.from_pretrained(folder, device=device, dtype=torch.float32)
    for seed, adapter in enumerate(("a", "b")):
        add_random_adapter(model, seed=10 + seed, name=adapter)
    names = [("a", "b", None)[i % 3] for i in range(len(prompts))]
    mixed = generate(model, prompts, sizes.generate_new, adapters=names)
    differ = ties = same = 0
    for adapter in ("a", "b", None):
        rows = [i for i, n in enumerate(names) if n == adapter]
        lora.set_adapter(model, adapter)
        alone = generate(model, [prompts[i] for i in rows], sizes.generate_new)
        d, t = greedy_mismatches(model, [prompts[i] for i in rows], [mixed[i] for i in rows], alone)
        differ, ties, same = differ + d, ties + t, same + len(rows) - d
    figures = (f"{same}/{len(prompts)} prompts identical over {sizes.generate_new} tokens"
               + (f", {ties} of {differ} differences at near-ties" if differ else ""))
    return Row("generate mixed adapters vs per-adapter batches float32", name,
               "PASS" if differ == ties else "FAIL", figures)


def decode_speed(name: str, model, vocab: int, sizes: Sizes, device: torch.device) -> list[Row]:
    rows = []
    for variant, kwargs in DECODE_VARIANTS.items():
        figures = []
        for batch in sizes.decode_batches:
            prompts = random_ids(vocab, batch, sizes.decode_prompt, seed=6).tolist()
            generate(model, prompts, 2, **kwargs)  # warm-up: kernels for this batch shape
            sync(device)
            start = time.perf_counter()
            result = generate(model, prompts, sizes.decode_new, **kwargs)
            sync(device)
            seconds = time.perf_counter() - start
            figures.append(f"batch {batch}: {sum(r.n_new for r in result) / seconds:,.0f} tokens/s")
        label = "decode bf16" + (f" {variant}" if variant else "") + f", prompt {sizes.decode_prompt}, " \
            f"{sizes.decode_new} new"
        rows.append(Row(label, name, "INFO", ", ".join(figures) + " (prefill included)"))
    return rows


# ----------------------------------------------------------------------------------------------------
# The recipe's own configuration, save and resume, --compile: prost.py's loop in-process.

def check_default_recipe(name: str, folder: Path, sizes: Sizes, device: torch.device, work: Path) -> Row:
    """One optimizer step as `prost.py` runs it by default: --micro-batch-size 4 rows of different lengths (a
    padded batch), --lora-dropout 0.05 (the dropout kernels), checkpointing as memory_estimate.plan_run
    chooses it, bf16 autocast on CUDA. On CUDA the real peak must stay under the estimate prost.py printed."""
    defaults = prost.TrainConfig()
    tokens = sizes.train_tokens
    cfg = train_config(folder, tokens, 1, micro_batch_size=defaults.micro_batch_size,
                       lora_dropout=defaults.lora_dropout, checkpoint_activations=defaults.checkpoint_activations)
    precision = prost.resolve_precision(defaults.precision, device)
    memory = memory_estimate.plan_run(cfg, device, precision, prost.LOSS_CHUNK, tokens)
    label = f"train default recipe, {cfg.micro_batch_size} rows up to {tokens} tokens, dropout {cfg.lora_dropout}"
    if memory.refusal:
        return Row(label, name, "FAIL", memory.refusal)
    cfg = dataclasses.replace(cfg, checkpoint_activations=memory.checkpointing)
    vocab = ModelConfig.from_hf(folder).vocab_size
    lengths = [tokens * (cfg.micro_batch_size - i) // cfg.micro_batch_size for i in range(cfg.micro_batch_size)]
    examples = [synthetic_examples(vocab, 1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with attention_kernels() as found:
        _, _, [stats] = train_steps(cfg, Cluster(0, 1, device), precision, [examples], work / "default-recipe")
    peak = meter.peak_memory_gb(device) * 1e9
    loss = stats.loss_sum / stats.targets
    fits = device.type != "cuda" or peak <= memory.estimate.total  # a CPU's figure is the process's whole RSS
    return Row(label, name, "PASS" if math.isfinite(loss) and fits else "FAIL",
               f"checkpointing {'on' if cfg.checkpoint_activations else 'off'} (estimate), rows {lengths}: loss "
               f"{loss:.4f}, peak {peak / 1e9:.2f} GB, estimated {memory.estimate.total / 1e9:.2f} GB, "
               f"{stats.tokens / stats.seconds:,.0f} tokens/s; {kernels(found)}")


def run_epochs(cfg: prost.TrainConfig, cluster: Cluster, precision: str, epochs: list[list[data.Example]],
               first: int, last: int, out_dir: Path, state: dict | None = None):
    """prost.py's loop over epochs first..last (1-based) of `epochs`, resumed from a saved `state` if given: the
    adapter drawn from seed 11 (a fresh B is zero, so dropout would change nothing), dropout drawn as
    prost._train seeds it.
    Returns (model, optimizer, step, losses of the epochs run)."""
    model = prost.build_model(cfg, cluster.device, precision)
    params = list(prost.trainable_parameters(model).values())
    optimizer = prost.make_optimizer(params, cfg)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in params:
            p.copy_(0.02 * torch.randn(p.shape))
    torch.manual_seed(cfg.seed + 1 + cluster.rank)
    step = 0
    if state is not None:
        _, step, _ = prost.restore_checkpoint(state, model, optimizer, cluster)
    cycles = [(0, len(epochs))]  # one example per step, one step per epoch
    losses = []
    for epoch in range(first, last + 1):
        stats, step = prost.run_epoch(model, optimizer, params, epochs[epoch - 1], epoch, len(epochs), step, cycles,
                                      cfg, cluster, precision, 0, out_dir, epoch - 1, resumed=None, save=None)
        losses.append(stats.loss_sum / stats.targets)
    return model, optimizer, step, losses


def check_resume(name: str, folder: Path, sizes: Sizes, device: torch.device, work: Path) -> Row:
    """Two epochs straight against one epoch, prost.save_checkpoint (fused AdamW state, the CUDA RNG state),
    then restore_checkpoint into a fresh model and the second epoch: the same second-epoch loss and adapter."""
    cfg = train_config(folder, sizes.ddp_tokens, 1, lora_dropout=0.05)
    precision = prost.resolve_precision("auto", device)
    cluster = Cluster(0, 1, device)
    vocab = ModelConfig.from_hf(folder).vocab_size
    epochs = [synthetic_examples(vocab, 1, sizes.ddp_tokens, seed=30 + e) for e in range(2)]
    straight, _, _, want = run_epochs(cfg, cluster, precision, epochs, 1, 2, work / "resume-straight")
    out_dir = work / "resume-split"
    out_dir.mkdir()
    model, optimizer, step, _ = run_epochs(cfg, cluster, precision, epochs, 1, 1, out_dir)
    state = {"run": {"epochs": 2}, "epoch": 1, "step": step, "history": [], "rng": run_folder.rng_states(cluster),
             "in_epoch": None}
    prost.save_checkpoint(out_dir, model, optimizer, state)
    saved = torch.load(out_dir / run_folder.STATE_FILE, map_location="cpu", weights_only=True)
    fused = bool(optimizer.defaults.get("fused"))
    del model, optimizer
    resumed, _, _, got = run_epochs(cfg, cluster, precision, epochs, 2, 2, out_dir, saved)
    loss_diff = abs(got[0] - want[1]) / abs(want[1])
    a, b = (prost.trainable_parameters(m) for m in (straight, resumed))
    adapter_diff = relative_difference({k: p.detach().float().cpu() for k, p in a.items()},
                                       {k: p.detach().float().cpu() for k, p in b.items()})
    cuda_rng = saved["rng"][0]["cuda"] is not None
    return Row("train save and resume", name, "PASS" if loss_diff <= RESUME_LOSS_TOL else "FAIL",
               f"epoch-2 loss diff {loss_diff:.1e} (tol {RESUME_LOSS_TOL:.0e}), adapter diff {adapter_diff:.1e}"
               f"{' (bit-exact)' if adapter_diff == 0 else ''}; fused AdamW {fused}, CUDA RNG state saved {cuda_rng}")


def check_compile(name: str, folder: Path, sizes: Sizes, device: torch.device, work: Path) -> Row:
    """--compile (each decoder block through torch.compile) against eager: the same losses in prost's precision."""
    cfg = train_config(folder, sizes.ddp_tokens, 1)
    precision = prost.resolve_precision("auto", device)
    vocab = ModelConfig.from_hf(folder).vocab_size
    steps = [[e] for e in synthetic_examples(vocab, 3, sizes.ddp_tokens, seed=40)]
    losses, seconds = {}, {}
    for compiled in (False, True):
        start = time.perf_counter()
        with attention_kernels() as found:
            _, _, stats = train_steps(dataclasses.replace(cfg, compile=compiled), Cluster(0, 1, device), precision,
                                      steps, work / f"compile-{compiled}")
        seconds[compiled], losses[compiled] = time.perf_counter() - start, [s.loss_sum / s.targets for s in stats]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
    return Row(f"train --compile vs eager {precision}, {sizes.ddp_tokens} tokens", name,
               "PASS" if worst <= BF16_LOSS_TOL else "FAIL",
               f"{len(steps)} steps, worst loss diff {worst:.1e} (tol {BF16_LOSS_TOL:.0e}), {seconds[True]:.0f} s "
               f"compiled (compilation included) vs {seconds[False]:.0f} s eager; {kernels(found)}")


# ----------------------------------------------------------------------------------------------------
# Collectives: cluster.py's process group under torch.distributed.run, with one GPU too.

def collectives_run(device_flag: str, out: Path) -> None:
    """One torchrun rank: cluster.py's group (a lone rank joins a group of one, so that one GPU runs nccl too),
    then a barrier, an all_gather_object and an all_reduce; rank 0 saves what they gave to `out`."""
    cluster = start_cluster(device_flag)
    try:
        if not dist.is_initialized():
            join_process_group(cluster.device)
        world, rank = dist.get_world_size(), dist.get_rank()
        dist.barrier()
        everyone = [None] * world  # cluster.gather's collective, called even for a group of one
        dist.all_gather_object(everyone, {"rank": rank, "device": str(cluster.device)})
        total = torch.full((3,), float(rank + 1), device=cluster.device)
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"gathered": everyone, "sum": total.tolist(), "world": world,
                        "backend": dist.get_backend()}, out)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_collectives(device: torch.device, work: Path) -> list[Row]:
    world = torch.cuda.device_count() if device.type == "cuda" else 2
    out = work / "collectives.pt"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            str(HERE / "gpu_check.py"), "--collectives-worker", str(out), "--device", device.type]
    rc, output = run_child(args)
    backend = "nccl" if device.type == "cuda" else "gloo"
    label = f"collectives {backend} x{world}: barrier, all_gather_object, all_reduce"
    if rc != 0 or not out.exists():
        why = "timed out" if rc is None else f"exit code {rc}"
        return [Row(label, "-", "FAIL", f"torchrun {why}: " + " | ".join(output.strip().splitlines()[-3:]))]
    got = torch.load(out)
    ok = [g["rank"] for g in got["gathered"]] == list(range(world)) and got["sum"] == [world * (world + 1) / 2] * 3
    return [Row(label, "-", "PASS" if ok else "FAIL",
                f"backend {got['backend']}, devices {', '.join(g['device'] for g in got['gathered'])}, sum "
                f"{got['sum'][0]:.0f}")]


# ----------------------------------------------------------------------------------------------------
# Evaluation's decoding path (rollout.py): what the world check reaches only with a micro model.

def check_evaluation_decoding(name: str, folder: Path, sizes: Sizes, device: torch.device, work: Path) -> list[Row]:
    """Rows sharing a system prompt on a merged adapter copy laid out for decoding (rollout.py's models), decoded
    with the prompt cache, deterministic chunked prefill and prompt lookup, rows leaving the batch as they stop
    (cold cache, then warm): against plain batched decoding of the same model."""
    import rollout  # its decoding settings; imported here, as the world check imports the world
    adapter_dir = work / "evaluation-adapter"
    cpu = Transformer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    add_random_adapter(cpu, seed=50)
    lora.save_adapter(cpu, adapter_dir, "check")
    del cpu
    vocab = ModelConfig.from_hf(folder).vocab_size
    g = torch.Generator().manual_seed(51)
    system = torch.randint(0, vocab, (sizes.decode_prompt,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        base = Transformer.from_pretrained(folder, device=device, dtype=dtype)
        model = decoding.lay_out_for_decoding(lora.merged_copy(base, adapter_dir, "check"))
        free = generate(model, prompts, sizes.generate_new)
        stop_ids = {free[0].ids[2], free[2].ids[sizes.generate_new // 2]}  # rows leave the batch at other steps
        want = generate(model, prompts, sizes.generate_new, stop_ids)
        cache = decoding.PromptCache(1 << 20)
        chunk = min(rollout.DETERMINISTIC_CHUNK, sizes.decode_prompt // 2)  # tiny prompts still reuse chunks
        with attention_kernels() as found:
            got = [generate(model, prompts, sizes.generate_new, stop_ids, prompt_cache=cache, namespace="check",
                            prefill_chunk=chunk, prompt_lookup=rollout.PROMPT_LOOKUP) for _ in ("cold", "warm")]
        differ = ties = 0
        for run in got:
            d, t = greedy_mismatches(model, prompts, run, want)
            differ, ties = differ + d, ties + t
        cached = sum(r.n_cached for r in got[1])
        label = f"evaluation decoding vs plain {str(dtype).removeprefix('torch.')}"
        figures = (f"{2 * len(prompts) - differ}/{2 * len(prompts)} rows identical (cold and warm cache, "
                   f"{cached} prompt tokens reused warm)" + (f", {ties} of {differ} at near-ties" if differ else "")
                   + f"; {kernels(found)}")
        if dtype == torch.float32:
            rows.append(Row(label, name, "PASS" if differ == ties and cached > 0 else "FAIL", figures))
        else:  # bf16 rounding depends on how many positions a pass computes, so tokens may part at close logits
            rows.append(Row(label, name, "INFO", figures))
        del base, model
    return rows


# ----------------------------------------------------------------------------------------------------
# A short mini-world evaluation through evaluate.py (needs appworld).

def check_world(device: torch.device, world_root: str | None, work: Path) -> list[Row]:
    if importlib.util.find_spec("appworld") is None:
        return [Row("world evaluation", "-", "SKIP", "appworld is not importable here")]
    import agents
    import world
    root = Path(world_root) if world_root else work / "miniworld"
    if not (root / "data" / "datasets" / "dev.txt").is_file():
        world.build_world(root)
    folder = init_tiny(work / "world-model", [agents.API_RULES], preset="micro", seed=0)
    out = work / "world-eval"
    start = time.perf_counter()
    rc, output = run_child([sys.executable, str(HERE / "evaluate.py"), "--model", str(folder), "--split", "dev",
                            "--root", str(root), "--limit", "2", "--workers", "1", "--out", str(out),
                            "--device", str(device), "--quiet", "--max-subtasks", "2", "--max-executor-turns", "2",
                            "--max-new-tokens", "16"])
    seconds = time.perf_counter() - start
    results = out / "results.json"
    if rc != 0 or not results.exists():
        why = "timed out" if rc is None else f"exit code {rc}"
        return [Row("world evaluation", "micro", "FAIL", f"evaluate.py {why}: "
                    + " | ".join(output.strip().splitlines()[-4:]))]
    metrics = json.loads(results.read_text())["metrics"]
    figures = ", ".join(f"{k} {metrics[k]}" for k in ("tgc", "sgc", "tasks") if k in metrics)
    return [Row("world evaluation (random micro model)", "micro", "PASS", f"{figures}, {seconds:.0f} s")]


# ----------------------------------------------------------------------------------------------------
# The run.

def print_table(rows: list[Row]) -> None:
    widths = [max(len(getattr(r, f)) for r in rows + [Row("check", "shape", "status", "")])
              for f in ("check", "shape", "status")]
    print(f"{'check':<{widths[0]}}  {'shape':<{widths[1]}}  {'status':<{widths[2]}}  figures")
    for r in rows:
        print(f"{r.check:<{widths[0]}}  {r.shape:<{widths[1]}}  {r.status:<{widths[2]}}  {r.figures}")


def run_checks(device: torch.device, tiny: bool, world_root: str | None, only: list[str]) -> list[Row]:
    sizes = TINY if tiny else FULL
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons mean fp32 matmuls
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        folders = {name: make_checkpoint(cfg, work / name, device, seed=i)
                   for i, (name, cfg) in enumerate(sizes.shapes.items())}
        checks = {
            "logits": lambda: [r for name, f in folders.items() for r in check_logits(name, f, sizes, device)],
            "train": lambda: check_training(sizes.train_shape, folders[sizes.train_shape], sizes, device, work),
            "recipe": lambda: [check_default_recipe(sizes.train_shape, folders[sizes.train_shape], sizes, device,
                                                    work)],
            "resume": lambda: [check_resume(sizes.ddp_shape, folders[sizes.ddp_shape], sizes, device, work)],
            "compile": lambda: [check_compile(sizes.ddp_shape, folders[sizes.ddp_shape], sizes, device, work)],
            "ddp": lambda: check_ddp(sizes.ddp_shape, folders[sizes.ddp_shape], sizes, device, tiny, work),
            "collectives": lambda: check_collectives(device, work),
            "generate": lambda: check_generation(sizes.generate_shape, folders[sizes.generate_shape], sizes, device),
            "decoding": lambda: check_evaluation_decoding(sizes.generate_shape, folders[sizes.generate_shape],
                                                          sizes, device, work),
            "world": lambda: check_world(device, world_root, work),
        }
        for check, run in checks.items():
            if only and check not in only:
                continue
            start = time.perf_counter()
            try:
                rows += run()
            except Exception as e:  # one broken path must not hide the others' answers
                traceback.print_exc()
                rows.append(Row(check, "-", "FAIL", f"{type(e).__name__}: {e}"[:300]))
            print(f"[{check} done in {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    return rows


CHECKS = ("logits", "train", "recipe", "resume", "compile", "ddp", "collectives", "generate", "decoding", "world")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check every CUDA path of prost at real model shapes in one run and "
                                            "print one table (exit 1 if any check fails).")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where to run the checks (cpu only makes sense with --tiny, as the tests do)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes instead of the real ones (seconds on a CPU)")
    p.add_argument("--only", nargs="*", default=[], choices=CHECKS, help="run only these checks")
    p.add_argument("--world-root", default=None,
                   help="an already built mini-world for the world check (default: build one in a temp folder)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)  # internal: one torchrun rank
    p.add_argument("--ddp-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--collectives-worker", default=None, help=argparse.SUPPRESS)  # internal: one torchrun rank
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < MIN_TORCH:
        print(f"gpu_check: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, which prost "
              f"needs (scaled_dot_product_attention's enable_gqa); install a newer torch")
        return 1
    if args.ddp_worker:
        ddp_run(Path(args.ddp_model), TINY if args.tiny else FULL, args.device, 1, Path(args.ddp_worker))
        return 0
    if args.collectives_worker:
        collectives_run(args.device, Path(args.collectives_worker))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__}; nothing to check here "
              f"(run `make gpu-check` on a GPU machine)")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    transformers = transformers_or_none()
    print(f"gpu_check on {name} x{torch.cuda.device_count() if device.type == 'cuda' else 1}, torch "
          f"{torch.__version__}, transformers {transformers.__version__ if transformers else 'absent'}, "
          f"{'tiny' if args.tiny else 'real'} shapes", flush=True)
    start = time.perf_counter()
    rows = run_checks(device, args.tiny, args.world_root, args.only)
    print_table(rows)
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows without failure, {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
