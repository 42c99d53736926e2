"""Datasets and loaders: an image folder tree, CIFAR-10/100 archives on disk, the built-in digits.

Every dataset is a list of labelled images read on demand, wrapped by :class:`AugmentedDataset`,
which applies the transform under a random seed fixed by (run seed, epoch, image index). The
augmentation of an image therefore does not depend on the number of loader workers, on the
process that reads it, or on where an interrupted run was resumed: a resumed run sees the very
same batches as one that never stopped.

Images that fail to decode do not stop a run: the loader drops them from the batch and reports
their paths, the training loop counts them and aborts when more than 1% fail.

Training batches cross from the loader processes as uint8 (:class:`StagedTransform`): the workers run
the transform up to the pixels and make random erasing's draws, the batch is normalised and erased on
the device, giving the very tensors of the whole pipeline. Shards and datasets files: ``sources.py``.

Nothing is ever downloaded: CIFAR must already be on disk (the messages say which files go where)
and the digits come with scikit-learn.
"""

import importlib
import io
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import UserError

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.gif')
CIFAR_FILES = {
    'cifar10': (
        'cifar-10-batches-py',
        [f'data_batch_{i}' for i in range(1, 6)],
        ['test_batch'],
        'batches.meta',
        b'labels',
        b'label_names',
    ),
    'cifar100': ('cifar-100-python', ['train'], ['test'], 'meta', b'fine_labels', b'fine_label_names'),
}
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode: grayscale, CMYK, palette; transparent pixels become white."""
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    return img.convert('RGB')


def image_files(paths: Sequence[str]) -> List[str]:
    """``paths`` with each folder replaced by the image files under it (``IMG_EXTENSIONS``, hidden names skipped,
    sorted; recursively), in the order given. A folder without images is a :class:`UserError`; other paths are
    kept as they are for :func:`load_image` to judge."""
    files: List[str] = []
    for path in map(str, paths):
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = images_under(path)
        if not found:
            raise UserError(f"{path}: a folder with no image files in it ({', '.join(IMG_EXTENSIONS)})")
        files += found
    return files


def images_under(folder) -> List[str]:
    """The image files (``IMG_EXTENSIONS``) under ``folder``, recursively, hidden names skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.')]
    return sorted(found)


def load_image(path) -> Image.Image:
    """The one image loader (datasets, predict, visualize): ``path`` as an RGB PIL image (see :func:`to_rgb`).

    A missing or undecodable file is a :class:`UserError` naming it; a dataset counts it as a failed image.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{path}: no such image file (check the path)')
    with open(path, 'rb') as f:
        return decode_image(f.read(), str(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes (a file's, a shard sample's, a datasets row's) as RGB; undecodable is a UserError."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f'{name}: cannot be read as an image ({type(e).__name__}); give a JPEG or PNG file') from None
    return to_rgb(img)


# -- preprocessing ----------------------------------------------------------------------------------------
def resolve_preprocessing(model, overrides: Optional[Dict[str, Any]] = None,
                          dataset: Optional[str] = None) -> Dict[str, Any]:
    """How images are prepared for ``model``: ``img_size``, ``in_chans``, ``mean``, ``std``, ``crop_pct``,
    ``interpolation``.

    Each is the value ``overrides`` gives (a run's flags, or the config a training checkpoint recorded;
    None means not given), else CIFAR's mean/std for CIFAR ``dataset``, else the model's ``pretrained_cfg``
    (a pretrained tag's own: CIFAR's for the CIFAR transfers). The size is the model's own unless
    ``overrides`` names one.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .cifar import CIFAR_MEAN, CIFAR_STD

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    pre = dict(getattr(model, 'pretrained_cfg', None) or {})
    input_size = pre.get('input_size', (3, 224, 224))
    size = given.get('img_size') or getattr(model, 'img_size', None) or input_size[1:]
    cifar = dataset in ('cifar10', 'cifar100')
    return {
        'img_size': int(size[0]) if isinstance(size, (tuple, list)) else int(size),
        'in_chans': int(getattr(model, 'in_chans', None) or input_size[0]),
        'mean': tuple(given.get('mean') or (CIFAR_MEAN if cifar else pre.get('mean', IMAGENET_DEFAULT_MEAN))),
        'std': tuple(given.get('std') or (CIFAR_STD if cifar else pre.get('std', IMAGENET_DEFAULT_STD))),
        'crop_pct': float(given.get('crop_pct', pre.get('crop_pct', 0.9))),
        'interpolation': given.get('interpolation') or pre.get('interpolation', 'bicubic'),
    }


