"""Train one ProST role (planner, executor, critic or single agent) as a LoRA adapter on teacher trajectories.

Where this sits: agents.py records teacher trajectories; data.py cuts them into per-role, per-sub-task
examples and orders them with the progressive schedule; this file runs the hand-written training loop and
writes `ckpts/<role>/` (a PEFT-layout adapter recording its base model, plus train_log.jsonl, the state
needed to resume, run.json with what defines the run, and progress.json saying which epoch of how many the
adapter is from), which agents.py and evaluate.py load back. The folder has one writer at a time, is
checked before any work (a file, not writable, too little space for a checkpoint), and whenever a run
is killed it holds a state `--resume` continues (store.py).

    python prost.py --model Qwen/Qwen2.5-1.5B --role planner --data trajectories/train.jsonl --out ckpts
    torchrun --nproc_per_node 8 prost.py ...           # data parallel (nccl on GPUs, gloo on CPUs)

The loop, in order: per epoch, the curriculum picks the examples with sub-task index <= s(e); an example
that is a token prefix of a longer one of the same conversation (a planner's earlier decisions) is trained
inside it (data.share_prefixes: the same loss terms, its context computed once); the sequences are
shuffled from (seed, epoch), grouped into micro-batches of similar length (longest first), or with each
task's sequences side by side where that computes less, and `grad_accum * world_size` micro-batches form one
optimizer step. A micro-batch whose rows start with the same tokens (the executor's examples of one task
share their system prompt and task) computes that trunk once, and each row attends to its keys and values
(model.SharedTrunk: the same loss terms and gradients). Each micro-batch contributes
sum(token losses) / (target tokens of the whole step, all ranks), so accumulation and data parallelism
give the gradient of the mean token loss over the step whatever the split. The frozen base runs under
bf16 autocast on CUDA while the adapter weights and the optimizer stay fp32; the vocabulary projection is
applied only at target positions, which saves a (tokens x vocab) logits tensor per micro-batch, and
positions after a micro-batch's last target are not computed at all. --checkpoint-activations keeps only
each decoder block's input for the backward pass and recomputes the block (less memory, the same numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

import data
import lora
import store
from cluster import Cluster, barrier, exit_process, first_error, gather, start_cluster, stop_cluster
from model import ModelConfig, SharedTrunk, Tokenizer, Transformer, fingerprint, resolve_model_dir, train_flops
from store import atomic_write

ADAPTER = "default"  # the adapter's name inside the model; the folder is what agents.py loads
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
RUN_FILE = store.IDENTITY_FILE
LOSS_CHUNK = 1024  # target tokens per recomputed piece of the vocabulary projection under checkpointing
# Dense bf16 peak of common training GPUs, for MFU (override with --peak-tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


@dataclass
class TrainConfig:
    """Every knob of a run; defaults suit Qwen2.5-1.5B on one 80 GB GPU."""
    model: str = "Qwen/Qwen2.5-1.5B"
    role: str = "planner"
    data: str | None = None
    dev_data: str | None = None
    out: str = "ckpts"
    schedule: str = "progressive"
    lr_schedule: str = "cosine"  # cosine: one warmup + cosine over the run; per-stage: restarted per stage
    subtasks_per_epoch: int = 1
    epochs: int = 0  # 0: until every sub-task is in, plus one epoch on everything
    micro_batch_size: int = 4
    grad_accum: int = 4
    max_seq_len: int = 4096
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    stop_after: int = 0  # stop after this epoch as if interrupted (0: run to the end)
    peak_tflops: float = 0.0  # 0: look the GPU up in PEAK_TFLOPS
    progress: bool = True
    share_prefixes: bool = True  # fold prefix examples into longer ones; compute a micro-batch's common trunk once
    checkpoint_activations: bool = False  # recompute each decoder block in the backward pass
    compile: bool = False  # torch.compile each decoder block


# Fields that do not change what is trained; everything else must match to resume a run.
NOT_IDENTITY = {"model", "data", "dev_data", "out", "device", "resume", "stop_after", "peak_tflops", "progress",
                "checkpoint_activations", "compile"}  # model and data: by content, see run_identity


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the step is not applied and the run stops."""


# ----------------------------------------------------------------------------------------------------
# The loop: train -> epochs (_train) -> optimizer steps (run_epoch) -> micro-batches -> loss -> backward.

