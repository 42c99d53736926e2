"""Dropout whose mask costs little under torch.compile on a CPU.

Inductor's CPU code draws each random number of a dropout mask with its own Philox engine, one scalar
element at a time: ~4.8 ns an element on 2 cores, 12% of a compiled ``t2t_vit_lite_32`` training step at
32 px, where the T2T module's fixed dropout 0.1 runs over 128 x 1024 x 16 values twice per layer, and again
when the backward recomputes the mask. :class:`Dropout` is ``nn.Dropout`` everywhere except in a compiled
training graph, where its mask is a splitmix64 hash of (a seed drawn from torch's generator, the element's
index): integer multiplies and shifts that inductor vectorises, ~5x cheaper. The distribution is the
same: each element is kept independently with probability ``1 - p`` (to 2^-24, the resolution of
torch's own float uniforms) and scaled by ``1 / (1 - p)``. Eager mode, TorchScript, fx and export are the
plain ``torch.nn.functional.dropout``, so eager masks stay torch's (and the reference's) for a given seed.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_BITS = 24  # uniforms of 24 bits, as torch.rand's float32


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def hashed_uniform_bits(shape, seed: torch.Tensor) -> torch.Tensor:
    """int64 tensor of ``shape`` with independent uniform values in [0, 2^24): splitmix64 of seed + index."""
    # (index + seed) * gamma, not index * gamma + seed: inductor would fold the latter into an index
    # expression and overflow its int64 arithmetic
    z = (torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).view(shape) + seed) * _GAMMA
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    return _shift(z, 64 - _BITS)


def hashed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` with a mask from :func:`hashed_uniform_bits` (seed from torch's RNG)."""
    seed = torch.randint(-(2 ** 62), 2 ** 62, (), dtype=torch.int64, device=x.device)
    keep = hashed_uniform_bits(x.shape, seed) >= int(round(p * 2 ** _BITS))
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no parameters, same state dict) with :func:`hashed_dropout` masks
    inside a compiled training graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.training and 0.0 < self.p < 1.0 and torch.compiler.is_compiling():
                return self.forward_hashed(x)
        return F.dropout(x, self.p, self.training, self.inplace)

    @torch.jit.unused
    def forward_hashed(self, x: torch.Tensor) -> torch.Tensor:
        return hashed_dropout(x, self.p)