# -- labelled images ------------------------------------------------------------------------------
class LabelledImages:
    """``len``, ``image(i)`` (an RGB PIL image), ``targets``, ``classes`` and ``name(i)`` for messages."""

    classes: List[str]
    targets: List[int]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f'#{i}'


class FolderImages(LabelledImages):
    """``root/<class>/**/*.jpg``; class indices follow ``classes`` (sorted folder names by default)."""

    def __init__(self, root: Path, classes: Optional[Sequence[str]] = None, describe: str = ''):
        self.root = Path(root)
        found = scan_folder(self.root, describe or str(root))
        if classes is None:
            classes = sorted(found)
        index = {c: i for i, c in enumerate(classes)}
        extra = sorted(set(found) - set(index))
        if extra:
            raise UserError(
                f'{describe or root}: class folders {", ".join(extra[:5])} are not among the '
                f'{len(classes)} classes of the training data / checkpoint'
            )
        self.classes = list(classes)
        self.paths: List[str] = []
        self.targets = []
        for cls in sorted(found):
            for p in found[cls]:
                self.paths.append(p)
                self.targets.append(index[cls])

    def image(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i]


def scan_folder(root: Path, describe: str) -> Dict[str, List[str]]:
    """{class: sorted image paths}; a missing tree, no class folders or an empty class is a UserError.

    In a job of several processes (torch.distributed initialised) rank 0 alone walks the tree and the
    others receive its list: one scan per job, not one per rank, on a shared file system where listing
    1.28 million files is minutes of metadata requests. Every rank calls this in the same order (the
    run's data set-up is the same code on every rank), so the broadcasts pair up.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _scan_folder(root, describe)
    box: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ('found', _scan_folder(root, describe))
        except UserError as e:
            box[0] = ('error', str(e))
    dist.broadcast_object_list(box, src=0)  # a list of our own job's rank 0: plain str/list/dict
    kind, value = box[0]
    if kind == 'error':
        raise UserError(value)
    return value


def _scan_folder(root: Path, describe: str) -> Dict[str, List[str]]:
    if not root.is_dir():
        raise UserError(f'{describe}: no such folder (expected {describe}/<class>/*.jpg)')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f'{describe}: no class folders in it (expected {describe}/<class>/*.jpg)')
    found: Dict[str, List[str]] = {}
    for cls in classes:
        files = images_under(root / cls)
        if not files:
            raise UserError(f'no images found in {describe}/{cls} (expected {describe}/<class>/*.jpg)')
        found[cls] = files
    return found


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads the CIFAR python archives: plain containers and numpy arrays, nothing else (no code)."""

    _ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'),
        ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'),
        ('numpy', 'dtype'),
        ('numpy.core.multiarray', 'scalar'),
        ('numpy._core.multiarray', 'scalar'),
        ('_codecs', 'encode'),  # bytes written by Python 3 at protocol 2 (a string encoder, no side effects)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        if module.startswith('numpy.core.') and hasattr(np, '_core'):
            module = 'numpy._core.' + module[len('numpy.core.') :]
        return getattr(importlib.import_module(module), name)


def _read_archive(path: Path) -> Dict[Any, Any]:
    try:
        with open(path, 'rb') as f:
            data = _ArchiveUnpickler(f, encoding='bytes').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f'{path}: not a CIFAR python archive ({e})') from None
    if not isinstance(data, dict):
        raise UserError(f'{path}: not a CIFAR python archive (expected a dict)')
    return data


class CifarImages(LabelledImages):
    """Python-pickle archives of CIFAR-10 (``cifar-10-batches-py/``) or CIFAR-100 (``cifar-100-python/``)."""

    def __init__(self, root: Path, which: str, train: bool):
        folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_FILES[which]
        root = Path(root)
        base = root / folder if (root / folder).is_dir() else root
        need = train_files + test_files + [meta_file]
        missing = [f for f in need if not (base / f).is_file()]
        if missing:
            raise UserError(
                f'{which} not found in {root}: put the python version of the archive there, unpacked, '
                f'so that {root}/{folder}/ holds {", ".join(need)} '
                f'(missing: {", ".join(missing)}; nothing is downloaded)'
            )
        meta = _read_archive(base / meta_file)
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
        arrays, targets = [], []
        for name in train_files if train else test_files:
            batch = _read_archive(base / name)
            try:
                arrays.append(np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                targets += [int(t) for t in batch[label_key]]
            except (KeyError, ValueError) as e:
                raise UserError(f'{base / name}: not a {which} archive ({e})') from None
        self.data = np.concatenate(arrays).transpose(0, 2, 3, 1)  # NHWC for PIL
        self.targets = targets
        self._where = f'{base}/{"train" if train else "test"}'

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[i])

    def name(self, i: int) -> str:
        return f'{self._where}#{i}'


