"""attention_masks.py: the mask form each attention call site takes on CUDA (decided here on the CPU), and the
forms' values against a hand-built boolean mask. With "cpu" added to FAST_KERNEL_DEVICES the CUDA forms run on
the CPU (causal_lower_right materialised, query heads folded), so decoding and shared-trunk training are checked
under them against transformers, the same independent oracle as tests/test_decoding.py and tests/test_prost.py."""

import pytest
import torch
import transformers
import test_decoding
import test_prost
from test_prost import base, trajectory_file  # noqa: F401  (fixtures)

import attention_masks as A
import decoding
import model as M
import trunk
from attention_masks import ALL_KEYS, BOOLEAN, CAUSAL, GROUPED_BOOLEAN, LOWER_RIGHT, MaskForm


@pytest.fixture
def cuda_forms(monkeypatch):
    """The CPU takes the forms CUDA takes."""
    monkeypatch.setattr(A, "FAST_KERNEL_DEVICES", ("cuda", "cpu"))


# ---- the decisions, per call site ------------------------------------------------------------------------------

@pytest.mark.parametrize("call, queries, keys, pads, cuda, cpu", [
    ("decode step, one row or unpadded batch", 1, 900, [0, 0], MaskForm(ALL_KEYS), MaskForm(ALL_KEYS)),
    ("prefill of an unpadded batch from an empty cache", 300, 300, [0, 0], MaskForm(CAUSAL), MaskForm(CAUSAL)),
    ("rows after a 3k shared trunk (trunk.attend_after)", 1000, 4000, [], MaskForm(LOWER_RIGHT), MaskForm(BOOLEAN)),
    ("chunked prefill, later chunk of an unpadded row", 64, 192, [0], MaskForm(LOWER_RIGHT), MaskForm(BOOLEAN)),
    ("chunked prefill, first chunk of a row padded by 7", 64, 71, [7], MaskForm(CAUSAL, 7), MaskForm(BOOLEAN)),
    ("chunked prefill, later chunk of a row padded by 7", 64, 135, [7], MaskForm(LOWER_RIGHT, 7), MaskForm(BOOLEAN)),
    ("prompt-lookup verification, lone row padded by 3", 5, 40, [3], MaskForm(LOWER_RIGHT, 3), MaskForm(BOOLEAN)),
    ("decode step of a lone row padded by 3", 1, 40, [3], MaskForm(ALL_KEYS, 3), MaskForm(BOOLEAN)),
    ("prefill of a left-padded batch", 120, 120, [0, 40, 7], MaskForm(GROUPED_BOOLEAN), MaskForm(BOOLEAN)),
    ("decode step of a left-padded batch", 1, 130, [0, 40, 7], MaskForm(GROUPED_BOOLEAN), MaskForm(BOOLEAN)),
])
def test_each_call_site_gets_the_form_the_fast_kernels_take_on_cuda(call, queries, keys, pads, cuda, cpu):
    assert A.mask_form("cuda", queries, keys, pads) == cuda, call
    assert A.mask_form("cpu", queries, keys, pads) == cpu, call
    # on CUDA no call but a padded batch hands a mask tensor to the kernel
    mask = A.build_mask(cuda, queries, keys, torch.tensor(pads or [0]), "cpu").mask
    assert (mask is None or isinstance(mask, torch.nn.attention.bias.CausalBias)) == (cuda.kind != GROUPED_BOOLEAN)


def test_a_lone_row_whose_queries_sit_in_its_padding_keeps_the_mask():
    # cutting the padding off would drop the keys those queries see; only a batch's left padding does this
    assert A.mask_form("cuda", 8, 8, [3]) == MaskForm(GROUPED_BOOLEAN)


def test_the_kv_cache_asks_mask_form_for_every_call(cuda_forms):
    config = M.ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    cache = M.KVCache(config, 1, 64, "cpu", torch.float32, pad=torch.tensor([5]))
    cache.length = 20
    _, mask = cache.positions_and_mask(4, torch.device("cpu"))
    assert mask.form == MaskForm(LOWER_RIGHT, 5)
    assert (mask.mask.seq_len_q, mask.mask.seq_len_kv) == (4, 19)


