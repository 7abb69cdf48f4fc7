"""attention_masks.py: which form of causal mask an attention call hands to scaled_dot_product_attention.

Every attention of prost is causal, but the same pattern can be spelt several ways, and on CUDA the spelling
picks the kernel. Flash attention (bf16/fp16, grouped K/V heads natively, the backward recomputes the scores)
takes no mask tensor: only `is_causal` (queries are the keys) or `torch.nn.attention.bias.causal_lower_right`
(T queries after S - T earlier keys: rows after a shared trunk or a KV cache). The memory-efficient kernel takes
any mask but not grouped K/V heads. A boolean mask on grouped heads therefore runs the math kernel: fp32 scores,
K/V copied to every query head, the whole (T, S) score matrix kept for backward.

`mask_form` is the one decision, for every call site (model.KVCache for decoding and chunked prefill,
trunk.attend_after for training rows after a shared trunk): given the device type, the number of queries and
keys and each row's left padding, it returns the form; `build_mask` makes that form's mask and `attend` runs it.
On a CUDA device:

  - no padding                  is_causal (T == S), no mask (T == 1), else causal_lower_right(T, S)
  - one row with left padding   its padding slots are left out of the keys instead of masked, then as above
  - several rows with padding   a boolean mask with each K/V head's query heads folded into the query axis:
                                (B, Hkv, G x T, d) queries share one K/V head and one (G x T, S) mask, so the
                                memory-efficient kernel runs with K/V as stored

On the CPU every call keeps a plain boolean mask wherever queries follow earlier keys (the CPU has no lower-right
flash kernel: torch materialises the bias and runs the math kernel), so CPU numerics do not depend on this file.
Tests put "cpu" into FAST_KERNEL_DEVICES to run the CUDA forms on the CPU and compare them with the boolean ones.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

CAUSAL = "is_causal"  # T queries are the last T of T keys
ALL_KEYS = "no mask"  # one query that sees every key (a decode step)
LOWER_RIGHT = "causal_lower_right"  # T queries after S - T earlier keys
BOOLEAN = "boolean mask"  # (B|1, 1, T, S)
GROUPED_BOOLEAN = "boolean mask, query heads grouped"  # (B, 1, G x T, S) over (B, Hkv, G x T, d) queries

# Device types whose attention takes the fast kernels' forms (tests add "cpu" to check them against BOOLEAN).
FAST_KERNEL_DEVICES = ("cuda",)


class MaskForm(NamedTuple):
    kind: str
    first_key: int = 0  # keys before this slot are left out (a lone row's left padding) instead of masked


class Mask(NamedTuple):
    """What a KV cache hands its attention calls: the form and the mask it needs (None, a CausalBias or a
    boolean tensor (B|1, 1, T, S - first_key))."""
    form: MaskForm
    mask: torch.Tensor | CausalBias | None


def mask_form(device_type: str, queries: int, keys: int, pads: Sequence[int] = ()) -> MaskForm:
    """The form of the causal mask for `queries` new positions attending to `keys` keys (the queries being the
    last ones), where row b's first pads[b] key slots are left padding (empty: none)."""
    fast = device_type in FAST_KERNEL_DEVICES
    first = 0
    if any(pads):
        if not (fast and len(pads) == 1 and keys - queries >= pads[0]):
            return MaskForm(GROUPED_BOOLEAN if fast else BOOLEAN)
        first = pads[0]  # one row whose queries are past its padding: cut the padding off the keys
    keys -= first
    if queries == 1:
        return MaskForm(ALL_KEYS, first)
    if queries == keys:
        return MaskForm(CAUSAL, first)
    return MaskForm(LOWER_RIGHT if fast else BOOLEAN, first)


def build_mask(form: MaskForm, queries: int, keys: int, pad: torch.Tensor | None = None, device=None) -> Mask:
    """The mask of `form` for the last `queries` of `keys` key slots, rows left-padded by pad (B,) (None: no
    padding)."""
    if form.kind == LOWER_RIGHT:
        return Mask(form, causal_lower_right(queries, keys - form.first_key))
    if form.kind not in (BOOLEAN, GROUPED_BOOLEAN):
        return Mask(form, None)
    slots = torch.arange(keys - queries, keys, device=device)  # (T,) the queries' slots
    key_slots = torch.arange(keys, device=device)  # (S,)
    mask = key_slots[None, None, :] <= slots[None, :, None]  # (1, T, S) causal
    if pad is not None and bool(pad.any()):
        real = key_slots[None, None, :] >= pad[:, None, None]  # (B, 1, S)
        # a padding query sees itself, so no softmax row is empty (an empty row gives NaN keys later)
        mask = mask & (real | (key_slots[None, None, :] == slots[None, :, None]))  # (B, T, S)
    return Mask(form, mask[:, None])  # (B|1, 1, T, S)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, T, d) and k, v (B, Hkv, S, d) in `mask`'s form; (B, H, T, d)."""
    k, v = k[:, :, mask.form.first_key:], v[:, :, mask.form.first_key:]
    scale = q.shape[-1] ** -0.5
    if mask.form.kind == GROUPED_BOOLEAN:
        return attend_grouped(q, k, v, mask.mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.form.kind == CAUSAL,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                   ) -> torch.Tensor:
    """Masked GQA attention as plain multi-head attention over the K/V heads: the G = H / Hkv query heads of one
    K/V head become G x T queries of that head (query head h uses K/V head h // G, as enable_gqa does), each
    with its position's mask row. The same softmax per query; K/V are read as stored, never copied per head."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    folded = q.reshape(B, k.shape[1], G * T, d)  # (B, Hkv, G*T, d): query g*T + t is head g's position t
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(1, 1, G, 1), scale=scale)
    return out.view(B, H, T, d)
