"""Tests for prost.py: the training loop of one role.

A tiny random Qwen2 checkpoint made by transformers (tests/conftest.py) is the base model; trajectories
are synthetic (tests/test_data.py). References are independent of the loop: transformers' logits for the
loss, hand-computed learning rates, an uninterrupted run for resume, a single process for DDP.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import batching
import data
import prost
import run_folder
import store
import train_config
import trajectories
import world
from conftest import assert_reordered_sums_close, build_hf_checkpoint, cpu_model_name, run_child, torchrun
from model import ModelConfig, Tokenizer, Transformer
from test_data import conversation_calls, synthetic_trajectory

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint folder, the transformers model that wrote it)."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("base"), "qwen2", tie=True, seed=3)


@pytest.fixture(scope="module")
def trajectory_file(tmp_path_factory):
    """Two tasks with 2 and 3 sub-tasks: the planner has sub-task indices 1..4 (4 = 'finished')."""
    path = tmp_path_factory.mktemp("traj") / "train.jsonl"
    trajectories.write_trajectory(path, synthetic_trajectory("a", n_subtasks=2))
    trajectories.write_trajectory(path, synthetic_trajectory("b", n_subtasks=3, recovery_at=3))
    return path


def config(base, trajectory_file, out, **overrides):
    settings = dict(model=str(base[0]), role="planner", data=str(trajectory_file), out=str(out), epochs=4,
                    micro_batch_size=2, grad_accum=2, lr=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    progress=False)
    settings.update(overrides)
    return train_config.TrainConfig(**settings)


def adapter_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "adapter_model.safetensors")


def log_records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# The loss.


@pytest.mark.parametrize("with_trunk", [False, True])
def test_target_token_losses_match_transformers_logits(base, trajectory_file, with_trunk, monkeypatch):
    """With a shared trunk, the rows' common prefix runs once and each row continues it; the reference is
    transformers on each full row."""
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)  # the synthetic executor conversations share a short prefix
    monkeypatch.setattr("trunk.ATTENTION_BLOCK", 5)  # rows attend in several blocks of queries (attend_after)
    ckpt, hf_model = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    examples, _ = data.build_examples(trajectories.read_trajectories(trajectory_file), "executor", tokenizer, 10_000)
    collate = batching.collate_with_trunk if with_trunk else data.collate
    ids, mask, trunk = collate(examples[:3], tokenizer.pad_id)
    assert (trunk >= 4) == with_trunk
    model = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        losses, rows = prost.target_token_losses(model, ids, mask, trunk)
        logits = hf_model(ids).logits  # (B, T, V), every position
    expected = F.cross_entropy(logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]], reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    assert rows.tolist() == [r for r, e in enumerate(examples[:3]) for _ in range(e.n_targets)]


def test_learning_rate_warmup_then_cosine_by_hand():
    lr = [prost.learning_rate(s, total_steps=10, warmup_steps=2, peak=1.0, min_ratio=0.1) for s in range(11)]
    assert lr[:2] == [0.5, 1.0]
    assert lr[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert lr[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr[10] == pytest.approx(0.1)


def test_cosine_restarts_restart_warmup_and_decay_when_subtasks_enter():
    plans = [data.EpochPlan(e, k, 0, 0, 0) for e, k in enumerate([1, 2, 3, 3], start=1)]
    counts = [2, 3, 4, 5]  # optimizer steps per epoch
    assert prost.lr_cycles(counts, plans, "cosine") == [(0, 14)]
    assert prost.lr_cycles(counts, plans, "cosine-restarts") == [(0, 2), (2, 3), (5, 9)]  # epoch 4 adds nothing
    cfg = train_config.TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_ratio=0.25)
    cycles = [(0, 2), (2, 3), (5, 9)]
    lrs = [prost.cycle_learning_rate(s, cycles, cfg) for s in range(14)]

    def cosine(progress):
        return 0.5 * (1 + math.cos(math.pi * progress))

    # by hand: each cycle warms up for ceil(0.25 n) steps (1, 1, 3), then decays over the rest of it
    expected = [1.0, cosine(0)] + [1.0, cosine(0), cosine(1 / 2)] + [1 / 3, 2 / 3, 1.0] + [
        cosine(i / 6) for i in range(6)]
    assert lrs == pytest.approx(expected)


def test_grad_accumulation_1x8_equals_4x2(base, trajectory_file):
    """One micro-batch of 8 and four of 2 give the same gradient of the mean token loss (padding differs)."""
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    examples, _ = data.build_examples(trajectories.read_trajectories(trajectory_file), "planner", tokenizer, 10_000)
    examples = examples[:8]
    step_targets = sum(e.n_targets for e in examples)
    cfg = train_config.TrainConfig(model=str(ckpt), lora_r=4, lora_dropout=0.0)
    model = prost.build_model(cfg, torch.device("cpu"), "fp32")
    params = list(prost.trainable_parameters(model).values())
    with torch.no_grad():  # B starts at zero; give it values so every adapter gradient is non-trivial
        for p in params:
            p.normal_(0.0, 0.05)

    def gradients(split):
        model.zero_grad(set_to_none=True)
        batches = [data.collate(examples[i:i + split], tokenizer.pad_id) for i in range(0, 8, split)]
        total = prost.accumulate_gradients(model, batches, step_targets, torch.device("cpu"), "fp32")
        return total, [p.grad.clone() for p in params]

    total_1x8, grads_1x8 = gradients(8)
    total_4x2, grads_4x2 = gradients(2)
    torch.testing.assert_close(total_4x2, total_1x8, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_4x2, grads_1x8):
        assert_reordered_sums_close(a, b, sum(e.n_tokens for e in examples))
    assert all(g.abs().sum() > 0 for g in grads_1x8)


def single_agent_record(task_id: str) -> dict:
    turns = [(1, "plan: look up", "obs 1", True), (1, "```python\nx\n```", "obs 2", True),
             (2, "wrong", "Error", False), (2, "right", "obs 3", True), (3, "finish", None, True)]
    record = synthetic_trajectory(task_id)
    record.update(calls=conversation_calls("single", 0, "You act.", f"Task {task_id}", turns),
                  system={"kind": "single", "teacher": "gold", "roles": {"single": {"model": "m", "adapter": None}},
                          "budgets": {}})
    return record


def random_adapter_model(ckpt, dropout=0.0):
    """fp32 model with a randomised adapter (B starts at zero: give every adapter gradient a value)."""
    model = prost.build_model(train_config.TrainConfig(model=str(ckpt), lora_r=4, lora_dropout=dropout),
                              torch.device("cpu"), "fp32")
    params = list(prost.trainable_parameters(model).values())
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.05)
    return model.train(), params


def step_gradients(model, params, micro_batches, step_targets):
    model.zero_grad(set_to_none=True)
    total = prost.accumulate_gradients(model, micro_batches, step_targets, torch.device("cpu"), "fp32")
    return total, [p.grad.clone() for p in params]


@pytest.mark.parametrize("role", ["planner", "single"])
def test_merged_nested_examples_give_the_separate_examples_gradient(base, role):
    """The reference is the separate examples, one per micro-batch (no padding): the merged sequences must
    give the same summed token loss and the same gradient of the step's mean token loss."""
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    records = ([synthetic_trajectory("a", n_subtasks=2), synthetic_trajectory("b", n_subtasks=3)]
               if role == "planner" else [single_agent_record("a"), single_agent_record("b")])
    examples, _ = data.build_examples(records, role, tokenizer, 10_000)
    merged = batching.merge_nested_examples(examples)
    assert len(merged) == 2 < len(examples)
    assert sum(e.n_tokens for e in merged) < sum(e.n_tokens for e in examples)
    step_targets = sum(e.n_targets for e in examples)
    model, params = random_adapter_model(ckpt)
    separate = step_gradients(model, params, [data.collate([e], tokenizer.pad_id) for e in examples], step_targets)
    batch = batching.collate_with_trunk(merged, tokenizer.pad_id)
    together = step_gradients(model, params, [batch], step_targets)
    n_terms = sum(e.n_tokens for e in examples)
    torch.testing.assert_close(together[0], separate[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(together[1], separate[1]):
        assert_reordered_sums_close(a, b, n_terms)
    assert all(g.abs().sum() > 0 for g in separate[1])
    # The tolerance still sees a real difference: one target of the merged sequences masked out.
    row, position = batch.mask.nonzero()[-1].tolist()
    broken_mask = batch.mask.clone()
    broken_mask[row, position] = 0
    broken = step_gradients(model, params, [batch._replace(mask=broken_mask)], step_targets)
    with pytest.raises(AssertionError):
        for a, b in zip(broken[1], separate[1]):
            assert_reordered_sums_close(a, b, n_terms)


@pytest.mark.parametrize("role", ["executor", "critic"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_trunk_gradient_equals_the_separate_examples(base, role, checkpointing, monkeypatch):
    """A micro-batch of one task's examples computes their common prefix once (trunk.SharedTrunk) and every
    row attends to its keys and values; the reference is each example alone, one per micro-batch (no
    padding, no trunk): the same summed token loss and the same gradient of the step's mean token loss."""
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)  # the synthetic conversations share a short system prompt
    monkeypatch.setattr("trunk.ATTENTION_BLOCK", 5)  # rows attend in several blocks of queries (attend_after)
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    records = [synthetic_trajectory("a", n_subtasks=3), synthetic_trajectory("b", n_subtasks=2, recovery_at=1)]
    examples, _ = data.build_examples(records, role, tokenizer, 10_000)
    by_task = [[e for e in examples if e.task_id == task] for task in ("a", "b")]
    batches = [batching.collate_with_trunk(group, tokenizer.pad_id) for group in by_task]
    assert all(b.trunk >= 4 for b in batches) and all(len(group) >= 2 for group in by_task)
    step_targets = sum(e.n_targets for e in examples)
    model, params = random_adapter_model(ckpt)
    separate = step_gradients(model, params, [data.collate([e], tokenizer.pad_id) for e in examples], step_targets)
    model.checkpoint_blocks = checkpointing
    together = step_gradients(model, params, batches, step_targets)
    torch.testing.assert_close(together[0], separate[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(together[1], separate[1]):
        assert_reordered_sums_close(a, b, sum(e.n_tokens for e in examples))
    assert all(g.abs().sum() > 0 for g in separate[1])


def test_micro_batches_keep_tasks_together_only_where_that_computes_less(base):
    """Two tasks of two examples each. When a task's examples share a long prefix, pairing them by task (one
    trunk each) beats pairing by length, padding included; when they share nothing, pairing by length (less
    padding) wins. With trunks off, the plan is by length."""
    config = ModelConfig.from_hf(base[0])
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()

    def example(task, ids):
        return data.Example(task, "executor", len(ids), 1, ids, [0] * (len(ids) - 4) + [1] * 4)
    prefix = {"a": tokens(60), "b": tokens(60)}
    sharing = [example("a", prefix["a"] + tokens(40)), example("b", prefix["b"] + tokens(38)),
               example("a", prefix["a"] + tokens(10)), example("b", prefix["b"] + tokens(12))]
    differing = [example("a", tokens(200)), example("b", tokens(190)), example("a", tokens(20)),
                 example("b", tokens(25))]
    cfg = train_config.TrainConfig(model=str(base[0]), micro_batch_size=2)
    for sequences, by_task in ((sharing, True), (differing, False)):
        lengths, indices = [e.n_tokens for e in sequences], list(range(4))
        plan = prost.epoch_micro_batches(sequences, 1, cfg, config)
        by_length = data.plan_batches(indices, lengths, 2, cfg.seed, 1)
        grouped = batching.plan_batches_by_task(indices, lengths, 2, cfg.seed, 1, [e.task_id for e in sequences])
        assert plan == (grouped if by_task else by_length)
        assert grouped != by_length  # the two plans differ: a real choice
        assert prost.epoch_micro_batches(sequences, 1, train_config.TrainConfig(model=str(base[0]), micro_batch_size=2,
                                                                         trunks=False), config) == by_length
    by_task = prost.epoch_micro_batches(sharing, 1, cfg, config)
    assert sorted(sorted(sharing[i].task_id for i in b) for b in by_task) == [["a", "a"], ["b", "b"]]


def test_checkpointed_blocks_give_the_same_losses_and_gradients(base, trajectory_file, monkeypatch):
    """With dropout on: the recomputed blocks must draw the same dropout masks as the first forward. The
    vocabulary projection is recomputed in pieces of 7 targets."""
    monkeypatch.setattr(prost, "LOSS_CHUNK", 7)
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    examples, _ = data.build_examples(trajectories.read_trajectories(trajectory_file), "executor", tokenizer, 10_000)
    batches = [batching.collate_with_trunk(examples[i:i + 3], tokenizer.pad_id) for i in (0, 3)]
    step_targets = sum(e.n_targets for e in examples[:6])
    model, params = random_adapter_model(ckpt, dropout=0.2)
    results = []
    for checkpointing in (False, True):
        model.checkpoint_blocks = checkpointing
        torch.manual_seed(11)
        results.append(step_gradients(model, params, batches, step_targets))
        results[-1] += (torch.randn(3),)  # the RNG stream after the step must not depend on recomputation
    (plain_loss, plain_grads, plain_rng), (ckpt_loss, ckpt_grads, ckpt_rng) = results
    assert torch.equal(ckpt_loss, plain_loss) and torch.equal(ckpt_rng, plain_rng)
    for a, b in zip(ckpt_grads, plain_grads):
        assert_reordered_sums_close(a, b, sum(e.n_tokens for e in examples[:6]))  # chunked logits


def test_compiled_blocks_trace_as_one_graph_and_give_the_same_gradients(base, trajectory_file):
    """--compile compiles each decoder block; a graph break (a Python value torch.compile cannot trace, such
    as a thread count) would split it and run the pieces eagerly. fullgraph=True makes a break an error."""
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    examples, _ = data.build_examples(trajectories.read_trajectories(trajectory_file), "executor", tokenizer, 10_000)
    batches = [batching.collate_with_trunk(examples[:3], tokenizer.pad_id)]
    step_targets = sum(e.n_targets for e in examples[:3])
    model, params = random_adapter_model(ckpt)
    eager = step_gradients(model, params, batches, step_targets)
    for block in model.model.layers:
        block.compile(fullgraph=True)
    compiled = step_gradients(model, params, batches, step_targets)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        assert_reordered_sums_close(a, b, sum(e.n_tokens for e in examples[:3]))  # compiled kernels


def test_training_flops_count_what_the_step_runs(base, trajectory_file):
    """Against torch's FlopCounterMode over a real step: every matmul the forward and backward run (counted
    by torch, not by prost), plus causal attention counted by hand (torch counts attention as full T x T)."""
    from conftest import flop_counter
    ckpt, _ = base
    tokenizer = Tokenizer.from_pretrained(ckpt)
    examples, _ = data.build_examples(trajectories.read_trajectories(trajectory_file), "executor", tokenizer, 10_000)
    example = max(examples, key=lambda e: e.n_tokens)
    model, params = random_adapter_model(ckpt)
    counter = flop_counter()
    with counter:
        step_gradients(model, params, [data.collate([example], tokenizer.pad_id)], example.n_targets)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "attention" not in str(op))
    c = model.config
    n = max(i for i, m in enumerate(example.mask) if m)  # positions before the last target
    attention = 3 * c.num_hidden_layers * 4 * c.num_attention_heads * c.head_dim * n * (n + 1) / 2
    # model.train_flops also counts the gradient into layer 0's input, which autograd skips (the embeddings
    # need none): the base q/k/v projections' and their adapters' A matrices' input gradients, by hand.
    q_dim, kv_dim, r = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, 4
    skipped = 2 * c.hidden_size * (q_dim + 2 * kv_dim) * n + 3 * 2 * r * c.hidden_size * n
    adapter_weights = sum(p.numel() for p in params)
    assert prost.batch_train_flops(c, adapter_weights, [example]) == pytest.approx(matmuls + attention + skipped,
                                                                                    rel=1e-9)


def test_shared_trunk_flops_count_what_the_step_runs(base, monkeypatch):
    """As above, for a micro-batch with a shared trunk: torch counts the matmuls; by hand, the attention that
    runs (the trunk's pairs once, each row's positions attending to the trunk and its own earlier keys) and
    what autograd skips but prost counts: layer 0's input gradients, and the trunk's last layer, which only
    its keys and values leave, so its q, o and MLP projections and its attention get no backward."""
    from conftest import flop_counter
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)
    ckpt, _ = base
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 300, (10,), generator=g).tolist()
    examples = []
    for row in range(3):  # rows of one length (padding is not counted) that part after 10 tokens
        tail = [300 + row] + torch.randint(3, 300, (11,), generator=g).tolist()
        examples.append(data.Example("a", "executor", row, 1, shared + tail, [0] * 17 + [1] * 5))
    batch = batching.collate_with_trunk(examples, pad_id=0)
    P = batch.trunk
    assert P == 10
    model, params = random_adapter_model(ckpt)
    counter = flop_counter()
    with counter:
        step_gradients(model, params, [batch], sum(e.n_targets for e in examples))
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "attention" not in str(op))
    c, r = model.config, 4
    d, hd, L, inter = c.hidden_size, c.head_dim, c.num_hidden_layers, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * hd, c.num_key_value_heads * hd
    lasts = [max(i for i, m in enumerate(e.mask) if m) for e in examples]  # each row computes positions P..last-1
    trunk_keys = P * (P + 1) // 2
    row_keys = sum((n - P) * P + (n - P) * (n - P + 1) // 2 for n in lasts)
    attention = 4 * q_dim * (3 * L * row_keys + (3 * L - 2) * trunk_keys)  # as run: no backward for the trunk's last
    positions = P + sum(n - P for n in lasts)
    layer0 = (2 * d * (q_dim + 2 * kv_dim) + 3 * 2 * r * d) * positions
    last_layer_base = 2 * (2 * d * q_dim + 3 * d * inter) * P  # q, o, gate, up, down: input gradients
    last_layer_adapters = 4 * r * (2 * (d + q_dim) + 3 * (d + inter)) * P  # their adapters: input and weight grads
    last_layer_attention = 2 * 4 * q_dim * trunk_keys
    skipped = layer0 + last_layer_base + last_layer_adapters + last_layer_attention
    adapter_weights = sum(p.numel() for p in params)
    assert prost.batch_train_flops(c, adapter_weights, examples, P) == pytest.approx(matmuls + attention + skipped,
                                                                                      rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Training runs.


def test_tiny_model_overfits_a_handful_of_examples(base, trajectory_file, tmp_path):
    history = prost.train(config(base, trajectory_file, tmp_path, role="executor", schedule="full", epochs=16,
                                 micro_batch_size=5, grad_accum=1, lr=2e-2, lora_r=16, lora_alpha=32,
                                 warmup_ratio=0.0))
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert history[0]["examples"] == 5
    assert last < first / 10, (first, last)
    saved = json.loads((tmp_path / "executor" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base[0]) and saved["peft_type"] == "LORA"


def test_epochs_follow_the_progressive_schedule_and_log(base, trajectory_file, tmp_path, capsys):
    history = prost.train(config(base, trajectory_file, tmp_path, dev_data=str(trajectory_file), epochs=5))
    out = capsys.readouterr().out
    # planner sub-tasks: a -> 1, 2, 3 (finished); b -> 1, 2, 3, 4 (finished)
    assert [r["max_subtask"] for r in history] == [1, 2, 3, 4, 4]
    assert [r["examples"] for r in history] == [2, 4, 6, 7, 7]
    assert "schedule: progressive, 1 new sub-task(s) per epoch" in out
    assert list(history[0]["dev_loss_by_subtask"]) == ["1", "2", "3", "4"]
    assert log_records(tmp_path / "planner") == json.loads(json.dumps(history))
    # nested examples merged: each trajectory's planner examples are one sequence, so one micro-batch per epoch
    assert [r["sequences"] for r in history] == [2] * 5 and history[-1]["step"] == 5
    for key in ("tokens_per_s", "target_tokens_per_s", "peak_memory_gb"):
        assert history[-1][key] > 0
    assert history[-1]["mfu"] is None  # CPU: no meaningful peak FLOP/s
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text().split()  # the CPUs we use differ by AMX's bf16 tiles
    assert history[-1]["machine"] == (f"{cpu_model_name()}, {'with' if amx else 'without'} AMX, "
                                      f"{torch.get_num_threads()} torch threads")


@pytest.mark.parametrize("role", ["planner", "executor"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_resume_reproduces_an_uninterrupted_run_bit_exactly(base, trajectory_file, tmp_path, checkpointing, role,
                                                            monkeypatch):
    """Dropout is on, so the restored RNG states matter as much as the adapter and optimizer. The planner's
    examples are nested (merged); the executor's micro-batches share trunks (one task's examples, side by side).
    The interrupted run may recompute its activations, the straight one does not. Its model and data folder
    move before it resumes: the run knows them by content, not by path."""
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)  # the synthetic executor conversations share a short prefix
    if role == "executor":  # the premise: trunks are computed
        sequences = prost.epoch_sequences(data.build_examples(trajectories.read_trajectories(trajectory_file), role,
                                                              Tokenizer.from_pretrained(base[0]), 10_000)[0], 1,
                                          config(base, trajectory_file, tmp_path, role=role, epochs=4))
        plan = prost.epoch_micro_batches(sequences, 1, config(base, trajectory_file, tmp_path, role=role),
                                         ModelConfig.from_hf(base[0]))
        assert any(batching.trunk_length([sequences[i] for i in b]) for b in plan)
    settings = dict(epochs=4, lora_dropout=0.1, role=role)
    straight = prost.train(config(base, trajectory_file, tmp_path / "straight", **settings))
    settings.update(checkpoint_activations=checkpointing)
    shutil.copytree(base[0], tmp_path / "inputs" / "base")
    shutil.copy(trajectory_file, tmp_path / "inputs" / "train.jsonl")

    def inputs(folder):  # (base, trajectories) as config() takes them
        return (folder / "base",), folder / "train.jsonl"
    first = prost.train(config(*inputs(tmp_path / "inputs"), tmp_path / "split", stop_after_epochs=2, **settings))
    assert len(first) == 2 and (tmp_path / "split" / role / prost.STATE_FILE).exists()
    shutil.move(tmp_path / "inputs", tmp_path / "moved")
    resumed = prost.train(config(*inputs(tmp_path / "moved"), tmp_path / "split", resume=True, **settings))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    a, b = adapter_tensors(tmp_path / "straight" / role), adapter_tensors(tmp_path / "split" / role)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in log_records(tmp_path / "split" / role)] == [1, 2, 3, 4]


@pytest.mark.parametrize("role", ["planner", "executor"])
def test_a_run_stopped_mid_epoch_resumes_bit_exactly(base, trajectory_file, tmp_path, role, monkeypatch):
    """One sequence per optimizer step, so every epoch takes several; the interrupted run saves a mid-epoch
    checkpoint after every step (--save-every-minutes tiny) and stops inside epoch 2. Until epoch 2 ends, what
    evaluate.py would load (the published adapter, progress.json, the log) stays epoch 1's. Resumed, the run
    ends with the uninterrupted run's losses, log and adapter."""
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)  # the synthetic executor conversations share a short prefix
    settings = dict(epochs=4, lora_dropout=0.1, role=role, micro_batch_size=1, grad_accum=1)
    straight = prost.train(config(base, trajectory_file, tmp_path / "straight", **settings))
    epoch_1_steps, epoch_2_steps = straight[0]["step"], straight[1]["step"] - straight[0]["step"]
    assert epoch_2_steps >= 2  # the premise: epoch 2 has a middle
    stop = epoch_1_steps + epoch_2_steps // 2
    out = tmp_path / "split" / role
    first = prost.train(config(base, trajectory_file, tmp_path / "split", stop_after_steps=stop,
                               save_every_minutes=1e-9, **settings))
    state = torch.load(out / prost.STATE_FILE, weights_only=True)
    assert len(first) == 1 and state["epoch"] == 1 and state["step"] == stop and state["in_epoch"][0]["steps"] > 0
    progress = store.read_progress(out)
    assert progress["epoch"] == 1 and progress["adapter_sha256"] == store.files_sha256(
        out, ["adapter_config.json", "adapter_model.safetensors"])
    assert [r["epoch"] for r in log_records(out)] == [1]
    prost.train(config(base, trajectory_file, tmp_path / "epoch_1", stop_after_epochs=1, **settings))
    a, b = adapter_tensors(tmp_path / "epoch_1" / role), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = prost.train(config(base, trajectory_file, tmp_path / "split", resume=True, **settings))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    a, b = adapter_tensors(tmp_path / "straight" / role), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"examples_per_s", "tokens_per_s", "target_tokens_per_s", "seconds", "mfu", "peak_memory_gb", "machine"}
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in log_records(folder)]
               for folder in (tmp_path / "straight" / role, out)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 4


@pytest.mark.parametrize("role", ["planner", "executor"])
def test_plain_run_equals_the_fast_paths(base, trajectory_file, tmp_path, role, monkeypatch):
    """--plain (no nested merging, no trunks, micro-batches by length, textbook dropout, no compile) against
    the defaults: micro-batches of 2 x 8 accumulated hold every sequence of an epoch either way, so each epoch
    is one optimizer step on the gradient of the same mean token loss, summed in another grouping and order:
    the same per-epoch losses and adapters up to fp32 reordering. The planner's fast run merges its nested
    examples; the executor's computes shared trunks."""
    monkeypatch.setattr(batching, "MIN_TRUNK", 4)  # the synthetic executor conversations share a short prefix
    settings = dict(role=role, epochs=4, micro_batch_size=2, grad_accum=8)
    records = trajectories.read_trajectories(trajectory_file)
    examples = data.build_examples(records, role, Tokenizer.from_pretrained(base[0]), 10_000)[0]
    cfg = config(base, trajectory_file, tmp_path, **settings)
    sequences = prost.epoch_sequences(examples, 4, cfg)
    plan = prost.epoch_micro_batches(sequences, 4, cfg, ModelConfig.from_hf(base[0]))
    if role == "planner":  # the premises: each fast path is taken
        assert len(sequences) < len(examples)
    else:
        assert any(batching.trunk_length([sequences[i] for i in b]) for b in plan)
    fast = prost.train(config(base, trajectory_file, tmp_path / "fast", **settings))
    plain = prost.train(config(base, trajectory_file, tmp_path / "plain", plain=True, **settings))
    assert [r["step"] for r in fast] == [r["step"] for r in plain] == [1, 2, 3, 4]
    assert [r["examples"] for r in plain] == [r["sequences"] for r in plain]  # nothing merged
    for f, p in zip(fast, plain):
        assert f["target_tokens"] == p["target_tokens"]
        assert f["train_loss"] == pytest.approx(p["train_loss"], rel=1e-5)
    # AdamW moves an element by about lr per step whatever its gradient's size, so the reordering noise of a
    # near-zero gradient element can shift it by a fraction of lr (seen: 0.005 lr); a tenth of lr is the bound
    a, b = adapter_tensors(tmp_path / "fast" / role), adapter_tensors(tmp_path / "plain" / role)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.1 * cfg.lr)


