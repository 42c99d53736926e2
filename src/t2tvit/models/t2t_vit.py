"""T2T-ViT: Tokens-to-Token Vision Transformer.

Paper: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
Yuan et al., ICCV 2021 (arXiv:2101.11986).

Checked against the authors' reference release (``models/t2t_vit.py``,
``token_performer.py``, ``token_transformer.py``): the state-dict keys and shapes are
the reference's, so released checkpoints load with ``strict=True`` and give the same
logits (see ``tests/test_parity.py``). Deliberate differences, none of which changes the
numbers of a released checkpoint:

- attention runs through ``F.scaled_dot_product_attention`` (``attn_impl='naive'``
  keeps the reference's explicit softmax), and the Performer's einsum/repeat chain is
  written as three matmuls, always in float32;
- the backbone attention scale is ``head_dim ** -0.5`` (the reference default). The
  reference's ``pretrained=True`` path would set ``embed_dim ** -0.5``; released
  weights are evaluated without it, so ``qk_scale`` is only an override here;
- any image size whose T2T grid is whole works, not only squares divisible by 16, and
  the position table is resized on load when the grid changes;
- the forward returns timm's contract: ``forward_features`` gives all tokens,
  ``forward_head`` takes the class token.
"""
import contextlib
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoint import fetch_pretrained, load_checkpoint
from ..cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR_MEAN, CIFAR_STD
from ..layers.attention import Attention, check_attn_impl
from ..layers.checkpointing import checkpoint_block
from ..layers.lean import LeanSaving, lean_saving_applies, timm_mlp
from ..layers.pos_table import resize_pos_table, sinusoid_table
from ..layers.t2t import T2TModule, to_2tuple_int
from ..registry import ModelEntry, register_entry

__all__ = ['T2TViT', 'Block', 'MODELS', 'MODEL_CONFIGS', 'PAPER_RESULTS', 'PRETRAINED', 'RELEASE_URL']


class Block(nn.Module):
    """Pre-norm Transformer block of the backbone (reference ``transformer_block.Block``)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            attn_impl: str = 'sdpa',
            attn_layer: Callable[..., nn.Module] = Attention,
            mlp_layer: Callable[..., nn.Module] = Mlp,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=drop, attn_impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.lean = True  # see layers/lean.py; T2TViT.set_lean_activations switches it
        # lean.norm casts for a single Linear reader: with several (ghost q, k, v), autocast's casts
        # would sum their gradients in float32, one shared cast in bf16
        self.lean_norm1 = isinstance(getattr(self.attn, 'qkv', None), nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if lean_saving_applies(self):
                return self.forward_lean(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` keeping the norms' and the activation's inputs for backward, not their outputs."""
        with LeanSaving() as lean:
            x = x + self.drop_path(self.attn(lean.norm(self.norm1, x) if self.lean_norm1 else self.norm1(x)))
            h = lean.norm(self.norm2, x)
            return x + self.drop_path(timm_mlp(lean, self.mlp, h) if type(self.mlp) is Mlp else self.mlp(h))


