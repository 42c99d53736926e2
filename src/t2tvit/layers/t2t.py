"""The Tokens-to-Token module: soft split, re-structurization, repeated.

Three soft splits (``nn.Unfold``, overlapping patches) with a token mixer between
them (a Performer or Transformer layer, or convolutions for the paper's T2T-ViT-c
ablation), then a linear projection to the backbone width. Each stage's geometry
(kernel, stride, padding) is configurable so that small images work, e.g. 32x32 with
strides (1, 2, 2) gives an 8x8 token grid.

Keys match the reference ``T2T_module``: ``soft_split{0,1,2}``, ``attention{1,2}``,
``project``.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .attention import TokenAttention
from .checkpointing import checkpoint_block
from .lean import LeanSaving, lean_saving_applies, timm_mlp
from .performer import TokenPerformer
from timm.layers import Mlp

TOKEN_MIXERS = ('performer', 'transformer', 'convolution')


def to_2tuple_int(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f'img_size must be an int or (height, width), got {size!r}')
    return size


def t2t_grids(img_size, kernel_sizes: Sequence[int], strides: Sequence[int], paddings: Sequence[int]):
    """Grid (H, W) after each soft split; raises ValueError when the geometry cannot tile the image.

    A size tiles when each split's stride divides the padded extent left after its
    kernel, so that the grids are whole and restructurized tokens cover the image.
    """
    h, w = to_2tuple_int(img_size)
    grids: List[Tuple[int, int]] = []
    total = 1
    for s in strides:
        total *= s
    for k, s, p in zip(kernel_sizes, strides, paddings):
        if h + 2 * p < k or w + 2 * p < k:
            raise ValueError(f'image size {img_size} is too small for the T2T geometry (kernel {k}, padding {p})')
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        grids.append((h, w))
    full = to_2tuple_int(img_size)
    if full[0] % total or full[1] % total:
        raise ValueError(
            f'image size {full[0]}x{full[1]} cannot be tiled by the T2T geometry with total stride {total}: '
            f'use a multiple of {total} (e.g. {max(total, (full[0] // total) * total)})')
    return grids


class TokenTransformer(nn.Module):
    """Transformer layer of the T2T module (reference ``Token_transformer``)."""

    def __init__(self, dim: int, in_dim: int, num_heads: int = 1, mlp_ratio: float = 1.0,
                 drop: float = 0.0, attn_drop: float = 0.0, attn_impl: str = 'sdpa'):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim=in_dim, num_heads=num_heads, attn_drop=attn_drop,
                                   proj_drop=drop, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=int(in_dim * mlp_ratio), out_features=in_dim, drop=drop)
        self.lean = True  # see layers/lean.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if lean_saving_applies(self):
                return self.forward_lean(x)
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        with LeanSaving() as lean:
            x = self.attn(lean.norm(self.norm1, x))
            return x + timm_mlp(lean, self.mlp, lean.norm(self.norm2, x))


class T2TModule(nn.Module):
    """Image (B, C, H, W) -> tokens (B, H/16 * W/16, embed_dim) for the default geometry."""

    def __init__(
            self,
            img_size=224,
            in_chans: int = 3,
            embed_dim: int = 768,
            token_dim: int = 64,
            token_mixer: str = 'performer',
            kernel_sizes: Sequence[int] = (7, 3, 3),
            strides: Sequence[int] = (4, 2, 2),
            paddings: Sequence[int] = (2, 1, 1),
            kernel_ratio: float = 0.5,
            attn_impl: str = 'sdpa',
    ):
        super().__init__()
        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"unknown T2T token_mixer {token_mixer!r} (expected one of {', '.join(TOKEN_MIXERS)})")
        if not (len(kernel_sizes) == len(strides) == len(paddings) == 3):
            raise ValueError('the T2T module has 3 soft splits: give 3 kernel sizes, strides and paddings')
        self.img_size = to_2tuple_int(img_size)
        self.token_mixer = token_mixer
        self.kernel_sizes: List[int] = [int(k) for k in kernel_sizes]
        self.strides: List[int] = [int(s) for s in strides]
        self.paddings: List[int] = [int(p) for p in paddings]
        self.grids = t2t_grids(self.img_size, self.kernel_sizes, self.strides, self.paddings)
        self.grid_size = self.grids[-1]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.token_dim = token_dim
        self.stage_dims = (token_dim, token_dim)
        k0, k1, k2 = self.kernel_sizes
        s0, s1, s2 = self.strides
        p0, p1, p2 = self.paddings
        self.is_conv = token_mixer == 'convolution'
        if self.is_conv:
            # T2T-ViT-c of Table 7: three convolutions with the soft splits' geometry
            self.soft_split0 = nn.Conv2d(in_chans, token_dim, k0, s0, p0)
            self.soft_split1 = nn.Conv2d(token_dim, token_dim, k1, s1, p1)
            self.soft_split2 = nn.Identity()
            self.attention1 = nn.Identity()
            self.attention2 = nn.Identity()
            self.project = nn.Conv2d(token_dim, embed_dim, k2, s2, p2)
        else:
            self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
            self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
            self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
            dim1, dim2 = in_chans * k0 * k0, token_dim * k1 * k1
            if token_mixer == 'performer':
                self.attention1 = TokenPerformer(dim1, in_dim=token_dim, kernel_ratio=kernel_ratio, attn_impl=attn_impl)
                self.attention2 = TokenPerformer(dim2, in_dim=token_dim, kernel_ratio=kernel_ratio, attn_impl=attn_impl)
            else:
                self.attention1 = TokenTransformer(dim1, in_dim=token_dim, num_heads=1, mlp_ratio=1.0,
                                                   attn_impl=attn_impl)
                self.attention2 = TokenTransformer(dim2, in_dim=token_dim, num_heads=1, mlp_ratio=1.0,
                                                   attn_impl=attn_impl)
            self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.act = nn.GELU()  # between the convolutions of T2T-ViT-c; unused otherwise
        self.grad_checkpointing = False

    def _split_grid(self, h: int, w: int, i: int) -> Tuple[int, int]:
        k, s, p = self.kernel_sizes[i], self.strides[i], self.paddings[i]
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens and the two restructurized stage outputs (B, token_dim, H_i, W_i)."""
        B, _, H, W = x.shape
        stages: List[torch.Tensor] = []
        if self.is_conv:
            x = self.act(self.soft_split0(x))
            stages.append(x)
            x = self.act(self.soft_split1(x))
            stages.append(x)
            x = self.project(x).flatten(2).transpose(1, 2)
            return x, stages
        g1 = self._split_grid(H, W, 0)
        g2 = self._split_grid(g1[0], g1[1], 1)
        x = self.soft_split0(x).transpose(1, 2)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_block(self.attention1, x)
        else:
            x = self.attention1(x)
        # re-structurization: tokens back to an image of token_dim channels
        x = x.transpose(1, 2).reshape(B, self.token_dim, g1[0], g1[1])
        stages.append(x)
        x = self.soft_split1(x).transpose(1, 2)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_block(self.attention2, x)
        else:
            x = self.attention2(x)
        x = x.transpose(1, 2).reshape(B, self.token_dim, g2[0], g2[1])
        stages.append(x)
        x = self.soft_split2(x).transpose(1, 2)
        return self.project(x), stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]
