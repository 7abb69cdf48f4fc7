"""What a training run measures and how it reports it: the progress bar, peak memory, model FLOPs
utilisation against the device's peak, the machine it ran on (evaluation names it too), and each epoch's log
record and line.

Where this sits in ProST: prost.py's loop counts the tokens, target tokens, FLOPs and seconds of every epoch
(model.train_flops is the one counting rule); this file turns them into train_log.jsonl's records and the
printed lines. Nothing here changes what is trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s of common training GPUs (NVIDIA's datasheets, without sparsity), for MFU, by the exact
# name torch.cuda.get_device_name reports: variants of one chip differ (an H100 PCIe runs at 3/4 of an SXM's peak),
# so a name not listed gets no MFU rather than a neighbour's figure (give it with --peak-tflops).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A10G": 125.0,
    "NVIDIA L4": 121.0,
}


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


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, and whether it has AMX (bf16 matrix tiles)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{names[0] if names else 'unknown CPU'}, {'with' if 'amx_bf16' in flags.split() else 'without'} AMX"


def machine(device: torch.device) -> str:
    """What a timing was measured on, to be named next to it: the GPU, or the CPU and torch's thread count (the
    same code runs at very different speeds on the CPUs we use)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


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
    GPU's dense bf16 peak by its exact name, else None (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = PEAK_TFLOPS.get(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def model_flops_utilisation(stats, peak: float | None, world: int) -> float | None:
    """Model FLOPs per second of an epoch (prost.EpochStats) as a share of the devices' peak (None: unknown)."""
    return stats.flops / stats.seconds / (peak * world) if peak else None


def epoch_record(epoch: int, step: int, plan, stats, dev: dict[int, float], lr: float, mfu: float | None,
                 device: torch.device) -> dict:
    """One line of train_log.jsonl: the epoch's schedule (data.EpochPlan), what it ran (prost.EpochStats), the
    dev loss per sub-task, the learning rate of its last step, MFU, peak memory and the machine it ran on."""
    dev_by_subtask = {str(k): round(v, 6) for k, v in dev.items()}  # JSON keys are strings
    return {"epoch": epoch, "step": step, "max_subtask": plan.max_subtask, "examples": plan.n_examples,
            "sequences": stats.sequences, "examples_per_s": plan.n_examples / stats.seconds, "lr": lr,
            "train_loss": stats.loss_sum / stats.targets, "dev_loss_by_subtask": dev_by_subtask,
            "tokens": stats.tokens, "target_tokens": stats.targets,
            "tokens_per_s": stats.tokens / stats.seconds, "target_tokens_per_s": stats.targets / stats.seconds,
            "mfu": mfu, "peak_memory_gb": peak_memory_gb(device), "seconds": stats.seconds, "machine": machine(device)}


def describe_epoch(record: dict, epochs: int) -> str:
    """The printed line of an epoch record."""
    dev = " ".join(f"{k}:{v:.3f}" for k, v in record["dev_loss_by_subtask"].items())
    mfu = f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
    return (f"epoch {record['epoch']}/{epochs} (sub-tasks 1..{record['max_subtask']}, {record['examples']} "
            f"examples in {record['sequences']} sequences): train loss {record['train_loss']:.4f}"
            + (f" | dev loss by sub-task {dev}" if dev else "")
            + f" | {record['tokens_per_s']:,.0f} tokens/s, {record['target_tokens_per_s']:,.0f} target "
            f"tokens/s{mfu} | peak memory {record['peak_memory_gb']:.2f} GB")