class T2TViT(nn.Module):
    """T2T module + class token + fixed sinusoid position table + deep-narrow ViT backbone."""

    # feature maps the stem gives before the blocks (the two T2T stages); ablations without T2T have none
    num_stem_stages: int = 2
    # buffers the reference holds as frozen Parameters; `t2tvit profile` counts them as it does
    reference_parameters = ('pos_embed',)

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            token_dim: int = 64,
            token_mixer: str = 'performer',
            t2t_kernel_sizes: Tuple[int, int, int] = (7, 3, 3),
            t2t_strides: Tuple[int, int, int] = (4, 2, 2),
            t2t_paddings: Tuple[int, int, int] = (2, 1, 1),
            kernel_ratio: float = 0.5,
            attn_impl: str = 'sdpa',
            pos_embed_resize: str = 'bicubic',
            dynamic_img_size: bool = False,
            block_fn: Callable[..., nn.Module] = Block,
    ):
        super().__init__()
        if global_pool not in ('token', ''):
            raise ValueError(f"global_pool {global_pool!r} is not supported "
                             "(T2T-ViT classifies the class token: 'token')")
        if pos_embed_resize not in ('bicubic', 'sinusoid'):
            raise ValueError(f"pos_embed_resize must be 'bicubic' or 'sinusoid', got {pos_embed_resize!r}")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.attn_impl = check_attn_impl(attn_impl)
        self.pos_embed_resize = pos_embed_resize
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.img_size = to_2tuple_int(img_size)

        self.tokens_to_token = self._build_stem(
            img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, token_dim=token_dim, token_mixer=token_mixer,
            kernel_sizes=t2t_kernel_sizes, strides=t2t_strides, paddings=t2t_paddings, kernel_ratio=kernel_ratio,
            attn_impl=attn_impl)
        self.grid_size = self.tokens_to_token.grid_size
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed (untrained) sinusoid table, saved in the state dict under the reference's key; a buffer
        # rather than the reference's frozen Parameter, so every parameter of the model gets a gradient
        # (on the default device: a model built under torch.device('meta') or create_model(device=...) holds it there)
        self.register_buffer('pos_embed', sinusoid_table(num_patches + 1, embed_dim, torch.get_default_device()))
        self.pos_drop = nn.Dropout(p=drop_rate)

        # CPU scalars, so that the model can also be built on the meta device (profiling)
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                     drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                     attn_impl=attn_impl)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self._feature_info()

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    # -- construction hooks (ablations override these) ------------------------------------------
    def _build_stem(self, **kwargs) -> nn.Module:
        return T2TModule(**kwargs)

    def _feature_info(self) -> List[Dict[str, Any]]:
        t2t = self.tokens_to_token
        s0, s1, s2 = t2t.strides
        info = [
            dict(num_chs=t2t.token_dim, reduction=s0, module='tokens_to_token.attention1'),
            dict(num_chs=t2t.token_dim, reduction=s0 * s1, module='tokens_to_token.attention2'),
        ]
        info += [dict(num_chs=self.embed_dim, reduction=s0 * s1 * s2, module=f'blocks.{i}')
                 for i in range(len(self.blocks))]
        return info

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm model contract ---------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        # the fixed sinusoid table is a buffer, not a parameter; a learned table (the ViT baselines) is one
        return {'cls_token', 'pos_embed'} if isinstance(self.pos_embed, nn.Parameter) else {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|^pos_embed|^tokens_to_token',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Keep only each T2T layer's and block's input and rerun it in backward (``layers/checkpointing.py``)."""
        self.grad_checkpointing = bool(enable)
        for module in self.modules():
            if isinstance(module, T2TModule):
                module.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def set_fused_stem(self, enable: bool = True):
        """Inference with each soft split + LayerNorm + projection as one strided convolution (``layers/t2t.py``):
        no patch matrices, faster on CPUs; logits within 1e-4 of the reference except on patches flat in every
        channel (~1e-3 there). Training and ``attn_impl='naive'`` always take the reference unfold path."""
        for module in self.modules():
            if isinstance(module, T2TModule):
                module.fused_split = bool(enable) and module.fusable

    @torch.jit.ignore
    def set_compiled_stem(self, enable: bool = True):
        """Run the T2T stem through ``torch.compile``, the blocks eager: whichever path it takes (the fused one
        of ``set_fused_stem`` in inference, the unfold one in training), its element-wise passes fuse. The first
        call in each mode compiles (5 to 70 s on a 2-core CPU). TorchScript, ONNX and fx tracing see the plain
        module. Same numbers as eager up to float rounding; in training the dropout masks differ (inductor's RNG).
        Measured on a 2-core CPU: bf16 inference 1.13x the eager fused stem, a bf16 training step 0.89x of eager."""
        for module in self.modules():
            if isinstance(module, T2TModule):
                module.compile_stem = bool(enable)

    @torch.jit.ignore
    def set_lean_activations(self, enable: bool = True):
        """Keep the inputs of LayerNorm and GELU for backward, not their outputs (on by default; bit-identical
        results, less memory: ``layers/lean.py``). Gradient checkpointing, where active, owns the saving."""
        for module in self.modules():
            if hasattr(module, 'forward_lean'):
                module.lean = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', ''):
                raise ValueError(f"global_pool {global_pool!r} is not supported (expected 'token')")
            self.global_pool = global_pool
        # the new head lives where the model does (timm's contract: its device, dtype and train/eval mode)
        like = self.cls_token
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str):
        """timm's hook for a ``custom_load`` pretrained tag: the reference release read by t2tvit's reader
        (EMA weights, ``module.`` prefix, the pickled run ``args``), a new head / image size fitted as with
        ``checkpoint_path``."""
        load_checkpoint(self, checkpoint_path)

    # -- forward ---------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.pos_embed
        if self.dynamic_img_size and (grid_h != self.grid_size[0] or grid_w != self.grid_size[1]):
            pos = resize_pos_table(pos, (grid_h, grid_w), old_grid=self.grid_size, mode=self.pos_embed_resize)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + pos)


    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], int, int]:
        """T2T tokens with class token and positions, the T2T stage maps, and the token grid."""
        tokens, stages = self.tokens_to_token.forward_stages(x)
        last = stages[-1]
        s = self.tokens_to_token.strides[2]
        k = self.tokens_to_token.kernel_sizes[2]
        p = self.tokens_to_token.paddings[2]
        grid_h = (last.shape[2] + 2 * p - k) // s + 1
        grid_w = (last.shape[3] + 2 * p - k) // s + 1
        return self._pos_embed(tokens, grid_h, grid_w), stages, grid_h, grid_w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, 1 + grid, embed_dim); token 0 is the class token."""
        x = self._tokens(x)[0]
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_block(blk, x)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the two T2T stages (strides 4, 8) and of the backbone blocks (stride 16).

        Index 0 and 1 are the restructurized T2T stages, index ``2 + i`` is block ``i``;
        ``norm=True`` applies the final norm to block outputs.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'output_fmt must be NCHW or NLC'
        num_stages = self.num_stem_stages
        take_indices, max_index = feature_take_indices(num_stages + len(self.blocks), indices)
        B = x.shape[0]
        x, stages, grid_h, grid_w = self._tokens(x)
        intermediates: List[torch.Tensor] = []
        for i, stage in enumerate(stages):
            if i in take_indices:
                intermediates.append(stage if output_fmt == 'NCHW' else stage.flatten(2).transpose(1, 2))
        for i, blk in enumerate(self.blocks):
            if stop_early and i + num_stages > max_index and not torch.jit.is_scripting():
                break
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_block(blk, x)
            else:
                x = blk(x)
            if i + num_stages in take_indices:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    y = y.reshape(B, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(self.num_stem_stages + len(self.blocks), indices)
        self.blocks = self.blocks[:max(0, max_index - self.num_stem_stages + 1)]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


# ---------------------------------------------------------------------------------------------
# Model table: one entry per registered model, its config, paper numbers and released weights.
# Paper numbers: Tables 1-4, 6-7 of the paper and the reference README (top-1 on ImageNet val at
# 224, params in M, MACs in G). Pretrained tags: the checkpoints the authors released, under their
# release file names, with the top-1 (%) they report (ImageNet val, None: the paper's number; CIFAR
# test for the transfers) and what differs from the model's own config. The token-labeling
# T2T-ViT-24 (84.2_T2T_ViT_24.pth.tar) is left out: its key layout could not be checked here.
# ---------------------------------------------------------------------------------------------
RELEASE_URL = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
_PERFORMER = dict(token_mixer='performer')
_TRANSFORMER = dict(token_mixer='transformer')
_CIFAR = dict(input_size=(3, 224, 224), crop_pct=1.0, interpolation='bilinear', mean=CIFAR_MEAN, std=CIFAR_STD)
_CIFAR10 = dict(dataset='CIFAR-10', num_classes=10, label_names=CIFAR10_CLASSES, **_CIFAR)
_CIFAR100 = dict(dataset='CIFAR-100', num_classes=100, label_names=CIFAR100_CLASSES, **_CIFAR)


def _in1k(file: str) -> Dict[str, Any]:
    return dict(file=file, top1=None, dataset='ImageNet-1k')


MODELS: Dict[str, ModelEntry] = {
    't2t_vit_7': ModelEntry(dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, **_PERFORMER),
                            paper=(71.7, 4.3, 1.1), pretrained={'in1k': _in1k('71.7_T2T_ViT_7.pth.tar')}),
    't2t_vit_10': ModelEntry(dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, **_PERFORMER),
                             paper=(75.2, 5.9, 1.5), pretrained={'in1k': _in1k('75.2_T2T_ViT_10.pth.tar')}),
    't2t_vit_12': ModelEntry(dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, **_PERFORMER),
                             paper=(76.5, 6.9, 1.8), pretrained={'in1k': _in1k('76.5_T2T_ViT_12.pth.tar')}),
    't2t_vit_14': ModelEntry(dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, **_PERFORMER),
                             paper=(81.5, 21.5, 4.8), pretrained={
        'in1k': _in1k('81.5_T2T_ViT_14.pth.tar'),
        'in1k_384': dict(file='83.3_T2T_ViT_14.pth.tar', top1=83.3, dataset='ImageNet-1k',
                         input_size=(3, 384, 384), crop_pct=1.0),
        'in1k_ft_cifar10': dict(file='cifar10_t2t-vit_14_98.3.pth', top1=98.3, **_CIFAR10),
        'in1k_ft_cifar100': dict(file='cirfar100_t2t-vit-14_88.4.pth', top1=88.4, **_CIFAR100),  # (sic) the release's
    }),
    't2t_vit_19': ModelEntry(dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, **_PERFORMER),
                             paper=(81.9, 39.2, 8.5), pretrained={
        'in1k': _in1k('81.9_T2T_ViT_19.pth.tar'),
        'in1k_ft_cifar10': dict(file='cifar10_t2t-vit_19_98.4.pth', top1=98.4, **_CIFAR10),
        'in1k_ft_cifar100': dict(file='cifar100_t2t-vit-19_89.0.pth', top1=89.0, **_CIFAR100),
    }),
    't2t_vit_24': ModelEntry(dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0, **_PERFORMER),
                             paper=(82.3, 64.1, 13.8), pretrained={'in1k': _in1k('82.3_T2T_ViT_24.pth.tar')}),
    't2t_vit_t_14': ModelEntry(dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, **_TRANSFORMER),
                               paper=(81.7, 21.5, 6.1), pretrained={'in1k': _in1k('81.7_T2T_ViTt_14.pth.tar')}),
    't2t_vit_t_19': ModelEntry(dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, **_TRANSFORMER),
                               paper=(82.4, 39.2, 9.8), pretrained={'in1k': _in1k('82.4_T2T_ViTt_19.pth.tar')}),
    't2t_vit_t_24': ModelEntry(dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0, **_TRANSFORMER),
                               paper=(82.6, 64.1, 15.0), pretrained={'in1k': _in1k('82.6_T2T_ViTt_24.pth.tar')}),
    # Table 6: ResNeXt-like (more heads) and wide-shallow structures
    't2t_vit_14_resnext': ModelEntry(dict(embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.0, **_PERFORMER),
                                     paper=(81.5, 21.5, 4.8)),
    # Table 7, T2T-ViT-d768-4 (the same shape as this model)
    't2t_vit_14_wide': ModelEntry(dict(embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0, **_PERFORMER),
                                  paper=(78.8, 25.0, 5.4)),
    # small images (CIFAR, the built-in digits): 32x32 -> 32x32 -> 16x16 -> 8x8 tokens
    't2t_vit_7_32': ModelEntry(dict(img_size=32, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
                                    t2t_kernel_sizes=(3, 3, 3), t2t_strides=(1, 2, 2), t2t_paddings=(1, 1, 1),
                                    **_PERFORMER)),
    # `make demo`'s model: t2t_vit_7_32's geometry, narrow and shallow to train in minutes on 2 CPU cores
    't2t_vit_lite_32': ModelEntry(dict(img_size=32, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, token_dim=16,
                                       t2t_kernel_sizes=(3, 3, 3), t2t_strides=(1, 2, 2), t2t_paddings=(1, 1, 1),
                                       **_PERFORMER)),
}


# -- views of the table: timm's pretrained cfgs, and the dicts tests and tools read ------------------
def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'tokens_to_token.attention1.kqv',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


def _first_conv(cfg: Dict[str, Any]) -> str:
    mixer = cfg.get('token_mixer', 'performer')
    return {'performer': 'tokens_to_token.attention1.kqv', 'transformer': 'tokens_to_token.attention1.attn.qkv',
            'convolution': 'tokens_to_token.soft_split0', 'patch': 'patch_embed.proj'}[mixer]


def _model_cfg(config: Dict[str, Any]) -> Dict[str, Any]:
    """A model's own timm pretrained cfg (no weights): input size and first layer from its config."""
    size = to_2tuple_int(config.get('img_size', 224))
    return _cfg(input_size=(config.get('in_chans', 3),) + size, first_conv=_first_conv(config),
                crop_pct=1.0 if size[0] < 64 else 0.9)


