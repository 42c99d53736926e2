"""Ablations and baselines of the T2T-ViT paper (Tables 2, 6 and 7), registered in timm.

Paper: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
Yuan et al., ICCV 2021 (arXiv:2101.11986), Sec. 4.2-4.3.

Every model reuses :class:`T2TViT` and its ``Block``; only the part the ablation changes is
new here.

CNN designs moved into the T2T-ViT-14 backbone (Table 6), checked against the authors'
``models/t2t_vit_se.py``, ``t2t_vit_ghost.py`` and ``t2t_vit_dense.py``; the state-dict keys and
shapes are the reference's (``../shared/fixtures/<name>.spec.json``):

- ``t2t_vit_14_se``: a squeeze-and-excitation layer inside each attention, after the output
  projection (``attn.se_layer.fc``: reduction 16, no bias, ReLU, sigmoid; the squeeze averages over
  all tokens, class token included).
- ``t2t_vit_16_ghost``: ghost attention (q, k and v each project to half the width, a depthwise
  1x1 ``Conv1d`` "cheap operation" makes the other half) and a ghost MLP (``fc1`` keeps the width,
  two cheap operations make the rest of the hidden features, GELU after each part). The reference
  model has 16 layers; Table 6 lists it with depth 14, but its 16.3M parameters are the 16-layer
  model's.
- ``t2t_vit_dense``: DenseNet-style backbone, growth rate 64, stages of (3, 6, 6, 4) blocks from
  width 128, 8 heads, MLP ratio 2. Each block runs attention and MLP on the current width and
  appends ``dense_linear`` (width -> growth) to its input; a transition ``blocks.N.linear`` (Linear
  + GELU) halves the width between stages; the final norm and head see 584 features. Kept from the
  reference for parity: the stochastic-depth rate of a block is ``linspace(0, rate, 12)[stage]``.
  Fixed: ``reset_classifier`` builds the head on the real output width (the reference uses the
  stem width 128).

Ablations of Table 7:

- ``t2t_vit_c_14``: the T2T module replaced by three convolutions with the soft splits' kernels
  (7, 3, 3) and strides (4, 2, 2) (``token_mixer='convolution'`` of the T2T module).
- ``t2t_vit_14_wo_t2t``: the T2T-ViT-14 backbone on a plain 16x16 patch embedding (a strided
  ``Conv2d``), with the fixed sinusoid table. It has no T2T stages, so its only feature maps are
  the blocks', at stride 16.

ViT baselines of Tables 2 and 6 (all: 16x16 patches, learned position embedding, class token, no
qkv bias, LayerNorm with torch's default eps 1e-5). Their key names are timm's ViT names.

- ``vit_s_16``: ViT-S/16 of the paper, the "small" ViT of the timm of that time
  (``vit_small_patch16_224``): width 768, 8 layers, 8 heads, MLP 2304 (Table 1). Its attention scale
  is ``768 ** -0.5``, the scale that timm's released ``vit_small_patch16_224`` weights were trained
  with, so those weights load strictly and evaluate as published; pass ``qk_scale=96 ** -0.5`` for
  the usual ``head_dim ** -0.5`` (timm's factory drops ``None`` arguments). timm's definition used
  ``nn.LayerNorm`` with the default eps (1e-5), not the 1e-6 of its ViT-B/L, and so does this one.
- ``vit_dn`` (deep-narrow) and ``vit_sw`` (shallow-wide): the paper gives only width and depth
  (Sec. 4.2: 384 x 16 layers and 1024 x 4 layers) with parameters and MACs (Table 6). The rest is
  chosen here:

  * ``vit_dn``: MLP ratio 3 (hidden 1152), as in ViT-S/16 and T2T-ViT-14 of the same width: 24.4M
    parameters against the paper's 24.5M (ratio 4 would give 29.1M). 6 heads of 64, like
    T2T-ViT-14.
  * ``vit_sw``: MLP ratio 3.5 (hidden 3584), the ratio that reproduces the published size: 48.2M
    parameters and 9.56G MACs against 47.9M and 9.9G. Ratio 3 (hidden 3072, the ViT-S/16 ratio)
    would give 44.0M / 8.74G and ratio 4 (hidden 4096, ViT-L) 52.4M / 10.39G. 16 heads of 64, like
    ViT-L/16 of the same width.
  * both use the default attention scale ``head_dim ** -0.5``: there are no weights to match.

``PAPER_RESULTS`` holds the published (top-1 %, params M, MACs G); ``t2tvit profile`` prints them
beside the counts of these implementations.
"""
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from ..layers.attention import Attention, scaled_attention
from ..layers.lean import lean_saving_applies
from ..registry import ModelEntry
from .t2t_vit import Block, T2TViT, register_models, table_cfgs