def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training as configured; returns the per-epoch log records. OUT/ROLE is checked
    (a file, not writable, too little space for a checkpoint) and locked against a second run before any
    data is read."""
    check_config(cfg)
    cluster = start_cluster(cfg.device)
    try:
        need = checkpoint_bytes(cfg)  # on every rank: a base that cannot be found stops them all
        with store.exclusive_output(Path(cfg.out) / cfg.role, need_bytes=need, is_main=cluster.is_main,
                                    first_error=lambda error: first_error(cluster, error)):
            return _train(cfg, cluster)
    finally:
        stop_cluster(cluster)


def _train(cfg: TrainConfig, cluster: Cluster) -> list[dict]:
    """The run: the role's examples and their schedule, the model with a fresh or resumed adapter, then epoch
    after epoch of optimizer steps, each epoch ending in a checkpoint that a killed run resumes from."""
    log = print if cluster.is_main else (lambda *a, **k: None)
    precision = resolve_precision(cfg.precision, cluster.device)
    role_data = prepare_data(cfg, log, cluster)
    examples, epochs, pad_id = role_data.examples, role_data.epochs, role_data.tokenizer.pad_id
    out_dir = Path(cfg.out) / cfg.role
    identity, saved, fingerprint = open_run(out_dir, cfg, cluster, role_data)

    model = build_model(cfg, cluster.device, precision)
    params = list(trainable_parameters(model).values())
    optimizer = make_optimizer(params, cfg)
    torch.manual_seed(cfg.seed + 1 + cluster.rank)  # dropout streams differ per rank
    random.seed(cfg.seed)
    history, step = resume_run(saved, model, optimizer, cluster, out_dir, epochs, log)
    stages = lr_stages(epoch_step_counts(examples, epochs, cfg, cluster.world), role_data.plans, cfg.lr_schedule)
    peak = peak_flops(cluster.device, cfg.peak_tflops)

    model.train()
    for epoch in range(len(history) + 1, epochs + 1):
        plan = role_data.plans[epoch - 1]  # the curriculum: the examples with sub-task index <= s(epoch)
        try:
            stats, step = run_epoch(model, optimizer, params, examples, epoch, epochs, step, stages, cfg,
                                    cluster, precision, pad_id, out_dir, len(history))
        except TrainingDiverged:
            mark_diverged(out_dir, cluster, len(history), epochs, epoch)
            raise
        dev_loss = dev_losses(model, role_data.dev, cfg, pad_id, cluster, precision) if role_data.dev else {}
        record = epoch_record(epoch, step, plan, stats, dev_loss, optimizer.param_groups[0]["lr"],
                              model_flops_utilisation(stats, peak, cluster.world), peak_memory_gb(cluster.device))
        history.append(record)
        log(describe_epoch(record, epochs))
        state = {"run": identity, "epoch": epoch, "step": step, "max_subtask": plan.max_subtask,
                 "scheduler": {"step": step, "lr_stages": stages},
                 "data_order": {"seed": cfg.seed, "examples_sha256": fingerprint},
                 "rng": rng_states(cluster), "history": history}
        stopping = bool(cfg.stop_after) and epoch == cfg.stop_after and epoch < epochs
        if cluster.is_main:
            save_checkpoint(out_dir, model, optimizer, state,
                            stopped=f"stopped by --stop-after {epoch}" if stopping else None)
        if stopping:
            log(f"stopping after epoch {epoch} as asked; continue with --resume")
            break
    return history


@dataclass
class EpochStats:
    loss_sum: float
    targets: int
    tokens: int
    seconds: float
    flops: float  # model FLOPs of what ran (batch_train_flops), all ranks
    sequences: int  # the epoch's examples after prefix sharing


def run_epoch(model, optimizer, params, examples, epoch: int, epochs: int, step: int, stages: list[tuple[int, int]],
              cfg: TrainConfig, cluster: Cluster, precision: str, pad_id: int, out_dir: Path,
              last_good: int) -> tuple[EpochStats, int]:
    """One epoch of optimizer steps; returns its statistics (summed over ranks) and the new step count."""
    sequences = epoch_sequences(examples, epoch, cfg)
    plan = epoch_micro_batches(sequences, epoch, cfg, model.config)
    steps = optimizer_steps(plan, cfg.grad_accum * cluster.world)
    bar = ProgressBar(len(steps), f"epoch {epoch}/{epochs}", cfg.progress and cluster.is_main)
    loss_total, targets_total, my_tokens, my_flops = 0.0, 0, 0, 0.0
    adapter_weights = sum(p.numel() for p in params)
    start = time.perf_counter()
    for i, step_batches in enumerate(steps):
        step_targets = sum(sequences[j].n_targets for b in step_batches for j in b)  # all ranks
        my_batches = [[sequences[j] for j in b] for b in step_batches[cluster.rank::cluster.world]]
        tensors = [data.collate(b, pad_id, cfg.share_prefixes) for b in my_batches]
        loss_sum = accumulate_gradients(model, tensors, step_targets, cluster.device, precision)
        if cluster.world > 1:
            all_reduce_gradients(params)
            loss_sum = all_reduce_sum(loss_sum, cluster)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not torch.isfinite(torch.stack([loss_sum, grad_norm.to(loss_sum.device)])).all():
            raise TrainingDiverged(
                f"non-finite loss or gradient at epoch {epoch}, step {i + 1}; the step was not applied. "
                + (f"The last good checkpoint (epoch {last_good}) is in {out_dir}; " if last_good else
                   "No checkpoint was written; ") + "lower --lr or inspect the data, then run again")
        lr = stage_learning_rate(step, stages, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_total += loss_sum.item()
        targets_total += step_targets
        my_tokens += sum(e.n_tokens for b in my_batches for e in b)
        my_flops += sum(batch_train_flops(model.config, adapter_weights, b, t.trunk) for b, t in zip(my_batches, tensors))
        bar.update(i + 1, f"loss {loss_sum.item() / step_targets:.4f} lr {lr:.2e}")
    bar.close()
    totals = all_reduce_sum(torch.tensor([my_tokens, my_flops], dtype=torch.float64, device=cluster.device),
                            cluster).tolist()
    seconds = time.perf_counter() - start
    return EpochStats(loss_total, targets_total, int(totals[0]), seconds, totals[1], len(sequences)), step


def accumulate_gradients(model, micro_batches: list[data.Batch], step_targets: int, device: torch.device,
                         precision: str) -> torch.Tensor:
    """Backward through each micro-batch with its loss divided by the step's total target tokens, so the
    summed gradients are those of the mean token loss over the step. Returns the summed token loss."""
    total = torch.zeros((), device=device)
    for ids, mask, trunk in micro_batches:
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with autocast(device, precision):
            losses, _ = target_token_losses(model, ids, mask, trunk)
        loss_sum = losses.sum()
        (loss_sum / step_targets).backward()
        total += loss_sum.detach()
    return total


def target_token_losses(model, ids: torch.Tensor, mask: torch.Tensor, trunk: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token, and the batch row it belongs to.

    Token t + 1 is predicted from position t, so positions from the batch's last target on are never
    needed as input (they are cut), and the vocabulary projection runs only where the next token is a
    target. The first `trunk` columns, the same in every row and predicting no target (data.trunk_length),
    run once as one row whose keys and values every row then attends to (model.SharedTrunk). Under
    activation checkpointing the (N, vocab) logits are recomputed too, LOSS_CHUNK targets at a time, so
    they never all exist at once (for Qwen2.5's 152k vocabulary, 1k targets take 1.5 GB)."""
    end = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 2  # one past the last target column
    ids, mask = ids[:, :end], mask[:, :end]
    cache = None
    if trunk:
        cache = SharedTrunk(ids.device)
        model.hidden(ids[:1, :trunk], cache)  # only its keys and values are used, and get gradients
        cache = cache.continuation()
        ids, mask = ids[:, trunk:], mask[:, trunk:]
    hidden = model.hidden(ids[:, :-1], cache)  # (B, T-1, D)
    is_target = mask[:, 1:]  # (B, T-1)
    targets, labels = hidden[is_target], ids[:, 1:][is_target]  # (N, D), (N,): N = target tokens in the batch
    if model.checkpoint_blocks and torch.is_grad_enabled():
        losses = torch.cat([torch.utils.checkpoint.checkpoint(vocabulary_losses, model, targets[i:i + LOSS_CHUNK],
                                                              labels[i:i + LOSS_CHUNK], use_reentrant=False)
                            for i in range(0, len(labels), LOSS_CHUNK)])
    else:
        losses = vocabulary_losses(model, targets, labels)
    rows = is_target.nonzero()[:, 0]  # (N,)
    return losses, rows


