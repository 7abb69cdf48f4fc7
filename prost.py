"""Train one ProST role (planner, executor, critic or single agent) as a LoRA adapter on teacher trajectories.

Where this sits in ProST: agents.py records teacher trajectories; data.py cuts them into per-role, per-sub-task
examples and lets the progressive schedule pick each epoch's; this file is the training loop. It writes
`ckpts/<role>/`: a PEFT-layout adapter recording its base model (what agents.py and evaluate.py load back),
train_log.jsonl, and the state a killed run resumes from (run_folder.py keeps the folder to one run).

    python prost.py --model Qwen/Qwen2.5-1.5B --role planner --data trajectories/train.jsonl --out ckpts
    torchrun --nproc_per_node 8 prost.py ...           # data parallel (nccl on GPUs, gloo on CPUs)

The loop (`_train`, then `run_epoch`), in order: the schedule picks the epoch's examples (sub-task index
<= s(epoch)); they are shuffled from (seed, epoch) and grouped into micro-batches of similar length, longest
first; `grad_accum * world_size` micro-batches form one optimizer step. Each micro-batch contributes
sum(target token losses) / (target tokens of the whole step, all ranks), so accumulation and data
parallelism give the gradient of the mean token loss over the step whatever the split; the vocabulary
projection runs at target positions only. Then: the global gradient norm is clipped, fused AdamW steps at
the step's learning rate (warmup, then cosine decay), and every epoch ends in a checkpoint (`save_checkpoint`)
from which `--resume` continues bit-exactly (a long epoch also saves one every --save-every-minutes). The frozen
base runs under bf16 autocast on CUDA; the adapter and the optimizer stay fp32. --checkpoint-activations keeps
only each decoder block's input for the backward pass and recomputes the block (less memory, the same numbers);
memory_estimate.py's estimate of the longest micro-batch is printed at start and turns it on where the step
would not fit otherwise (`--dry-run`: print, exit).

Fast paths, each tested equal to the plain loop and on by default; `--plain` turns every one off:
batching.py merges nested examples (`--no-merge-nested`) and computes a micro-batch's shared trunk once,
planning micro-batches by task where that computes less (`--no-trunks`); dropout_masks.py draws the
adapter's dropout masks faster; `--compile` compiles each decoder block. Every knob and its flag is
train_config.py's.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import batching
import data
import dropout_masks
import lora
import memory_estimate
import meter
import model_io
import run_folder
import store
import train_config
import trajectories
from cluster import (Cluster, all_reduce_gradients, all_reduce_sum, exit_process, first_error, start_cluster,
                     stop_cluster)
from model import ModelConfig, train_flops
from run_folder import ADAPTER, STATE_FILE, EpochProgress, mid_epoch_save_due
from store import atomic_write
from train_config import TrainConfig

LOSS_CHUNK = 1024  # target tokens per recomputed piece of the vocabulary projection under checkpointing


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the step is not applied and the run stops."""


# ----------------------------------------------------------------------------------------------------
# The loop: train -> epochs (_train) -> optimizer steps (run_epoch) -> micro-batches -> loss -> backward.

