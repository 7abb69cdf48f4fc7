"""dropout_masks.py: a faster dropout on the LoRA adapter input, for training.

A fast path of lora.py's `LoRALinear`, whose textbook dropout draws one fp32 uniform per element and compares
it with p. Here each element gets 15 random bits, made into an integer as wide as the element that is all ones
(keep) or all zeros (drop); `x & mask` on x's bits zeroes the dropped elements exactly, and the backward pass
applies the same mask to the gradient. p is rounded to a multiple of 2^-15 (0.05 -> 0.0499878; flash
attention's GPU dropout keeps 8 bits); the 1 / keep rescaling uses the rounded value and is the caller's.
`use_fast_dropout(model)` puts it in every LoRA layer of a model (prost.py does, unless --plain); the tests check
it against the textbook formula with the same mask, and that each element is dropped with probability p.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora import lora_layers

DROP_LEVELS = 2 ** 15
SIGNED_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer type of that width


def drop_threshold(p: float) -> int:
    """An element is dropped when its 15 random bits, read as an integer in [0, 2^15), are below this."""
    return round(p * DROP_LEVELS)


def keep_probability(p: float) -> float:
    return 1 - drop_threshold(p) / DROP_LEVELS


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Integers as wide as `dtype`'s elements: -1 (all bits set: keep) or 0 (drop, probability p), independently."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # 64 random bits
    bits = words.view(torch.int16)[:n].view(shape) >> 1  # 15 uniform bits per element, in [-2^14, 2^14)
    margin = bits.sub_(drop_threshold(p) - DROP_LEVELS // 2)  # bits + 2^14 - threshold: negative when dropped
    mask = margin.bitwise_right_shift_(15).bitwise_not_()  # the sign spread over all bits, inverted
    return mask.to(SIGNED_INT[dtype.itemsize])


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x.view(mask.dtype) & mask).view(x.dtype)


class DropElements(torch.autograd.Function):
    """x with each element zeroed with probability p (not rescaled); its gradient is zeroed where x was.
    It draws from torch's default generator, so seeding and activation checkpointing's replay of the RNG
    state give the same masks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = keep_mask(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(mask)
        return apply_mask(x, mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        return apply_mask(grad, mask), None


def drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """lora.textbook_drop's contract: (x with each element zeroed with probability p, the keep probability)."""
    return DropElements.apply(x, p), keep_probability(p)


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Make every LoRA layer of the model (those there now) drop its adapter input with `drop`; returns it."""
    for layer in lora_layers(model).values():
        layer.drop = drop
    return model