class DigitsImages(LabelledImages):
    """scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn), upsampled to ``size``.

    A fixed stratified split keeps 20% of each class for validation (360 of 1797 images).
    """

    def __init__(self, train: bool, size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(
            idx, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
        )
        self.indices = np.sort(train_idx if train else val_idx)
        self.classes = [str(d) for d in range(10)]
        self.targets = [int(digits.target[i]) for i in self.indices]
        # ink is bright: 0..16 -> 0..255, upsampled once with bicubic interpolation
        pixels = (digits.images[self.indices] * (255.0 / 16.0)).round().astype(np.uint8)
        self._images = [
            Image.fromarray(p, mode='L').resize((size, size), Image.BICUBIC).convert('RGB') for p in pixels
        ]
        self._split = 'train' if train else 'val'

    def image(self, i: int) -> Image.Image:
        return self._images[i]

    def name(self, i: int) -> str:
        return f'digits/{self._split}#{int(self.indices[i])}'


# -- augmentation under a per-image seed ------------------------------------------------------------
@dataclass
class Failed:
    """An image that could not be read; the collate function drops it and reports the path."""

    path: str
    reason: str


class AugmentedDataset(Dataset):
    """``images`` through ``transform``; keys: ``index``, or ``(epoch, index)`` from :class:`EpochSampler`."""

    def __init__(self, images: LabelledImages, transform: Callable, seed: int = 0):
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    @property
    def classes(self) -> List[str]:
        return self.images.classes

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            img = self.images.image(i)
        except UserError as e:
            if getattr(e, 'fatal', False):  # a shard unlike its manifest: the run stops, no image to skip
                raise
            return Failed(self.images.name(i), f'{type(e).__name__}: {e}')
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return Failed(self.images.name(i), f'{type(e).__name__}: {e}')
        with _seeded(self.seed, epoch, i):
            x = self.transform(img)
        return x, self.images.targets[i]


class _seeded:
    """Seed python, numpy and torch's CPU generator for one image, then put the caller's states back."""

    def __init__(self, seed: int, epoch: int, index: int):
        self.value = ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63)

    def __enter__(self):
        self.saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(self.value)
        np.random.seed(self.value % (2**32))
        torch.default_generator.manual_seed(self.value)

    def __exit__(self, *exc):
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.default_generator.set_state(th)
        return False


def collate(items):
    """Batch the readable images; return ``(images, targets, failed_paths)``; :class:`Staged` images make a
    :class:`StagedBatch`."""
    good = [it for it in items if not isinstance(it, Failed)]
    failed = [it.path for it in items if isinstance(it, Failed)]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), failed
    targets = torch.tensor([g[1] for g in good], dtype=torch.long)
    if isinstance(good[0][0], Staged):
        first = good[0][0]
        return (StagedBatch(torch.stack([g[0].pixels for g in good]), [g[0].erased for g in good], first.mean,
                            first.std), targets, failed)
    return torch.stack([g[0] for g in good]), targets, failed


