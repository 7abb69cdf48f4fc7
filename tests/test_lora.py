"""Tests for lora.py: LoRA layers, named adapters, merge/export and PEFT-format files.

References are independent of lora.py: the LoRA formula written out by hand with plain matmuls, PEFT
(`PeftModel`) on the same tiny transformers checkpoint, and transformers itself for exported folders.
"""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lora
from conftest import assert_reordered_sums_close
import dropout_masks
import model_io
from decoding import joined_projections, joint_weight, lay_out_for_decoding
from model import ModelConfig, Transformer


class TinyBlock(nn.Module):
    """A stand-in with the projection names of a Qwen2 layer, plus an lm_head."""

    def __init__(self, d=8, f=16, vocab=10):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):  # x: (B, T, d)
        h = x + self.o_proj(torch.tanh(self.q_proj(x)))
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(h)  # (B, T, vocab)


def randomize_adapter(model, name, seed):
    """Give adapter `name` non-zero A and B so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if name in layer.specs:
                layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=g) * 0.1)
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------------
# LoRALinear on a plain nn.Linear


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base)
    layer.add("a", lora.AdapterSpec(r=3, alpha=12))
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    with torch.no_grad():
        layer.lora_A["a"].copy_(a)
        layer.lora_B["a"].copy_(b)
    layer.active = "a"
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (12 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_written_out_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.LoRALinear(base)
    layer.add("a", lora.AdapterSpec(r=2, alpha=6))
    randomize_adapter(layer, "a", seed=4)
    layer.active = "a"
    a = layer.lora_A["a"].detach().clone().requires_grad_()
    b = layer.lora_B["a"].detach().clone().requires_grad_()
    x = torch.randn(3, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    target = torch.randn(3, 5)
    ((layer(x) - target) ** 2).sum().backward()
    ((x_ref @ base.weight.T + base.bias + 3.0 * (x_ref @ a.T @ b.T) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.lora_A["a"].grad, a.grad)
    torch.testing.assert_close(layer.lora_B["a"].grad, b.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_fresh_adapter_init_kaiming_A_zero_B():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(64, 32))
    layer.add("a", lora.AdapterSpec(r=8, alpha=16))
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    assert a.shape == (8, 64) and b.shape == (32, 8)
    assert a.dtype == b.dtype == torch.float32
    # kaiming_uniform with a=sqrt(5): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in)
    assert a.abs().max() <= 1 / math.sqrt(64) and a.abs().max() > 0.5 / math.sqrt(64)
    assert torch.count_nonzero(b) == 0


def test_keeps_base_parameters_and_names():
    base = nn.Linear(4, 3)
    layer = lora.LoRALinear(base)
    assert layer.weight is base.weight and layer.bias is base.bias  # adopted, not copied
    layer.add("a", lora.AdapterSpec(r=2, alpha=4))
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.a", "lora_B.a"}
    no_bias = lora.LoRALinear(nn.Linear(4, 3, bias=False))
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}


def test_bf16_base_fp32_adapter_cast_rule():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora.LoRALinear(base)
    layer.add("a", lora.AdapterSpec(r=4, alpha=8))
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    with torch.no_grad():
        layer.lora_A["a"].copy_(a)
        layer.lora_B["a"].copy_(b)
    layer.active = "a"
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A["a"].dtype == torch.float32
    base_out = x @ base.weight.T + base.bias  # bf16
    delta = 2.0 * (x.float() @ a.T @ b.T)  # fp32
    torch.testing.assert_close(y, base_out + delta.to(torch.bfloat16))


def test_dropout_only_on_the_adapter_path_and_only_in_training():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 32))
    layer.add("a", lora.AdapterSpec(r=4, alpha=8, dropout=0.5))
    layer.active = "a"
    x = torch.randn(4, 32)
    layer.train()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # B = 0: nothing to drop
    randomize_adapter(layer, "a", seed=1)
    assert not torch.allclose(layer(x), layer(x))  # two dropout masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_textbook_dropout_is_inverted_dropout_with_a_uniform_draw_per_element():
    """The core's dropout (lora.textbook_drop) against W x + b + (alpha / r) * B A (x * keep / (1 - p)), keep the
    elements whose fp32 uniform draw is at least p (same seed)."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 24))
    layer.add("a", lora.AdapterSpec(r=4, alpha=8, dropout=0.3))
    layer.active = "a"
    randomize_adapter(layer, "a", seed=1)
    layer.train()
    x = torch.randn(3, 5, 32)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = torch.rand(x.shape) >= 0.3
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    expected = x @ layer.weight.T + layer.bias + (8 / 4) * ((x * keep / 0.7) @ a.T @ b.T)
    assert_reordered_sums_close(y.detach(), expected.detach(), 15 * 32)


