"""Weights to a model: which registered model a checkpoint is, and fitting its state dict to a built model.

Fitting (:func:`load_checkpoint`) keeps the reference key names, so only three things may differ
from the model: the classifier (another ``num_classes``: the head keeps its fresh initialisation
and a warning says so), the position table (another image size: resized bicubically like the
reference transfer code, or regenerated as the exact sinusoid table, after the model's
``pos_embed_resize``) and the layer that reads the image (another number of input channels).
Anything else fails with a :class:`CheckpointError` that lists the first differences and names
the registered model the checkpoint looks like. Models are looked up by name in timm's registry
(``t2tvit.registry``); nothing here imports the models or the factory.
"""
import json
import logging
import math
from functools import lru_cache
from typing import Any

import timm
import torch
from torch import nn

from ..layers.pos_table import resize_pos_table
from ..registry import UnknownModelError, list_models, model_entry
from .io import CheckpointError, PathLike, StateDict
from .layouts import Checkpoint, json_kwargs, kwargs_from_json, read_checkpoint

__all__ = ['adapt_input_channels', 'closest_models', 'load_checkpoint', 'model_args_from_checkpoint']

_logger = logging.getLogger(__name__)

# how a model that cannot be built with some arguments fails
BUILD_ERRORS = (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError, KeyError)


# -- which registered model a state dict belongs to -------------------------------------------------------
def meta_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``name`` built on the meta device: its structure and shapes, no weights allocated."""
    return _meta_model(name, json.dumps(json_kwargs(kwargs or {}), sort_keys=True))


def _meta_model(name: str, kwargs_json: str = '{}') -> nn.Module:
    with torch.device('meta'):
        return timm.create_model(name, **kwargs_from_json(json.loads(kwargs_json)))


@lru_cache(maxsize=64)
def _signature(name: str, kwargs_json: str = '{}') -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(name, kwargs_json).state_dict().items()}


def signature(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``name``'s state dict built with ``kwargs`` (cached)."""
    return _signature(name, json.dumps(json_kwargs(kwargs or {}), sort_keys=True))