# -- uint8 until the device -------------------------------------------------------------------------------
@dataclass
class Staged:
    """One image as the loader ships it: uint8 pixels, and the regions random erasing drew for it (the slice
    and the fill, drawn in the worker under the image's seed); normalised and erased where it trains."""

    pixels: torch.Tensor
    erased: List[Tuple[Any, torch.Tensor]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


class _ErasedRegions:
    """Stands in for the image in timm's RandomErasing: records each assignment instead of making it."""

    def __init__(self):
        self.regions: List[Tuple[Any, torch.Tensor]] = []

    def __setitem__(self, key, value):
        self.regions.append((key, value.clone()))


class StagedTransform:
    """A ToTensor + Normalize (+ RandomErasing) pipeline split so that the batch crosses from the loader
    processes as uint8 (a quarter of float32's bytes) and is normalised on the device.

    The head (crop, flip, RandAugment) and every random draw of the erasing run in the worker, in the
    order the whole pipeline draws them, so :class:`StagedBatch` gives the very tensors the pipeline
    would (bit for bit on the CPU: the same division, subtraction and division in float32).
    """

    def __init__(self, head: Callable, mean, std, erase=None):
        from torchvision import transforms as T

        self.head = T.Compose([*head, T.PILToTensor()])
        self.mean, self.std, self.erase = tuple(mean), tuple(std), erase

    @classmethod
    def split(cls, transform) -> Optional['StagedTransform']:
        """The staged form of ``transform``, or None when it does not end in ToTensor, Normalize[, RandomErasing]."""
        from timm.data.random_erasing import RandomErasing
        from torchvision import transforms as T

        steps = list(getattr(transform, 'transforms', []))
        erase = steps.pop() if steps and isinstance(steps[-1], RandomErasing) else None
        if erase is not None and (erase.num_splits > 1 or str(erase.device) != 'cpu'):
            return None
        if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or type(steps[-2]).__name__ not in (
                'ToTensor', 'MaybeToTensor'):
            return None
        norm = steps[-1]
        return cls(steps[:-2], [float(m) for m in torch.as_tensor(norm.mean).flatten()],
                   [float(v) for v in torch.as_tensor(norm.std).flatten()], erase)

    def __call__(self, img) -> Staged:
        pixels = self.head(img)
        regions = _ErasedRegions()
        if self.erase is not None:
            self.erase._erase(regions, *pixels.shape, torch.float32)
        return Staged(pixels, regions.regions, self.mean, self.std)


class StagedBatch:
    """A batch of :class:`Staged` images: ``.to(device)`` gives the normalised, erased float32 batch there."""

    def __init__(self, pixels: torch.Tensor, erased, mean, std):
        self.pixels, self.erased, self.mean, self.std = pixels, erased, mean, std

    def __len__(self) -> int:
        return len(self.pixels)

    def numel(self) -> int:
        return self.pixels.numel()

    def __getitem__(self, index: slice) -> 'StagedBatch':
        return StagedBatch(self.pixels[index], self.erased[index], self.mean, self.std)

    def pin_memory(self) -> 'StagedBatch':
        return StagedBatch(self.pixels.pin_memory(), self.erased, self.mean, self.std)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        x = self.pixels.to(device, non_blocking=non_blocking).to(torch.float32).div_(255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
        for image, regions in zip(x, self.erased):
            for key, fill in regions:
                image[key] = fill.to(x.device, non_blocking=non_blocking)
        return x


# -- samplers -----------------------------------------------------------------------------------------
class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (``set_epoch`` each epoch) that can start an epoch part-way.

    ``skip`` drops the first indices of this rank, the ones a resumed run already trained on; the
    keys carry the epoch so that :class:`AugmentedDataset` seeds each image's augmentation.
    With one process it is a seeded shuffle, the same permutation the ranks of a DDP run share.

    ``groups`` (the shard of each image, :func:`shard_groups`) makes the shuffle shard-local: the
    shards in a random order, taken ``SHARD_GROUP`` at a time, the images of each group shuffled together.
    A loader worker then reads a few shards at once instead of one image from every shard of the set;
    prepare shuffles the images across shards, so a group is a random sample of every class.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 groups: Optional[Sequence[int]] = None):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.skip = 0
        self.groups = None if groups is None else [int(g) for g in groups]

    def _grouped(self) -> List[int]:
        from .sources import SHARD_GROUP

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        members: Dict[int, List[int]] = {}
        for i, s in enumerate(self.groups):
            members.setdefault(s, []).append(i)
        shards = sorted(members)
        shards = [shards[k] for k in torch.randperm(len(shards), generator=g).tolist()]
        order: List[int] = []
        for start in range(0, len(shards), SHARD_GROUP):
            chunk = [i for s in shards[start:start + SHARD_GROUP] for i in members[s]]
            order += [chunk[k] for k in torch.randperm(len(chunk), generator=g).tolist()]
        order += order[: self.total_size - len(order)]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        indices = self._grouped() if self.shuffle and self.groups is not None else list(super().__iter__())
        indices = indices[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def shard_groups(images: 'LabelledImages') -> Optional[List[int]]:
    """The shard each image lives in, for :class:`EpochSampler`'s shard-local shuffle; None for random-access
    sources (folders, archives, datasets files)."""
    base, indices = images, None
    if isinstance(images, SubsetImages):
        base, indices = images.base, images.indices
    shard_of = getattr(base, 'shard_of', None)
    if shard_of is None:
        return None
    return [shard_of(i) for i in (indices if indices is not None else range(len(base)))]


class ShardSampler(Sampler):
    """Evaluation shard of one rank: every image exactly once across ranks (no padding duplicates)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    drop_last: bool = False,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A loader of ``(images, targets, failed_paths)`` batches.

    Never more workers than CPU cores; a private generator, so that starting an epoch does not draw
    from the global RNG (a resumed run's random streams stay those of an uninterrupted one).
    """
    workers = min(workers, os.cpu_count() or 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


# -- picking the data a run asks for ---------------------------------------------------------------------
def val_folder(root: Path) -> Optional[Path]:
    for name in ('val', 'validation'):
        if (root / name).is_dir():
            return root / name
    return None


class SubsetImages(LabelledImages):
    """The images ``indices`` of ``base`` (same classes), e.g. one side of a held-out split."""

    def __init__(self, base: LabelledImages, indices: Sequence[int], describe: str = ''):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.classes = list(base.classes)
        self.targets = [base.targets[i] for i in self.indices]
        self.describe = describe

    def image(self, i: int) -> Image.Image:
        return self.base.image(self.indices[i])

    def name(self, i: int) -> str:
        return self.base.name(self.indices[i])


def held_out_description(images: LabelledImages) -> Optional[str]:
    """``0.1 of DATA held out (seed 42)`` for the held-out side of :func:`held_out_split`, else None."""
    return images.describe if isinstance(images, SubsetImages) and images.describe else None


def held_out_split(
    images: LabelledImages, fraction: float, seed: int = 0, describe: str = ''
) -> Tuple[SubsetImages, SubsetImages]:
    """(train, held-out): ``fraction`` of every class, drawn by ``seed``, never trained on.

    Stratified: each class gives ``round(fraction * n_class)`` images (at least one, and at least
    one stays for training), so the held-out classes keep the training set's proportions. The draw
    depends only on the seed and on the sorted file list, not on the machine or the worker count.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f'--val-split {fraction}: must be a fraction between 0 and 1, e.g. 0.1')
    rng = np.random.default_rng(seed)
    targets = np.asarray(images.targets)
    held: List[int] = []
    for c in range(len(images.classes)):
        members = np.flatnonzero(targets == c)
        if len(members) < 2:
            raise UserError(
                f'{describe or "the training images"}: class {images.classes[c]!r} has '
                f'{len(members)} image(s); --val-split needs at least 2 per class'
            )
        k = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        held.extend(rng.permutation(members)[:k].tolist())
    held_set = set(held)
    keep = [i for i in range(len(images)) if i not in held_set]
    name = describe or 'the training images'
    return (SubsetImages(images, keep, describe=name),
            SubsetImages(images, sorted(held), describe=f'{fraction:g} of {name} held out (seed {seed})'))


def training_images(
    dataset: str, data: Optional[str], img_size: int, val_split: float = 0.0, seed: int = 0
) -> Tuple[LabelledImages, LabelledImages]:
    """(train, val) images of a run; DATA problems are UserErrors naming the path and the fix.

    ``val_split`` > 0 validates on a stratified, seeded share of the training images instead of
    DATA/val (see :func:`held_out_split`); a folder without ``val/`` needs it.
    """
    if dataset == 'digits':
        train = DigitsImages(train=True, size=img_size)
        if val_split > 0:
            return held_out_split(train, val_split, seed, describe='digits train')
        return train, DigitsImages(train=False, size=img_size)
    if dataset == 'folder' and data is not None:
        found = _source_images(data, val_split, seed)
        if found is not None:
            return found
    root = Path(data)
    if not root.exists():
        raise UserError(f'{data}: no such folder')
    if dataset in CIFAR_FILES:
        train = CifarImages(root, dataset, train=True)
        if val_split > 0:
            return held_out_split(train, val_split, seed, describe=f'{dataset} train')
        return train, CifarImages(root, dataset, train=False)
    train_root = root / 'train'
    describe = f'{data}/train'
    if not train_root.is_dir():
        if val_split > 0 and val_folder(root) is None:
            # DATA itself holds the class folders (CIFAR-10 as JPEG folders, any ImageFolder tree).
            train_root, describe = root, str(data)
        else:
            raise UserError(
                f'{data}: no train folder in it (expected {data}/train/<class>/*.jpg and '
                f'{data}/val/<class>/*.jpg, or {data}/<class>/*.jpg with --val-split 0.1)'
            )
    train = FolderImages(train_root, describe=describe)
    if val_split > 0:
        return held_out_split(train, val_split, seed, describe=describe)
    vf = val_folder(root)
    if vf is None:
        raise UserError(
            f'{data}: no val folder in it (expected {data}/val/<class>/*.jpg beside {data}/train; '
            f'or hold out part of the training images with --val-split 0.1)'
        )
    val = FolderImages(vf, classes=train.classes, describe=f'{data}/{vf.name}')
    return train, val


def _source_images(data: str, val_split: float, seed: int):
    """(train, val) of a shard set or a datasets file, or None when DATA is neither (a folder tree)."""
    from . import sources

    kind = sources.kind_of(data)
    if kind is None:
        return None
    if kind == 'shards':
        manifest = sources.Manifest(data)
        train = manifest.images('train')
        val = None if val_split > 0 or manifest.split('val') is None else manifest.images('val')
    else:
        found = sources.open_datasets(data)
        train = sources.datasets_split(found, data, 'train')
        if train is None:
            raise UserError(f'{data}: no train split (it has {", ".join(found) or "none"}); name the '
                            f'training files train-*.parquet or save a DatasetDict with a train split')
        val = None if val_split > 0 else sources.datasets_split(found, data, 'val', classes=train.classes)
    if val_split > 0:
        return held_out_split(train, val_split, seed, describe=f'{data} train')
    if val is None:
        raise UserError(f'{data}: no validation split in it; hold out part of the training images with '
                        f'--val-split 0.1')
    return train, val


def _source_eval_images(data: str):
    """The val split of a shard set or a datasets file (its train split when it has none), or None."""
    from . import sources

    kind = sources.kind_of(data)
    if kind == 'shards':
        manifest = sources.Manifest(data)
        return manifest.images('val' if manifest.split('val') is not None else 'train')
    if kind == 'datasets':
        found = sources.open_datasets(data)
        return sources.datasets_split(found, data, 'val') or sources.datasets_split(found, data, 'train')
    return None


def evaluation_images(
    dataset: str, data: Optional[str], img_size: int, classes: Optional[Sequence[str]] = None
) -> LabelledImages:
    """Images to validate on: DATA/val (or DATA holding class folders), CIFAR test, digits val."""
    if dataset == 'digits':
        return DigitsImages(train=False, size=img_size)
    if dataset == 'folder' and data is not None:
        found = _source_eval_images(data)
        if found is not None:
            return found
    root = Path(data)
    if not root.exists():
        raise UserError(f'{data}: no such folder')
    if dataset in CIFAR_FILES:
        return CifarImages(root, dataset, train=False)
    vf = val_folder(root)
    target = vf if vf is not None else root
    describe = f'{data}/{vf.name}' if vf is not None else str(data)
    if classes is not None:
        found = scan_folder(target, describe)
        if not set(found) <= set(classes):
            if len(found) == len(classes):
                classes = None  # folders named otherwise than the checkpoint's labels: use their sorted order
    return FolderImages(target, classes=classes, describe=describe)


def digits_samples(out_dir: Path, count: int = 8, size: int = 32) -> List[Tuple[Path, str]]:
    """Write ``count`` held-out digits (one per class first) as PNG files; return (path, label) pairs."""
    images = DigitsImages(train=False, size=size)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen, seen = [], set()
    for i, t in enumerate(images.targets):
        if t not in seen:
            chosen.append(i)
            seen.add(t)
        if len(chosen) == count:
            break
    written = []
    for i in chosen:
        label = images.classes[images.targets[i]]
        path = out_dir / f'digit_{int(images.indices[i]):04d}_label_{label}.png'
        images.image(i).save(path)
        written.append((path, label))
    return written


# -- transforms (timm's and torchvision's building blocks) -----------------------------------------------
def eval_transform(img_size: int, mean, std, crop_pct: float, interpolation: str):
    """Resize by ``crop_pct``, center crop, normalize: timm's evaluation transform."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, img_size, img_size),
        is_training=False,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
    )


def pad_crop_padding(img_size: int) -> int:
    """The zero padding of ``--augment pad-crop``'s random crop: an eighth of the side (4 px at 32)."""
    return img_size // 8


def train_transform(
    augment: str,
    img_size: int,
    mean,
    std,
    interpolation: str,
    *,
    scale,
    ratio,
    hflip: float,
    color_jitter: float,
    auto_augment: Optional[str],
    train_interpolation: str,
    reprob: float,
    remode: str,
    crop_pct: float,
):
    """``timm``: the reference ImageNet pipeline (random-resized crop, RandAugment, random erasing);
    ``pad-crop``: the reference transfer pipeline (resize, padded random crop, flip);
    ``none``: evaluation's. Every setting is the run's (``RunConfig`` owns their defaults)."""
    if augment == 'none':
        return eval_transform(img_size, mean, std, crop_pct, interpolation)
    if augment == 'pad-crop':
        from timm.data.transforms import str_to_interp_mode
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(img_size, interpolation=str_to_interp_mode(interpolation)),
                T.RandomCrop(img_size, padding=pad_crop_padding(img_size)),
                T.RandomHorizontalFlip(hflip),
                T.ToTensor(),
                T.Normalize(tuple(mean), tuple(std)),
            ]
        )
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, img_size, img_size),
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=train_interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode=remode,
        re_count=1,
    )
    _posterize_zero_bits(transform)
    return transform


