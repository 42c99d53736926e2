"""The Tokens-to-Token module: soft split, re-structurization, repeated.

Three soft splits (``nn.Unfold``, overlapping patches) with a token mixer between
them (a Performer or Transformer layer, or convolutions for the paper's T2T-ViT-c
ablation), then a linear projection to the backbone width. Each stage's geometry
(kernel, stride, padding) is configurable so that small images work, e.g. 32x32 with
strides (1, 2, 2) gives an 8x8 token grid.

Keys match the reference ``T2T_module``: ``soft_split{0,1,2}``, ``attention{1,2}``,
``project``.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.fx
import torch.nn.functional as F

from .attention import TokenAttention
from .checkpointing import checkpoint_block
from .lean import LeanSaving, is_fx_symbolic_tracing, lean_saving_applies, timm_mlp
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

    @torch.jit.unused
    def forward_projected(self, qkv: torch.Tensor) -> torch.Tensor:
        """``forward`` from ``attn.qkv(norm1(x))``, which the T2T module's fused soft split computes."""
        if lean_saving_applies(self):
            with LeanSaving() as lean:
                x = self.attn.attend(qkv)
                return x + timm_mlp(lean, self.mlp, lean.norm(self.norm2, x))
        x = self.attn.attend(qkv)
        return x + self.mlp(self.norm2(x))