def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training as configured; returns the per-epoch log records. OUT/ROLE is checked
    (a file, not writable, too little space for a checkpoint) and locked against a second run before any
    data is read."""
    train_config.check_config(cfg)
    if cfg.plain:
        cfg = replace(cfg, merge_nested=False, trunks=False, compile=False)
    cluster = start_cluster(cfg.device)
    if cfg.dry_run:
        try:
            memory = memory_estimate.plan_run(cfg, cluster.device, resolve_precision(cfg.precision, cluster.device),
                                              LOSS_CHUNK)
        finally:
            stop_cluster(cluster)
        if memory.refusal:
            raise ValueError(memory.refusal)
        print("\n".join(memory.lines))
        return []
    try:
        need = run_folder.checkpoint_bytes(cfg.model, cfg.lora_r)  # every rank: a missing base stops them all
        with store.exclusive_output(Path(cfg.out) / cfg.role, need_bytes=need, is_main=cluster.is_main,
                                    first_error=lambda error: first_error(cluster, error)):
            return _train(cfg, cluster)
    finally:
        stop_cluster(cluster)


def _train(cfg: TrainConfig, cluster: Cluster) -> list[dict]:
    """The run: the role's examples and their schedule, the model with a fresh or resumed adapter, then epoch
    after epoch of optimizer steps, each epoch ending in a checkpoint that a killed run resumes from (and
    long ones saving mid-epoch checkpoints too)."""
    log = print if cluster.is_main else (lambda *a, **k: None)
    precision = resolve_precision(cfg.precision, cluster.device)
    path, tokenizer, examples, dev, epochs, plans = prepare_data(cfg, log, cluster)
    out_dir = Path(cfg.out) / cfg.role
    memory = memory_estimate.plan_run(cfg, cluster.device, precision, LOSS_CHUNK, max(e.n_tokens for e in examples))
    if memory.refusal:
        raise ValueError(memory.refusal)
    log("\n".join(memory.lines))
    cfg = replace(cfg, checkpoint_activations=memory.checkpointing)
    # the identity holds the precision as resolved: `auto` trains bf16 on CUDA and fp32 on the CPU
    identity, saved, examples_sha256 = run_folder.open_run(out_dir, replace(cfg, precision=precision), cluster, path,
                                                           examples, epochs)

    model = build_model(cfg, cluster.device, precision)
    params = list(trainable_parameters(model).values())
    optimizer = make_optimizer(params, cfg)
    torch.manual_seed(cfg.seed + 1 + cluster.rank)  # dropout streams differ per rank
    random.seed(cfg.seed)
    history, step, in_epoch = [], 0, None
    if saved is not None:
        history, step, in_epoch = restore_checkpoint(saved, model, optimizer, cluster)
        run_folder.republish(out_dir, saved, model, epochs, cluster, log)
    cycles = lr_cycles(epoch_step_counts(examples, epochs, cfg, cluster.world), plans, cfg.lr_schedule)
    peak = meter.peak_flops(cluster.device, cfg.peak_tflops)

    def save(epoch: int, step: int, progress: EpochProgress | None = None, stopped: str | None = None) -> None:
        """A checkpoint after `epoch` epochs and `step` optimizer steps, or `progress` into the next epoch."""
        state = run_folder.checkpoint_state(identity, epoch, step, cycles, cfg.seed, examples_sha256, history,
                                            progress, cluster)
        if cluster.is_main:
            save_checkpoint(out_dir, model, optimizer, state, stopped)

    model.train()
    for epoch in range(len(history) + 1, epochs + 1):
        plan = plans[epoch - 1]  # the schedule: the examples with sub-task index <= s(epoch)
        try:
            stats, step = run_epoch(model, optimizer, params, examples, epoch, epochs, step, cycles, cfg,
                                    cluster, precision, tokenizer.pad_id, out_dir, len(history), in_epoch, save)
        except TrainingDiverged:
            run_folder.mark_diverged(out_dir, cluster, len(history), epochs, epoch)
            raise
        in_epoch = None
        if stats is None:
            log(f"stopping in epoch {epoch} after step {step} as asked; continue with --resume")
            break
        dev_loss = dev_losses(model, dev, cfg, tokenizer.pad_id, cluster, precision) if dev else {}
        record = meter.epoch_record(epoch, step, plan, stats, dev_loss, optimizer.param_groups[0]["lr"],
                                    meter.model_flops_utilisation(stats, peak, cluster.world), cluster.device)
        history.append(record)
        log(meter.describe_epoch(record, epochs))
        stopped = (f"stopped by --stop-after-epochs {epoch}" if epoch == cfg.stop_after_epochs else
                   f"stopped by --stop-after-steps {step}" if step == cfg.stop_after_steps else None)
        stopping = bool(stopped) and epoch < epochs
        save(epoch, step, stopped=stopped if stopping else None)
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
    sequences: int  # the epoch's training sequences (fewer than its examples when nested ones are merged)


def run_epoch(model, optimizer, params, examples, epoch: int, epochs: int, step: int, cycles: list[tuple[int, int]],
              cfg: TrainConfig, cluster: Cluster, precision: str, pad_id: int, out_dir: Path, last_good: int,
              resumed: list[dict] | None, save) -> tuple[EpochStats | None, int]:
    """One epoch of optimizer steps, or the rest of one after a mid-epoch checkpoint (`resumed`: every rank's
    EpochProgress); returns its statistics (summed over ranks) and the new step count. Every
    --save-every-minutes it saves a mid-epoch checkpoint through `save`; stopped there by --stop-after-steps,
    it returns no statistics."""
    sequences = epoch_sequences(examples, epoch, cfg)
    plan = epoch_micro_batches(sequences, epoch, cfg, model.config)
    per_step = cfg.grad_accum * cluster.world
    steps = [plan[i:i + per_step] for i in range(0, len(plan), per_step)]
    bar = meter.ProgressBar(len(steps), f"epoch {epoch}/{epochs}", cfg.progress and cluster.is_main)
    done = EpochProgress(**resumed[cluster.rank]) if resumed else EpochProgress()
    adapter_weights = sum(p.numel() for p in params)
    start = last_save = time.perf_counter()
    for i in range(done.steps, len(steps)):
        step_batches = steps[i]
        step_targets = sum(sequences[j].n_targets for b in step_batches for j in b)  # all ranks
        my_batches = [[sequences[j] for j in b] for b in step_batches[cluster.rank::cluster.world]]
        tensors = [collate(b, pad_id, cfg) for b in my_batches]
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
        lr = cycle_learning_rate(step, cycles, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done.steps += 1
        done.loss_sum += loss_sum.item()
        done.targets += step_targets
        done.tokens += sum(e.n_tokens for b in my_batches for e in b)
        done.flops += sum(batch_train_flops(model.config, adapter_weights, b, t.trunk)
                          for b, t in zip(my_batches, tensors))
        bar.update(i + 1, f"loss {loss_sum.item() / step_targets:.4f} lr {lr:.2e}")
        stop = bool(cfg.stop_after_steps) and step == cfg.stop_after_steps
        if i + 1 < len(steps) and (stop or mid_epoch_save_due(last_save, cfg.save_every_minutes, cluster)):
            now = time.perf_counter()
            done.seconds, start, last_save = done.seconds + now - start, now, now
            save(epoch - 1, step, done)
            if stop:
                bar.close()
                return None, step
    bar.close()
    totals = all_reduce_sum(torch.tensor([done.tokens, done.flops], dtype=torch.float64, device=cluster.device),
                            cluster).tolist()
    seconds = done.seconds + time.perf_counter() - start
    return EpochStats(done.loss_sum, done.targets, int(totals[0]), seconds, totals[1], len(sequences)), step


# ----------------------------------------------------------------------------------------------------
# Each epoch's micro-batches: the plain path, or batching.py's fast paths where the flags leave them on.

def epoch_sequences(examples: list[data.Example], epoch: int, cfg: TrainConfig) -> list[data.Example]:
    """What epoch `epoch` trains on: the examples the schedule admits, in data order; with --merge-nested
    (the default), each one that begins a longer one of its conversation is trained inside it."""
    chosen = [examples[i] for i in data.epoch_example_indices(examples, epoch, cfg.subtasks_per_epoch, cfg.schedule)]
    return batching.merge_nested_examples(chosen) if cfg.merge_nested else chosen


def epoch_micro_batches(sequences: list[data.Example], epoch: int, cfg: TrainConfig,
                        config: ModelConfig) -> list[list[int]]:
    """Micro-batches (indices into sequences) of similar length (data.plan_batches); with trunks, by task
    where that computes less (batching.plan_for_trunks). Either plan has the same number of micro-batches."""
    if cfg.trunks:
        return batching.plan_for_trunks(sequences, cfg.micro_batch_size, cfg.seed, epoch, config)
    return data.plan_batches(list(range(len(sequences))), [e.n_tokens for e in sequences], cfg.micro_batch_size,
                             cfg.seed, epoch)


def collate(batch: list[data.Example], pad_id: int, cfg: TrainConfig) -> data.Batch:
    return batching.collate_with_trunk(batch, pad_id) if cfg.trunks else data.collate(batch, pad_id)


def batch_train_flops(config: ModelConfig, adapter_weights: int, batch: list[data.Example], trunk: int = 0) -> float:
    """Model FLOPs of one micro-batch as the step runs it (model.train_flops, the one counting rule): each
    sequence's positions up to its last target (target_token_losses cuts the rest), the vocabulary
    projection at the targets only (with a trunk: batching.trunk_batch_train_flops). Padding and activation
    recomputation are not counted."""
    if trunk:
        return batching.trunk_batch_train_flops(config, adapter_weights, batch, trunk)
    return sum(train_flops(config, e.last_target + 1, e.n_targets, adapter_weights) for e in batch)


# ----------------------------------------------------------------------------------------------------
# The loss of the target tokens, summed over a step's micro-batches.

def accumulate_gradients(model, micro_batches: list[data.Batch], step_targets: int, device: torch.device,
                         precision: str) -> torch.Tensor:
    """Backward through each micro-batch with its loss divided by the step's total target tokens, so the
    summed gradients are those of the mean token loss over the step. Returns the summed token loss."""
    total = torch.zeros((), device=device)
    for ids, mask, trunk in micro_batches:
        if device.type == "cuda":  # a non_blocking copy overlaps with compute only from pinned host memory
            ids, mask = ids.pin_memory(), mask.pin_memory()
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
    target. With a `trunk` (batching.collate_with_trunk), the first trunk columns, the same in every row and
    predicting no target, run once (batching.run_trunk). Under activation checkpointing the (N, vocab) logits
    are recomputed too, LOSS_CHUNK targets at a time, so they never all exist at once (for Qwen2.5's 152k
    vocabulary, 1k targets take 1.5 GB)."""
    end = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 2  # one past the last target column
    ids, mask = ids[:, :end], mask[:, :end]
    cache = None
    if trunk:
        cache, ids, mask = batching.run_trunk(model, ids, trunk), ids[:, trunk:], mask[:, trunk:]
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


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32 (got {precision})")
    return precision


