"""Gradient checkpointing of one T2T layer or block: keep its input, rerun it in backward.

The least memory for one extra forward of compute, with the same gradients as no checkpointing,
bit for bit on CPU (dropout masks are replayed from the saved RNG state). Measured on
t2t_vit_t_14, 224 px, batch 16, fp32 (benchmarks/RESULTS.md): about a third of the memory of a
lean step (``layers/lean.py``) for about 20% more time. Lean saving steps aside inside
checkpointed layers, where nothing but the input is kept anyway.
"""
from typing import Callable

import torch
import torch.utils.checkpoint


@torch.jit.unused
def checkpoint_block(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, with its activations recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
