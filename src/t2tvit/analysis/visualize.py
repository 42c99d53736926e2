"""Pictures of what a T2T-ViT sees: its feature maps (the paper's Fig. 2) and its attention.

Features. The two T2T stages are restructurized to their grids (56x56 and 28x28 at 224)
and the backbone blocks' tokens reshaped to theirs (14x14); each channel is min-max scaled
on its own and drawn in gray. As in Fig. 2, *invalid* channels are outlined in red:

- **all zero**: the channel's peak ``max |x|`` is at most ``ZERO_RTOL`` (1e-6) times the
  layer's median channel peak, i.e. nothing at the layer's own scale;
- **extreme**: the peak exceeds ``EXTREME_RATIO`` (10) times the layer's median channel peak.

The median is taken over the layer's channels that are not exactly zero (so a ReLU layer
with many dead channels does not make every live one "extreme"), and over every such
channel of the layer, not only the ones drawn, so the rule does not change with how many
channels a picture shows (:func:`invalid_channels`).

Attention. Backbone attention runs through ``F.scaled_dot_product_attention``, which never
forms the weights; for a picture, forward pre-hooks record each block's attention input
and ``Attention.attention_weights`` recomputes the softmax from it after the forward. The
hooks exist only inside :func:`block_attention`, so the normal forward is untouched.
Rollout (Abnar & Zuidema, 2020): heads averaged, identity added for the skip
connection, rows renormalised, and the layers multiplied; only the class-token row is
needed, so it is propagated as a vector (O(depth * N^2), not O(depth * N^3)).
The T2T stages have no class token: ``--stages t2t1 t2t2`` draws one query's attention there
(the Performer's implicit weights from its random features; see t2t_attention.py).
"""
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_transform, load_image, resolve_preprocessing
from ..errors import UserError
from ..factory import create_model

ZERO_RTOL = 1e-6
EXTREME_RATIO = 10.0
DPI = 100
PANEL_IN = 3.2    # width of one layer's panel, inches
HEADER_IN = 0.9   # suptitle + panel titles
FOOTER_IN = 0.5   # the legend line under the panels
MAX_HEAD_COLS = 8
RED = '#ff0000'

__all__ = [
    'EXTREME_RATIO',
    'ZERO_RTOL',
    'LayerMaps',
    'Picture',
    'attention_rollout',
    'block_attention',
    'feature_layers',
    'image_tensor',
    'invalid_channels',
    'layer_names',
    'load_image',
    'picture_model',
    'recorded_attention_inputs',
    'render_attention',
    'render_features',
    'resnet50_conv1',
    'visualize_attention',
    'visualize_features',
]


@dataclass
class LayerMaps:
    """All channels of one layer for one image: ``maps`` is (C, H, W)."""
    name: str
    maps: torch.Tensor
    note: str = ''


@dataclass
class Picture:
    """A written PNG: its path, its size in pixels (width, height) and where things are in it.

    ``boxes`` maps ``(layer name, channel)`` to the tile's ``(x0, y0, x1, y1)`` in PNG pixels
    (origin top-left), ``invalid`` lists the outlined channels of each layer.
    """
    path: Path
    size: tuple[int, int]
    boxes: dict[tuple[str, int], tuple[float, float, float, float]] = field(default_factory=dict)
    invalid: dict[str, list[int]] = field(default_factory=dict)


# -- inputs ---------------------------------------------------------------------------------------
def image_tensor(image, model: nn.Module, img_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """Preprocess a PIL image as the model's pretrained_cfg says (:func:`t2tvit.data.resolve_preprocessing`):
    (1, C, H, W) and the settings used."""
    pre = resolve_preprocessing(model, {'img_size': img_size})
    x = eval_transform(pre['img_size'], pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation'])(image)
    if x.shape[0] != pre['in_chans']:
        # models of one-channel data see the image as gray
        x = x.mean(dim=0, keepdim=True).expand(pre['in_chans'], -1, -1)
    return x.unsqueeze(0), pre


def picture_model(name: str, checkpoint: str | None = None) -> nn.Module:
    """The model for pictures: eval mode, any image size (the position table is resized)."""
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f'{checkpoint}: no such checkpoint file (check the path)')
    try:
        model = create_model(name, checkpoint_path=checkpoint, dynamic_img_size=True)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e))
    except (RuntimeError, KeyError) as e:
        raise UserError(f'{checkpoint}: does not load into {name} ({str(e).splitlines()[0][:200]}); '
                        f'check --model matches the checkpoint')
    return model.eval()