def test_ddp_two_gloo_processes_equal_one_process(base, trajectory_file, tmp_path):
    """Global batch 4 either way: 1 process x 2 micro-batches of 2, or 2 processes x 1 micro-batch of 2. Two
    processes stopped in the middle of epoch 2 and resumed (each rank's totals and RNG states in the mid-epoch
    checkpoint) end where the uninterrupted two did, bit for bit."""
    common = ["--model", str(base[0]), "--role", "executor", "--data", str(trajectory_file), "--epochs", "2",
              "--schedule", "full", "--micro-batch-size", "2", "--lr", "5e-3", "--lora-r", "4",
              "--lora-dropout", "0", "--no-progress"]
    run_child([sys.executable, "prost.py", *common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    run_child(torchrun(2, "prost.py", *common, "--grad-accum", "1", "--out", str(tmp_path / "two")))
    one, two = log_records(tmp_path / "one/executor"), log_records(tmp_path / "two/executor")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for r1, r2 in zip(one, two):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
    a, b = adapter_tensors(tmp_path / "one/executor"), adapter_tensors(tmp_path / "two/executor")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)

    epoch_2_steps = two[1]["step"] - two[0]["step"]
    assert epoch_2_steps >= 2  # the premise: epoch 2 has a middle
    split = ["--grad-accum", "1", "--out", str(tmp_path / "split"), "--save-every-minutes", "1e-9"]
    run_child(torchrun(2, "prost.py", *common, *split, "--stop-after-steps", str(two[0]["step"] + epoch_2_steps // 2)))
    run_child(torchrun(2, "prost.py", *common, *split, "--resume"))
    resumed = log_records(tmp_path / "split/executor")
    assert [(r["train_loss"], r["tokens"]) for r in resumed] == [(r["train_loss"], r["tokens"]) for r in two]
    a, b = adapter_tensors(tmp_path / "two/executor"), adapter_tensors(tmp_path / "split/executor")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# Failures.


def cli_args(base, trajectory_file, out, **flags) -> list[str]:
    """The command line equivalent of config(...): flags given as keyword arguments override."""
    settings = dict(model=str(base[0]), data=str(trajectory_file), out=str(out), epochs=4, micro_batch_size=2,
                    grad_accum=2, lr=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    settings.update(flags)
    args = ["--no-progress"]
    for name, value in settings.items():
        if value is True:
            args.append("--" + name.replace("_", "-"))
        elif value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = prost.main(args)
    return code, capsys.readouterr().err


def test_bad_inputs_are_clear_errors_leaving_no_checkpoint(base, trajectory_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(trajectory_file.read_text().splitlines()[0] + "\n{\"schema\": 2}\n")
    cases = [
        (dict(role="judge"), "unknown role 'judge'"),
        (dict(role="single"), "holds no single calls"),
        (dict(data=str(tmp_path / "missing.jsonl")), "does not exist"),
        (dict(model=str(tmp_path / "no-model")),
         "no-model does not exist (and is not a hub id like 'Qwen/Qwen2.5-1.5B')\n"),  # not "... --resume"
        (dict(data=str(bad)), f"{bad}:2: record: missing field"),
        (dict(grad_accum=0), "--grad-accum must be at least 1"),
        (dict(device="tpu"), "--device must be auto, cpu or cuda"),
        # the planner's indices are 1..4 (4 = FINISH): 3 epochs of one new sub-task would never train FINISH
        (dict(epochs=3), "reach sub-task 3 of 4, so sub-tasks 4..4 would never be trained; use --epochs 4"),
        (dict(epochs=1, subtasks_per_epoch=3), "reach sub-task 3 of 4"),
        (dict(max_seq_len=8), "longer than --max-seq-len 8 even with its old outputs shortened"),
    ]
    for flags, message in cases:
        code, err = run_cli(cli_args(base, trajectory_file, tmp_path / "ck", **flags), capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (flags, err)
        assert "Traceback" not in err and not (tmp_path / "ck").exists()


def test_without_data_it_trains_on_the_mini_worlds_gold_trajectories(base, mini_world, gold_train, tmp_path,
                                                                     capsys, monkeypatch):
    """No --data: the world is found through $APPWORLD_ROOT, the gold collection resumes in the default file
    (already complete here, so it is left as it is) and the role trains on it: epoch 1 of the progressive
    schedule holds exactly one planner decision per train task, its first sub-task."""
    default = tmp_path / "trajectories" / "train.jsonl"
    default.parent.mkdir()
    shutil.copy(gold_train[1], default)
    before = default.read_bytes()
    monkeypatch.setenv("APPWORLD_ROOT", str(mini_world))
    monkeypatch.setattr(run_folder, "DEFAULT_DATA", default)
    # gold prompts are long for this 320-token vocabulary: a base with room for them, so none is dropped
    long_base = build_hf_checkpoint(tmp_path / "base", "qwen2", tie=True, seed=3, max_positions=4096)
    code, err = run_cli(cli_args(long_base, None, tmp_path / "ck", data=None, epochs=0, stop_after_epochs=1,
                                 max_seq_len=4096), capsys)
    assert code == 0, err
    assert default.read_bytes() == before
    log = (tmp_path / "ck" / "planner" / run_folder.LOG_FILE).read_text()
    [epoch] = [json.loads(line) for line in log.splitlines()]
    assert epoch["max_subtask"] == 1 and epoch["examples"] == len(world.load_split("train", root=mini_world))
    assert (tmp_path / "ck" / "planner" / "adapter_model.safetensors").is_file()


def test_out_folder_holding_another_run_is_refused(base, trajectory_file, tmp_path, capsys):
    prost.train(config(base, trajectory_file, tmp_path, epochs=1, subtasks_per_epoch=4))
    state = tmp_path / "planner" / prost.STATE_FILE
    before = state.read_bytes()
    code, err = run_cli(cli_args(base, trajectory_file, tmp_path, epochs=1, subtasks_per_epoch=4, lr=1e-3), capsys)
    assert code == 2 and "holds a different run (lr: 0.005 there vs 0.001 now)" in err
    other_weights = build_hf_checkpoint(tmp_path / "other-base", "qwen2", tie=True, seed=4)
    code, err = run_cli(cli_args(other_weights, trajectory_file, tmp_path, epochs=1, subtasks_per_epoch=4,
                                 resume=True), capsys)
    assert code == 2 and "holds a different run (model_sha256: " in err
    code, err = run_cli(cli_args(base, trajectory_file, tmp_path, epochs=1, subtasks_per_epoch=4), capsys)
    assert code == 2 and "already holds this run (epoch 1 of 1 done); pass --resume" in err
    assert state.read_bytes() == before
    stray = tmp_path / "other" / "planner"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    code, err = run_cli(cli_args(base, trajectory_file, tmp_path / "other"), capsys)
    assert code == 2 and "is not empty and holds no prost run" in err
    assert sorted(p.name for p in stray.iterdir()) == ["notes.txt"]
    # A crash inside the first checkpoint leaves this run's files but no state: the run starts over.
    crashed = tmp_path / "crashed" / "planner"
    shutil.copytree(tmp_path / "planner", crashed, ignore=shutil.ignore_patterns(prost.STATE_FILE))
    assert len(prost.train(config(base, trajectory_file, tmp_path / "crashed", epochs=1, subtasks_per_epoch=4))) == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base, trajectory_file, tmp_path, capsys,
                                                                   monkeypatch):
    good = prost.train(config(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=2, stop_after_epochs=1))
    adapter_after_epoch_1 = adapter_tensors(tmp_path / "planner")
    real = prost.target_token_losses

    def poisoned(model, ids, mask, trunk):
        losses, rows = real(model, ids, mask, trunk)
        return losses * float("nan"), rows

    monkeypatch.setattr(prost, "target_token_losses", poisoned)
    code, err = run_cli(cli_args(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=2, resume=True), capsys)
    assert code == 1
    assert "non-finite loss or gradient at epoch 2, step 1" in err and "last good checkpoint (epoch 1)" in err
    kept = adapter_tensors(tmp_path / "planner")
    assert all(torch.equal(kept[k], adapter_after_epoch_1[k]) for k in kept)
    assert log_records(tmp_path / "planner") == json.loads(json.dumps(good))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_config.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in train_config.TrainConfig.__dataclass_fields__:
        flag = "--" + ("no-" if name in ("progress", "merge_nested", "trunks") else "") + name.replace("_", "-")
        assert flag in text, flag
    assert "Qwen/Qwen2.5-1.5B" in train_config.TrainConfig().model


def test_bf16_autocast_on_cpu_keeps_fp32_adapter_and_optimizer(base, trajectory_file, tmp_path):
    history = prost.train(config(base, trajectory_file, tmp_path, precision="bf16", epochs=2, schedule="full"))
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(tmp_path / "planner").values())
    state = torch.load(tmp_path / "planner" / prost.STATE_FILE, weights_only=True)
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())
    model = prost.build_model(config(base, trajectory_file, tmp_path), torch.device("cpu"), "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
