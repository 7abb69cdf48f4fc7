"""Processes and devices: which rank this process is, which device it computes on, and the few collectives
that training and evaluation use (gathers, barriers, and training's sums of gradients and counts).

Both `prost.py` (training one role) and `evaluate.py` (rolling out a split) run as one process per device
under torchrun: every process joins the process group here, works on its own share (micro-batches, tasks),
and meets the others at barriers. Alone (no torchrun), a process is rank 0 of a world of 1 and no collective
does any communication. A process that launches runs of its own (gpu_check.py, the tests) gives them
`child_env()`, so that they never join the launcher's group.

    torchrun --nproc_per_node 8 prost.py ...       # nccl between GPUs, gloo between CPU processes
    torchrun --nproc_per_node 2 evaluate.py ...    # gloo: evaluation only exchanges small objects
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist


# How long a rank waits for the others at a collective. Rank 0 alone builds the default data (the mini-world and
# its gold trajectories) while the other ranks wait at a barrier, which can outlast nccl's 10-minute default.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_cluster(device_flag: str = "auto", backend: str | None = None,
                  timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> Cluster:
    """This process's rank and device; under torchrun (WORLD_SIZE > 1) it joins the process group.

    device_flag: auto (this rank's GPU when CUDA is there, else the CPU), cpu or cuda (this rank's GPU,
    LOCAL_RANK). backend: None picks nccl between GPUs and gloo between CPU processes. nccl gets the rank's
    device (`device_id`: the communicator is made now, on the right GPU, instead of at the first collective on
    a device guessed from the rank)."""
    if device_flag not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda (got {device_flag}); under torchrun each process "
                         f"takes the GPU of its LOCAL_RANK")
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this torch sees no CUDA device; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} would compute on cuda:{local_rank}, but this machine shows "
                             f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per "
                             f"node (torchrun --nproc-per-node), or pass --device cpu")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        join_process_group(device, backend, timeout)
    return Cluster(rank, world, device)


def join_process_group(device: torch.device, backend: str | None = None,
                       timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> None:
    """Join torchrun's process group from this rank's device (backend None: nccl on a GPU, gloo on the CPU)."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timeout, **({"device_id": device} if backend == "nccl" else {}))


def stop_cluster(cluster: Cluster) -> None:
    if cluster.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a command line run with `code`. A torchrun rank skips the interpreter's shutdown (os._exit, after
    flushing its output): torch's gloo worker threads drop a collective's tensors a moment after the
    collective has returned, dropping a tensor takes the GIL, and when that moment falls inside the shutdown
    the thread dies inside a destructor and the whole rank aborts (SIGABRT at exit in 4 of 49 runs of
    gpu_check's two-rank check, torch 2.13). Every file a run writes is closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def barrier(cluster: Cluster) -> None:
    if cluster.world > 1:
        dist.barrier()


def gather(cluster: Cluster, obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if cluster.world == 1:
        return [obj]
    out = [None] * cluster.world
    dist.all_gather_object(out, obj)
    return out


def first_error(cluster: Cluster, error: str | None) -> str | None:
    """The first rank's error message, on every rank, so that all ranks stop together."""
    return next((e for e in gather(cluster, error) if e), None)


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
    """values summed over ranks, in place (alone: unchanged)."""
    if cluster.world > 1:
        dist.all_reduce(values)
    return values


# Variables a launcher (torchrun, SLURM, an IDE) may have left in this process's environment.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                      "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child run on this machine (a torchrun launch, a CLI): it must start a run of its
    own, never join the caller's. One intra-op thread per process, because two ranks that each spawn a thread
    per core of a small CPU starve their own gloo heartbeats; and gloo over loopback, so the run does not
    depend on what address the host name resolves to."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env