# ---- the forms' values ----------------------------------------------------------------------------------------

def boolean_reference(q, k, v, pads, queries):
    """model.attention with the (B, 1, T, S) mask written out by hand: causal, padding keys hidden, a padding
    query seeing itself."""
    S = k.shape[2]
    mask = torch.zeros(len(pads), 1, queries, S, dtype=torch.bool)
    for b, pad in enumerate(pads):
        for t in range(queries):
            slot = S - queries + t
            for s in range(slot + 1):
                mask[b, 0, t, s] = s >= pad or s == slot
    return M.attention(q, k, v, mask)


@pytest.mark.parametrize("queries, keys, pads", [
    (6, 6, [0, 0]), (1, 9, [0, 0]), (5, 12, [0, 0]),  # causal, one query, lower right
    (6, 6, [0, 2, 4]), (1, 9, [3, 0, 1]), (4, 10, [2, 0, 5]),  # padded batches: query heads grouped
    (4, 10, [3]), (1, 10, [3]), (6, 9, [3]),  # a lone padded row: padding cut off the keys
])
def test_every_cuda_form_gives_the_boolean_masks_values(cuda_forms, queries, keys, pads):
    g = torch.Generator().manual_seed(queries * keys)
    q = torch.randn(len(pads), 6, queries, 8, generator=g)  # 6 query heads over 2 K/V heads
    k, v = torch.randn(2, len(pads), 2, keys, 8, generator=g)
    mask = A.build_mask(A.mask_form("cpu", queries, keys, pads), queries, keys, torch.tensor(pads), "cpu")
    got = A.attend(q, k, v, mask)
    torch.testing.assert_close(got, boolean_reference(q, k, v, pads, queries), rtol=1e-6, atol=1e-6)


def test_lower_right_rows_after_a_trunk_give_the_blocked_boolean_values_and_gradients(cuda_forms, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 13, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, 20, 8, generator=g, requires_grad=True) for _ in range(2))
    fast = trunk.attend_after(q, k, v)
    fast_grads = torch.autograd.grad(fast.square().sum(), (q, k, v))
    monkeypatch.setattr(A, "FAST_KERNEL_DEVICES", ("cuda",))
    monkeypatch.setattr(trunk, "ATTENTION_BLOCK", 5)
    blocked = trunk.attend_after(q, k, v)
    torch.testing.assert_close(fast, blocked, rtol=1e-6, atol=1e-6)
    for a, b in zip(fast_grads, torch.autograd.grad(blocked.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- decoding and training under the CUDA forms, against transformers ---------------------------------------

def test_cuda_forms_prompt_cache_turns_equal_transformers(cuda_forms, qwen2_ckpt):
    # padded rows, chunks
    test_decoding.test_prompt_cache_turns_equal_transformers_and_reuse_the_previous_turn(qwen2_ckpt)


def test_cuda_forms_generate_under_a_small_memory_bound_equals_transformers(cuda_forms, qwen2_ckpt):
    test_decoding.test_generate_under_a_small_memory_bound_still_equals_transformers(qwen2_ckpt)


def test_cuda_forms_prompt_lookup_equals_transformers(cuda_forms, qwen2_ckpt):
    # lone rows of a padded batch
    test_decoding.test_prompt_lookup_drafts_keep_the_greedy_tokens_in_fewer_steps(qwen2_ckpt)


def test_cuda_forms_padded_batch_with_chunks_equals_transformers_per_prompt(cuda_forms, qwen2_ckpt):
    folder, hf = qwen2_ckpt
    ours = M.Transformer.from_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (4, 19, 11)]
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
    assert [x.ids for x in decoding.generate(ours, prompts, 10)] == want  # grouped boolean
    chunked = decoding.generate(ours, prompts, 10, prompt_cache=decoding.PromptCache(512), prefill_chunk=8)
    assert [x.ids for x in chunked] == want  # padding cut off, lower right


def test_cuda_forms_shared_trunk_losses_equal_transformers(cuda_forms, base, trajectory_file,  # noqa: F811
                                                            monkeypatch):
    test_prost.test_target_token_losses_match_transformers_logits(base, trajectory_file, True, monkeypatch)