def _arch_keys(sig: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes that fix the architecture: not the head (num_classes) nor the table's length (img_size)."""
    out = {k: v for k, v in sig.items() if not k.startswith('head.')}
    if 'pos_embed' in out:
        out['pos_embed'] = out['pos_embed'][-1:]
    if 'head.weight' in sig:
        out['head.weight'] = sig['head.weight'][1:]
    return out


def closest_models(state_dict: StateDict, limit: int = 3) -> list[tuple[str, float]]:
    """Registered models ranked by the share of architecture keys (and shapes) they have in common with
    ``state_dict``: ``[(name, share in 0..1)]``. Models are built on the meta device, no weights are made."""
    mine = _arch_keys({k: tuple(v.shape) for k, v in state_dict.items()})
    names = list_models()
    cls = state_dict.get('cls_token')
    if cls is not None:  # the width is in every table entry: build only the models of the checkpoint's width
        same_width = [n for n in names if model_entry(n).config.get('embed_dim') == cls.shape[-1]]
        names = same_width or names
    scores = []
    for name in names:
        try:
            theirs = _arch_keys(signature(name))
        except BUILD_ERRORS:  # a model that cannot be built on the meta device is no candidate
            continue
        same = sum(1 for k, s in mine.items() if theirs.get(k) == s)
        scores.append((name, same / max(len(mine), len(theirs), 1)))
    scores.sort(key=lambda t: -t[1])
    return scores[:limit]


def looks_like(state_dict: StateDict) -> str:
    """Half a sentence for an error: the registered model the state dict matches best."""
    ranked = closest_models(state_dict)
    if not ranked or ranked[0][1] < 0.5:
        return 'it matches no registered model (run `t2tvit models` for the list)'
    best = ranked[0][1]
    tied = [n for n, s in ranked if s == best]
    names = ' or '.join(tied)
    share = 'all' if best == 1.0 else f'{100 * best:.0f}% of the'
    return f'it looks like a {names} checkpoint ({share} keys and shapes match)'


def differences(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], limit: int = 3) -> str:
    """The first keys that differ between two signatures, for an error line."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f'{k} {list(got[k])} vs {list(want[k])}' for k in want if k in got and got[k] != want[k]]
    parts = []
    for label, items in (('shapes differ (checkpoint vs model)', shapes), ('missing', missing),
                         ('unexpected', unexpected)):
        if items:
            more = f' and {len(items) - limit} more' if len(items) > limit else ''
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return '; '.join(parts)


def kwargs_text(kwargs: dict[str, Any]) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


# -- the model a checkpoint asks for ----------------------------------------------------------------------
def _img_size_from_table(sd: StateDict, name: str, kwargs: dict[str, Any]) -> int | None:
    """The square image size whose grid matches a reference checkpoint's position table (e.g. 384)."""
    table = sd.get('pos_embed')
    if table is None or table.ndim != 3:
        return None
    try:
        model = meta_model(name, kwargs)
    except BUILD_ERRORS:
        return None
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    if table.shape[1] == model.pos_embed.shape[1] or not hasattr(model, 'grid_size'):
        return None
    side = math.isqrt(table.shape[1] - prefix)
    (gh, gw), (ih, iw) = model.grid_size, model.img_size
    if side * side != table.shape[1] - prefix or gh != gw or ih != iw or ih % gh:
        return None
    size = side * (ih // gh)
    try:
        meta_model(name, {**kwargs, 'img_size': size})
    except BUILD_ERRORS:
        return None
    return size


def _checkpoint_model_name(ckpt: Checkpoint) -> str:
    if ckpt.model_name is not None:
        return ckpt.model_name
    if ckpt.release_arch and ckpt.release_arch.lower() in list_models():
        return ckpt.release_arch.lower()
    raise CheckpointError(f'{ckpt.path} does not name its model; {looks_like(ckpt.weights)}: give the model '
                          'name (create_model(NAME, checkpoint_path=...), or --model NAME)')


def model_args_from_checkpoint(ckpt: Checkpoint, name: str | None = None, **kwargs
                               ) -> tuple[str, dict[str, Any]]:
    """The model name and constructor arguments to load ``ckpt`` into: ``kwargs`` first, then the checkpoint's.

    Our formats give their config (name, ``img_size``, ``num_classes``, any other argument); the
    reference layouts give ``num_classes`` from the head and ``img_size`` from the position table.
    """
    given = {k: v for k, v in kwargs.items() if v is not None}
    name = name if name is not None else _checkpoint_model_name(ckpt)
    arch = name.split('.')[0]  # a pretrained tag (t2t_vit_14.in1k_ft_cifar10) brings its data config
    if ckpt.model_name and ckpt.model_name != arch:
        raise CheckpointError(f'{ckpt.path} holds a {ckpt.model_name} model, not {name} '
                              f'(use {ckpt.model_name}, or leave the name out)')
    if arch not in list_models():
        raise CheckpointError(str(UnknownModelError(arch, list_models())))
    merged = {**ckpt.model_kwargs, **given}
    if 'num_classes' not in merged and ckpt.num_classes is not None:
        merged['num_classes'] = ckpt.num_classes
    if 'img_size' not in merged:
        size = _img_size_from_table(ckpt.weights, name, merged)
        if size is not None:
            _logger.info('%s: img_size %d, from the position table of the checkpoint', ckpt.path, size)
            merged['img_size'] = size
    return name, merged


# -- fitting a state dict to a model ----------------------------------------------------------------------
def _model_label(model: nn.Module) -> str:
    recorded = getattr(model, 't2tvit_config', None) or {}
    return recorded.get('model') or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') \
        or type(model).__name__


def _checkpoint_grid(ckpt: Checkpoint | None, table: torch.Tensor, prefix: int) -> tuple[int, int] | None:
    """The grid of a checkpoint's position table: from our formats' config, else a square root."""
    if ckpt is not None and ckpt.model_name and 'img_size' in ckpt.model_kwargs:
        try:
            grid = tuple(meta_model(ckpt.model_name, ckpt.model_kwargs).grid_size)
            if grid[0] * grid[1] + prefix == table.shape[1]:
                return grid
        except BUILD_ERRORS:
            _logger.debug('%s: cannot rebuild %s to read its grid', ckpt.path, ckpt.model_name)
    side = math.isqrt(table.shape[1] - prefix)
    return (side, side) if side * side == table.shape[1] - prefix else None


def _first_layer_weight(model: nn.Module) -> str | None:
    """State-dict key of the weight that reads the image (``pretrained_cfg['first_conv']``)."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    return f'{first}.weight' if isinstance(first, str) else None


def _repeat_channels(t: torch.Tensor, chans: int, scale: float = 1.0) -> torch.Tensor:
    """(out, 3, ...) -> (out, chans, ...): R, G, B repeated in turn, times ``scale``."""
    reps = (chans + 2) // 3
    return t.repeat(1, reps, *([1] * (t.ndim - 2)))[:, :chans] * scale


def adapt_input_channels(sd: StateDict, own: StateDict, first: str | None) -> int | None:
    """Fit the RGB layer that reads the image (key ``first``) to the model's number of input channels, in place.

    timm's rule for a first convolution: one channel gets the sum over R, G, B (a gray image gives the
    response of its 3-channel copy), more channels repeat R, G, B scaled by 3 / channels. The T2T soft split
    feeds an unfolded patch (channel by channel) through a LayerNorm into a Linear: for one channel the
    LayerNorm's affine part is folded into the Linear, which keeps that gray-image identity exact (a
    replicated patch has the same mean and variance); for more, the LayerNorm's weight and bias repeat
    like the channels. Returns the channel count, or None where ``first`` is no such layer.
    """
    if first is None or first not in sd or first not in own or sd[first].shape == own[first].shape:
        return None
    w, shape = sd[first], own[first].shape
    if w.ndim != len(shape) or w.shape[0] != shape[0] or w.ndim not in (2, 4):
        return None
    if w.ndim == 4:
        if w.shape[1] != 3 or w.shape[2:] != shape[2:]:
            return None
        chans = shape[1]
        sd[first] = (w.float().sum(1, keepdim=True) if chans == 1
                     else _repeat_channels(w.float(), chans, 3 / chans)).to(w.dtype)
        return chans
    if w.shape[1] % 3 or shape[1] % (w.shape[1] // 3):
        return None
    patch, chans = w.shape[1] // 3, shape[1] // (w.shape[1] // 3)
    norms = [k for k in sd if k.endswith('norm1.weight') and tuple(sd[k].shape) == (w.shape[1],)
             and k in own and tuple(own[k].shape) == (shape[1],)]
    if len(norms) != 1:
        return None
    norm, bias = norms[0][:-len('weight')], first[:-len('weight')] + 'bias'
    gamma, beta, w32 = sd[norm + 'weight'].float(), sd[norm + 'bias'].float(), w.float()
    if chans == 1:
        sd[first] = (w32.reshape(-1, 3, patch) * gamma.reshape(3, patch)).sum(1).to(w.dtype)
        if bias in sd:
            sd[bias] = (sd[bias].float() + w32 @ beta).to(sd[bias].dtype)
        sd[norm + 'weight'], sd[norm + 'bias'] = torch.ones_like(gamma[:patch]), torch.zeros_like(beta[:patch])
    else:
        sd[first] = _repeat_channels(w32.reshape(-1, 3, patch), chans, 3 / chans).reshape(shape).to(w.dtype)
        sd[norm + 'weight'] = _repeat_channels(gamma.reshape(1, 3, patch), chans).reshape(-1)
        sd[norm + 'bias'] = _repeat_channels(beta.reshape(1, 3, patch), chans).reshape(-1)
    return chans


Notes = list[tuple[int, str]]


def _fit_head(sd: StateDict, own: StateDict, source: str, label: str, notes: Notes, new_head_level: int
              ) -> StateDict:
    """Leave the checkpoint's head out where the model has none, or keep the model's where the classes differ."""
    own_head = {k: v for k, v in own.items() if k.startswith('head.')}
    head_w, own_head_w = sd.get('head.weight'), own.get('head.weight')
    if not own_head and head_w is not None:
        notes.append((logging.INFO, f"{source}: the model has no classifier; the checkpoint's head is not used"))
        return {k: v for k, v in sd.items() if not k.startswith('head.')}
    if own_head_w is not None and not any(k.startswith('head.') for k in sd):
        notes.append((new_head_level, f'{source} has no classifier: the head of {label} ({own_head_w.shape[0]} '
                                      'classes) keeps its random initialisation; train it (t2tvit finetune)'))
        return {**sd, **own_head}
    if own_head_w is not None and head_w is not None and head_w.ndim == 2 and own_head_w.ndim == 2 \
            and head_w.shape[1] == own_head_w.shape[1] and head_w.shape[0] != own_head_w.shape[0]:
        notes.append((new_head_level, f'{source} classifies {head_w.shape[0]} classes, the model '
                                      f'{own_head_w.shape[0]}: the head is re-initialised (not loaded); train it '
                                      '(t2tvit finetune)'))
        return {**{k: v for k, v in sd.items() if not k.startswith('head.')}, **own_head}
    return sd


def _fit_pos_table(sd: StateDict, own: StateDict, model: nn.Module, source: str, ckpt: Checkpoint | None,
                   notes: Notes) -> str | None:
    """Resize the checkpoint's position table to the model's grid, in place; the problem when its grid is unknown."""
    table, own_table = sd.get('pos_embed'), own.get('pos_embed')
    if table is None or own_table is None or table.shape == own_table.shape or table.ndim != 3 \
            or table.shape[-1] != own_table.shape[-1] or not hasattr(model, 'grid_size'):
        return None
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    mode = getattr(model, 'pos_embed_resize', 'bicubic')
    new_grid = tuple(model.grid_size)
    old_grid = _checkpoint_grid(ckpt, table, prefix)
    if old_grid is None and mode != 'sinusoid':
        return (f'{source}: cannot tell the grid of its position table ({table.shape[1] - prefix} '
                'positions, not a square); build the model with the img_size it was trained at')
    sd['pos_embed'] = resize_pos_table(table, new_grid, old_grid=old_grid, num_prefix_tokens=prefix, mode=mode)
    old = f'{old_grid[0]}x{old_grid[1]}' if old_grid else f'{table.shape[1] - prefix} positions'
    notes.append((logging.INFO, f'{source}: position table {old} -> {new_grid[0]}x{new_grid[1]} ({mode})'))
    return None


def fit_state_dict(sd: StateDict, model: nn.Module, source: str, ckpt: Checkpoint | None = None,
                   strict: bool = True, new_head: bool = False) -> StateDict:
    """``sd`` adapted to ``model``: head left out when the classes differ, position table resized,
    the RGB input layer fitted to the model's channels. ``new_head``: a head re-initialised is expected
    (fine-tuning), said at INFO level rather than as a warning."""
    own = model.state_dict()
    label = _model_label(model)
    notes: Notes = []  # told only once the checkpoint is known to fit
    sd = _fit_head(dict(sd), own, source, label, notes, logging.INFO if new_head else logging.WARNING)
    grid_problem = _fit_pos_table(sd, own, model, source, ckpt, notes)
    chans = adapt_input_channels(sd, own, _first_layer_weight(model))
    if chans is not None:
        notes.append((logging.INFO, f'{source}: the RGB input layer adapted to {chans} input channels'))

    got = {k: tuple(v.shape) for k, v in sd.items()}
    want = {k: tuple(v.shape) for k, v in own.items()}
    bad_shapes = [k for k in got if k in want and got[k] != want[k]]
    if bad_shapes or (strict and got.keys() != want.keys()):
        if grid_problem and bad_shapes == ['pos_embed'] and got.keys() == want.keys():
            raise CheckpointError(grid_problem)
        raise CheckpointError(f'{source} does not fit {label}: {differences(got, want)}; {looks_like(sd)}')
    for level, message in notes:
        _logger.log(level, message)
    return sd


def load_checkpoint(model: nn.Module, path: PathLike | Checkpoint, use_ema: bool = True,
                    strict: bool = True, new_head: bool = False):
    """Load any supported checkpoint into ``model``; returns torch's ``(missing_keys, unexpected_keys)``.

    EMA weights are used when the file has them and ``use_ema``. Another ``num_classes`` leaves the
    model's head as initialised (with a warning, unless ``new_head`` says that is the point);
    another image size resizes the position table. ``strict=False`` allows missing and unexpected
    keys, never different shapes. Raises :class:`CheckpointError` (a
    :class:`~t2tvit.errors.UserError`) for unreadable files and checkpoints of another architecture.
    """
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    sd = fit_state_dict(ckpt.state_dict(use_ema), model, f'checkpoint {ckpt.path}', ckpt, strict=strict,
                        new_head=new_head)
    return model.load_state_dict(sd, strict=strict)