def release_info(entry: ModelEntry, tag: str) -> Dict[str, Any]:
    """A pretrained tag's release: ``file``, ``top1`` (the paper's when the release gives none), ``dataset``
    and the cfg keys that differ from the model's."""
    release = dict(entry.pretrained[tag])
    if release.get('top1') is None:
        release['top1'] = entry.paper[0]
    return release


def _tag_cfg(entry: ModelEntry, tag: str) -> Dict[str, Any]:
    """A tag's timm cfg: the release URL, read by ``T2TViT.load_pretrained`` (``custom_load``: the file is a
    reference ``.pth.tar``, not a bare state dict). timm's cfg takes no keys of its own, so the top-1 goes in
    ``description``, which export keeps."""
    release = release_info(entry, tag)
    overrides = {k: v for k, v in release.items() if k not in ('file', 'top1', 'dataset')}
    return {
        **_model_cfg(entry.config),
        'url': RELEASE_URL + release['file'],
        'custom_load': True,
        'description': f"top-1 {release['top1']}% on {release['dataset']} (the authors' release {release['file']})",
        'origin_url': 'https://github.com/yitu-opensource/T2T-ViT',
        'paper_ids': 'arXiv:2101.11986',
        **overrides,
    }


def table_cfgs(table: Dict[str, ModelEntry]) -> Dict[str, Any]:
    """timm's ``default_cfgs`` of a model table: each tag's cfg, or the model's own where it has no tag
    (the first tag listed is the model's default)."""
    untagged = {name: _model_cfg(e.config) for name, e in table.items() if not e.pretrained}
    tagged = {f'{name}.{tag}': _tag_cfg(e, tag) for name, e in table.items() for tag in e.pretrained}
    return generate_default_cfgs({**untagged, **tagged})