def vocabulary_losses(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (N,) of the next tokens `labels` (N,) predicted from final hidden states (N, D)."""
    logits = model.lm_head(hidden).float()  # (N, V)
    return F.cross_entropy(logits, labels, reduction="none")


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the adapter gradients over ranks in one flat buffer (a rank that got no micro-batch in the last
    step of an epoch contributes zeros). LoRA gradients are small, so overlapping this with the backward
    pass, as DistributedDataParallel does, would buy little."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def all_reduce_sum(values: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    if cluster.world > 1:
        dist.all_reduce(values)
    return values


# ----------------------------------------------------------------------------------------------------
# Precision.

def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32 (got {precision})")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Data.

DEFAULT_DATA = Path(__file__).resolve().parent / "trajectories" / "train.jsonl"


def collect_default_data(cluster: Cluster) -> Path:
    """The data used when --data is not given: the mini-world's train split replayed by the gold teacher.

    Rank 0 builds the mini-world if it is missing and collects into trajectories/train.jsonl; the
    collection resumes from that file, so a second run costs only the check. Other ranks wait for it.
    """
    if cluster.is_main:
        import agents  # only the default-data path needs the agents and the world
        import miniworld
        import world
        if not (world.world_root() / "data" / "datasets" / "train.txt").is_file():
            print(f"no --data: building the mini-world in {world.world_root()}")
            miniworld.build_world(world.world_root())
        print(f"no --data: collecting gold-teacher trajectories of the train split into {DEFAULT_DATA}")
        DEFAULT_DATA.parent.mkdir(parents=True, exist_ok=True)
        summary = agents.collect(agents.teacher_system("gold"), "train", DEFAULT_DATA, agents.Budgets())
        if summary.failed:
            raise ValueError(f"gold-teacher trajectories failed evaluation for {', '.join(summary.failed)}; "
                             f"rebuild the mini-world with `python miniworld.py build`")
    barrier(cluster)
    return DEFAULT_DATA


def examples_fingerprint(examples: list[data.Example]) -> str:
    """Identifies the rendered examples, so a resumed run knows it sees the same data in the same order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.name, e.ids, e.mask]).encode())
    return digest.hexdigest()


