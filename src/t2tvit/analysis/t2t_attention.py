"""Attention inside the Tokens-to-Token module: where one token of a T2T stage looks on the image.

Each T2T stage attends over the tokens of its soft split (56x56 and 28x28 at 224 px), with no class
token, so the picture is one query position's row of the attention, drawn on the stage's grid over
the image.

- Transformer T2T layer (T2T-ViT-t): the softmax weights ``softmax(q k^T * scale)`` recomputed from
  the layer's input, with the reference's scale (taken from the input width, ``scale_q``).
- Performer T2T layer: no attention matrix is ever formed; its output is
  ``phi(q_t) (sum_n phi(k_n) v_n^T) / (phi(q_t) . sum_n phi(k_n) + eps)``. The implicit weights are
  ``A[t, n] = phi(q_t) . phi(k_n) / (phi(q_t) . sum_m phi(k_m) + eps)``, normalised per query, with
  ``phi`` the layer's own positive random features from its saved ``w`` in float32, so ``A @ v`` is
  the layer's attention output (tests/test_t2t_attention.py checks it). Only the chosen query's row
  is computed (O(T) per picture), so a 1024 px render, 65,536 tokens in stage 1, needs no T x T matrix.

The stages' inputs are recorded by forward pre-hooks that exist only inside :func:`stage_inputs`;
a hooked T2T module takes the reference (unfold) path, so the fused stem never hides an input.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError
from ..layers.performer import TokenPerformer
from ..layers.t2t import TokenTransformer

STAGES = ('t2t1', 't2t2')


def _t2t_module(model: nn.Module) -> nn.Module:
    t2t = getattr(model, 'tokens_to_token', None)
    if t2t is None:
        raise UserError('this model has no T2T module (its tokens come from a patch embedding): no T2T attention')
    if t2t.token_mixer == 'convolution':
        raise UserError('the T2T stages of this model are convolutions (T2T-ViT-c): no T2T attention')
    return t2t


def check_stages(stages: Sequence[str]) -> List[str]:
    out = []
    for s in stages:
        key = str(s).strip().lower().replace('_', '')
        if key not in STAGES:
            raise UserError(f'--stages {s}: choose from t2t1, t2t2')
        out.append(key)
    return list(dict.fromkeys(out))


@contextmanager
def stage_inputs(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Inside the block, every forward records each T2T layer's input tokens (B, T, dim) as ``t2t1``/``t2t2``."""
    t2t = _t2t_module(model)
    inputs: Dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in (('t2t1', t2t.attention1), ('t2t2', t2t.attention2)):
        def hook(_module, args, name=name):
            inputs[name] = args[0].detach()
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def performer_qkv(layer: TokenPerformer, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's q, k, v (B, T, emb) from its input tokens, in float32 (its k, q, v split order)."""
    k, q, v = torch.split(layer.kqv(layer.norm1(x)).float(), layer.emb, dim=-1)
    return q, k, v


def performer_attention_weights(layer: TokenPerformer, x: torch.Tensor,
                                queries: torch.Tensor | None = None) -> torch.Tensor:
    """The Performer's implicit attention, (B, len(queries), T) (all queries when None), float32.

    Row t is ``phi(q_t) . phi(k_n) / (phi(q_t) . sum_m phi(k_m) + eps)``: the weights the layer's linear
    attention gives each value, so ``weights @ v`` is its output before the projection.
    """
    q, k, _ = performer_qkv(layer, x)
    if queries is not None:
        q = q[:, queries]
    with torch.autocast(q.device.type, enabled=False):  # float32 even when the caller runs under autocast
        qp, kp = layer.random_features(q), layer.random_features(k)
        scores = torch.matmul(qp, kp.transpose(1, 2))
        normaliser = torch.matmul(qp, kp.sum(dim=1).unsqueeze(-1))  # the layer's D, summed as it sums it
        return scores / (normaliser + layer.epsilon)


def transformer_attention_weights(layer: TokenTransformer, x: torch.Tensor,
                                  queries: torch.Tensor | None = None) -> torch.Tensor:
    """The Transformer T2T layer's softmax weights, (B, heads, len(queries), T) (all queries when None)."""
    q, k, _ = layer.attn.qkv_heads(layer.norm1(x))
    q, k = q.float(), k.float()
    if queries is not None:
        q = q[:, :, queries]
    with torch.autocast(q.device.type, enabled=False):
        return ((q * layer.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def query_token(query_xy: Tuple[float, float], image_hw: Tuple[int, int], grid: Tuple[int, int]) -> int:
    """The token of a stage grid (gh, gw) that covers pixel (x, y) of an (H, W) input."""
    x, y = query_xy
    (h, w), (gh, gw) = image_hw, grid
    if not (0 <= x < w and 0 <= y < h):
        raise UserError(f'--query {x:g} {y:g} is outside the {w}x{h} input (give X Y in its pixels)')
    return min(gh - 1, int(y * gh / h)) * gw + min(gw - 1, int(x * gw / w))


@torch.no_grad()
def stage_attention(model: nn.Module, x: torch.Tensor, stages: Sequence[str],
                    query_xy: Tuple[float, float] | None = None) -> Dict[str, torch.Tensor]:
    """One query's attention over each chosen T2T stage's grid, ``{stage: (gh, gw)}``, for the first image.

    ``query_xy`` is a pixel (x, y) of the input (default: its centre); heads, if several, are averaged.
    """
    t2t = _t2t_module(model)
    stages = check_stages(stages)
    h, w = x.shape[-2:]
    query_xy = query_xy if query_xy is not None else (w / 2, h / 2)
    with stage_inputs(model) as inputs:
        model.forward_features(x[:1])
    g1 = t2t._split_grid(h, w, 0)
    grids = {'t2t1': g1, 't2t2': t2t._split_grid(g1[0], g1[1], 1)}
    out = {}
    for stage in stages:
        layer = t2t.attention1 if stage == 't2t1' else t2t.attention2
        tokens, grid = inputs[stage], grids[stage]
        query = torch.tensor([query_token(query_xy, (h, w), grid)])
        if isinstance(layer, TokenPerformer):
            row = performer_attention_weights(layer, tokens, query)[0, 0]
        else:
            row = transformer_attention_weights(layer, tokens, query)[0, :, 0].mean(dim=0)
        out[stage] = row.reshape(grid)
    return out


def render_stage_attention(image, maps: Dict[str, torch.Tensor], query_xy: Tuple[float, float], path,
                           title: str, mixer: str):
    """``attention_t2t.png``: per stage, the query's attention over the image and on its own grid."""
    from pathlib import Path

    from .visualize import DPI, FOOTER_IN, HEADER_IN, Picture, _new_figure, _size_px, _upsampled
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = image.shape[:2]
    fig = _new_figure(2 * 3.0 * len(maps), 3.0 + HEADER_IN + FOOTER_IN)
    fig.suptitle(f'T2T attention of one query: {title}', fontsize=12)
    axes = fig.subplots(1, 2 * len(maps), squeeze=False)[0]
    qx, qy = query_xy
    for i, (stage, m) in enumerate(maps.items()):
        over, raw = axes[2 * i], axes[2 * i + 1]
        over.imshow(image)
        over.imshow(_upsampled(m, size), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
        over.plot([qx - 0.5], [qy - 0.5], marker='+', color='cyan', markersize=14, markeredgewidth=2)
        over.set_title(f'T2T stage {stage[3:]} on the input', fontsize=10)
        im = raw.imshow(m.float().numpy(), cmap='inferno', interpolation='nearest')
        gh, gw = m.shape
        raw.plot([qx * gw / size[1] - 0.5], [qy * gh / size[0] - 0.5], marker='+', color='cyan', markersize=14,
                 markeredgewidth=2)
        raw.set_title(f'stage {stage[3:]}: {gh}x{gw} tokens, max {m.max().item():.3g}', fontsize=10)
        fig.colorbar(im, ax=raw, shrink=0.8)
        for ax in (over, raw):
            ax.set_xticks([])
            ax.set_yticks([])
    note = ("Performer: implicit weights phi(q).phi(k) / (phi(q).sum phi(k) + eps) from its random features, "
            'float32; rows sum to 1' if mixer == 'performer' else
            'Transformer T2T layer: softmax weights (heads averaged)')
    fig.text(0.5, 0.01, f'{note}; + marks the query', ha='center', va='bottom', fontsize=9)
    fig.savefig(path, dpi=DPI)
    return Picture(path, _size_px(fig))