def _denormalised(x: torch.Tensor, cfg: dict) -> np.ndarray:
    """(1, C, H, W) normalised input -> (H, W, 3) in [0, 1], for overlays."""
    mean = torch.tensor(cfg['mean'][:x.shape[1]]).view(1, -1, 1, 1)
    std = torch.tensor(cfg['std'][:x.shape[1]]).view(1, -1, 1, 1)
    img = (x * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


# -- features -------------------------------------------------------------------------------------
def layer_names(model: nn.Module) -> dict[str, int]:
    """``{'t2t1': 0, 't2t2': 1, 'block1': 2, ...}``: picture names -> ``forward_intermediates`` index.

    Blocks are numbered from 1 as in the paper's Fig. 2 (block 1 is ``model.blocks[0]``).
    """
    names: dict[str, int] = {}
    for i, info in enumerate(model.feature_info):
        module = info['module']
        if module.startswith('blocks.'):
            names[f'block{int(module.split(".")[1]) + 1}'] = i
        elif module.startswith('tokens_to_token.attention'):
            names[f't2t{module[len("tokens_to_token.attention"):]}'] = i
        else:
            names[module.replace('.', '_')] = i
    return names


def _pretty(short: str) -> str:
    if short.startswith('t2t'):
        return f'T2T stage {short[3:]}'
    if short.startswith('block'):
        return f'block {short[5:]}'
    return short


def default_layers(model: nn.Module) -> list[str]:
    """The T2T stages, the first block and the last block."""
    names = list(layer_names(model))
    stages = [n for n in names if n.startswith('t2t')]
    blocks = [n for n in names if n.startswith('block')]
    return stages + sorted({blocks[0], blocks[-1]}, key=blocks.index) if blocks else stages


def _parse_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    known = layer_names(model)
    if not layers:
        return default_layers(model)
    out = []
    for layer in layers:
        key = str(layer).strip().lower().replace(' ', '').replace('_', '')
        if key.isdigit():
            key = f'block{key}'
        if key not in known:
            blocks = [n for n in known if n.startswith('block')]
            hint = f't2t1, t2t2, block1..block{len(blocks)}' if 't2t1' in known else ', '.join(known)
            raise UserError(f'unknown layer {layer!r} (choose from {hint}; a plain number N means blockN)')
        out.append(key)
    return out


@torch.no_grad()
def feature_layers(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None) -> list[LayerMaps]:
    """Feature maps of the chosen layers for the first image of ``x`` (names as in :func:`layer_names`)."""
    names = _parse_layers(model, layers)
    index = layer_names(model)
    wanted = sorted({index[n] for n in names})
    feats = model.forward_intermediates(x, indices=wanted, intermediates_only=True, output_fmt='NCHW')
    by_index = dict(zip(wanted, feats))
    out = []
    for n in names:
        maps = by_index[index[n]][0].float()
        stride = model.feature_info[index[n]]['reduction']
        stride = x.shape[-1] // maps.shape[-1] if x.shape[-1] % maps.shape[-1] == 0 else stride
        out.append(LayerMaps(_pretty(n), maps, f'{maps.shape[1]}x{maps.shape[2]}, stride {stride}'))
    return out


@torch.no_grad()
def resnet50_conv1(x: torch.Tensor, checkpoint: str | None = None) -> LayerMaps:
    """conv1 (with its BN and ReLU) of timm's resnet50 on the same input.

    Never downloads: random weights unless ``checkpoint`` names a resnet50 state dict.
    """
    import timm
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f'{checkpoint}: no such resnet50 checkpoint file (check the path)')
    torch.manual_seed(0)
    try:
        net = timm.create_model('resnet50', pretrained=False, checkpoint_path=checkpoint or '').eval()
    except (RuntimeError, KeyError) as e:
        raise UserError(f'{checkpoint}: does not load into resnet50 ({str(e).splitlines()[0][:200]})')
    x3 = x if x.shape[1] == 3 else x[:, :1].expand(-1, 3, -1, -1)
    maps = net.act1(net.bn1(net.conv1(x3)))[0].float()
    return LayerMaps('resnet50 conv1', maps, f'{maps.shape[1]}x{maps.shape[2]}, stride 2, after BN+ReLU')