def load_role_examples(path: str | Path, role: str, tokenizer, max_seq_len: int, log) -> list[data.Example]:
    records = data.read_trajectories(path)
    examples, report = data.build_examples(records, role, tokenizer, max_seq_len)
    for line in report.lines():
        log(f"{path}: {line}")
    if not examples and report.dropped:
        raise ValueError(f"every {role} example of {path} is longer than --max-seq-len {max_seq_len} even with its "
                         f"old outputs shortened ({len(report.dropped)} dropped); raise --max-seq-len")
    if not examples:
        roles = sorted({c["role"] for r in records for c in r["calls"]})
        raise ValueError(f"{path} holds no {role} calls, so there is nothing to train (roles present: "
                         f"{', '.join(roles) or 'none'}); pick one of those with --role or give other --data")
    return examples


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, learning rate.

def build_model(cfg: TrainConfig, device: torch.device, precision: str):
    """The frozen base (bf16 under bf16 training, to halve its memory) with a fresh fp32 adapter."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Transformer.from_pretrained(cfg.model, device=device, dtype=dtype)
    torch.manual_seed(cfg.seed)  # every rank starts from the same adapter initialisation
    lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, name=ADAPTER)
    model.checkpoint_blocks = cfg.checkpoint_activations
    if cfg.compile:
        for block in model.model.layers:
            block.compile()
    return model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the adapter matrices only; fused (one kernel for the whole update)
    wherever this torch supports it for the device."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """LR of 0-based optimizer step `step`: linear warmup to `peak`, then cosine decay to min_ratio * peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------
# Epoch plans.

def epoch_sequences(examples, epoch: int, cfg: TrainConfig) -> list[data.Example]:
    """What epoch `epoch` trains on: the examples the schedule admits, in data order, each one that is a
    token prefix of a longer one folded into it (data.share_prefixes) unless --no-share-prefixes."""
    chosen = [examples[i] for i in data.epoch_example_indices(examples, epoch, cfg.subtasks_per_epoch,
                                                              cfg.schedule)]
    return data.share_prefixes(chosen) if cfg.share_prefixes else chosen


def epoch_micro_batches(sequences: list[data.Example], epoch: int, cfg: TrainConfig,
                        config: ModelConfig) -> list[list[int]]:
    """Micro-batches of similar length (data.plan_batches). With prefix sharing, the plan that keeps each
    task's sequences side by side, so that a micro-batch computes their common prefix once (data.trunk_length),
    is taken instead when it runs fewer FLOPs, padding included: for the executor, whose examples of one task
    share a long system prompt and task and have similar lengths, but not for the critic, whose examples of
    one task differ in length more than they share. Either plan has the same number of micro-batches."""
    lengths, indices = [e.n_tokens for e in sequences], list(range(len(sequences)))
    by_length = data.plan_batches(indices, lengths, cfg.micro_batch_size, cfg.seed, epoch)
    if not cfg.share_prefixes:
        return by_length
    by_task = data.plan_batches(indices, lengths, cfg.micro_batch_size, cfg.seed, epoch,
                                groups=[e.task_id for e in sequences])

    def cost(plan):
        return sum(padded_batch_flops(config, [sequences[i] for i in batch]) for batch in plan)
    return by_task if cost(by_task) < cost(by_length) else by_length


