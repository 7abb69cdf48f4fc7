"""The core on its own, end to end: a tiny system trained with every fast path off (`prost.py --plain`) and
evaluated with every fast path off (`evaluate.py --plain`: agents.py's plain driver over model.generate, one task
at a time) gets what the fast paths give with their defaults: adapters equal up to fp32 reordering, the same
trajectories (all but what measures the engine: seconds, cached tokens, FLOPs computed) and the same metrics.

Both pipelines run as the command lines a user types, on the demo's tiny base, the gold trajectories of a few
train tasks and the first dev tasks of the mini-world. To stay small on 2 CPU cores one role is trained (the
planner) and its adapter serves every role, of the multi-agent system and of the single agent. Micro-batches of
4 x 8 accumulated hold every planner example of an epoch, so each epoch is one optimizer step either way (nested
examples merged or not, micro-batches planned by task or by length): the same mean token loss, summed in another
order.
"""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
import result_files
import trajectories
from conftest import run_child

BUDGETS = ["--max-subtasks", "2", "--max-executor-turns", "2", "--max-critic-retries", "1",
           "--max-format-retries", "1", "--max-single-turns", "3", "--max-new-tokens", "12", "--max-context", "1024"]
MEASURED = set(trajectories.MEASURED_CALL_FIELDS)


def train_and_evaluate(base, trajectory_file, world_root, out, plain: bool) -> dict:
    """prost.py, then evaluate.py on the multi-agent system and on the single agent, all with or all without
    --plain: {"log", "adapter", and per kind "results", "run" (run.json), "records"}."""
    flag = ["--plain"] if plain else []
    ckpts = out / "ckpts"
    run_child([sys.executable, "prost.py", "--model", str(base), "--role", "planner", "--data", str(trajectory_file),
               "--out", str(ckpts), "--epochs", "2", "--subtasks-per-epoch", "3", "--micro-batch-size", "4",
               "--grad-accum", "8", "--lr", "5e-3", "--lora-r", "4", "--lora-dropout", "0", "--max-seq-len", "2048",
               "--no-progress", *flag])
    for role in ("executor", "critic", "single"):  # the planner's adapter in every role
        shutil.copytree(ckpts / "planner", ckpts / role)
    found = {"log": [json.loads(line) for line in (ckpts / "planner" / "train_log.jsonl").read_text().splitlines()],
             "adapter": load_file(ckpts / "planner" / lora.ADAPTER_WEIGHTS)}
    for kind, system in (("multi", ["--agents", str(ckpts)]), ("single", ["--single", str(ckpts / "single")])):
        folder = out / kind
        run_child([sys.executable, "evaluate.py", *system, "--split", "dev", "--limit", "2", "--root", str(world_root),
                   "--out", str(folder), "--workers", "1", "--device", "cpu", "--quiet", *BUDGETS, *flag])
        found[kind] = {"results": json.loads((folder / result_files.RESULTS).read_text()),
                       "run": json.loads((folder / "run.json").read_text()),
                       "records": trajectories.read_trajectories(folder / result_files.TRAJECTORIES)}
    return found


def comparable(record: dict) -> dict:
    """A trajectory without what measures the engine, and without where the adapters were."""
    system = {**record["system"], "roles": {role: b["model"] for role, b in record["system"]["roles"].items()}}
    return {**record, "system": system,
            "calls": [{k: v for k, v in c.items() if k not in MEASURED} for c in record["calls"]]}


def test_plain_training_and_evaluation_equal_the_fast_paths(tiny_preset_model, gold_train, mini_world, tmp_path):
    few = tmp_path / "train.jsonl"  # the gold records (multi-agent and single-agent view) of 3 train tasks
    trajectories.write_trajectories(few, trajectories.read_trajectories(gold_train[1])[:6])
    fast = train_and_evaluate(tiny_preset_model, few, mini_world, tmp_path / "fast", plain=False)
    plain = train_and_evaluate(tiny_preset_model, few, mini_world, tmp_path / "plain", plain=True)

    # the paths really differ: the fast run merged nested examples, the plain one did not; the plain
    # evaluations ran agents.PlainEngine, the fast ones rollout.LocalEngine in deterministic mode
    assert sum(r["sequences"] for r in fast["log"]) < sum(r["examples"] for r in fast["log"])
    assert [r["examples"] for r in plain["log"]] == [r["sequences"] for r in plain["log"]]
    for kind in ("multi", "single"):
        assert set(plain[kind]["run"]["decode"].values()) == {"plain"}
        assert all(d["deterministic"] for d in fast[kind]["run"]["decode"].values())

    # training: one step per epoch, the same losses, adapters equal up to fp32 reordering (AdamW divides each
    # gradient element by its own running size, so an element with a small gradient carries the reordering
    # into its update at full size: bounded here by a fiftieth of one step's update, the learning rate)
    assert [r["step"] for r in fast["log"]] == [r["step"] for r in plain["log"]] == [1, 2]
    for f, p in zip(fast["log"], plain["log"]):
        assert f["target_tokens"] == p["target_tokens"]
        assert f["train_loss"] == pytest.approx(p["train_loss"], rel=1e-5)
    assert fast["adapter"].keys() == plain["adapter"].keys()
    for k in fast["adapter"]:
        torch.testing.assert_close(plain["adapter"][k], fast["adapter"][k], rtol=1e-4, atol=5e-3 / 50)

    # evaluation: the same trajectories, hence the same metrics (TGC, SGC, sub-task errors, FLOPs per task)
    for kind in ("multi", "single"):
        assert [comparable(r) for r in plain[kind]["records"]] == [comparable(r) for r in fast[kind]["records"]]
        assert plain[kind]["results"]["metrics"] == fast[kind]["results"]["metrics"]
        assert len(plain[kind]["records"]) == 2 and plain[kind]["results"]["metrics"]["flops_per_task"] > 0
    assert sum(len(r["calls"]) for r in plain["single"]["records"]) == 2 * 3  # every turn of --max-single-turns