def invalid_channels(maps: torch.Tensor, zero_rtol: float = ZERO_RTOL,
                     extreme_ratio: float = EXTREME_RATIO) -> torch.Tensor:
    """Bool (C,): channels of a (C, H, W) layer that are all zero or extreme (module docstring)."""
    peak = maps.detach().float().abs().flatten(1).amax(dim=1)
    alive = peak[peak > 0]
    if alive.numel() == 0:
        return torch.ones_like(peak, dtype=torch.bool)
    median = alive.median()
    return (peak <= zero_rtol * median) | (peak > extreme_ratio * median)


def _scaled(maps: torch.Tensor) -> np.ndarray:
    """Each channel min-max scaled to [0, 1]; a constant channel is drawn black."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-30), torch.zeros_like(flat))
    return scaled.reshape(maps.shape).numpy()


def _mosaic(tiles: np.ndarray, cols: int, gap: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(n, h, w) in [0,1] -> an RGB mosaic on white and each tile's top-left corner."""
    n, h, w = tiles.shape
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3))
    corners = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        canvas[y:y + h, x:x + w] = tiles[i][..., None]
        corners.append((x, y))
    return canvas, corners


def _new_figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout='constrained')


def _size_px(fig) -> tuple[int, int]:
    return round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi)


def _png_box(fig, ax, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """Data box -> PNG pixel box (origin top-left) of a figure saved at its own dpi."""
    (ax0, ay0), (ax1, ay1) = ax.transData.transform([(x0, y0), (x1, y1)])
    height = fig.get_figheight() * fig.dpi
    return (min(ax0, ax1), height - max(ay0, ay1), max(ax0, ax1), height - min(ay0, ay1))


def render_features(layers: Sequence[LayerMaps], path, channels: int = 16, title: str = '') -> Picture:
    """One panel per layer, the first ``channels`` channels in a square grid, invalid ones in red."""
    from matplotlib.patches import Rectangle
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _new_figure(PANEL_IN * len(layers), PANEL_IN + HEADER_IN + FOOTER_IN)
    fig.suptitle(title or 'Feature maps', fontsize=12)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    placed = []
    invalid_all: dict[str, list[int]] = {}
    for ax, layer in zip(axes, layers):
        maps = layer.maps.detach().float().cpu()
        bad = invalid_channels(maps)
        n = min(channels, maps.shape[0])
        cols = math.ceil(math.sqrt(n))
        h, w = maps.shape[1:]
        gap = max(2, round(max(h, w) / 6))
        canvas, corners = _mosaic(_scaled(maps[:n]), cols, gap)
        ax.imshow(canvas, interpolation='antialiased')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'{layer.name}\n{layer.note}' if layer.note else layer.name, fontsize=10)
        ax.set_xlabel(f'channels 0-{n - 1} of {maps.shape[0]}', fontsize=9)
        marked = [c for c in range(n) if bad[c]]
        invalid_all[layer.name] = marked
        for c in marked:
            x, y = corners[c]
            half = gap / 2
            ax.add_patch(Rectangle((x - half - 0.5, y - half - 0.5), w + gap, h + gap,
                                   fill=False, edgecolor=RED, linewidth=2.0))
        placed.append((ax, layer.name, corners, h, w, n))
    fig.text(0.5, 0.01, f'each channel min-max scaled; red outline: all-zero channel or extreme '
             f'(peak |x| > {EXTREME_RATIO:g}x the layer\'s median channel peak)', ha='center', va='bottom',
             fontsize=9, color='black', wrap=True)  # a narrow figure (two T2T stages) wraps it
    fig.savefig(path, dpi=DPI)
    boxes = {}
    for ax, name, corners, h, w, n in placed:
        for c in range(n):
            x, y = corners[c]
            boxes[(name, c)] = _png_box(fig, ax, x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5)
    return Picture(path, _size_px(fig), boxes, invalid_all)