def optimizer_steps(micro_batches: list[list[int]], per_step: int) -> list[list[list[int]]]:
    return [micro_batches[i:i + per_step] for i in range(0, len(micro_batches), per_step)]


LR_SCHEDULES = ("cosine", "per-stage")


def epoch_step_counts(examples, epochs: int, cfg: TrainConfig, world: int) -> list[int]:
    """Optimizer steps of each epoch, known up front because batch counts do not depend on shuffling."""
    per_step = cfg.grad_accum * world
    counts = []
    for epoch in range(1, epochs + 1):
        n = len(epoch_sequences(examples, epoch, cfg))
        counts.append(math.ceil(math.ceil(n / cfg.micro_batch_size) / per_step))
    return counts


def lr_stages(step_counts: list[int], plans: list[data.EpochPlan], lr_schedule: str) -> list[tuple[int, int]]:
    """(first step, steps) of each learning-rate cycle. cosine: one cycle over the whole run. per-stage: a new
    cycle (warmup, then cosine decay) each epoch in which the curriculum adds sub-tasks, so the sub-tasks that
    enter last are not trained only near the minimum learning rate."""
    stages, start = [], 0
    for epoch, (n, plan) in enumerate(zip(step_counts, plans)):
        new_stage = epoch == 0 or (lr_schedule == "per-stage" and plan.max_subtask > plans[epoch - 1].max_subtask)
        if new_stage:
            stages.append((start, 0))
        stages[-1] = (stages[-1][0], stages[-1][1] + n)
        start += n
    return stages


def stage_learning_rate(step: int, stages: list[tuple[int, int]], cfg: TrainConfig) -> float:
    """LR of 0-based optimizer step `step`: warmup and cosine decay within its cycle."""
    first, length = next((a, n) for a, n in reversed(stages) if a <= step)
    return learning_rate(step - first, length, math.ceil(cfg.warmup_ratio * length), cfg.lr, cfg.min_lr_ratio)


# ----------------------------------------------------------------------------------------------------
# Measuring.

class ProgressBar:
    """A one-line text bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def update(self, done: int, note: str) -> None:
        if not self.enabled:
            return
        tenth = done * 10 // max(1, self.total)
        if not self.tty and tenth == self.last_tenth and done < self.total:
            return
        self.last_tenth = tenth
        filled = done * 30 // max(1, self.total)
        line = f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {note}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak memory allocated by torch; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a trainer started by a big
    # process (a test, a notebook) would report that process's peak whenever it is the higher one
    return status_kib("VmHWM:") * 1024 / 1e9


def status_kib(field: str) -> int:
    """A memory figure of this process (e.g. "VmRSS:", "VmHWM:") from Linux's /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    """The device's peak FLOP/s: --peak-tflops if given (any device; bench.py measures a CPU's), else the
    GPU's dense bf16 peak by name, else None (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def batch_train_flops(config, adapter_weights: int, batch: list[data.Example], trunk: int = 0) -> float:
    """Model FLOPs of one micro-batch as the step runs it (model.train_flops, the one counting rule): each
    sequence's positions up to its last target (target_token_losses cuts the rest), the vocabulary
    projection at the targets only; the `trunk` its rows share (data.collate) once, each row's positions
    after it attending to the trunk's keys. Padding and activation recomputation are not counted."""
    # the trunk's last layer gets a backward only through its keys and values; the rest of that layer's
    # backward (at most 1 / layers of the trunk's) is counted anyway, as train_flops does for layer 0's input
    total = train_flops(config, trunk + 1, 0, adapter_weights) if trunk else 0.0
    for e in batch:
        total += train_flops(config, e.last_target + 1 - trunk, e.n_targets, adapter_weights, past=trunk)
    return total


def padded_batch_flops(config, batch: list[data.Example]) -> float:
    """FLOPs of one micro-batch's positions as they run, padding included (every row is computed up to the
    batch's last target column), with its shared trunk once: what epoch_micro_batches compares plans by.
    The vocabulary projection and the adapter are left out: they cost the same in any plan."""
    trunk = data.trunk_length(batch)
    width = max(e.last_target for e in batch)
    rows = len(batch) * train_flops(config, width + 1 - trunk, 0, past=trunk)
    return rows + (train_flops(config, trunk + 1, 0) if trunk else 0.0)


@torch.no_grad()
def dev_losses(model, examples: list[data.Example], cfg: TrainConfig, pad_id: int, cluster: Cluster,
               precision: str) -> dict[int, float]:
    """Mean token loss per sub-task index on the dev examples, sharded over ranks."""
    model.eval()
    max_subtask = max(e.subtask for e in examples)
    sums = torch.zeros(max_subtask + 1, 2, dtype=torch.float64, device=cluster.device)  # (k, [loss, tokens])
    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)[cluster.rank::cluster.world]
    for start in range(0, len(order), cfg.micro_batch_size):
        batch = [examples[i] for i in order[start:start + cfg.micro_batch_size]]
        ids, mask, trunk = data.collate(batch, pad_id, cfg.share_prefixes)
        with autocast(cluster.device, precision):
            losses, rows = target_token_losses(model, ids.to(cluster.device), mask.to(cluster.device), trunk)
        subtask_of_row = torch.tensor([e.subtask for e in batch], device=cluster.device)
        sums[:, 0].index_add_(0, subtask_of_row[rows], losses.double())
        sums[:, 1].index_add_(0, subtask_of_row[rows], torch.ones_like(losses, dtype=torch.float64))
    all_reduce_sum(sums, cluster)
    model.train()
    return {k: (sums[k, 0] / sums[k, 1]).item() for k in range(1, max_subtask + 1) if sums[k, 1] > 0}