__all__ = [
    'MODELS',
    'MODEL_CONFIGS',
    'PAPER_RESULTS',
    'CheapOperation',
    'DenseBlock',
    'GhostAttention',
    'GhostMlp',
    'PatchViT',
    'SEAttention',
    'SELayer',
    'T2TViTDense',
    'Transition',
]


# -- squeeze and excitation ------------------------------------------------------------------------
class SELayer(nn.Module):
    """Channel attention over tokens (B, N, C): scale each channel by a gate from the token mean."""

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1, keepdim=True))


class SEAttention(Attention):
    """Backbone attention with an SE layer between the output projection and its dropout."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.se_layer = SELayer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        x = scaled_attention(q, k, v, self.scale, self.attn_drop if self.training else 0.0, self.attn_impl)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.se_layer(x))


# -- ghost operations ------------------------------------------------------------------------------
class CheapOperation(nn.Conv1d):
    """GhostNet's cheap operation on tokens (B, N, C): a depthwise 1x1 convolution over the channels."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, kernel_size=1, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the convolution itself, not super().forward: TorchScript has no super()
        return self._conv_forward(x.transpose(1, 2), self.weight, self.bias).transpose(1, 2)


class GhostAttention(Attention):
    """Attention whose q, k, v are half projected, half made by cheap operations on that half."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kwargs)
        if dim % 2:
            raise ValueError(f'ghost attention needs an even width, got {dim}')
        half = dim // 2
        del self.qkv  # replaced by the half-width projections below
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = CheapOperation(half)
        self.cheap_operation_k = CheapOperation(half)
        self.cheap_operation_v = CheapOperation(half)
        # re-register the projection last: the reference's state-dict order (q, k, v, cheap ops, proj)
        proj, proj_drop = self.proj, self.proj_drop
        del self.proj, self.proj_drop
        self.proj, self.proj_drop = proj, proj_drop

    def _heads(self, y: torch.Tensor, cheap: torch.Tensor) -> torch.Tensor:
        B, N, _ = y.shape
        y = torch.cat((y, cheap), dim=2)
        return y.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv_heads(self, x: torch.Tensor):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return (self._heads(q, self.cheap_operation_q(q)),
                self._heads(k, self.cheap_operation_k(k)),
                self._heads(v, self.cheap_operation_v(v)))


class GhostMlp(nn.Module):
    """MLP whose hidden features are ``fc1`` (width kept) plus cheap operations on it.

    ``hidden_features`` must be a multiple of the width: ratio r gives r - 1 cheap operations
    (``cheap_operation2``, ``cheap_operation3``, ... as in the reference, which has r = 3).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        if hidden_features % in_features:
            raise ValueError(f'ghost MLP hidden size {hidden_features} is not a multiple of the width {in_features}')
        self.fc1 = nn.Linear(in_features, in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.num_cheap = hidden_features // in_features - 1
        for i in range(self.num_cheap):
            self.add_module(f'cheap_operation{i + 2}', CheapOperation(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        parts = [x]
        # in registration order; TorchScript unrolls this loop and keeps only the cheap operations
        for name, op in self.named_children():
            if name.startswith('cheap_operation'):
                parts.append(self.act(op(x)))
        x = self.drop(torch.cat(parts, dim=2))
        return self.drop(self.fc2(x))


# -- dense connections -----------------------------------------------------------------------------
class DenseBlock(Block):
    """Backbone block on the current width whose output, cut to ``growth_rate`` features, is appended."""

    def __init__(self, dim: int, growth_rate: int, **kwargs):
        super().__init__(dim, **kwargs)
        self.dense_linear = nn.Linear(dim, growth_rate)
        self.out_dim = dim + growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Block.forward written out: TorchScript has no super()
        if not torch.jit.is_scripting():
            if lean_saving_applies(self):
                return torch.cat((x, self.dense_linear(self.forward_lean(x))), dim=2)
        y = x + self.drop_path(self.attn(self.norm1(x)))
        y = y + self.drop_path(self.mlp(self.norm2(y)))
        return torch.cat((x, self.dense_linear(y)), dim=2)


class Transition(nn.Module):
    """Between dense stages: Linear + GELU to half the width."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.act = nn.GELU()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class T2TViTDense(T2TViT):
    """T2T module + dense backbone: stages of :class:`DenseBlock` joined by :class:`Transition`.

    ``blocks`` holds the dense blocks and the transitions in order (the reference layout), so block
    indices of ``forward_intermediates`` count the transitions too.
    """

    def __init__(
            self,
            growth_rate: int = 64,
            block_config: tuple[int, ...] = (3, 6, 6, 4),
            embed_dim: int = 128,
            num_heads: int = 8,
            mlp_ratio: float = 2.0,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer=None,
            num_classes: int = 1000,
            attn_impl: str = 'sdpa',
            **kwargs,
    ):
        super().__init__(embed_dim=embed_dim, depth=0, num_heads=num_heads, num_classes=num_classes,
                         drop_rate=drop_rate, norm_layer=norm_layer, attn_impl=attn_impl, **kwargs)
        norm_layer = norm_layer or nn.LayerNorm
        # reference quirk kept for parity: the rates come from linspace(0, rate, 12) (its unused
        # ``depth=12`` default) and every block of a stage gets the rate of the stage's index
        dpr = torch.linspace(0, drop_path_rate, 12, device='cpu').tolist()
        blocks: list[nn.Module] = []
        dim = embed_dim
        for stage, num_layers in enumerate(block_config):
            if stage:
                blocks.append(Transition(dim, dim // 2))
                dim //= 2
            for _ in range(num_layers):
                blocks.append(DenseBlock(
                    dim, growth_rate, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[stage], norm_layer=norm_layer,
                    attn_impl=attn_impl))
                dim += growth_rate
        self.blocks = nn.ModuleList(blocks)
        self.num_features = self.head_hidden_size = dim
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self._feature_info()
        for part in (self.blocks, self.norm, self.head):
            part.apply(self._init_weights)

    def _feature_info(self) -> list[dict[str, Any]]:
        info = super()._feature_info()[:self.num_stem_stages]
        stride = info[-1]['reduction'] * self.tokens_to_token.strides[2]
        return info + [{'num_chs': blk.out_dim, 'reduction': stride, 'module': f'blocks.{i}'}
                       for i, blk in enumerate(self.blocks)]

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, **kwargs):
        if norm:
            raise ValueError('norm=True is not available for the dense backbone: the final norm has the output '
                             f'width ({self.num_features}) and the blocks before it are narrower')
        return super().forward_intermediates(x, indices, norm=False, **kwargs)


# -- no T2T module: ViT on 16x16 patches -------------------------------------------------------------
POS_TABLES = ('sinusoid', 'learned')


class PatchViT(T2TViT):
    """The backbone of :class:`T2TViT` on ViT's non-overlapping patch embedding (``patch_embed.proj``).

    ``pos_table='sinusoid'`` keeps T2T-ViT's fixed table (T2T-ViT-14 without T2T),
    ``'learned'`` is ViT's trained position embedding (the ViT baselines).
    """

    num_stem_stages = 0

    def __init__(self, patch_size: int = 16, pos_table: str = 'sinusoid', token_mixer: str = 'patch', **kwargs):
        if pos_table not in POS_TABLES:
            raise ValueError(f"pos_table must be one of {', '.join(POS_TABLES)}, got {pos_table!r}")
        if token_mixer != 'patch':
            raise ValueError(f"PatchViT has no T2T module: token_mixer must be 'patch', got {token_mixer!r}")
        if pos_table == 'learned' and kwargs.get('pos_embed_resize', 'bicubic') != 'bicubic':
            raise ValueError("a learned position embedding is resized with pos_embed_resize='bicubic'")
        self.patch_size = patch_size  # read by _build_stem while T2TViT.__init__ runs
        super().__init__(token_mixer=token_mixer, **kwargs)
        # timm's ViT names the stem ``patch_embed`` and registers it first: ViT checkpoints load as they are
        stem = self._modules.pop('tokens_to_token')
        self._modules = {'patch_embed': stem, **self._modules}
        if pos_table == 'learned':
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros_like(self.pos_embed), std=0.02))

    def _build_stem(self, img_size, in_chans: int, embed_dim: int, **unused) -> nn.Module:
        return PatchEmbed(img_size=img_size, patch_size=self.patch_size, in_chans=in_chans, embed_dim=embed_dim,
                          strict_img_size=not self.dynamic_img_size)

    def _feature_info(self) -> list[dict[str, Any]]:
        return [{'num_chs': self.embed_dim, 'reduction': self.patch_size, 'module': f'blocks.{i}'}
                for i in range(len(self.blocks))]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            'stem': r'^cls_token|^pos_embed|^patch_embed',
            'blocks': [(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        }

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int, int]:
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        return self._pos_embed(self.patch_embed(x), grid_h, grid_w), [], grid_h, grid_w


# ---------------------------------------------------------------------------------------------
# Model table: one entry per registered model: its config, its class, and the published
# (top-1 %, params M, MACs G) of Tables 2, 6 and 7.
# ---------------------------------------------------------------------------------------------
_T2T_VIT_14 = {'embed_dim': 384, 'depth': 14, 'num_heads': 6, 'mlp_ratio': 3.0}
_VIT = {'token_mixer': 'patch', 'patch_size': 16, 'pos_table': 'learned', 'out_indices': 3}

MODELS: dict[str, ModelEntry] = {
    # Table 6: CNN designs in the T2T-ViT backbone
    't2t_vit_14_se': ModelEntry({**_T2T_VIT_14, 'token_mixer': 'performer',
                                 'block_fn': partial(Block, attn_layer=SEAttention)}, paper=(81.6, 21.9, 4.9)),
    't2t_vit_16_ghost': ModelEntry({**_T2T_VIT_14, 'depth': 16, 'token_mixer': 'performer',
                                    'block_fn': partial(Block, attn_layer=GhostAttention, mlp_layer=GhostMlp)},
                                   paper=(79.5, 16.3, 3.7)),
    't2t_vit_dense': ModelEntry({'embed_dim': 128, 'growth_rate': 64, 'block_config': (3, 6, 6, 4), 'num_heads': 8,
                                 'mlp_ratio': 2.0, 'token_mixer': 'performer'},
                                model_cls=T2TViTDense, paper=(80.6, 23.7, 5.5)),
    # Table 7: the T2T module ablated
    't2t_vit_c_14': ModelEntry({**_T2T_VIT_14, 'token_mixer': 'convolution'}, paper=(80.8, 21.3, 4.6)),
    't2t_vit_14_wo_t2t': ModelEntry({**_T2T_VIT_14, 'token_mixer': 'patch', 'patch_size': 16, 'pos_table': 'sinusoid',
                                     'out_indices': 3}, model_cls=PatchViT, paper=(79.5, 21.1, 4.2)),
    # Tables 2 and 6: ViT baselines
    'vit_s_16': ModelEntry({**_VIT, 'embed_dim': 768, 'depth': 8, 'num_heads': 8, 'mlp_ratio': 3.0,
                            'qk_scale': 768 ** -0.5}, model_cls=PatchViT, paper=(78.1, 48.6, 10.1)),
    'vit_dn': ModelEntry({**_VIT, 'embed_dim': 384, 'depth': 16, 'num_heads': 6, 'mlp_ratio': 3.0},
                         model_cls=PatchViT, paper=(79.0, 24.5, 5.5)),
    'vit_sw': ModelEntry({**_VIT, 'embed_dim': 1024, 'depth': 4, 'num_heads': 16, 'mlp_ratio': 3.5},
                         model_cls=PatchViT, paper=(69.9, 47.9, 9.9)),
}

MODEL_CONFIGS = {name: e.config for name, e in MODELS.items()}
PAPER_RESULTS = {name: e.paper for name, e in MODELS.items() if e.paper is not None}
default_cfgs = table_cfgs(MODELS)
# one loop registers every model of the table (timm reads ``default_cfgs`` above)
register_models(__name__, MODELS)