def visualize_features(
        image: str,
        model_name: str,
        checkpoint: str | None = None,
        layers: Sequence[str] | None = None,
        channels: int = 16,
        img_size: int | None = None,
        compare: str | None = None,
        compare_checkpoint: str | None = None,
        out_dir='runs/visualize',
        model: nn.Module | None = None,
) -> Picture:
    """``t2tvit visualize features``: writes ``<out_dir>/features.png`` and returns it."""
    if channels < 1:
        raise UserError(f'--channels must be at least 1, got {channels}')
    if compare not in (None, 'resnet50'):
        raise UserError(f'--compare {compare!r} is not supported (only resnet50)')
    model = model if model is not None else picture_model(model_name, checkpoint)
    x, _ = _checked_input(load_image(image), model, img_size)
    maps = feature_layers(model, x, layers)
    weights = Path(checkpoint).name if checkpoint else 'random weights'
    title = f'{model_name} ({weights}) on {Path(image).name}, input {x.shape[-2]}x{x.shape[-1]}'
    if compare:
        maps = [resnet50_conv1(x, compare_checkpoint)] + maps
        resnet = Path(compare_checkpoint).name if compare_checkpoint else 'random weights, not pretrained'
        title += f'; resnet50 ({resnet})'
    return render_features(maps, Path(out_dir) / 'features.png', channels, title)


def _checked_input(image, model: nn.Module, img_size: int | None) -> tuple[torch.Tensor, dict]:
    if img_size is not None and img_size < 1:
        raise UserError(f'--img-size must be positive, got {img_size}')
    x, cfg = image_tensor(image, model, img_size)
    stride = model.feature_info[-1]['reduction']
    if x.shape[-1] % stride or x.shape[-2] % stride:
        raise UserError(f'--img-size {x.shape[-1]} is not a multiple of the model\'s token stride {stride} '
                        f'(e.g. {max(stride, x.shape[-1] // stride * stride)})')
    return x, cfg


# -- attention ------------------------------------------------------------------------------------
def _attention_blocks(model: nn.Module) -> list[int]:
    """Indices of the backbone blocks that attend (a dense backbone's transitions do not)."""
    return [i for i, blk in enumerate(model.blocks)
            if hasattr(getattr(blk, 'attn', None), 'attention_weights')]


