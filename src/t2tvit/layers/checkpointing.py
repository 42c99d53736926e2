"""Gradient checkpointing of one block: full recomputation, or selective.

``full`` keeps only the block's input and reruns the whole block in backward: the least
memory, one extra forward of compute. ``selective`` keeps what is expensive to recompute
(the outputs of matmuls, attention kernels and convolutions) and reruns only the cheap
element-wise work in between (LayerNorm, GELU, residual adds, the Performer's exponentials):
activations that only feed such ops are not kept. Both give the same gradients as no
checkpointing, bit for bit on CPU (dropout masks are replayed from the saved RNG state).

Measured on t2t_vit_t_14, 224 px, batch 16, fp32 (see benchmarks/RESULTS.md): selective
needs about a quarter less memory per training step for about 4% more time; full needs about a
quarter of the memory for about 20% more time.
"""
import functools
from typing import Callable

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

GRAD_CHECKPOINTING = ('full', 'selective')

_aten = torch.ops.aten


def _expensive_ops() -> frozenset:
    names = [
        'mm', 'addmm', 'bmm', 'baddbmm', 'convolution', '_convolution',
        '_scaled_dot_product_flash_attention', '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_efficient_attention', '_scaled_dot_product_cudnn_attention',
    ]
    ops = []
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            ops.append(packet.default)
    return frozenset(ops)


_SAVE = _expensive_ops()


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _policy)


def check_grad_checkpointing(mode) -> str:
    """``True``/``'full'`` -> 'full', ``'selective'`` -> 'selective', ``False``/``None``/``''`` -> ''."""
    if mode is True:
        return 'full'
    if mode is False or mode is None or mode == '':
        return ''
    if mode not in GRAD_CHECKPOINTING:
        raise ValueError(f"grad checkpointing {mode!r}: expected True, False, 'full' or 'selective'")
    return mode


@torch.jit.unused
def checkpoint_block(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     selective: bool) -> torch.Tensor:
    """``block(x)``, with its activations recomputed in backward (all of them, or the cheap ones)."""
    if selective:
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=_selective_context)
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