def split_norm_project(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                       weight: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int, stride: int,
                       padding: int, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``linear(norm(unfold(x).transpose(1, 2)))`` as one strided convolution, in float32.

    (B, C, H, W) -> (B, H' * W', out) tokens. LayerNorm over a patch is (p - mean) * rstd * g + b, so
    its projection is rstd * (conv(x, W g) - mean * sum(W g)) + W b + c; each patch's mean and mean
    square over its C * k * k values (the padding's zeros included, as in the unfold) come from a
    box filter of the channel moments. No (B, H' * W', C * k * k) patch matrix is formed. Float32 even
    under autocast or with weights cast to bf16: the difference cancels where a patch is nearly flat, and
    the two convolutions of the stem are a few percent of the model's MACs. ``out_dtype``: the tokens'
    dtype (float32 when None).
    """
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _split_norm_project(x, norm_weight, norm_bias, eps, weight, bias, kernel_size, stride, padding,
                                       out_dtype)
    # no context manager without autocast, so exported graphs (ONNX, torch.export) stay plain
    return _split_norm_project(x, norm_weight, norm_bias, eps, weight, bias, kernel_size, stride, padding, out_dtype)


def _split_norm_project(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: int, stride: int,
                        padding: int, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    x, weight = x.float(), weight.float()
    B, C, out = x.shape[0], x.shape[1], weight.shape[0]
    folded = (weight * norm_weight.float()).reshape(out, C, kernel_size, kernel_size)
    shift = torch.matmul(weight, norm_bias.float())
    if bias is not None:
        shift = shift + bias.float()
    if C <= 4:
        # an image: LayerNorm ignores a shift shared by a patch's values, and the image's own mean taken off
        # (after the zero padding, which is part of the patches) keeps flat regions from cancelling in the sum
        x = F.pad(x, (padding,) * 4)
        x = x - x.mean(dim=(1, 2, 3), keepdim=True)
        padding = 0
    # channels-last: the convolution's output is already (B, H', W', out) in memory, the token layout
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, folded, None, stride, padding).permute(0, 2, 3, 1)
    # per-pixel moments over the channels, then the patch's from a box filter; with many channels in one pass
    # (no (B, C, H, W) square), while over an image's 3 strided channels the one-pass kernel is 3x slower
    if C <= 4:
        pixel = torch.stack((x.mean(dim=1), (x * x).mean(dim=1)), dim=1)
    else:
        var, mean = torch.var_mean(x, dim=1, correction=0)
        pixel = torch.stack((mean, var + mean * mean), dim=1)
    moments = F.avg_pool2d(pixel, kernel_size, stride, padding, count_include_pad=True).permute(0, 2, 3, 1)
    mean, mean_sq = moments[..., :1], moments[..., 1:]
    rstd = torch.rsqrt((mean_sq - mean * mean).clamp_min(0) + eps)
    folded_sum = folded.sum(dim=(1, 2, 3))
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        y = (y - mean * folded_sum) * rstd + shift
        y = y if out_dtype is None else y.to(out_dtype)
    else:
        # inference: two passes over the (B, H', W', out) output in place (a cast writing through out= is slower)
        y = torch.addcmul(shift, y.addcmul_(mean, folded_sum, value=-1.0), rstd, out=y)
        y = y if out_dtype is None else y.to(out_dtype)
    return y.reshape(B, y.shape[1] * y.shape[2], out)


# fx keeps the call as one node, so autocast is switched off when the traced graph runs
torch.fx.wrap('split_norm_project')


def split_project(x: torch.Tensor, linear: nn.Linear, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """``linear(unfold(x).transpose(1, 2))`` as one strided convolution: (B, C, H, W) -> (B, H' * W', out)."""
    B, C = x.shape[0], x.shape[1]
    weight = linear.weight.reshape(linear.weight.shape[0], C, kernel_size, kernel_size)
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, linear.bias, stride, padding)
    return y.permute(0, 2, 3, 1).reshape(B, y.shape[2] * y.shape[3], weight.shape[0])


def split_tokens(tokens: torch.Tensor, h: int, w: int, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """``unfold(_restructurize(tokens, h, w)).transpose(1, 2)`` read straight from the token layout.

    (B, h * w, C) -> (B, h' * w', C * k * k), the values in unfold's order (channel-major, then kernel row
    and column), bit for bit. Inductor compiles the unfold of a channels-last view into scalar gathers
    (forward) and scatters (its col2im backward): 55 ms for the (128, 1024, 16) tokens of a 32-px model's
    second split with the LayerNorm after it, forward and backward on 2 cores, against 16 ms for these k * k
    strided slices of contiguous channels. Only compiled graphs take it (``T2TModule.stages``): eager keeps
    the reference's ``nn.Unfold``, whose backward sums the overlapping windows in another order.
    """
    B, _, C = tokens.shape
    x = F.pad(tokens.reshape(B, h, w, C), (0, 0, padding, padding, padding, padding))
    ho, wo = (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1
    windows: List[torch.Tensor] = []
    for i in range(kernel_size):
        for j in range(kernel_size):
            windows.append(x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :])
    return torch.stack(windows, dim=-1).reshape(B, ho * wo, C * kernel_size * kernel_size)


def _hooked(modules) -> bool:
    """Whether a forward (pre-)hook waits on any of ``modules``: a path that skips their calls must not apply."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _restructurize(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h * w, C) tokens -> (B, C, h, w) image, a channels-last view of the same memory."""
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


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
        # opt-in inference path (T2TViT.set_fused_stem): soft split + LayerNorm + projection as strided
        # convolutions (split_norm_project); the naive path and training keep the reference's unfold. Off by
        # default: a patch that is flat in every channel (a mean-coloured letterbox) loses ~1e-3 of a logit to
        # float32 cancellation, outside the 1e-4 parity the default path keeps on every input
        self.fusable = not self.is_conv and attn_impl != 'naive'
        self.fused_split = False
        # the stem through torch.compile (T2TViT.set_compiled_stem): a flag, not a compiled callable held by the
        # module, so copies of the model (EMA, deepcopy) run their own weights through the shared compiled code
        self.compile_stem = False

    def _split_grid(self, h: int, w: int, i: int) -> Tuple[int, int]:
        k, s, p = self.kernel_sizes[i], self.strides[i], self.paddings[i]
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    @torch.jit.unused
    def _input_projection(self, layer: nn.Module) -> List[nn.Module]:
        """The LayerNorm and the Linear layer that read a T2T layer's input."""
        return [layer.norm1, layer.kqv if isinstance(layer, TokenPerformer) else layer.attn.qkv]

    @torch.jit.unused
    def _fused_applies(self) -> bool:
        # training keeps the unfold path: the folded form's weight gradients subtract two large sums
        # (conv(x, dy) and mean * sum(dy)), a float32 cancellation the patch matrices do not have
        if not self.fused_split or (self.training and torch.is_grad_enabled()):
            return False
        # a hook on a module the fused path does not call would silently not fire: such a caller gets the reference path
        modules = [self.soft_split0, self.soft_split1, self.soft_split2, self.attention1, self.attention2, self.project]
        modules += self._input_projection(self.attention1) + self._input_projection(self.attention2)
        return not _hooked(modules)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``forward_stages`` with every soft split a strided convolution (see ``split_norm_project``)."""
        (k0, k1, k2), (s0, s1, s2), (p0, p1, p2) = self.kernel_sizes, self.strides, self.paddings
        g1 = self._split_grid(x.shape[2], x.shape[3], 0)
        g2 = self._split_grid(g1[0], g1[1], 1)
        # float32 out; weights cast once to a low precision (model.to(torch.bfloat16)) take it back to theirs
        norm, linear = self._input_projection(self.attention1)
        x = split_norm_project(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias, k0, s0, p0,
                               linear.weight.dtype)
        stage1 = _restructurize(self.attention1.forward_projected(x), *g1)
        norm, linear = self._input_projection(self.attention2)
        x = split_norm_project(stage1, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias, k1, s1, p1,
                               linear.weight.dtype)
        stage2 = _restructurize(self.attention2.forward_projected(x), *g2)
        return split_project(stage2, self.project, k2, s2, p2), [stage1, stage2]

    @torch.jit.unused
    def _compile_applies(self) -> bool:
        return (self.compile_stem and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not is_fx_symbolic_tracing())

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens and the two restructurized stage outputs (B, token_dim, H_i, W_i)."""
        if not torch.jit.is_scripting():
            if self._compile_applies():
                return compiled_stages()(self, x)
        return self.stages(x)

    def stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``forward_stages`` run eagerly: the fused path where it applies, else the reference unfold."""
        if not torch.jit.is_scripting():
            if self._fused_applies():
                return self.forward_fused(x)
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
        token_splits = False
        if not torch.jit.is_scripting():
            token_splits = self._token_splits_apply()
        x = self.soft_split0(x).transpose(1, 2)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            t = checkpoint_block(self.attention1, x)
        else:
            t = self.attention1(x)
        # re-structurization: tokens back to an image of token_dim channels
        x = t.transpose(1, 2).reshape(B, self.token_dim, g1[0], g1[1])
        stages.append(x)
        # spelled out per stage (not a helper choosing soft_split1 or 2): TorchScript calls submodules by name only
        if token_splits:
            x = split_tokens(t, g1[0], g1[1], self.kernel_sizes[1], self.strides[1], self.paddings[1])
        else:
            x = self.soft_split1(x).transpose(1, 2)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            t = checkpoint_block(self.attention2, x)
        else:
            t = self.attention2(x)
        x = t.transpose(1, 2).reshape(B, self.token_dim, g2[0], g2[1])
        stages.append(x)
        if token_splits:
            x = split_tokens(t, g2[0], g2[1], self.kernel_sizes[2], self.strides[2], self.paddings[2])
        else:
            x = self.soft_split2(x).transpose(1, 2)
        return self.project(x), stages

    @torch.jit.unused
    def _token_splits_apply(self) -> bool:
        """Whether ``stages`` reads soft splits 1 and 2 from the token layout (:func:`split_tokens`): in
        compiled graphs, unless a hook waits on those ``nn.Unfold`` modules."""
        if not torch.compiler.is_compiling():
            return False
        return not _hooked((self.soft_split1, self.soft_split2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]


_COMPILED_STAGES = []


def compiled_stages():
    """``T2TModule.stages`` through ``torch.compile``, made on first use and shared by every T2T module.

    The stem is a few percent of the MACs but, on a CPU, a third of a bf16 forward pass: element-wise passes
    and dtype copies over (B, 3136, 64) tensors between small matmuls, which inductor fuses into a few loops
    (forward and backward alike). The module is an argument, not a closure: its parameters are graph inputs,
    so every model of one architecture (and its copies) shares the compiled code; a new batch size,
    architecture, train/eval mode or fused/unfold path compiles once more.
    """
    if not _COMPILED_STAGES:
        _COMPILED_STAGES.append(torch.compile(T2TModule.stages))
    return _COMPILED_STAGES[0]