def _posterize_keep_zero(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, also for 0 bits kept: a black image, as Pillow gave before it refused 0."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _posterize_zero_bits(transform) -> None:
    """RandAugment at magnitude 10 (reached with ``mstd``) asks 'PosterizeIncreasing' to keep 0 bits,
    which Pillow >= 11 rejects with a ValueError; the reference's Pillow returned a black image."""
    for t in getattr(transform, 'transforms', []):
        ops = list(getattr(t, 'ops', []) or [])
        for sub in getattr(t, 'policy', []) or []:
            ops += list(sub)
        for op in ops:
            if getattr(op, 'name', '').startswith('Posterize'):
                op.aug_fn = _posterize_keep_zero


# -- images decoded once, kept in memory as uint8 ------------------------------------------------------------
class DecodedImages:
    """Every image of ``images`` through ``prepare`` (a PIL image -> uint8 (3, S, S) tensor), once.

    ``pixels`` (N, 3, S, S) uint8, ``ok`` (N,) bool (False: the image failed to decode, ``pixels`` is zeros
    there) and ``targets``; ``images`` is the source, for names in messages. The decoding runs in ``workers`` loader
    processes; an image whose prepared shape is not (3, S, S) is a UserError (the batched crop needs one size).
    """

    def __init__(self, images: LabelledImages, prepare: Callable, size: int, workers: int = 0,
                 describe: str = 'the images', progress: bool = False):
        from tqdm import tqdm

        self.images = images
        n = len(images)
        need = n * 3 * size * size
        budget = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2
        if need > budget:
            raise UserError(f'--cache-images: {describe} ({n} images at {size}px) need {need / 2**30:.1f} GiB '
                            f'in memory, more than half of this machine\'s; drop --cache-images')
        self.pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
        self.ok = torch.zeros(n, dtype=torch.bool)
        self.targets = torch.as_tensor(list(images.targets), dtype=torch.long)
        loader = DataLoader(_Prepared(images, prepare), batch_size=256, num_workers=min(workers, os.cpu_count() or 1),
                            collate_fn=list)
        bar = tqdm(total=n, desc='decoding', leave=False, disable=not progress, mininterval=0.5)
        with bar:
            for items in loader:
                for i, x in items:
                    if isinstance(x, Failed):
                        continue
                    if tuple(x.shape) != (3, size, size):
                        raise UserError(
                            f'--cache-images: {images.name(i)} is {x.shape[2]}x{x.shape[1]} after the resize to '
                            f'{size}px, not square; the in-memory batches need images of one size: drop '
                            f'--cache-images for this data')
                    self.pixels[i] = x
                    self.ok[i] = True
                bar.update(len(items))

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def classes(self) -> List[str]:
        return self.images.classes

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()


class _Prepared(Dataset):
    def __init__(self, images: LabelledImages, prepare: Callable):
        self.images, self.prepare = images, prepare

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.prepare(self.images.image(i))
        except (UserError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return i, Failed(self.images.name(i), f'{type(e).__name__}: {e}')


def key_randoms(seed: int, epoch: int, indices: torch.Tensor, stream: int) -> np.ndarray:
    """A uint64 per image, a function of (run seed, epoch, image index, stream) only (splitmix64).

    The in-memory batches draw each image's crop and flip from these: the same for an image whatever
    the batch, worker, rank or resume point, as :class:`AugmentedDataset`'s per-image seed is.
    """
    offset = (((seed * 1_000_003 + epoch) * 1_000_000_007) * 8 + stream) % 2**64
    z = indices.numpy().astype(np.uint64) * np.uint64(8) + np.uint64(offset)
    for _ in range(2):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def pad_crop_flip(x: torch.Tensor, padding: int, hflip: float, seed: int, epoch: int,
                  indices: torch.Tensor) -> torch.Tensor:
    """torchvision's ``RandomCrop(S, padding)`` then ``RandomHorizontalFlip(hflip)``, on a uint8 batch.

    The same distribution as the per-image transforms: zero padding, each offset uniform over the
    ``2 * padding + 1`` positions, a flip with probability ``hflip``; drawn by :func:`key_randoms`.
    """
    B, _, H, W = x.shape
    span = 2 * padding + 1
    dy = torch.from_numpy((key_randoms(seed, epoch, indices, 0) % np.uint64(span)).astype(np.int64))
    dx = torch.from_numpy((key_randoms(seed, epoch, indices, 1) % np.uint64(span)).astype(np.int64))
    unit = (key_randoms(seed, epoch, indices, 2) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    flip = torch.from_numpy(unit < hflip)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W))
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(B)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


class MemoryLoader:
    """Batches of :class:`DecodedImages` in ``sampler``'s order: ``(images, targets, failed_paths)``.

    What :func:`make_loader` yields, without loader processes: the gather, the batched crop and flip
    (``augment``: ``(padding, hflip)`` or None) and the normalisation (timm's ``mean`` / ``std`` over
    [0, 1], as ``ToTensor`` + ``Normalize`` compute it) take a few milliseconds a batch.
    """

    def __init__(self, images: DecodedImages, batch_size: int, sampler: Sampler, mean, std,
                 augment: Optional[Tuple[int, float]] = None, drop_last: bool = False, seed: int = 0):
        self.images, self.batch_size, self.sampler, self.drop_last = images, batch_size, sampler, drop_last
        self.augment, self.seed = augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        keys = list(self.sampler)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield self.batch(chunk)

    def batch(self, keys) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        epoch = keys[0][0] if isinstance(keys[0], tuple) else 0
        index = torch.tensor([k[1] if isinstance(k, tuple) else k for k in keys], dtype=torch.long)
        ok = self.images.ok[index]
        failed = [self.images.images.name(int(i)) for i in index[~ok]]
        index = index[ok]
        if not len(index):
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), failed
        x = self.images.pixels[index]
        if self.augment is not None:
            x = pad_crop_flip(x, *self.augment, seed=self.seed, epoch=epoch, indices=index)
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        return x, self.images.targets[index], failed


def memory_prepare(augment: str, img_size: int, mean, std, crop_pct: float, interpolation: str) -> Callable:
    """The deterministic head of a pipeline, to uint8: what :class:`DecodedImages` keeps of each image.

    ``pad-crop``: its resize (the crop and flip are :func:`pad_crop_flip`'s, per batch); ``none`` and
    evaluation: timm's resize and center crop. The float conversion and normalisation come per batch.
    """
    from torchvision import transforms as T

    if augment not in ('pad-crop', 'none'):
        raise UserError(f'--cache-images augments in batches: use --augment pad-crop or none (not {augment}), '
                        f'or drop --cache-images')
    if augment == 'pad-crop':
        head = train_transform('pad-crop', img_size, mean, std, interpolation, scale=None, ratio=None, hflip=0.0,
                               color_jitter=0.0, auto_augment=None, train_interpolation=interpolation, reprob=0.0,
                               remode='pixel', crop_pct=crop_pct).transforms[:1]
    else:
        head = eval_transform(img_size, mean, std, crop_pct, interpolation).transforms[:2]
    return T.Compose([*head, T.PILToTensor()])
