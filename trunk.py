"""trunk.py: training rows that continue one shared prefix, its keys and values computed once.

A fast path of prost.py's training step (batching.py finds the trunks): the executor's examples of one task share
their system prompt and task, so a micro-batch of them begins with the same tokens. `SharedTrunk` is a cache for
`model.Transformer.hidden` (the seam in model.py: `positions_and_mask`, `attend`, `length`): the trunk runs once,
as one row, and every row continues it, so the trunk's projections and MLPs run once instead of once per row.
Gradients reach the trunk through each row's attention to its keys and values, so they are the separate rows'
sum: the same loss terms and gradients as the rows run whole (tests/test_prost.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attention_masks
from model import attention

ATTENTION_BLOCK = 256  # queries per attention call after a shared trunk on the CPU (attend_after)


class SharedTrunk:
    """Keys and values of a trunk: the leading tokens that every row of a training batch has in common.

    `SharedTrunk(device)` records, during the trunk's own pass, each layer's keys and values (1, Hkv, P, d)
    without detaching them and attends causally over the trunk; `continuation()` then serves the rows' pass: row
    tokens sit at positions P, P + 1, ... and attend to the trunk's keys and every earlier key of their own row
    (`attend_after`). Each object does one of the two, whatever its length says, because activation
    checkpointing re-runs a block's forward after both passes."""

    def __init__(self, device, keys: tuple[dict, dict] | None = None):
        self.recording = keys is None
        self.k, self.v = keys if keys is not None else ({}, {})  # layer -> (1, Hkv, P, d)
        self.length = 0 if keys is None else next(iter(self.k.values())).shape[2]  # P once recorded
        self.device = device

    def continuation(self) -> "SharedTrunk":
        return SharedTrunk(self.device, (self.k, self.v))

    def positions_and_mask(self, T: int, device) -> tuple[torch.Tensor, None]:
        """Positions (1, T) after the trunk's P (0 while recording); no mask: the attention is causal."""
        return torch.arange(self.length, self.length + T, device=device)[None], None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Recording: keep k, v (1, Hkv, P, d) of the first forward (a recomputation's are equal) and attend
        causally over them. Continuing: q (B, H, T, d) attends to the trunk's keys, then its row's own."""
        if self.recording:
            self.k.setdefault(layer, k)
            self.v.setdefault(layer, v)
            return attention(q, k, v)
        B = k.shape[0]
        k = torch.cat((self.k[layer].expand(B, -1, -1, -1), k), dim=2)  # (B, Hkv, P + T, d)
        v = torch.cat((self.v[layer].expand(B, -1, -1, -1), v), dim=2)
        return attend_after(q, k, v)


def attend_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of T queries q (B, H, T, d) that follow P = S - T earlier keys: query i sees keys
    0..P + i of k, v (B, Hkv, S, d); the same as model.attention with a (T, S) causal mask.

    On CUDA that is one call with causal_lower_right (attention_masks.mask_form), which flash attention runs
    skipping the masked blocks. On the CPU it is a boolean mask, and one call with it would make CPU flash
    attention compute every query-key pair of the rectangle, since it skips no masked block; in blocks of
    ATTENTION_BLOCK queries each call reads only the keys its queries see, wasting at most half a block of pairs
    per query."""
    T, S = q.shape[2], k.shape[2]
    form = attention_masks.mask_form(q.device.type, T, S)
    if form.kind != attention_masks.BOOLEAN:
        return attention_masks.attend(q, k, v, attention_masks.build_mask(form, T, S))
    out = []
    for start in range(0, T, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, T)
        seen = S - T + end  # keys the block's last query sees
        mask = (torch.arange(seen, device=q.device)[None, :]
                <= torch.arange(S - T + start, seen, device=q.device)[:, None])  # (block, seen)
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :seen], v[:, :, :seen], attn_mask=mask,
                                                  scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(out, dim=2)  # (B, H, T, d)