def autocast(device: torch.device, precision: str):
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)


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
        ids, mask, trunk = collate(batch, pad_id, cfg)
        with autocast(cluster.device, precision):
            losses, rows = target_token_losses(model, ids.to(cluster.device), mask.to(cluster.device), trunk)
        subtask_of_row = torch.tensor([e.subtask for e in batch], device=cluster.device)
        sums[:, 0].index_add_(0, subtask_of_row[rows], losses.double())
        sums[:, 1].index_add_(0, subtask_of_row[rows], torch.ones_like(losses, dtype=torch.float64))
    all_reduce_sum(sums, cluster)
    model.train()
    return {k: (sums[k, 0] / sums[k, 1]).item() for k in range(1, max_subtask + 1) if sums[k, 1] > 0}


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, learning rate.

def build_model(cfg: TrainConfig, device: torch.device, precision: str):
    """The frozen base (bf16 under bf16 training, to halve its memory) with a fresh fp32 adapter."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model_io.load_model(cfg.model, device=device, dtype=dtype)
    torch.manual_seed(cfg.seed)  # every rank starts from the same adapter initialisation
    lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, name=ADAPTER)
    if not cfg.plain:
        dropout_masks.use_fast_dropout(model)
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


def epoch_step_counts(examples, epochs: int, cfg: TrainConfig, world: int) -> list[int]:
    """Optimizer steps of each epoch, known up front because batch counts do not depend on shuffling."""
    per_step = cfg.grad_accum * world
    counts = []
    for epoch in range(1, epochs + 1):
        n = len(epoch_sequences(examples, epoch, cfg))
        counts.append(math.ceil(math.ceil(n / cfg.micro_batch_size) / per_step))
    return counts


def lr_cycles(step_counts: list[int], plans: list[data.EpochPlan], lr_schedule: str) -> list[tuple[int, int]]:
    """(first step, steps) of each learning-rate cycle. cosine: one cycle over the whole run. cosine-restarts:
    a new cycle (warmup, then cosine decay) each epoch in which the schedule adds sub-tasks, so the sub-tasks
    that enter last are not trained only near the minimum learning rate."""
    cycles, start = [], 0
    for epoch, (n, plan) in enumerate(zip(step_counts, plans)):
        if epoch == 0 or (lr_schedule == "cosine-restarts" and plan.max_subtask > plans[epoch - 1].max_subtask):
            cycles.append((start, 0))
        cycles[-1] = (cycles[-1][0], cycles[-1][1] + n)
        start += n
    return cycles


def cycle_learning_rate(step: int, cycles: list[tuple[int, int]], cfg: TrainConfig) -> float:
    """LR of 0-based optimizer step `step`: warmup and cosine decay within its cycle."""
    first, length = next((a, n) for a, n in reversed(cycles) if a <= step)
    return learning_rate(step - first, length, math.ceil(cfg.warmup_ratio * length), cfg.lr, cfg.min_lr_ratio)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the state file is the commit point; run_folder.py keeps the folder to one run.

def save_checkpoint(out_dir: Path, model, optimizer, state: dict, stopped: str | None = None) -> None:
    """The state file first: it is the commit point, holding the adapter tensors, the optimizer and the
    position in the run, so a crash at any later moment resumes from it. Then, at an epoch's end, the log
    (rewritten from the state's history, so it never runs ahead of the checkpoint) and the published adapter;
    a mid-epoch checkpoint leaves both to the last finished epoch."""
    state = dict(state, optimizer=optimizer.state_dict(),
                 adapter={n: p.detach().cpu() for n, p in trainable_parameters(model).items()})
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    if state["in_epoch"] is None:
        run_folder.write_log(out_dir, state["history"])
        run_folder.publish_adapter(out_dir, model, state["epoch"], state["run"]["epochs"], stopped)


def restore_checkpoint(state: dict, model, optimizer, cluster: Cluster
                       ) -> tuple[list[dict], int, list[dict] | None]:
    """The saved adapter, optimizer and RNG states; returns (history, optimizer steps done, every rank's
    EpochProgress in the unfinished epoch, or None after a finished one)."""
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    run_folder.restore_rng(state["rng"], cluster)
    return state["history"], state["step"], state.get("in_epoch")


# ----------------------------------------------------------------------------------------------------
# Configuration and data.

def prepare_data(cfg: TrainConfig, log, cluster: Cluster):
    """(trajectory file, tokenizer, examples, dev examples, epochs, the schedule's plan of each epoch)."""
    path = Path(cfg.data) if cfg.data else run_folder.collect_default_data(cluster)
    tokenizer = model_io.load_tokenizer(cfg.model)
    examples = load_role_examples(path, cfg.role, tokenizer, cfg.max_seq_len, log)
    dev = load_role_examples(cfg.dev_data, cfg.role, tokenizer, cfg.max_seq_len, log) if cfg.dev_data else []
    max_subtask = max(e.subtask for e in examples)
    epochs = cfg.epochs or data.epochs_to_cover(max_subtask, cfg.subtasks_per_epoch) + 1
    data.check_coverage(max_subtask, epochs, cfg.subtasks_per_epoch, cfg.schedule)
    plans = data.plan_schedule(examples, epochs, cfg.subtasks_per_epoch, cfg.schedule)
    log(f"{cfg.role}: {len(examples)} examples from {path}, sub-task indices 1..{max_subtask}")
    log(data.format_schedule(plans, cfg.schedule, cfg.subtasks_per_epoch))
    return path, tokenizer, examples, dev, epochs, plans


def load_role_examples(path: str | Path, role: str, tokenizer, max_seq_len: int, log) -> list[data.Example]:
    records = trajectories.read_trajectories(path)
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
# CLI.

def main(argv: list[str] | None = None) -> int:
    cfg = train_config.parse_args(argv)
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