@pytest.mark.parametrize("p, dtype", [(0.05, torch.bfloat16), (0.5, torch.float32)])
def test_keep_mask_drops_each_element_independently_with_probability_p(p, dtype):
    """Binomial bounds (6 standard deviations, fixed seed): the overall rate, the rate in each quarter of
    every 64-bit draw and in the odd-sized tail, and pairs of neighbours dropped together at rate p^2."""
    torch.manual_seed(0)
    mask = dropout_masks.keep_mask(torch.Size((2001, 999)), p, dtype, "cpu")  # odd size: the last draw is part used
    assert mask.shape == (2001, 999) and mask.element_size() == torch.empty((), dtype=dtype).element_size()
    assert set(mask.unique().tolist()) == {-1, 0}  # all bits set, or none
    q = 1 - dropout_masks.keep_probability(p)
    assert q == pytest.approx(p, abs=2 ** -16)

    def assert_rate(sample, rate):
        n = sample.numel()
        assert abs(sample.float().mean().item() - rate) < 6 * math.sqrt(rate * (1 - rate) / n)

    drop = (mask == 0).flatten()
    assert_rate(drop, q)
    for i in range(4):
        assert_rate(drop[i::4], q)
    assert_rate(drop[-10_000:], q)
    assert_rate(drop[:-1:2] & drop[1::2], q * q)
    x = torch.randn(2001, 999).to(dtype)
    dropped = dropout_masks.apply_mask(x, mask)
    assert torch.equal(dropped, torch.where(mask == 0, 0, x).to(dtype))  # kept elements bit for bit