# ----------------------------------------------------------------------------------------------------
# Checkpoints.

def run_identity(cfg: TrainConfig, role_data: RoleData, world: int) -> dict:
    """What defines a run: a checkpoint only resumes under the same identity. The base model and the data
    count by content (a moved folder still resumes); where they were is recorded, not compared."""
    identity = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IDENTITY}
    identity.update(model_sha256=fingerprint(cfg.model), epochs=role_data.epochs,
                    data_sha256=store.file_sha256(role_data.path), world_size=world)
    identity[store.PATHS] = {"model": cfg.model, "data": str(role_data.path)}
    return identity


def read_checkpoint(out_dir: Path, identity: dict, resume: bool) -> dict | None:
    """The saved state to resume from, or None for a fresh run; refuses to mix runs in one folder.

    A folder holding only files of this run but no state (a crash before or during the first checkpoint)
    starts over; temp files of an interrupted write are not the run's and were cleaned when it was locked."""
    fix = "choose another --out or remove that folder"
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        store.check_identity(out_dir, state["run"], identity, fix)
        if not resume:
            raise ValueError(f"{out_dir} already holds this run (epoch {state['epoch']} of "
                             f"{identity['epochs']} done); pass --resume to continue it, or choose another --out")
        lora.check_finite(state["adapter"], str(state_path))
        return state
    if not out_dir.exists():
        return None
    ours = {RUN_FILE, LOG_FILE, store.PROGRESS_FILE, lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS}
    if any(p.name not in ours and not store.bookkeeping(p) for p in out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no prost run; choose another --out")
    saved = store.read_identity(out_dir)
    if saved is not None:
        store.check_identity(out_dir, saved, identity, fix)
    return None


def rng_states(cluster: Cluster) -> list[dict]:
    """Every rank's RNG states (dropout draws differ per rank), gathered on all ranks."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(cluster.device) if cluster.device.type == "cuda" else None}
    return gather(cluster, mine)


def restore_rng(states: list[dict], cluster: Cluster) -> None:
    mine = states[cluster.rank]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], cluster.device)


def save_checkpoint(out_dir: Path, model, optimizer, state: dict, stopped: str | None = None) -> None:
    """The state file first: it is the commit point, holding the adapter tensors, the optimizer and the
    position in the run, so a crash at any later moment resumes from it. Then the log (rewritten from the
    state's history, so it never runs ahead of the checkpoint) and the published adapter."""
    state = dict(state, optimizer=optimizer.state_dict(),
                 adapter={n: p.detach().cpu() for n, p in trainable_parameters(model).items()})
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    write_log(out_dir, state["history"])
    publish_adapter(out_dir, model, state["epoch"], state["run"]["epochs"], stopped)


def publish_adapter(out_dir: Path, model, epoch: int, epochs: int, stopped: str | None = None) -> None:
    """The adapter in PEFT layout (what agents.py and evaluate.py load), then progress.json tying its content
    hash to the epoch it is from. Until progress.json is written, the hashes differ and evaluate.py knows the
    adapter files are not (yet) those of a checkpoint."""
    lora.save_adapter(model, out_dir, ADAPTER)
    store.write_progress(out_dir, epoch=epoch, epochs=epochs, stopped=stopped,
                         adapter_sha256=store.files_sha256(out_dir, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]))


def write_log(out_dir: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(out_dir / LOG_FILE, text)


def restore_checkpoint(state: dict, model, optimizer, cluster: Cluster) -> None:
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == cluster.world:
        restore_rng(state["rng"], cluster)


# ----------------------------------------------------------------------------------------------------
# The run's bookkeeping: configuration checks, data, identity, resume, the epoch log.

def epoch_record(epoch: int, step: int, plan: data.EpochPlan, stats: EpochStats, dev: dict[int, float],
                 lr: float, mfu: float | None, memory_gb: float) -> dict:
    dev_by_subtask = {str(k): round(v, 6) for k, v in dev.items()}  # JSON keys are strings
    return {"epoch": epoch, "step": step, "max_subtask": plan.max_subtask, "examples": plan.n_examples,
            "sequences": stats.sequences, "examples_per_s": plan.n_examples / stats.seconds, "lr": lr,
            "train_loss": stats.loss_sum / stats.targets, "dev_loss_by_subtask": dev_by_subtask,
            "tokens": stats.tokens, "target_tokens": stats.targets,
            "tokens_per_s": stats.tokens / stats.seconds, "target_tokens_per_s": stats.targets / stats.seconds,
            "mfu": mfu, "peak_memory_gb": memory_gb, "seconds": stats.seconds}


def describe_epoch(record: dict, epochs: int) -> str:
    dev = " ".join(f"{k}:{v:.3f}" for k, v in record["dev_loss_by_subtask"].items())
    mfu = f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
    return (f"epoch {record['epoch']}/{epochs} (sub-tasks 1..{record['max_subtask']}, {record['examples']} "
            f"examples in {record['sequences']} sequences): train loss {record['train_loss']:.4f}"
            + (f" | dev loss by sub-task {dev}" if dev else "")
            + f" | {record['tokens_per_s']:,.0f} tokens/s, {record['target_tokens_per_s']:,.0f} target "
            f"tokens/s{mfu} | peak memory {record['peak_memory_gb']:.2f} GB")


def check_config(cfg: TrainConfig) -> None:
    if cfg.role not in data.ROLES:
        raise ValueError(f"unknown role '{cfg.role}' (expected one of {', '.join(data.ROLES)})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule})")
    positive = ("subtasks_per_epoch", "micro_batch_size", "grad_accum", "lora_r")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("epochs", "stop_after", "weight_decay", "lora_dropout", "warmup_ratio", "min_lr_ratio"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative (got {getattr(cfg, name)})")
    if cfg.max_seq_len < 2 or cfg.lr <= 0 or cfg.grad_clip <= 0:
        raise ValueError("--max-seq-len must be at least 2, and --lr and --grad-clip positive")


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """About what one checkpoint takes on disk: the fp32 adapter in the PEFT file and again in the state
    file, AdamW's two fp32 moments, and 1 MiB for the log, RNG states and JSON files."""
    config = ModelConfig.from_hf(resolve_model_dir(cfg.model))
    return 4 * 4 * lora.count_adapter_parameters(config, cfg.lora_r) + (1 << 20)


@dataclass
class RoleData:
    """The role's examples and the per-epoch plan the schedule makes of them."""
    path: Path
    tokenizer: Tokenizer
    examples: list[data.Example]
    dev: list[data.Example]
    epochs: int
    plans: list[data.EpochPlan]


def prepare_data(cfg: TrainConfig, log, cluster: Cluster) -> RoleData:
    path = Path(cfg.data) if cfg.data else collect_default_data(cluster)
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    examples = load_role_examples(path, cfg.role, tokenizer, cfg.max_seq_len, log)
    dev = load_role_examples(cfg.dev_data, cfg.role, tokenizer, cfg.max_seq_len, log) if cfg.dev_data else []
    max_subtask = max(e.subtask for e in examples)
    epochs = cfg.epochs or data.epochs_to_cover(max_subtask, cfg.subtasks_per_epoch) + 1
    data.check_coverage(max_subtask, epochs, cfg.subtasks_per_epoch, cfg.schedule)
    plans = data.plan_schedule(examples, epochs, cfg.subtasks_per_epoch, cfg.schedule)
    log(f"{cfg.role}: {len(examples)} examples from {path}, sub-task indices 1..{max_subtask}")
    log(data.format_schedule(plans, cfg.schedule, cfg.subtasks_per_epoch))
    return RoleData(path, tokenizer, examples, dev, epochs, plans)


def model_flops_utilisation(stats: EpochStats, peak: float | None, world: int) -> float | None:
    return stats.flops / stats.seconds / (peak * world) if peak else None


def open_run(out_dir: Path, cfg: TrainConfig, cluster: Cluster, role_data: RoleData) -> tuple[dict, dict | None, str]:
    """(identity, saved state or None, examples fingerprint) of the run in out_dir; a new run records its
    identity there. Refuses a folder holding another run, or this run's data rendered differently."""
    identity = run_identity(cfg, role_data, cluster.world)
    saved = read_checkpoint(out_dir, identity, cfg.resume)
    fingerprint = examples_fingerprint(role_data.examples)
    if saved is not None and saved["data_order"]["examples_sha256"] != fingerprint:
        raise ValueError(f"{role_data.path} renders into different examples than when the run in {out_dir} "
                         f"started (tokenizer changed?); choose another --out")
    barrier(cluster)  # every rank has checked the folder before rank 0 writes into it
    if cluster.is_main and saved is None:
        store.write_identity(out_dir, identity)
        store.write_progress(out_dir, epoch=0, epochs=role_data.epochs, adapter_sha256=None)
    return identity, saved, fingerprint


def resume_run(saved: dict | None, model, optimizer, cluster: Cluster, out_dir: Path, epochs: int,
               log) -> tuple[list[dict], int]:
    """(history, optimizer steps done): empty for a fresh run; else the saved adapter, optimizer and RNG
    states are restored, and the log and adapter files are rewritten from the state."""
    if saved is None:
        return [], 0
    restore_checkpoint(saved, model, optimizer, cluster)
    log(f"resuming {out_dir} after epoch {saved['epoch']} (step {saved['step']})")
    if cluster.is_main:  # the log and adapter may lag the state if a crash came right after it
        write_log(out_dir, saved["history"])
        publish_adapter(out_dir, model, saved["epoch"], epochs)
    if saved["epoch"] >= epochs:
        log(f"{out_dir} already finished all {epochs} epochs")
    return saved["history"], saved["step"]


def mark_diverged(out_dir: Path, cluster: Cluster, good_epochs: int, epochs: int, epoch: int) -> None:
    """progress.json says the run stopped; the published adapter stays that of the last good epoch."""
    if cluster.is_main and good_epochs:
        progress = store.read_progress(out_dir)
        store.write_progress(out_dir, epoch=good_epochs, epochs=epochs, adapter_sha256=progress["adapter_sha256"],
                             stopped=f"diverged: non-finite loss or gradient in epoch {epoch}")


# ----------------------------------------------------------------------------------------------------
# CLI.

def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train one ProST role as a LoRA adapter on teacher trajectories "
                                            "with progressive sub-task training (writes OUT/ROLE/).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="base model: Hugging Face id or local folder")
    p.add_argument("--role", default=d.role, help=f"role to train: one of {', '.join(data.ROLES)}")
    p.add_argument("--data", default=d.data, help="training trajectories (JSONL); without it, the mini-world's "
                   "gold-teacher trajectories, built and collected into trajectories/train.jsonl on first use")
    p.add_argument("--dev-data", default=d.dev_data, help="dev trajectories for the per-sub-task dev loss")
    p.add_argument("--out", default=d.out, help="output root; the run goes to OUT/ROLE/")
    p.add_argument("--schedule", default=d.schedule, choices=data.SCHEDULES,
                   help="progressive: add sub-tasks epoch by epoch; full: every sub-task every epoch (SFT)")
    p.add_argument("--subtasks-per-epoch", type=int, default=d.subtasks_per_epoch,
                   help="sub-task indices the progressive schedule adds per epoch")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="epochs (0: until the schedule covers every sub-task, plus one)")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="sequences per forward pass")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step and process (global batch = this x micro x processes)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="longer examples are fitted by shortening old outputs, oldest first, as rollouts do "
                        "(and reported); set it to the evaluation's --max-context to train on what roles see")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                   help="cosine: one warmup and cosine decay over the whole run; per-stage: warmup and decay "
                        "restarted each epoch in which the progressive schedule adds sub-tasks")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR as a fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps warming up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on adapter matrices")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="adapter scale numerator (alpha/r)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the adapter input")
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA (fp32 adapter and optimizer), fp32 on CPU")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (under torchrun: the local GPU)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for adapter init, data order and dropout")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ROLE/")
    p.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="stop after this epoch as if interrupted (0: run to the end); resume with --resume")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="GPU peak bf16 TFLOP/s for MFU (0: look up the GPU name)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-share-prefixes", dest="share_prefixes", action="store_false",
                   help="train every example as its own sequence, even one that is a token prefix of a longer "
                        "example of the same conversation, and compute each row of a micro-batch in full, with "
                        "micro-batches planned by length alone (the same loss terms, more tokens and steps)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="keep only each decoder block's input and recompute the block in the backward pass "
                        "(less activation memory, one more forward; the same losses and gradients)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad settings or inputs (a missing model or data file)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up during a checkpoint: the last complete one is intact
        print(f"error: {e}; fix that and continue with --resume (the last complete checkpoint is kept)",
              file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())
