"""A training run's folder (`OUT/ROLE/`): what identifies the run, the refusals that keep two runs apart, what
a checkpoint holds, the files published beside it, and every rank's random state.

Where this sits in ProST: prost.py's loop writes a checkpoint after every epoch, and every few minutes within
one (its state file is the commit point), and resumes from one; this file is the machinery around that idea,
over store.py's rules for files (atomic writes, one writer, identities, progress records). `open_run` refuses
a folder holding another run (`training_identity`: the settings that change what is trained, the base model
and the data by content) or this run without `--resume`, and records a new run's identity; `checkpoint_state`
is what a state file holds (with an unfinished epoch's running totals, `EpochProgress`); `publish_adapter`
writes the PEFT-layout adapter and progress.json (which epoch of how many it is from); `rng_states` lets a
resumed run continue bit-exactly; `collect_default_data` is what trains without `--data`.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import adapter_checks
import lora
import store
from cluster import Cluster, all_reduce_sum, barrier, gather
from model import ModelConfig
from model_io import fingerprint, resolve_model_dir
from store import atomic_write

ADAPTER = "default"  # the adapter's name inside the model; the folder is what agents.py loads
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
RUN_FILE = store.IDENTITY_FILE
DEFAULT_DATA = Path(__file__).resolve().parent / "trajectories" / "train.jsonl"
# TrainConfig fields that do not change what is trained; every other one must match to resume a run (model and
# data are known by content instead).
NOT_IDENTITY = {"model", "data", "dev_data", "out", "device", "resume", "stop_after_epochs", "stop_after_steps",
                "save_every_minutes", "peak_tflops", "progress", "checkpoint_activations", "compile", "dry_run"}


# ----------------------------------------------------------------------------------------------------
# Identity.

def training_identity(cfg, data_path: Path, epochs: int, world: int) -> dict:
    """What defines a run: a checkpoint only resumes under the same identity. The base model and the data
    count by content (a moved folder still resumes); where they were is recorded, not compared."""
    identity = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IDENTITY}
    identity.update(model_sha256=fingerprint(cfg.model), epochs=epochs, data_sha256=store.file_sha256(data_path),
                    world_size=world)
    identity[store.PATHS] = {"model": cfg.model, "data": str(data_path)}
    return identity


def examples_fingerprint(examples) -> str:
    """Identifies the rendered examples, so a resumed run knows it sees the same data in the same order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.name, e.ids, e.mask]).encode())
    return digest.hexdigest()


def open_run(out_dir: Path, cfg, cluster: Cluster, data_path: Path, examples, epochs: int
             ) -> tuple[dict, dict | None, str]:
    """(identity, saved state or None, examples fingerprint) of the run in out_dir; a new run records its
    identity there. Refuses a folder holding another run, or this run's data rendered differently."""
    identity = training_identity(cfg, data_path, epochs, cluster.world)
    saved = read_checkpoint(out_dir, identity, cfg.resume)
    examples_sha256 = examples_fingerprint(examples)
    if saved is not None and saved["data_order"]["examples_sha256"] != examples_sha256:
        raise ValueError(f"{data_path} renders into different examples than when the run in {out_dir} "
                         f"started (tokenizer changed?); choose another --out")
    barrier(cluster)  # every rank has checked the folder before rank 0 writes into it
    if cluster.is_main and saved is None:
        store.write_identity(out_dir, identity)
        store.write_progress(out_dir, epoch=0, epochs=epochs, adapter_sha256=None)
    return identity, saved, examples_sha256


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
        adapter_checks.check_finite(state["adapter"], str(state_path))
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


def checkpoint_bytes(model: str, lora_r: int) -> int:
    """About what one checkpoint takes on disk: the fp32 adapter in the PEFT file and again in the state
    file, AdamW's two fp32 moments, and 1 MiB for the log, RNG states and JSON files."""
    config = ModelConfig.from_hf(resolve_model_dir(model))
    return 4 * 4 * lora.count_adapter_parameters(config, lora_r) + (1 << 20)


# ----------------------------------------------------------------------------------------------------
# What a checkpoint's state file holds, at an epoch's end or within an epoch.

@dataclass
class EpochProgress:
    """An epoch's running totals after its first `steps` optimizer steps; a mid-epoch checkpoint holds them."""
    steps: int = 0
    loss_sum: float = 0.0  # all ranks
    targets: int = 0  # all ranks
    tokens: int = 0  # this rank's
    flops: float = 0.0  # this rank's
    seconds: float = 0.0


def checkpoint_state(identity: dict, epoch: int, step: int, lr_cycles: list, seed: int, examples_sha256: str,
                     history: list[dict], progress: EpochProgress | None, cluster: Cluster) -> dict:
    """The state after `epoch` finished epochs and `step` optimizer steps, `progress` into the next epoch if
    given (adapter and optimizer are added by prost.save_checkpoint). Every rank gathers its RNG states and
    totals; call it on all ranks."""
    return {"run": identity, "epoch": epoch, "step": step, "scheduler": {"step": step, "lr_cycles": lr_cycles},
            "data_order": {"seed": seed, "examples_sha256": examples_sha256},
            "rng": rng_states(cluster), "history": history,
            "in_epoch": gather(cluster, asdict(progress)) if progress else None}


