"""memory_estimate.py against what autograd really keeps (saved-tensor hooks on the CPU, per decoder layer), against
published parameter counts, and for the default recipe: Qwen2.5-1.5B at 4 x 4096 tokens on an 80 GB GPU."""

import sys

import pytest
import torch

import dropout_masks
import lora
import memory_estimate as E
import prost
from conftest import run_child
from model import ModelConfig, Transformer

GB = 1e9


def saved_bytes(model, ids, precision: str) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of model.hidden(ids), parameters
    left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        model.hidden(ids)
    return sum(seen.values())


def measured_per_token_per_layer(fields: dict, precision: str, dropout: float, checkpointing: bool) -> float:
    """(saved bytes with 3 layers - with 1 layer) / 2 / tokens: one layer's share, embeddings and final norm out,
    and under bf16 autocast without the layer's bf16 copies of its adapter matrices (a constant per layer)."""
    B, T = 2, 96
    ids = torch.randint(0, fields["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    totals = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_hf({**fields, "num_hidden_layers": layers}))
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        lora.apply_lora(model, r=8, alpha=16, dropout=dropout)
        dropout_masks.use_fast_dropout(model)
        model.train()
        model.checkpoint_blocks = checkpointing
        totals.append(saved_bytes(model, ids, precision))
    config = ModelConfig.from_hf({**fields, "num_hidden_layers": 1})
    copies = 2 * lora.count_adapter_parameters(config, 8) if precision == "bf16" and not checkpointing else 0
    return ((totals[1] - totals[0]) / 2 - copies) / (B * T)


SHAPES = {  # GQA 4/2 with q/k/v bias and a wide MLP; GQA 6/2 with a narrow one and a head_dim of its own
    "qwen2-like": dict(model_type="qwen2", vocab_size=256, hidden_size=128, intermediate_size=384,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "llama-like": dict(model_type="llama", vocab_size=256, hidden_size=96, intermediate_size=160, head_dim=32,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_saved_bytes_per_token_and_layer_match_what_autograd_keeps(shape, precision, dropout):
    fields = SHAPES[shape]
    config = ModelConfig.from_hf({**fields, "num_hidden_layers": 1})
    want = measured_per_token_per_layer(fields, precision, dropout, checkpointing=False)
    assert E.saved_bytes_per_token_per_layer(config, precision, dropout, lora_r=8) == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_checkpointing_keeps_only_each_blocks_input(precision):
    fields = SHAPES["qwen2-like"]
    a = 2 if precision == "bf16" else 4
    assert measured_per_token_per_layer(fields, precision, 0.05, checkpointing=True) == a * fields["hidden_size"]


@pytest.mark.parametrize("name, published", [("HuggingFaceTB/SmolLM2-135M", 134.5e6), ("Qwen/Qwen2.5-0.5B", 494e6),
                                             ("Qwen/Qwen2.5-1.5B", 1.54e9), ("Qwen/Qwen2.5-7B", 7.62e9)])
def test_parameter_counts_are_the_published_ones(name, published):
    assert E.parameter_count(E.model_config(name)) == pytest.approx(published, rel=0.01)


def default_workload(checkpointing: bool) -> E.Workload:
    cfg = prost.TrainConfig()  # the defaults: Qwen2.5-1.5B, 4 x 4096, dropout 0.05, no checkpointing, rank 16
    assert (cfg.model, cfg.micro_batch_size, cfg.max_seq_len, cfg.lora_dropout, cfg.lora_r) == (
        "Qwen/Qwen2.5-1.5B", 4, 4096, 0.05, 16)
    tokens = cfg.micro_batch_size * cfg.max_seq_len
    return E.Workload(cfg.micro_batch_size, cfg.max_seq_len, tokens, checkpointing, cfg.lora_dropout, "bf16",
                      cfg.lora_r, prost.LOSS_CHUNK)


def test_the_default_recipe_does_not_fit_80_gb_without_checkpointing_and_fits_with_it():
    config = E.model_config("Qwen/Qwen2.5-1.5B")
    off = E.estimate(config, default_workload(False), "cuda")
    # by hand, bytes per token and layer: norms 8 x 1536, normed inputs 2 x 2 x 1536, q k v out
    # 2 x (2 x 1536 + 2 x 256) + 4 x 12, MLP 4 x 2 x 8960, adapters 7 x 2 x 16,
    # dropout 2 x (8 x 1536 + 2 x 1536 + 8960)
    per_token_layer = 12288 + 6144 + 7168 + 48 + 71680 + 224 + 48640
    assert off.activations == pytest.approx(per_token_layer * 28 * 16384 + 4 * 1536 * 16384)
    assert off.activations > 60 * GB and off.total > 80 * GB  # the reviewer's read: step 1 fails
    assert off.weights == pytest.approx(2 * 1.54e9, rel=0.01)
    chosen = E.plan(config, default_workload(False), "cuda", 80 * GB, "H100")
    assert chosen.checkpointing and chosen.refusal is None
    assert chosen.estimate.total == E.estimate(config, default_workload(True), "cuda").total < 0.9 * 80 * GB
    assert "checkpointing turned on" in chosen.lines[0]


def test_a_step_that_cannot_fit_is_refused_with_the_flags_to_change():
    config = E.model_config("Qwen/Qwen2.5-7B")
    work = E.Workload(64, 32768, 64 * 32768, False, 0.05, "bf16", 16, prost.LOSS_CHUNK)
    chosen = E.plan(config, work, "cuda", 80 * GB, "H100")
    assert chosen.refusal and "--micro-batch-size" in chosen.refusal and "\n" not in chosen.refusal


def test_the_table_cli_prints_a_row_per_model_with_prosts_loss_chunk(capsys):
    assert E.parse_args([]).loss_chunk == prost.LOSS_CHUNK
    assert E.main(["--models", "Qwen/Qwen2.5-1.5B", "HuggingFaceTB/SmolLM2-135M"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[3] for r in rows] == ["on", "off"]  # checkpointing: 1.5B needs it at 4 x 4096


def test_prost_dry_run_prints_the_estimate_and_refuses_in_one_line(tmp_path):
    run = run_child([sys.executable, "prost.py", "--dry-run", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert "memory estimate for 4 x 4096 tokens" in run.stdout and not any(tmp_path.iterdir())
    refused = run_child([sys.executable, "prost.py", "--dry-run", "--device", "cpu", "--model",
                         "Qwen/Qwen2.5-7B", "--micro-batch-size", "64", "--max-seq-len", "32768"], expect_rc=2)
    assert refused.stderr.strip().count("\n") == 0 and "--micro-batch-size" in refused.stderr
