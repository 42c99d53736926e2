"""Multi-head self-attention for the backbone and the T2T Transformer layer.

Both run through ``F.scaled_dot_product_attention`` by default. ``attn_impl='naive'``
materialises the attention matrix exactly as the reference code does; it is kept for
benchmarks and parity tests, and for pictures of the attention weights.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lean import is_fx_symbolic_tracing

ATTN_IMPLS = ('sdpa', 'naive')
# CPU, bf16/fp16, at most this many keys: softmax(q k^T) v as two matmuls beats the fused kernel (see
# ``scaled_attention``); longer sequences (the T2T Transformer layer's 3136 tokens) keep the fused kernel,
# whose memory does not grow with the square of the length
EXPLICIT_LOW_PRECISION_MAX_KEYS = 512


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r} (expected one of {', '.join(ATTN_IMPLS)})")
    return attn_impl


def scaled_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        dropout_p: float,
        attn_impl: str,
        scale_q: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, N, head_dim) tensors.

    ``naive`` follows the reference code's order of operations: the backbone scales the
    product ``q k^T``, the T2T Transformer layer scales ``q`` first (``scale_q=True``).
    """
    if attn_impl == 'sdpa':
        if not torch.jit.is_scripting():
            if not is_fx_symbolic_tracing() and _explicit_is_faster(q, k):
                return _explicit_attention(q, k, v, scale, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    # reference math: scaled product, then softmax, dropout, @ v
    attn = (q * scale) @ k.transpose(-2, -1) if scale_q else (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


@torch.jit.unused
def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    # torch 2.14's CPU flash kernel in bf16 (without AMX) ran forward 2x and forward + backward 2.5x slower than
    # two bf16 matmuls around a softmax, at the backbone's 197 tokens on a 2-core EPYC (benchmarks/compare.py)
    return (q.device.type == 'cpu' and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and k.shape[-2] <= EXPLICIT_LOW_PRECISION_MAX_KEYS)


@torch.jit.unused
def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale) v in the inputs' low precision: the softmax accumulates in float32 inside the
    kernel and rounds once, as the product with v would round it anyway. Autocast is off here, or it would run
    the softmax and its backward in float32 over the whole (N, N) matrix and cast it back."""
    with torch.autocast('cpu', enabled=False):
        # the scale on q, not on the (N, N) product: a pass over N x head_dim values instead of N x N, in the copy
        # that bmm makes of the strided q anyway; exact for head_dim 64 (scale 1/8, a power of two)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v


class Attention(nn.Module):
    """Backbone attention. Scale ``head_dim ** -0.5`` unless ``qk_scale`` is given.

    The reference ``pretrained=True`` constructors pass ``qk_scale = embed_dim ** -0.5``,
    but the released checkpoints are evaluated by building the model without it (the
    reference ``main.py`` loads weights through ``--initial-checkpoint``), so the
    default here is ``head_dim ** -0.5`` as the fixtures confirm.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            attn_impl: str = 'sdpa',
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = float(qk_scale or self.head_dim ** -0.5)
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, N) softmax weights, recomputed for pictures; not used by forward."""
        q, k, _ = self.qkv_heads(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        x = scaled_attention(q, k, v, self.scale, self.attn_drop if self.training else 0.0, self.attn_impl)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TokenAttention(nn.Module):
    """Attention of the T2T Transformer layer: input width ``dim``, output width ``in_dim``.

    Reference semantics kept for parity: no qkv bias, the scale is taken from the
    *input* width (``(dim // num_heads) ** -0.5``, not from ``in_dim``), and since the
    input and output widths differ the skip connection goes through ``v``.
    """

    def __init__(
            self,
            dim: int,
            in_dim: int,
            num_heads: int = 1,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            attn_impl: str = 'sdpa',
    ):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f'token dim {in_dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.in_dim = in_dim
        self.scale = float(qk_scale or (dim // num_heads) ** -0.5)
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.in_dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv_heads(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the ``qkv`` projection (B, N, 3 * in_dim) of the normalised tokens."""
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.in_dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = scaled_attention(q, k, v, self.scale, self.attn_drop if self.training else 0.0, self.attn_impl,
                             scale_q=True)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, self.in_dim)))
        return v.transpose(1, 2).reshape(B, N, self.in_dim) + y