def mid_epoch_save_due(last_save: float, every_minutes: float, cluster: Cluster) -> bool:
    """`every_minutes` have passed since `last_save` (a perf_counter time) by the main rank's clock: all ranks
    must agree, since saving gathers their states."""
    due = bool(every_minutes) and time.perf_counter() - last_save >= 60 * every_minutes
    if cluster.world > 1:
        flag = torch.tensor([float(due and cluster.is_main)], device=cluster.device)
        due = all_reduce_sum(flag, cluster).item() > 0
    return due


# ----------------------------------------------------------------------------------------------------
# Files published beside the state file.

def write_log(out_dir: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(out_dir / LOG_FILE, text)


def publish_adapter(out_dir: Path, model, epoch: int, epochs: int, stopped: str | None = None) -> None:
    """The adapter in PEFT layout (what agents.py and evaluate.py load), then progress.json tying its content
    hash to the epoch it is from. Until progress.json is written, the hashes differ and evaluate.py knows the
    adapter files are not (yet) those of a checkpoint."""
    lora.save_adapter(model, out_dir, ADAPTER)
    store.write_progress(out_dir, epoch=epoch, epochs=epochs, stopped=stopped,
                         adapter_sha256=store.files_sha256(out_dir, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]))


def republish(out_dir: Path, saved: dict, model, epochs: int, cluster: Cluster, log) -> None:
    """After a resume: the log and adapter files may lag the state if a crash came right after it. A mid-epoch
    state's adapter is not an epoch's: the files published at the last epoch's end stay."""
    if saved.get("in_epoch"):
        log(f"resuming {out_dir} in epoch {saved['epoch'] + 1}, after step {saved['step']}")
        return
    log(f"resuming {out_dir} after epoch {saved['epoch']} (step {saved['step']})")
    if cluster.is_main:
        write_log(out_dir, saved["history"])
        publish_adapter(out_dir, model, saved["epoch"], epochs)
    if saved["epoch"] >= epochs:
        log(f"{out_dir} already finished all {epochs} epochs")


def mark_diverged(out_dir: Path, cluster: Cluster, good_epochs: int, epochs: int, epoch: int) -> None:
    """progress.json says the run stopped; the published adapter stays that of the last good epoch."""
    if cluster.is_main and good_epochs:
        progress = store.read_progress(out_dir)
        store.write_progress(out_dir, epoch=good_epochs, epochs=epochs, adapter_sha256=progress["adapter_sha256"],
                             stopped=f"diverged: non-finite loss or gradient in epoch {epoch}")


# ----------------------------------------------------------------------------------------------------
# Random state.

def rng_states(cluster: Cluster) -> list[dict]:
    """Every rank's RNG states (dropout draws differ per rank), gathered on all ranks."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(cluster.device) if cluster.device.type == "cuda" else None}
    return gather(cluster, mine)


def restore_rng(states: list[dict], cluster: Cluster) -> None:
    """This rank's RNG states, when the run saved them for as many ranks as it has now. A run saved on CUDA and
    resumed on the CPU (or the reverse) restores the CPU generator only: its dropout draws then come from another
    generator than the saved run's, so it continues correctly but not bit-identically, and says so."""
    if len(states) != cluster.world:
        return
    mine = states[cluster.rank]
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    on_cuda = cluster.device.type == "cuda"
    if mine["cuda"] is not None and on_cuda:
        torch.cuda.set_rng_state(mine["cuda"], cluster.device)
    elif (mine["cuda"] is not None) != on_cuda and cluster.is_main:
        saved, now = ("CUDA", "the CPU") if mine["cuda"] is not None else ("the CPU", "CUDA")
        print(f"resuming on {now} a run saved on {saved}: dropout draws continue from another generator, so the "
              f"run continues correctly but not bit-identically to one that stayed on {saved}")


# ----------------------------------------------------------------------------------------------------
# The default data.

def collect_default_data(cluster: Cluster) -> Path:
    """The data used when --data is not given: the mini-world's train split replayed by the gold teacher.

    Rank 0 builds the mini-world if it is missing and collects into trajectories/train.jsonl; the
    collection resumes from that file, so a second run costs only the check. Other ranks wait for it.
    """
    if cluster.is_main:
        import agents  # only the default-data path needs the agents and the world
        import miniworld
        import rollout
        import world
        if not (world.world_root() / "data" / "datasets" / "train.txt").is_file():
            print(f"no --data: building the mini-world in {world.world_root()}")
            miniworld.build_world(world.world_root())
        print(f"no --data: collecting gold-teacher trajectories of the train split into {DEFAULT_DATA}")
        DEFAULT_DATA.parent.mkdir(parents=True, exist_ok=True)
        summary = rollout.collect(rollout.teacher_system("gold"), "train", DEFAULT_DATA, agents.Budgets())
        if summary.failed:
            raise ValueError(f"gold-teacher trajectories failed evaluation for {', '.join(summary.failed)}; "
                             f"rebuild the mini-world with `python miniworld.py build`")
    barrier(cluster)
    return DEFAULT_DATA