@contextmanager
def recorded_attention_inputs(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward records each attending block's attention input by block index."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i in _attention_blocks(model):
        def hook(_module, args, i=i):
            inputs[i] = args[0].detach()
        handles.append(model.blocks[i].attn.register_forward_pre_hook(hook))
    if not handles:
        raise UserError('this model has no backbone attention weights to show')
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def attention_rollout(weights: Sequence[torch.Tensor], token: int = 0) -> torch.Tensor:
    """Rollout row of ``token`` through layers given first to last as (B, heads, N, N) weights.

    Each layer: mean over heads, + identity, rows renormalised; the product
    ``A_L ... A_1`` is taken from the left as a row vector. Returns (B, N), rows sum to 1.
    """
    row = None
    for a in reversed(list(weights)):
        a = _rollout_layer(a)
        if row is None:
            row = a[:, token]
        else:
            row = torch.bmm(row.unsqueeze(1), a).squeeze(1)
    return row


def _rollout_layer(a: torch.Tensor) -> torch.Tensor:
    a = a.float().mean(dim=1)
    a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a / a.sum(dim=-1, keepdim=True)


@torch.no_grad()
def block_attention(model: nn.Module, x: torch.Tensor, blocks: Sequence[int]):
    """Class-token attention of every head of ``blocks`` (1-based) and the rollout of the whole backbone.

    Returns ``({block: (heads, gh, gw)}, rollout (gh, gw), (gh, gw))`` for the first image.
    """
    depth = len(model.blocks)
    attending = _attention_blocks(model)
    for b in blocks:
        if not 1 <= b <= depth:
            raise UserError(f'--blocks {b} is out of range: this model has blocks 1..{depth}')
        if b - 1 not in attending:
            raise UserError(f'block {b} has no attention ({type(model.blocks[b - 1]).__name__}); '
                            f'choose from {", ".join(str(i + 1) for i in attending)}')
    with recorded_attention_inputs(model) as inputs:
        model.forward_features(x[:1])
    prefix = getattr(model, 'num_prefix_tokens', 1)
    n = inputs[attending[0]].shape[1] - prefix
    stride = model.feature_info[-1]['reduction']
    gh, gw = x.shape[-2] // stride, x.shape[-1] // stride
    if gh * gw != n:
        gh = gw = math.isqrt(n)
    heads = {}
    row = None
    # one (N, N) matrix at a time, last block first, so a 1024 render fits in memory; blocks
    # without attention (transitions) act on each token alone: identity for the rollout
    for i in reversed(attending):
        a = model.blocks[i].attn.attention_weights(inputs[i]).float()
        if i + 1 in blocks:
            heads[i + 1] = a[0, :, 0, prefix:].reshape(-1, gh, gw)
        a = _rollout_layer(a)
        row = a[:, 0] if row is None else torch.bmm(row.unsqueeze(1), a).squeeze(1)
    rollout = row[0, prefix:].reshape(gh, gw)
    return {b: heads[b] for b in blocks}, rollout, (gh, gw)


def _upsampled(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    m = F.interpolate(m[None, None].float(), size=size, mode='bilinear', align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)).numpy()


def _t2t_note(model: nn.Module) -> str:
    mixer = getattr(getattr(model, 'tokens_to_token', None), 'token_mixer', None)
    if mixer == 'performer':
        return ('T2T stages (Performer, no class token) are not in these pictures: --stages t2t1 t2t2 draws '
                'their implicit attention for one query')
    if mixer == 'transformer':
        return ('T2T stages have no class token; only the backbone\'s class-token attention is shown '
                '(--stages t2t1 t2t2 draws theirs for one query)')
    if mixer == 'convolution':
        return 'T2T stages are convolutions (T2T-ViT-c): no attention there'
    if hasattr(model, 'patch_embed'):
        return 'no T2T module: tokens come from a patch embedding'
    return ''


def render_attention(image: np.ndarray, heads: dict[int, torch.Tensor], rollout: torch.Tensor,
                     out_dir, title: str, note: str = '') -> list[Picture]:
    """``attention_heads.png`` (a row of heads per block) and ``attention_rollout.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = image.shape[:2]
    num_heads = max(h.shape[0] for h in heads.values()) if heads else 1
    cols = min(num_heads, MAX_HEAD_COLS)
    rows_per_block = math.ceil(num_heads / cols)
    rows = max(1, rows_per_block * len(heads))
    tile_in = 2.0
    pictures = []

    fig = _new_figure(max(cols * tile_in, 6.0), rows * (tile_in + 0.35) + HEADER_IN + FOOTER_IN)
    fig.suptitle(f'Class-token attention per head: {title}', fontsize=12)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for bi, (block, maps) in enumerate(heads.items()):
        for h in range(maps.shape[0]):
            r, c = divmod(h, cols)
            ax = axes[bi * rows_per_block + r, c]
            ax.imshow(image)
            ax.imshow(_upsampled(maps[h], size), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f'block {block}, head {h + 1}', fontsize=9)
    fig.text(0.5, 0.01, note or 'weights recomputed from each block\'s input; each map min-max scaled',
             ha='center', va='bottom', fontsize=9, wrap=True)
    path = out_dir / 'attention_heads.png'
    fig.savefig(path, dpi=DPI)
    pictures.append(Picture(path, _size_px(fig)))

    fig = _new_figure(3 * 3.0, 3.0 + HEADER_IN + FOOTER_IN)
    fig.suptitle(f'Attention rollout through all blocks: {title}', fontsize=12)
    axes = fig.subplots(1, 3)
    roll = _upsampled(rollout, size)
    for ax, (img, overlay, name) in zip(axes, [(image, None, 'input'), (image, roll, 'rollout on input'),
                                                (None, roll, 'rollout')]):
        ax.set_xticks([])
        ax.set_yticks([])
        if img is not None:
            ax.imshow(img)
        if overlay is not None:
            im = ax.imshow(overlay, cmap='inferno', alpha=0.6 if img is not None else 1.0, vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes[-1], shrink=0.8, label='class-token attention (scaled)')
    fig.text(0.5, 0.01, 'heads averaged, identity added for the skip, rows renormalised, blocks multiplied',
             ha='center', va='bottom', fontsize=9)
    path = out_dir / 'attention_rollout.png'
    fig.savefig(path, dpi=DPI)
    pictures.append(Picture(path, _size_px(fig)))
    return pictures


def visualize_attention(
        image: str,
        model_name: str,
        checkpoint: str | None = None,
        blocks: Sequence[int] | None = None,
        img_size: int | None = None,
        out_dir='runs/visualize',
        model: nn.Module | None = None,
        stages: Sequence[str] | None = None,
        query: tuple[float, float] | None = None,
) -> list[Picture]:
    """``t2tvit visualize attention``: writes ``attention_heads.png`` and ``attention_rollout.png``, and with
    ``stages`` (``t2t1``, ``t2t2``) ``attention_t2t.png``: the attention of the input pixel ``query`` (x, y;
    default the centre) in those T2T stages (see :mod:`t2tvit.analysis.t2t_attention`)."""
    model = model if model is not None else picture_model(model_name, checkpoint)
    x, cfg = _checked_input(load_image(image), model, img_size)
    attending = [i + 1 for i in _attention_blocks(model)]
    blocks = list(dict.fromkeys(blocks)) if blocks else attending[-2:]
    heads, rollout, _ = block_attention(model, x, blocks)
    weights = Path(checkpoint).name if checkpoint else 'random weights'
    title = f'{model_name} ({weights}) on {Path(image).name}, input {x.shape[-2]}x{x.shape[-1]}'
    pictures = render_attention(_denormalised(x, cfg), heads, rollout, out_dir, title, _t2t_note(model))
    if stages:
        from .t2t_attention import render_stage_attention, stage_attention
        query = tuple(query) if query else (x.shape[-1] / 2, x.shape[-2] / 2)
        maps = stage_attention(model, x, stages, query)
        pictures.append(render_stage_attention(_denormalised(x, cfg), maps, query, Path(out_dir) / 'attention_t2t.png',
                                               title, model.tokens_to_token.token_mixer))
    return pictures


# -- the model zoo, like the paper's Fig. 1 -------------------------------------------------------
REPORT_SIZE_IN = (13.0, 5.6)
_FAMILIES = (
    # (label, name pattern, marker, colour, joined by a line)
    ('T2T-ViT (Performer T2T)', r'^t2t_vit_\d+$', 'o', 'tab:red', True),
    ('T2T-ViT-t (Transformer T2T)', r'^t2t_vit_t_\d+$', 's', 'tab:orange', True),
    ('ViT baselines', r'^vit_', '^', 'tab:blue', False),
    ('ablations (Tables 6, 7)', r'', 'D', 'tab:gray', False),
)


def paper_label(name: str) -> str:
    """``t2t_vit_t_14`` -> ``T2T-ViT-t-14``, ``vit_s_16`` -> ``ViT-S/16``: the paper's spelling."""
    import re
    m = re.fullmatch(r'vit_([a-z]+)_(\d+)', name)
    if m:
        return f'ViT-{m.group(1).upper()}/{m.group(2)}'
    if name.startswith('vit_'):
        return 'ViT-' + name[4:].upper()
    if name.startswith('t2t_vit'):
        return 'T2T-ViT' + name[len('t2t_vit'):].replace('_', '-')
    return name


def _family(name: str) -> int:
    import re
    for i, (_, pattern, *_rest) in enumerate(_FAMILIES):
        if pattern and re.search(pattern, name):
            return i
    return len(_FAMILIES) - 1


def _tick_in_range(rows: Sequence[dict], key: str, scale: float, tick: float) -> bool:
    """Whether ``tick`` lies within the drawn range (with some margin either side)."""
    values = [r[key] / scale for r in rows]
    return bool(values) and min(values) / 1.5 <= tick <= max(values) * 1.5


def _place_labels(ax, labels: dict[tuple[float, float], str], renderer) -> None:
    """Annotate each point at the nearby offset whose text overlaps the fewest placed labels and markers.

    A label moved off its usual place (up and to the right) gets a leader line to its point.
    """
    from matplotlib.transforms import Bbox
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    r = 4 * ax.figure.dpi / 72  # a marker's half size in pixels
    for px, py in ax.transData.transform(list(labels)):
        taken.append(Bbox([[px - r, py - r], [px + r, py + r]]))
    inside = ax.get_window_extent(renderer)
    offsets = [(5, 3), (-5, 3), (5, -11), (-5, -11)]
    offsets += [(sx * dx, sy * dy) for dy in (14, 26, 38) for dx in (10, 30) for sy in (1, -1) for sx in (1, -1)]
    for (x, y), text in sorted(labels.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        best = None
        for rank, (dx, dy) in enumerate(offsets):
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords='offset points', fontsize=8,
                              ha='left' if dx > 0 else 'right')
            box = ann.get_window_extent(renderer)
            ann.remove()
            outside = not (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)
            cost = (10 * outside + sum(box.overlaps(t) for t in taken), rank)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost[0] == 0:
                break
        _, dx, dy, box = best
        leader = None if (dx, dy) == offsets[0] else {'arrowstyle': '-', 'color': '0.45', 'lw': 0.6, 'shrinkA': 0,
                                                            'shrinkB': 3}
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords='offset points', fontsize=8,
                    ha='left' if dx > 0 else 'right', arrowprops=leader)
        taken.append(box)