def _num_feature_stages(model_cls, kwargs) -> int:
    return 2 + int(kwargs.get('depth', 12))


def create_t2t_vit(variant: str, pretrained: bool = False, model_cls=T2TViT,
                   config: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """Build a registered variant: its table entry's ``config`` (default ``MODELS[variant]``), overridden by ``kwargs``.

    ``device`` and ``dtype`` are timm's factory arguments: every parameter and buffer is created on
    ``device`` (``'meta'`` allocates nothing) and the model is then cast to ``dtype``.
    """
    model_args = {**(MODELS[variant].config if config is None else config), **kwargs}
    out_indices = model_args.pop('out_indices', (0, 1, -1))
    if pretrained:
        # fetched here, so that a missing file and no network end in one line that says where to put it;
        # timm then finds it in its cache and hands it to ``T2TViT.load_pretrained``
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        fetch_pretrained(cfg.to_dict(), cache_dir=kwargs.get('cache_dir'))
    device, dtype = model_args.pop('device', None), model_args.pop('dtype', None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(
            model_cls, variant, pretrained,
            pretrained_strict=True,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
            **model_args,
        )
    return model if dtype is None else model.to(dtype=dtype)


def _entry_point(name: str, entry: ModelEntry):
    model_cls = entry.model_cls or T2TViT

    def fn(pretrained: bool = False, **kwargs) -> T2TViT:
        return create_t2t_vit(name, pretrained=pretrained, model_cls=model_cls, config=entry.config, **kwargs)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f'{name}: {entry.config}'
    return fn


def register_models(module_name: str, table: Dict[str, ModelEntry]) -> None:
    """Register one timm entry point per entry of ``table``, and the entry in :mod:`t2tvit.registry`.

    timm files each model under the module its entry point claims (``timm.list_models(module=...)``) and takes
    its pretrained config from that module's ``default_cfgs`` (:func:`table_cfgs`), so the entry points become
    functions of ``module_name``, the module that holds the table.
    """
    module = sys.modules[module_name]
    for name, entry in table.items():
        fn = _entry_point(name, entry)
        fn.__module__ = module_name
        setattr(module, name, register_model(fn))
        register_entry(name, entry)


MODEL_CONFIGS = {name: e.config for name, e in MODELS.items()}
PAPER_RESULTS = {name: e.paper for name, e in MODELS.items() if e.paper is not None}
PRETRAINED = {f'{name}.{tag}': release_info(e, tag) for name, e in MODELS.items() for tag in e.pretrained}
default_cfgs = table_cfgs(MODELS)
# one loop registers every variant of the table (timm reads ``default_cfgs`` above)
register_models(__name__, MODELS)
