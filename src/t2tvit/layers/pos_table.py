"""Position tables: the reference's fixed sinusoid table and its resizing.

The reference T2T-ViT keeps a *fixed* sinusoid table (a parameter with
``requires_grad=False``; a buffer here, under the same key) whose first row belongs to the class token. Transfer to
another image size resizes the grid part bicubically (reference ``utils.py``,
``F.interpolate(mode='bicubic')``, ``align_corners=False``).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def sinusoid_table(num_positions: int, dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The reference sinusoid table, computed in float64 and returned as float32 (1, N, dim).

    Computed on the CPU whatever the default device (the same bits as the reference on every
    machine), then moved to ``device`` (default: the CPU).
    """
    position = torch.arange(num_positions, dtype=torch.float64, device='cpu')[:, None]
    j = torch.arange(dim, dtype=torch.float64, device='cpu')[None, :]
    exponent = 2 * torch.div(j, 2, rounding_mode='floor') / dim
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64, device='cpu'), exponent)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(device=device, dtype=torch.float32)[None]


def resize_pos_table(
        table: torch.Tensor,
        new_grid: Tuple[int, int],
        old_grid: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: int = 1,
        mode: str = 'bicubic',
) -> torch.Tensor:
    """Resize a (1, prefix + H*W, C) table to ``new_grid``.

    ``mode='bicubic'`` interpolates the grid rows like the reference transfer code;
    ``mode='sinusoid'`` regenerates the exact sinusoid table for the new length.
    Scriptable: the model calls it in forward when ``dynamic_img_size=True``.
    """
    new_len = num_prefix_tokens + new_grid[0] * new_grid[1]
    if mode == 'sinusoid':
        return sinusoid_table(new_len, table.shape[-1]).to(table.device, table.dtype)
    if mode != 'bicubic':
        raise ValueError("unknown pos_embed_resize mode " + mode + " (expected 'bicubic' or 'sinusoid')")
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(math.sqrt(grid.shape[1]) + 0.5)
        if side * side != grid.shape[1]:
            raise ValueError('cannot infer the grid of a non-square position table; pass old_grid')
        old_h, old_w = side, side
    else:
        old_h, old_w = old_grid[0], old_grid[1]
    if old_h == new_grid[0] and old_w == new_grid[1]:
        return table
    dtype = table.dtype
    grid = grid.float().reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[new_grid[0], new_grid[1]], mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix.float(), grid], dim=1).to(dtype)