def render_report(rows: Sequence[dict], path) -> Picture:
    """Published top-1 against counted MACs and params of every model with a paper top-1 at 224.

    ``rows`` are :func:`t2tvit.analysis.report.model_rows` rows (with counts). The picture's
    ``invalid`` field is unused; ``boxes`` is empty; the models drawn are in ``Picture.models``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = [r for r in rows if r.get('paper_top1') is not None and r.get('img_size') == 224]
    fig = _new_figure(*REPORT_SIZE_IN)
    fig.suptitle('ImageNet top-1 as published against the MACs and parameters of this implementation '
                 '(224x224, batch 1), like the paper\'s Fig. 1', fontsize=12)
    axes = fig.subplots(1, 2)
    for ax, key, scale, xlabel in [(axes[0], 'macs', 1e9, 'MACs (G), counted by t2tvit profile'),
                                   (axes[1], 'params', 1e6, 'parameters (M), counted')]:
        for fi, (label, _, marker, colour, joined) in enumerate(_FAMILIES):
            family = sorted((r for r in drawn if _family(r['model']) == fi), key=lambda r: r[key])
            if not family:
                continue
            xs = [r[key] / scale for r in family]
            ys = [r['paper_top1'] for r in family]
            ax.plot(xs, ys, linestyle='-' if joined else 'none', marker=marker, color=colour, label=label,
                    markersize=7, linewidth=1.5)
        ax.set_xscale('log')
        ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64, 128) if _tick_in_range(drawn, key, scale, t)]
        ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel, fontsize=10)
        ax.set_ylabel('ImageNet top-1 (%), as published', fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc='upper left')
    # labels go where they overlap nothing already drawn: the layout is settled first, then frozen
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    fig.set_layout_engine('none')
    renderer = fig.canvas.get_renderer()
    for ax, key, scale in [(axes[0], 'macs', 1e9), (axes[1], 'params', 1e6)]:
        points: dict[tuple[float, float], list[str]] = {}
        for r in drawn:
            points.setdefault((round(r[key] / scale, 2), r['paper_top1']), []).append(paper_label(r['model']))
        _place_labels(ax, {xy: ' / '.join(sorted(names)) for xy, names in points.items()}, renderer)
    fig.savefig(path, dpi=DPI)
    picture = Picture(path, _size_px(fig))
    picture.models = [r['model'] for r in drawn]
    return picture


def write_report(rows: Sequence[dict], table: str, out_dir, markdown: bool = True, png: bool = True) -> list[Path]:
    """``t2tvit report``: ``report.md`` (the model table) and ``report.png`` (top-1 against MACs/params)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if png:
        written.append(render_report(rows, out_dir / 'report.png').path)
    if markdown:
        path = out_dir / 'report.md'
        figure = '\n\n![top-1 against MACs and params](report.png)\n' if png else '\n'
        path.write_text('# T2T-ViT models\n\nParams and MACs counted by `t2tvit profile` at each model\'s '
                        'input size (224 unless given), batch 1; top-1, params and MACs of the paper as '
                        f'published (ImageNet val, 224).\n\n{table}\n{figure}')
        written.insert(0, path)
    return written
