"""Evaluation (top-1, top-5, loss, throughput; sums all-reduced across ranks) and prediction."""

import contextlib
import functools
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import UserError
from ..precision import InferencePrecision
from .distributed import DistEnv, all_reduce


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    env: Optional[DistEnv] = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    progress: bool = False,
    desc: str = 'val',
    should_stop: Callable[[], bool] = lambda: False,
    input_dtype: torch.dtype = torch.float32,
) -> Optional[Dict[str, Any]]:
    """Cross-entropy, top-1/top-5 (%) over every image of the loader's dataset (all ranks together).

    ``input_dtype``: the dtype of a model whose weights were cast once (``InferencePrecision.input_dtype``).

    Returns None when ``should_stop`` turns true part-way (an interrupted run re-evaluates on resume).
    """
    env = env or DistEnv(device=device)
    model.eval()
    # loss, top1, top5, images, failed images, stopped: one all-reduce at the end (shards differ in length)
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    failed: List[str] = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and env.is_main), dynamic_ncols=True)
    for images, targets, bad in bar:
        sums[4] += len(bad)
        failed += bad[: max(0, 5 - len(failed))]
        if images.numel():
            images = images.to(device, dtype=input_dtype, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            hit = logits.topk(k, dim=1).indices.eq(targets[:, None])
            sums[:4] += torch.stack(
                [
                    F.cross_entropy(logits, targets, reduction='sum'),
                    hit[:, :1].sum(),
                    hit.sum(),
                    torch.tensor(float(len(targets)), device=device),
                ]
            ).double()
        if should_stop():
            sums[5] = 1
            break
    bar.close()
    all_reduce(sums, env)
    if sums[5].item():
        return None
    seconds = time.perf_counter() - start
    n = sums[3].item()
    return {
        'loss': sums[0].item() / max(n, 1),
        'top1': 100.0 * sums[1].item() / max(n, 1),
        'top5': 100.0 * sums[2].item() / max(n, 1),
        'images': int(n),
        'img_per_s': n / seconds if seconds > 0 else 0.0,
        'seconds': seconds,
        'failed': failed,
        'failed_count': int(sums[4].item()),
    }


def check_failures(failed_count: int, total: int, first: Sequence[str], where: str) -> Optional[str]:
    """A report line for skipped images; a UserError when more than 1% of them failed."""
    if not failed_count:
        return None
    names = ', '.join(first[:3])
    if failed_count > 0.01 * total:
        raise UserError(
            f'{failed_count} of {total} {where} images failed to decode (more than 1%), '
            f'first: {names}; fix or remove them'
        )
    return f'skipped {failed_count} {where} image(s) that failed to decode (first: {names})'


def predict(
    model: nn.Module,
    paths: Sequence[str],
    transform,
    class_names: Sequence[str],
    device: torch.device,
    topk: int = 5,
    precision: Optional[InferencePrecision] = None,
    batch_size: int = 32,
) -> List[Dict[str, Any]]:
    """Top-k classes with probabilities for each image file (RGB conversion of any PIL mode), ``batch_size``
    files through the model at a time; ``model`` as ``precision.prepare`` made it."""
    from ..data import load_image

    precision = precision or InferencePrecision()
    model.eval()
    results = []
    step = max(1, batch_size)
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        x = torch.stack([transform(path[1]() if isinstance(path, tuple) else load_image(path))
                         for path in chunk]).to(device)
        probs = precision.logits(model, x).softmax(dim=1)
        k = min(topk, probs.shape[1])
        for path, (p, idx) in zip(chunk, zip(*probs.topk(k, dim=1))):
            results.append(
                {
                    'image': path[0] if isinstance(path, tuple) else str(path),
                    'top': [
                        {
                            'class': class_names[i] if i < len(class_names) else str(i),
                            'index': int(i),
                            'prob': float(q),
                        }
                        for q, i in zip(p.tolist(), idx.tolist())
                    ],
                }
            )
    return results


# -- the validate and predict commands ---------------------------------------------------------------------
def _preprocessing(model: nn.Module, trained_on: Dict[str, Any], crop_pct: Optional[float]) -> Dict[str, Any]:
    """A training run's own preprocessing (its mean/std may be CIFAR's), else the model's defaults."""
    from ..data import resolve_preprocessing

    overrides = {k: trained_on.get(k) for k in ('mean', 'std', 'crop_pct', 'interpolation')}
    if crop_pct is not None:
        overrides['crop_pct'] = crop_pct
    return resolve_preprocessing(model, overrides)


def checkpoint_class_names(model: nn.Module, ckpt, descriptions: bool = False) -> Optional[List[str]]:
    if ckpt.class_names:
        return list(ckpt.class_names)
    labels = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')  # a pretrained tag's (CIFAR)
    if labels and len(labels) == getattr(model, 'num_classes', 0):
        return list(labels)
    if getattr(model, 'num_classes', 0) == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return info.label_descriptions() if descriptions else info.label_names()
    return None


def validate(
    checkpoint: str,
    model_name: Optional[str] = None,
    data: Optional[str] = None,
    dataset: Optional[str] = None,
    img_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    batch_size: int = 100,
    amp: Optional[bool] = None,
    workers: int = 4,
    device: Optional[str] = None,
    progress: bool = True,
    precision: Optional[InferencePrecision] = None,
) -> Dict[str, Any]:
    """top-1/top-5/loss of a checkpoint (EMA weights when it has them) on DATA/val, CIFAR test or digits val.

    Without DATA, the data the checkpoint was trained on (recorded in our checkpoints) is used. ``precision``
    (``--dtype`` and the stem flags) replaces ``amp``'s autocast when given.
    """
    from .. import data as D
    from .builders import autocast_pays, autocast_setup, model_for_checkpoint, train_config
    from .distributed import init_distributed, shutdown

    env = init_distributed(device)
    try:
        if precision is not None:
            precision.check(env.device)
        model, ckpt, model_name = model_for_checkpoint(model_name, checkpoint, img_size)
        trained_on = train_config(ckpt)
        if data is None and dataset is None:
            if not trained_on.get('dataset'):
                raise UserError(f'no DATA given and {checkpoint} does not record its data: give DATA')
            dataset, data = trained_on['dataset'], trained_on.get('data')
        dataset = dataset or ('folder' if data else 'digits')
        pre = _preprocessing(model, trained_on, crop_pct)
        classes = checkpoint_class_names(model, ckpt)
        images = _held_out_images(trained_on, dataset, data, pre['img_size'], classes)
        if images is None:
            images = D.evaluation_images(dataset, data, pre['img_size'], classes)
        if len(images.classes) > model.num_classes:
            raise UserError(
                f'{data}: {len(images.classes)} classes but the checkpoint predicts {model.num_classes}'
            )
        ds = D.AugmentedDataset(
            images,
            D.eval_transform(pre['img_size'], pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation']),
        )
        loader = D.make_loader(
            ds,
            batch_size,
            D.ShardSampler(len(ds), env.world_size, env.rank),
            workers,
            pin_memory=env.device.type == 'cuda',
        )
        if precision is None:
            if amp is None and trained_on.get('amp', False) is None:
                # a run of ours that left --amp unset validated each epoch where autocast pays: so does this
                amp = autocast_pays(env.device)
            autocast, _, _ = autocast_setup(env.device, amp, 'auto')
            model.to(env.device)
            input_dtype = torch.float32
        else:
            model = precision.prepare(model, env.device, model_name)
            autocast, input_dtype = (lambda: precision.autocast(env.device)), precision.input_dtype
        metrics = evaluate(
            model, loader, env.device, env=env, autocast=autocast, progress=progress, desc='validate',
            input_dtype=input_dtype,
        )
        note = check_failures(metrics['failed_count'], len(ds), metrics['failed'], 'validation')
        metrics.update(
            held_out=D.held_out_description(images),
            model=model_name,
            checkpoint=str(checkpoint),
            img_size=pre['img_size'],
            crop_pct=pre['crop_pct'],
            note=note,
            is_main=env.is_main,
        )
        return metrics
    finally:
        shutdown(env)


def _held_out_images(trained_on: Dict[str, Any], dataset: str, data: Optional[str], img_size: int, classes):
    """The run's own held-out images when it trained with ``--val-split`` on this very DATA, else None.

    Such a DATA holds the training images too: validating on all of it would count images the model
    trained on, so the split is drawn again from the seed the run recorded (the same images it validated on).
    """
    from .. import data as D

    split = float(trained_on.get('val_split') or 0.0)
    if split <= 0 or dataset != (trained_on.get('dataset') or ('folder' if trained_on.get('data') else 'digits')):
        return None
    if dataset != 'digits':
        if data is None or trained_on.get('data') is None:
            return None
        if Path(data).resolve() != Path(trained_on['data']).resolve():
            return None
    _, held = D.training_images(dataset, data, img_size, val_split=split, seed=int(trained_on.get('seed', 0)))
    if classes is not None and list(held.classes) != list(classes):
        return None
    return held


def _predict_inputs(paths: Sequence[str]) -> List[Any]:
    """Image files, each folder's images, and for a shard set or datasets file the images of its val split
    (its train split when it has none) as ``(name, load)`` pairs, in the order given."""
    from .. import data as D
    from .. import sources

    items: List[Any] = []
    plain: List[str] = []
    for path in map(str, paths):
        if sources.kind_of(path) is None:
            plain.append(path)
            continue
        items += D.image_files(plain)
        plain = []
        images = D.evaluation_images('folder', path, 0)
        items += [(images.name(i), functools.partial(images.image, i)) for i in range(len(images))]
    return items + D.image_files(plain)


def predict_files(
    paths: Sequence[str],
    checkpoint: str,
    model_name: Optional[str] = None,
    img_size: Optional[int] = None,
    topk: int = 5,
    device: Optional[str] = None,
    precision: Optional[InferencePrecision] = None,
    batch_size: int = 32,
) -> List[Dict[str, Any]]:
    """Top-k classes of each image file (a folder: each image in it, recursively, sorted); names from the
    checkpoint's data or ImageNet's for 1000 classes."""
    from .. import data as D
    from .builders import model_for_checkpoint, train_config
    from .distributed import pick_device

    dev = pick_device(device)
    precision = (precision or InferencePrecision()).check(dev)
    paths = _predict_inputs(paths)
    model, ckpt, model_name = model_for_checkpoint(model_name, checkpoint, img_size)
    pre = _preprocessing(model, train_config(ckpt), None)
    names = checkpoint_class_names(model, ckpt, descriptions=True) or [str(i) for i in range(model.num_classes)]
    model = precision.prepare(model, dev, model_name)
    transform = D.eval_transform(
        pre['img_size'], pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation']
    )
    return predict(model, paths, transform, names, dev, topk=topk, precision=precision, batch_size=batch_size)