def test_dropout_output_and_gradients_equal_the_dense_formula_with_the_same_mask():
    """Training-mode forward and backward of a dropout adapter with dropout_masks' fast masks against autograd
    through the textbook formula W x + b + (alpha / r) * B A (x * keep / P(keep)), with the mask the layer drew
    (same seed)."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 24))
    layer.add("a", lora.AdapterSpec(r=4, alpha=8, dropout=0.3))
    layer.active = "a"
    dropout_masks.use_fast_dropout(layer)
    randomize_adapter(layer, "a", seed=1)
    layer.train()
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 24)
    torch.manual_seed(7)
    layer(x).backward(g)
    torch.manual_seed(7)
    keep = dropout_masks.keep_mask(x.shape, 0.3, x.dtype, "cpu") != 0  # the layer's first random draw is its mask
    xr = x.detach().clone().requires_grad_()
    a = layer.lora_A["a"].detach().clone().requires_grad_()
    b = layer.lora_B["a"].detach().clone().requires_grad_()
    yr = xr @ layer.weight.T + layer.bias + (8 / 4) * ((xr * keep / dropout_masks.keep_probability(0.3)) @ a.T @ b.T)
    yr.backward(g)
    torch.manual_seed(7)
    n_terms = 15 * 32  # no sum here has more terms than 15 positions x 32 input features
    assert_reordered_sums_close(layer(x.detach()), yr.detach(), n_terms)
    assert_reordered_sums_close(x.grad, xr.grad, n_terms)
    assert_reordered_sums_close(layer.lora_A["a"].grad, a.grad, n_terms)
    assert_reordered_sums_close(layer.lora_B["a"].grad, b.grad, n_terms)


# ----------------------------------------------------------------------------------------------------
# Model-level API on a small module stack


def test_apply_lora_wraps_targets_and_freezes_all_but_adapter():
    model = TinyBlock()
    lora.apply_lora(model, r=2, alpha=4, targets=("q_proj", "o_proj", "up_proj", "down_proj"))
    assert sorted(lora.lora_layers(model)) == ["down_proj", "o_proj", "q_proj", "up_proj"]
    assert isinstance(model.lm_head, nn.Linear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{m}.lora_{ab}.default" for m in ("q_proj", "o_proj", "up_proj", "down_proj")
                               for ab in "AB")
    assert lora.active_adapter(model) == "default"


def test_second_apply_lora_trains_only_the_new_adapter():
    model = TinyBlock()
    lora.apply_lora(model, r=2, alpha=4, targets=("q_proj",), name="planner")
    lora.apply_lora(model, r=2, alpha=4, targets=("q_proj",), name="executor")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A.executor", "q_proj.lora_B.executor"}
    assert {id(p) for p in lora.adapter_parameters(model, "executor")} == \
        {id(model.q_proj.lora_A["executor"]), id(model.q_proj.lora_B["executor"])}


def test_set_adapter_none_gives_base_output_and_switching_gives_each_adapters_output():
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 3, 8)
    base_out = model(x)
    ref = copy.deepcopy(model)
    lora.add_adapter(model, "p", r=2, alpha=4, targets=("q_proj", "up_proj"))
    lora.add_adapter(model, "e", r=4, alpha=4, targets=("down_proj",))
    randomize_adapter(model, "p", 1)
    randomize_adapter(model, "e", 2)
    lora.set_adapter(model, "p")
    out_p = model(x)
    lora.set_adapter(model, "e")
    out_e = model(x)
    lora.set_adapter(model, None)
    torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
    assert not torch.allclose(out_p, base_out) and not torch.allclose(out_e, out_p)
    # Reference for "p": the plain block with W + (alpha / r) B A written into the adapted weights.
    with torch.no_grad():
        for name in ("q_proj", "up_proj"):
            layer = getattr(model, name)
            getattr(ref, name).weight += (4 / 2) * layer.lora_B["p"] @ layer.lora_A["p"]
    torch.testing.assert_close(ref(x), out_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets, match", [
    (("lm_head",), "lm_head"),
    (("q_proj", "w_proj"), "w_proj"),
    ((), "empty"),
])
def test_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        lora.apply_lora(TinyBlock(), targets=targets)


def test_bad_adapter_arguments():
    model = TinyBlock()
    with pytest.raises(ValueError, match="adapter name"):
        lora.add_adapter(model, "bad.name", targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        lora.add_adapter(model, "a", r=0, targets=("q_proj",))
    with pytest.raises(ValueError, match="dropout"):
        lora.add_adapter(model, "a", dropout=1.0, targets=("q_proj",))
    lora.add_adapter(model, "a", targets=("q_proj",))
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter(model, "a", targets=("q_proj",))
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="no active adapter"):
        lora.merge(model)


def test_merge_unmerge_on_module_stack():
    torch.manual_seed(0)
    model = TinyBlock()
    w0 = model.q_proj.weight.detach().clone()
    lora.apply_lora(model, r=2, alpha=4, targets=("q_proj", "down_proj"))
    randomize_adapter(model, "default", 3)
    x = torch.randn(2, 3, 8)
    unmerged = model(x)
    lora.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    lora.set_adapter(model, "default")  # the merged adapter: nothing to do
    with pytest.raises(ValueError, match="unmerge"):
        lora.set_adapter(model, None)
    lora.unmerge(model)
    torch.testing.assert_close(model.q_proj.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)



# ----------------------------------------------------------------------------------------------------
# On the real Transformer, against transformers + PEFT loading the same tiny checkpoint

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Logits computed in two fp32 orders (merged W + sBA against W and the adapter apart; ours against transformers'):
# each logit comes through 2 layers and the head, each a dot product of at most 96 terms (the MLP's width).
LOGIT_TERMS = 3 * 96


@pytest.fixture(scope="module")
def hf_dir(qwen2_ckpt):
    """conftest's tiny random Qwen2 checkpoint (hidden 64, 4 heads / 2 KV heads of 16, MLP 96, tied)."""
    return qwen2_ckpt[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(1))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def load_ours(hf_dir):
    return Transformer.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def load_hf(hf_dir):
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def test_fresh_adapter_keeps_logits_and_trains_only_adapter(hf_dir, ids):
    model = load_ours(hf_dir)
    base_keys = set(model.state_dict())
    base = our_logits(model, ids)
    lora.apply_lora(model, r=4, alpha=8)
    torch.testing.assert_close(our_logits(model, ids), base, rtol=0, atol=0)
    # HF key names of the base are unchanged; the only new keys are adapter tensors.
    new_keys = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict()) and all(".lora_" in k for k in new_keys)
    assert len(lora.lora_layers(model)) == 7 * 2
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Per layer: r * (in + out) for each projection; q: 64->64, k/v: 64->32, o: 64->64, gate/up: 64->96, down 96->64
    assert n_lora == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64))
    model.train()
    model(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].grad.abs().sum() > 0


