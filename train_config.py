"""train_config.py: every knob of a prost.py training run, its command-line flag, and the checks on it.

Where this sits: beside prost.py, whose loop reads a TrainConfig. Each field is declared once with its default
and its help text (`knob`), and the command line is built from the fields (`parse_args`): --the-name, or
--no-the-name for a switch that is on by default. `check_config` refuses a bad value with the flag's name before
anything loads. run_folder.py compares the fields that change what is trained when a run resumes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import trajectories
from data import SCHEDULES

LR_SCHEDULES = ("cosine", "cosine-restarts")


def knob(default, help: str, **flag):
    """A TrainConfig field and its command-line flag: --the-name, or --no-the-name for a bool that is on."""
    return field(default=default, metadata=dict(help=help, **flag))


@dataclass
class TrainConfig:
    """Every knob of a run; defaults suit Qwen2.5-1.5B on one 80 GB GPU."""
    model: str = knob("Qwen/Qwen2.5-1.5B", "base model: Hugging Face id or local folder")
    role: str = knob("planner", f"role to train: one of {', '.join(trajectories.ROLES)}")
    data: str | None = knob(None, "training trajectories (JSONL); without it, the mini-world's gold-teacher "
                            "trajectories, built and collected into trajectories/train.jsonl on first use")
    dev_data: str | None = knob(None, "dev trajectories for the per-sub-task dev loss")
    out: str = knob("ckpts", "output root; the run goes to OUT/ROLE/")
    schedule: str = knob("progressive", "progressive: add sub-tasks epoch by epoch; full: every sub-task every "
                         "epoch (SFT)", choices=SCHEDULES)
    subtasks_per_epoch: int = knob(1, "sub-task indices the progressive schedule adds per epoch")
    epochs: int = knob(0, "epochs (0: until the schedule covers every sub-task, plus one)")
    micro_batch_size: int = knob(4, "sequences per forward pass")
    grad_accum: int = knob(4, "micro-batches per optimizer step and process (global batch = this x micro x "
                           "processes)")
    max_seq_len: int = knob(4096, "longer examples are fitted by shortening old outputs, oldest first, as rollouts "
                            "do (and reported); set it to the evaluation's --max-context to train on what roles see")
    lr: float = knob(2e-4, "peak learning rate")
    lr_schedule: str = knob("cosine", "cosine: one warmup and cosine decay over the whole run; cosine-restarts: "
                            "warmup and decay restarted each epoch in which the progressive schedule adds "
                            "sub-tasks", choices=LR_SCHEDULES)
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of --lr")
    warmup_ratio: float = knob(0.03, "fraction of steps warming up")
    weight_decay: float = knob(0.01, "AdamW decay on adapter matrices")
    grad_clip: float = knob(1.0, "max global gradient norm")
    lora_r: int = knob(16, "adapter rank")
    lora_alpha: float = knob(32.0, "adapter scale numerator (alpha/r)")
    lora_dropout: float = knob(0.05, "dropout on the adapter input")
    precision: str = knob("auto", "auto: bf16 autocast on CUDA (fp32 adapter and optimizer), fp32 on CPU",
                          choices=("auto", "bf16", "fp32"))
    device: str = knob("auto", "auto, cpu or cuda (under torchrun: the local GPU)")
    seed: int = knob(0, "seed for adapter init, data order and dropout")
    resume: bool = knob(False, "continue the run saved in OUT/ROLE/")
    stop_after_epochs: int = knob(0, "stop after this epoch as if interrupted (0: run to the end); resume with "
                                  "--resume")
    stop_after_steps: int = knob(0, "stop after this many optimizer steps in all, as if interrupted (mid-epoch: "
                                 "after saving a mid-epoch checkpoint; 0: run to the end); resume with --resume")
    save_every_minutes: float = knob(10.0, "save a mid-epoch checkpoint this often, so a killed run loses at most "
                                     "this much work (0: only at each epoch's end)")
    peak_tflops: float = knob(0.0, "GPU peak bf16 TFLOP/s for MFU (0: look up the GPU name in meter.PEAK_TFLOPS)")
    progress: bool = knob(True, "no progress bar")
    merge_nested: bool = knob(True, "train every example as its own sequence, even one whose tokens begin a "
                              "longer example of the same conversation (the same loss terms, more tokens and steps)")
    trunks: bool = knob(True, "compute each row of a micro-batch in full, with micro-batches planned by length "
                        "alone (the same loss terms, more tokens)")
    plain: bool = knob(False, "every training fast path off: --no-merge-nested --no-trunks, textbook adapter "
                       "dropout and no --compile (the plain loop the fast paths are tested against)")
    checkpoint_activations: bool = knob(False, "keep only each decoder block's input and recompute the block in "
                                        "the backward pass (less activation memory, one more forward; the same "
                                        "losses and gradients)")
    compile: bool = knob(False, "torch.compile each decoder block")
    dry_run: bool = knob(False, "print the memory estimate of a micro-batch of --max-seq-len rows on this device "
                         "(memory_estimate.py) and exit")


def check_config(cfg: TrainConfig) -> None:
    if cfg.role not in trajectories.ROLES:
        raise ValueError(f"unknown role '{cfg.role}' (expected one of {', '.join(trajectories.ROLES)})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {cfg.lr_schedule})")
    for name in ("subtasks_per_epoch", "micro_batch_size", "grad_accum", "lora_r"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("epochs", "stop_after_epochs", "stop_after_steps", "save_every_minutes", "weight_decay",
                 "lora_dropout", "warmup_ratio", "min_lr_ratio"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative (got {getattr(cfg, name)})")
    if cfg.max_seq_len < 2 or cfg.lr <= 0 or cfg.grad_clip <= 0:
        raise ValueError("--max-seq-len must be at least 2, and --lr and --grad-clip positive")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description="Train one ProST role as a LoRA adapter on teacher trajectories "
                                            "with progressive sub-task training (writes OUT/ROLE/).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument("--no-" + flag[2:] if f.default else flag, dest=f.name, default=f.default,
                           action="store_false" if f.default else "store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, default=f.default, type={"int": int, "float": float}.get(f.type, str), **f.metadata)
    return TrainConfig(**vars(p.parse_args(argv)))