def test_merged_equals_unmerged_and_disabled_gives_base(hf_dir, ids):
    model = load_ours(hf_dir)
    base = our_logits(model, ids)
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapter(model, "default", seed=5)
    adapted = our_logits(model, ids)
    assert (adapted - base).abs().max() > 1e-1
    lora.set_adapter(model, None)
    torch.testing.assert_close(our_logits(model, ids), base, rtol=0, atol=0)  # disabled: exactly the base
    lora.set_adapter(model, "default")
    lora.merge(model)
    assert_reordered_sums_close(our_logits(model, ids), adapted, LOGIT_TERMS)
    lora.unmerge(model)  # W + dW - dW: back to W up to fp32 rounding
    assert_reordered_sums_close(our_logits(model, ids), adapted, LOGIT_TERMS)
    lora.set_adapter(model, None)
    assert_reordered_sums_close(our_logits(model, ids), base, LOGIT_TERMS)


def test_prost_adapter_loads_in_peft_with_same_logits(hf_dir, ids, tmp_path):
    model = load_ours(hf_dir)
    lora.apply_lora(model, r=4, alpha=16, targets=PROJ, name="planner")
    randomize_adapter(model, "planner", seed=6)
    ours = our_logits(model, ids)
    with torch.no_grad():
        assert (ours - hf_logits(load_hf(hf_dir), ids)).abs().max() > 1e-1
    lora.save_adapter(model, tmp_path / "planner", "planner")
    config = json.loads((tmp_path / "planner" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == sorted(PROJ)
    assert lora.adapter_base(tmp_path / "planner") == str(hf_dir)
    keys = load_file(tmp_path / "planner" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    assert keys["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert not list((tmp_path / "planner").glob("*.tmp"))

    peft_model = PeftModel.from_pretrained(load_hf(hf_dir), str(tmp_path / "planner")).eval()
    torch.testing.assert_close(hf_logits(peft_model, ids), ours, rtol=1e-4, atol=1e-5)


def test_peft_adapter_loads_in_prost_with_same_logits(hf_dir, ids, tmp_path):
    torch.manual_seed(7)
    peft_config = LoraConfig(r=8, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    peft_model = get_peft_model(load_hf(hf_dir), peft_config).eval()
    with torch.no_grad():  # PEFT starts B at zero; perturb it so the adapter matters
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    expected = hf_logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = load_ours(hf_dir)
    base = our_logits(model, ids)
    assert (expected - base).abs().max() > 1e-1
    lora.load_adapter(model, tmp_path / "peft", "critic")
    assert sorted({p.rsplit(".", 1)[-1] for p in lora.lora_layers(model)}) == ["down_proj", "q_proj", "v_proj"]
    torch.testing.assert_close(our_logits(model, ids), base, rtol=0, atol=0)  # loaded, not active
    lora.set_adapter(model, "critic")
    torch.testing.assert_close(our_logits(model, ids), expected, rtol=1e-4, atol=1e-5)


def storage_bytes(model):
    """Bytes of distinct tensor storages behind the model's parameters and buffers."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_two_adapters_switch_without_copying_the_base(hf_dir, ids, tmp_path):
    model = load_ours(hf_dir)
    base_bytes = storage_bytes(model)
    lora.add_adapter(model, "planner", r=4, alpha=8)
    lora.add_adapter(model, "executor", r=2, alpha=2, targets=("q_proj", "up_proj"))
    randomize_adapter(model, "planner", seed=8)
    randomize_adapter(model, "executor", seed=9)
    adapter_bytes = sum(4 * p.numel() for name in ("planner", "executor") for p in lora.adapter_parameters(model, name))
    assert storage_bytes(model) == base_bytes + adapter_bytes

    # Each adapter's own logits: PEFT with only that adapter, on the transformers model.
    expected = {}
    for name in ("planner", "executor"):
        lora.save_adapter(model, tmp_path / name, name)
        expected[name] = hf_logits(PeftModel.from_pretrained(load_hf(hf_dir), str(tmp_path / name)).eval(), ids)
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    ptr = q_weight.data_ptr()
    for name in ("planner", "executor", "planner"):
        lora.set_adapter(model, name)
        torch.testing.assert_close(our_logits(model, ids), expected[name], rtol=1e-4, atol=1e-5)
    assert q_weight.data_ptr() == ptr and storage_bytes(model) == base_bytes + adapter_bytes
    assert not torch.allclose(expected["planner"], expected["executor"])


def save_executor_adapter_and_peft_merged_logits(hf_dir, ids, folder):
    """Save a random adapter 'executor' on q_proj and up_proj into `folder`; return the logits of PEFT's
    merge_and_unload of it on the transformers model (the reference for merged copies)."""
    trained = load_ours(hf_dir)
    lora.apply_lora(trained, r=4, alpha=8, targets=("q_proj", "up_proj"), name="executor")
    randomize_adapter(trained, "executor", seed=10)
    lora.save_adapter(trained, folder, "executor")
    return hf_logits(PeftModel.from_pretrained(load_hf(hf_dir), str(folder)).merge_and_unload().eval(), ids)


def test_merged_copy_equals_peft_and_shares_what_the_adapter_leaves_alone(hf_dir, ids, tmp_path):
    """What evaluation runs per role: the base with one adapter merged into copies of the layers it covers.
    Reference: PEFT's merge_and_unload of the same adapter on the transformers model."""
    expected = save_executor_adapter_and_peft_merged_logits(hf_dir, ids, tmp_path / "executor")
    base = load_ours(hf_dir)
    base_logits, base_bytes = our_logits(base, ids), storage_bytes(base)
    merged = lora.merged_copy(base, tmp_path / "executor", "executor")
    torch.testing.assert_close(our_logits(merged, ids), expected, rtol=1e-4, atol=1e-5)
    assert not [name for name, m in merged.named_modules() if m.training]
    torch.testing.assert_close(our_logits(base, ids), base_logits, rtol=0, atol=0)  # the base is untouched
    covered = [p.numel() for name, p in base.named_parameters() if name.endswith(("q_proj.weight", "up_proj.weight"))]
    adapter = sum(p.numel() for p in lora.adapter_parameters(merged, "executor"))
    together = {s.data_ptr(): s.nbytes() for m in (base, merged) for t in m.parameters() for s in [t.untyped_storage()]}
    assert sum(together.values()) == base_bytes + 4 * (sum(covered) + adapter)  # only covered layers are copied
    with pytest.raises(ValueError, match="without adapters"):
        lora.merged_copy(merged, tmp_path / "executor", "executor")


def test_merged_copy_of_a_base_laid_out_for_decoding_equals_peft_and_leaves_the_base_alone(hf_dir, ids, tmp_path):
    """What rollout.LocalEngine does: lay the base out for decoding (q k v and gate up joined), merge a role's
    adapter into a copy, lay the copy out. The adapter covers q_proj and up_proj only, so each joined group
    mixes merged and shared weights. Reference: PEFT's merge_and_unload."""
    expected = save_executor_adapter_and_peft_merged_logits(hf_dir, ids, tmp_path / "executor")
    base = lay_out_for_decoding(load_ours(hf_dir))
    base_logits = our_logits(base, ids)
    joints = [joint_weight(g).data_ptr() for g in joined_projections(base)]
    merged = lay_out_for_decoding(lora.merged_copy(base, tmp_path / "executor", "executor"))
    assert all(joint_weight(g) is not None for g in joined_projections(merged))  # joined again, merged ones too
    assert_reordered_sums_close(our_logits(merged, ids), expected, LOGIT_TERMS)
    assert [joint_weight(g).data_ptr() for g in joined_projections(base)] == joints  # the base keeps its blocks
    torch.testing.assert_close(our_logits(base, ids), base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("ckpt", ["qwen2_ckpt", "llama_ckpt"])  # tied and untied lm_head
def test_export_merged_loads_in_transformers_and_prost(ckpt, request, ids, tmp_path):
    hf_dir = request.getfixturevalue(ckpt)[0]
    model = load_ours(hf_dir)
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapter(model, "default", seed=10)
    adapted = our_logits(model, ids)
    model_io.export_merged(model, tmp_path / "merged")
    assert lora.active_adapter(model) == "default" and not any(l.merged for l in lora.lora_layers(model).values())
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "merged" / fname).read_bytes() == (hf_dir / fname).read_bytes()
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k for k in tensors)
    hf = load_hf(tmp_path / "merged")
    assert_reordered_sums_close(hf_logits(hf, ids), adapted, LOGIT_TERMS)
    assert_reordered_sums_close(our_logits(load_ours(tmp_path / "merged"), ids), adapted, LOGIT_TERMS)
    with pytest.raises(ValueError, match="overwrite the base model"):
        model_io.export_merged(model, hf_dir)
    # Merging in place first gives the same folder contents.
    lora.merge(model)
    model_io.export_merged(model, tmp_path / "merged2")
    again = load_file(tmp_path / "merged2" / "model.safetensors")
    assert again.keys() == tensors.keys()
    for k in tensors:
        torch.testing.assert_close(again[k], tensors[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def saved_adapter(hf_dir, tmp_path):
    model = load_ours(hf_dir)
    lora.apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))
    return lora.save_adapter(model, tmp_path / "adapter", "default")


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_load_adapter_missing_files(hf_dir, saved_adapter, tmp_path):
    model = load_ours(hf_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.load_adapter(model, tmp_path / "nope", "a")
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lora.load_adapter(model, saved_adapter, "a")
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(model, saved_adapter, "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.adapter_base(saved_adapter)
    assert lora.adapter_names(model) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_adapter_refuses_non_finite_weights_naming_the_tensor(hf_dir, saved_adapter, bad):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[2]
    tensors[key][1, 0] = bad
    save_file(tensors, path)
    model = load_ours(hf_dir)
    with pytest.raises(ValueError, match=f"tensor {re.escape(key)} holds 1 non-finite value"):
        lora.load_adapter(model, saved_adapter, "a")
    assert lora.adapter_names(model) == []


def test_load_adapter_wrong_base(hf_dir, saved_adapter):
    edit_config(saved_adapter, base_model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct")
    assert lora.adapter_base(saved_adapter) == "Qwen/Qwen2.5-1.5B-Instruct"
    with pytest.raises(ValueError, match="adapter for base 'Qwen/Qwen2.5-1.5B-Instruct'"):
        lora.load_adapter(load_ours(hf_dir), saved_adapter, "a")
    lora.load_adapter(load_ours(hf_dir), saved_adapter, "a", check_base=False)


def test_load_adapter_wrong_rank(hf_dir, saved_adapter):
    model = load_ours(hf_dir)
    lora.apply_lora(model, r=8, alpha=8, targets=("q_proj", "v_proj"), name="a")
    with pytest.raises(ValueError, match="wrong rank"):  # resuming into an adapter of another rank
        lora.load_adapter(model, saved_adapter, "a")
    edit_config(saved_adapter, r=2)
    with pytest.raises(ValueError, match="wrong rank"):  # config and tensors disagree
        lora.load_adapter(load_ours(hf_dir), saved_adapter, "b")


def test_load_adapter_wrong_shapes_or_modules(hf_dir, saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key: torch.zeros(4, 128)}, path)
    with pytest.raises(ValueError, match="64->64 in this model but 128->64 in the adapter"):
        lora.load_adapter(load_ours(hf_dir), saved_adapter, "a")
    save_file({k.replace("layers.0", "layers.9"): v for k, v in tensors.items()}, path)
    with pytest.raises(ValueError, match="layers.9.* does not have"):
        lora.load_adapter(load_ours(hf_dir), saved_adapter, "a")
    edit_config(saved_adapter, peft_type="PREFIX_TUNING")
    with pytest.raises(ValueError, match="peft_type must be 'LORA'"):
        lora.load_adapter(load_ours(hf_dir), saved_adapter, "a")


def test_load_adapter_in_place_keeps_parameter_identity(hf_dir, saved_adapter):
    model = load_ours(hf_dir)
    lora.apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), name="a")
    params = lora.adapter_parameters(model, "a")
    randomize_adapter(model, "a", seed=11)
    lora.load_adapter(model, saved_adapter, "a")
    assert [id(p) for p in lora.adapter_parameters(model, "a")] == [id(p) for p in params]
    saved = load_file(saved_adapter / "adapter_model.safetensors")
    layer = model.model.layers[1].self_attn.v_proj
    assert torch.equal(layer.lora_A["a"], saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])


def test_adapter_parameter_count_matches_peft(hf_dir):
    config = ModelConfig.from_hf(hf_dir)
    for r, targets in ((4, PROJ), (8, ("q_proj", "v_proj"))):
        peft_model = get_peft_model(load_hf(hf_dir), LoraConfig(r=r, target_modules=list(targets)))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert lora.count_adapter_parameters(config, r, targets) == trainable
        model = load_ours(hf_dir)
        lora.apply_lora(model, r=r, targets=targets)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_cli_export_of_a_peft_adapter_equals_peft_merge_and_unload(hf_dir, ids, tmp_path, capsys):
    torch.manual_seed(12)
    peft_model = get_peft_model(load_hf(hf_dir), LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = hf_logits(peft_model.merge_and_unload().eval(), ids)

    model_io.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "merged"), ids), expected, rtol=1e-4, atol=1e-5)

    capsys.readouterr()  # drop transformers' progress output
    with pytest.raises(SystemExit) as exit_info:
        model_io.main(["merge", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_bf16_base_keeps_fp32_adapter_and_gradients(hf_dir, ids, tmp_path):
    model = Transformer.from_pretrained(str(hf_dir), dtype=torch.bfloat16)
    lora.apply_lora(model, r=4, alpha=8, name="planner")
    randomize_adapter(model, "planner", seed=13)
    lora.save_adapter(model, tmp_path / "planner", "planner")
    model.train()
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.weight.grad is None
    assert q.lora_A["planner"].dtype == q.lora_A["planner"].grad.dtype == torch.float32
    # Same adapter in fp32 PEFT: equal up to bf16 rounding of the base (about 2% here; the adapter moves the
    # logits by about 90%).
    expected = hf_logits(PeftModel.from_pretrained(load_hf(hf_dir), str(tmp_path / "planner")).eval(), ids)
    err = (logits.detach().float() - expected).abs().max() / expected.abs().max()
    assert err < 0.05


def test_bf16_autocast_adapter_is_as_close_to_fp32_as_peft_under_the_same_autocast(hf_dir, ids, tmp_path):
    """Training's setting (bf16 base, fp32 adapter, bf16 autocast; prost adds B u inside the base's matmul):
    logits and adapter gradients are at least as close to the fp32 result as PEFT's under the same autocast."""
    model = Transformer.from_pretrained(str(hf_dir), dtype=torch.bfloat16)
    lora.apply_lora(model, r=4, alpha=8, name="planner")
    randomize_adapter(model, "planner", seed=13)
    lora.save_adapter(model, tmp_path / "planner", "planner")

    def logits_and_grads(net, path_prefix, autocast):
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(ids) if isinstance(net, Transformer) else net(input_ids=ids).logits
        out.float().logsumexp(-1).mean().backward()
        grads = {n.removeprefix(path_prefix): p.grad.float() for n, p in net.named_parameters() if p.requires_grad}
        return out.detach().float(), grads

    def peft(dtype):
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
        return PeftModel.from_pretrained(hf, str(tmp_path / "planner"), is_trainable=True)

    exact, exact_grads = logits_and_grads(peft(torch.float32), "base_model.model.", autocast=False)
    theirs, their_grads = logits_and_grads(peft(torch.bfloat16), "base_model.model.", autocast=True)
    ours, our_grads = logits_and_grads(model, "", autocast=True)

    def error(x, ref):
        return ((x - ref).norm() / ref.norm()).item()

    assert error(ours, exact) <= 1.1 * error(theirs, exact)
    # Per tensor, the two roundings scatter either way (2-5% each here); over all 28 adapter tensors they match.
    assert len(exact_grads) == len(our_grads) == 2 * 7 * model.config.num_hidden_layers
    ours_errors, their_errors = [], []
    for name, ref in exact_grads.items():  # PEFT's ...q_proj.lora_A.default.weight is prost's ...q_proj.lora_A.planner
        ours_errors.append(error(our_grads[name.replace(".default.weight", ".planner")], ref))
        their_errors.append(error(their_grads[name], ref))
    assert sum(ours_errors) <= 1.1 * sum(their_errors) and max(ours_errors) < 0.1, (ours_errors, their_errors)
