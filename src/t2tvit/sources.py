"""Data where large datasets live: WebDataset tar shards and Hugging Face datasets files.

Both are :class:`t2tvit.data.LabelledImages` read by index, so every guarantee of the folder reader
holds unchanged: each image's augmentation is seeded by (run seed, epoch, index), independent of
workers, ranks and resume point, and undecodable images are skipped and counted.

Shards (``t2tvit prepare DATA OUT``)::

    OUT/manifest.json          classes, and per split its image count and shards (name, size, labels)
    OUT/train/shard-000000.tar WebDataset samples: <key>.jpg|png (the file's own bytes), <key>.cls, <key>.class.txt
    OUT/val/shard-000000.tar

The tar files are written by ``webdataset.TarWriter`` and read by wids' indexed tar reader
(``IndexedTarSamples``, memory-mapped): random access, so a resumed run sees the very same batches.
DATA may be OUT, its manifest, a URL of the manifest or a ``pipe:`` command printing it; shards named
relative to a URL or a command are fetched once into a local cache (``T2TVIT_SHARD_CACHE``, default
``~/.cache/t2tvit/shards``) and read from there.

Datasets files: a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict), or
parquet files with an image column and a label column (the hub's ImageNet-1k layout,
``data/train-00000-of-00257.parquet``); class names come from the label's ``ClassLabel`` feature.
"""

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from .data import LabelledImages, decode_image, to_rgb
from .errors import UserError

MANIFEST = 'manifest.json'
FORMAT = 't2tvit-shards'
# Shards a loader worker keeps open (memory-mapped, indexed): the shard-grouped shuffle of
# :class:`ShardGroupSampler` reads SHARD_GROUP shards at a time, so each is opened once per epoch.
SHARD_GROUP = 8
OPEN_SHARDS = 2 * SHARD_GROUP
SPLIT_NAMES = {'train': ('train',), 'val': ('val', 'validation', 'valid', 'test')}


def is_remote(location: str) -> bool:
    """A URL (``https://...``, ``s3://...``, ``file://...``) or a ``pipe:`` command, not a local path."""
    return location.startswith('pipe:') or re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', location) is not None


def kind_of(data: str) -> Optional[str]:
    """``'shards'``, ``'datasets'`` or None (an image folder, or nothing there) for DATA."""
    if is_remote(data):
        return 'shards'
    p = Path(data)
    if p.is_file():
        if p.suffix == '.json':
            return 'shards'
        if p.suffix == '.parquet':
            return 'datasets'
        return None
    if not p.is_dir():
        return None
    if (p / MANIFEST).is_file():
        return 'shards'
    if (p / 'dataset_dict.json').is_file() or (p / 'state.json').is_file() or parquet_files(p):
        return 'datasets'
    return None


# -- writing shards ---------------------------------------------------------------------------------------
def image_bytes(images, i: int) -> Tuple[bytes, str]:
    """(encoded bytes, extension) of image ``i``: a file's own bytes (no re-encoding), else lossless PNG."""
    paths = getattr(images, 'paths', None)
    if paths is not None:
        path = paths[i]
        ext = Path(path).suffix.lower().lstrip('.')
        with open(path, 'rb') as f:
            return f.read(), {'jpeg': 'jpg', 'tif': 'tiff'}.get(ext, ext)
    buf = io.BytesIO()
    images.image(i).save(buf, format='PNG')
    return buf.getvalue(), 'png'


def write_shards(images, out: Path, split: str, shard_images: int, seed: int = 0,
                 progress: bool = False) -> Dict[str, Any]:
    """``images`` as ``out/split/shard-NNNNNN.tar``, shuffled by ``seed`` so that every shard mixes the
    classes; returns the split's manifest entry. Each shard is written to a temporary name and renamed
    when complete: an interrupted ``prepare`` leaves no shard that looks whole."""
    import numpy as np
    import webdataset as wds
    from tqdm import tqdm

    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(images)).tolist()
    shards = []
    bar = tqdm(total=len(order), desc=f'{split} shards', unit='img', disable=not progress, mininterval=0.5)
    with bar:
        for start in range(0, len(order), shard_images):
            name = f'shard-{len(shards):06d}.tar'
            chunk = order[start:start + shard_images]
            tmp = folder / f'.{name}.partial'
            labels = []
            with open(tmp, 'wb') as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0)
                for j, i in enumerate(chunk):
                    data, ext = image_bytes(images, i)
                    target = int(images.targets[i])
                    writer.write({'__key__': f'{start + j:09d}', ext: data, 'cls': str(target).encode(),
                                  'class.txt': images.classes[target].encode()})
                    labels.append(target)
                writer.close()
            os.replace(tmp, folder / name)
            shards.append({'url': f'{split}/{name}', 'nsamples': len(chunk),
                           'filesize': (folder / name).stat().st_size, 'labels': labels})
            bar.update(len(chunk))
    return {'images': len(order), 'shards': shards}


def prepare(dataset: str, data: Optional[str], out: str, shard_images: int = 1000, img_size: int = 32,
            seed: int = 0, progress: bool = False) -> Dict[str, Any]:
    """``t2tvit prepare``: a folder tree (train/ and val/, or class folders), CIFAR archives or the digits
    as shards in ``out`` plus ``out/manifest.json``; returns the manifest."""
    from . import data as D

    if shard_images < 1:
        raise UserError(f'--shard-images {shard_images}: must be at least 1 (e.g. 1000)')
    outp = Path(out)
    if (outp / MANIFEST).exists():
        raise UserError(f'{out}: already holds shards ({MANIFEST}); give an empty or new folder')
    if data is not None and kind_of(data) is not None:
        raise UserError(f'{data}: already {kind_of(data)}; prepare reads an image folder, CIFAR or the digits')
    if dataset == 'folder':
        root = Path(data)
        has_split = (root / 'train').is_dir()
        if has_split:
            train, val = D.training_images('folder', data, img_size)
        else:
            train, val = D.FolderImages(root, describe=str(data)), None
    else:
        train, val = D.training_images(dataset, data, img_size)
    outp.mkdir(parents=True, exist_ok=True)
    splits = {'train': write_shards(train, outp, 'train', shard_images, seed, progress)}
    if val is not None:
        splits['val'] = write_shards(val, outp, 'val', shard_images, seed, progress)
    manifest = {'format': FORMAT, 'version': 1, 'classes': list(train.classes),
                'source': str(data) if data else dataset, 'splits': splits}
    tmp = outp / f'.{MANIFEST}.partial'
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, outp / MANIFEST)
    return manifest


# -- reading shards ---------------------------------------------------------------------------------------
def read_text(location: str) -> str:
    """The manifest at a local path, a URL or a ``pipe:`` command's output; unreachable is a UserError."""
    if not is_remote(location):
        path = Path(location)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise UserError(f'{location}: no shard manifest there (expected {path}, written by t2tvit prepare)')
        return path.read_text()
    try:
        with _open_remote(location) as f:
            data = f.read()
    except Exception as e:  # curl, a shell command, a cloud tool: any of them may fail in its own way
        raise UserError(f'{location}: cannot be read ({_reason(e)}); check the URL or the command, '
                        f'and that this machine can reach it') from None
    return data.decode()


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[-1][:200]}' if text else type(e).__name__


class _open_remote:
    """webdataset's ``gopen`` of a URL or ``pipe:``, which only fails on close when the command did."""

    def __init__(self, location: str):
        import webdataset as wds
        self.stream = wds.gopen(location, 'rb')

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        self.stream.close()  # a Pipe raises here on a non-zero exit status
        return False


_SHARD_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$')


def shard_location(manifest_at: str, url: str) -> str:
    """Where shard ``url`` (as the manifest names it) lives: beside the manifest; for a ``pipe:`` manifest,
    its command with the manifest's file name replaced by the shard's.

    Shard names are plain relative paths (letters, digits, ``_.-`` and ``/``, no ``..``): a manifest read
    from elsewhere can neither run a command of its own (``pipe:``) nor send this machine to another host.
    """
    if not _SHARD_NAME.match(url) or '..' in url.split('/'):
        raise UserError(f'{manifest_at}: names shard {url!r}; shard names must be paths relative to the manifest '
                        f'(as t2tvit prepare writes them), not URLs, commands or absolute paths')
    if manifest_at.startswith('pipe:'):
        if MANIFEST not in manifest_at:
            raise UserError(f'{manifest_at}: a pipe: command for relative shard names must name {MANIFEST} '
                            f'(e.g. "pipe:aws s3 cp s3://bucket/set/{MANIFEST} -"), so that shards can be '
                            f'fetched by the same command')
        return manifest_at.replace(MANIFEST, url)
    if is_remote(manifest_at):
        from urllib.parse import urljoin
        return urljoin(manifest_at, url)
    base = Path(manifest_at)
    return str((base if base.is_dir() else base.parent) / url)


def cache_folder(manifest_at: str) -> Path:
    root = Path(os.environ.get('T2TVIT_SHARD_CACHE') or Path.home() / '.cache' / 't2tvit' / 'shards')
    return root / hashlib.sha256(manifest_at.encode()).hexdigest()[:16]


def fetch_shard(location: str, local: Path, size: int, progress_name: str) -> None:
    """Copy a remote shard to ``local`` once (a lock lets the ranks of one machine share the copy)."""
    import fcntl

    local.parent.mkdir(parents=True, exist_ok=True)
    if local.is_file() and local.stat().st_size == size:
        return
    with open(str(local) + '.lock', 'w') as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if local.is_file() and local.stat().st_size == size:
            return
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix='.fetch-')
        try:
            with os.fdopen(fd, 'wb') as out, _open_remote(location) as f:
                shutil.copyfileobj(f, out, 1 << 20)
        except BaseException as e:  # Ctrl-C too: no partial copy left behind
            os.unlink(tmp)
            if not isinstance(e, Exception):
                raise
            raise UserError(f'{progress_name}: cannot be fetched from {location} ({_reason(e)}); check that '
                            f'it exists there and that this machine can reach it') from None
        got = os.path.getsize(tmp)
        if got != size:
            os.unlink(tmp)
            raise UserError(f'{progress_name}: {location} gave {got} bytes, the manifest says {size}: the shard '
                            f'there is truncated or was rewritten; copy it again or run t2tvit prepare again')
        os.replace(tmp, local)


class Manifest:
    """A shard manifest read from ``location`` and checked: classes, splits, where each shard is."""

    def __init__(self, location: str):
        self.location = location
        text = read_text(location)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f'{location}: not a shard manifest (not JSON: {e}); give the {MANIFEST} '
                            f'that t2tvit prepare wrote') from None
        if not isinstance(data, dict) or data.get('format') != FORMAT or not isinstance(data.get('splits'), dict):
            raise UserError(f'{location}: not a shard manifest (no "format": "{FORMAT}"); give the {MANIFEST} '
                            f'that t2tvit prepare wrote')
        self.classes = [str(c) for c in data['classes']]
        self.splits: Dict[str, Dict[str, Any]] = data['splits']
        self.at = location if is_remote(location) or not Path(location).is_dir() else str(Path(location) / MANIFEST)

    def split(self, name: str) -> Optional[Dict[str, Any]]:
        for alias in SPLIT_NAMES.get(name, (name,)):
            if alias in self.splits:
                return self.splits[alias]
        return None

    def images(self, split: str, progress: bool = False) -> 'ShardImages':
        entry = self.split(split)
        if entry is None:
            raise UserError(f'{self.location}: no {split} split in this manifest (it has '
                            f'{", ".join(self.splits)})')
        return ShardImages(self, entry, split, progress)


class ShardImages(LabelledImages):
    """The images of one split of a shard set, by index (wids' memory-mapped indexed tar reader).

    Local shards are checked against the manifest (present, the recorded size) before the run starts;
    remote ones are fetched into the cache and checked the same way. A shard holding other samples
    than the manifest says is a UserError; an undecodable image inside one is a failed image.
    """

    def __init__(self, manifest: Manifest, entry: Dict[str, Any], split: str, progress: bool = False):
        from tqdm import tqdm

        self.classes = list(manifest.classes)
        self.where = manifest.location
        self.split_name = split
        self.shard_names: List[str] = []
        self.paths: List[str] = []
        self.sizes: List[int] = []
        self.targets: List[int] = []
        self.starts: List[int] = []
        remote = []
        for shard in entry['shards']:
            url, n, size = shard['url'], int(shard['nsamples']), int(shard['filesize'])
            labels = [int(t) for t in shard['labels']]
            if len(labels) != n:
                raise UserError(f'{manifest.location}: shard {url} lists {len(labels)} labels for {n} images; '
                                f'run t2tvit prepare again')
            location = shard_location(manifest.at, url)
            if is_remote(location):
                local = cache_folder(manifest.at) / url.replace('/', '__')
                remote.append((location, local, size, url))
                path = str(local)
            else:
                path = location
                if not os.path.isfile(path):
                    raise UserError(f'{manifest.location}: names shard {url}, which is missing ({path}); copy '
                                    f'the whole shard folder, or run t2tvit prepare again')
                got = os.path.getsize(path)
                if got != size:
                    raise UserError(f'{path}: {got} bytes, the manifest says {size}: the shard is truncated '
                                    f'or was rewritten; copy it again or run t2tvit prepare again')
            self.starts.append(len(self.targets))
            self.shard_names.append(url)
            self.paths.append(path)
            self.sizes.append(n)
            self.targets += labels
        for location, local, size, url in tqdm(remote, desc='fetching shards', disable=not progress or not remote,
                                               mininterval=0.5):
            fetch_shard(location, local, size, url)
        self._open: 'OrderedDict[int, Any]' = OrderedDict()

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self):  # loader workers open their own memory maps
        state = dict(self.__dict__)
        state['_open'] = OrderedDict()
        return state

    def locate(self, i: int) -> Tuple[int, int]:
        import bisect
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def shard_of(self, i: int) -> int:
        return self.locate(i)[0]

    def _reader(self, s: int):
        from wids.wids import IndexedTarSamples

        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        try:
            reader = IndexedTarSamples(path=self.paths[s])
        except Exception as e:
            raise ShardError(f'{self.paths[s]}: not a readable tar shard ({_reason(e)}); copy it again or run '
                             f't2tvit prepare again') from None
        if len(reader) != self.sizes[s]:
            reader.close()
            raise ShardError(f'{self.paths[s]}: holds {len(reader)} samples, the manifest says {self.sizes[s]}; '
                             f'copy it again or run t2tvit prepare again')
        self._open[s] = reader
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return reader

    def name(self, i: int) -> str:
        s, j = self.locate(i)
        return f'{self.paths[s]}#{j}'

    def image(self, i: int) -> Image.Image:
        s, j = self.locate(i)
        sample = self._reader(s)[j]
        data = next((v for k, v in sample.items() if k.lstrip('.').lower() in _IMAGE_EXTS), None)
        if data is None:
            raise UserError(f'{self.name(i)}: no image in this sample (has {", ".join(sorted(sample))})')
        return decode_image(data.read() if hasattr(data, 'read') else data, self.name(i))


class ShardError(UserError):
    """A shard that does not hold what its manifest says: the run stops (not an image to skip)."""

    fatal = True


_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'ppm', 'bmp', 'tif', 'tiff', 'gif')


# -- Hugging Face datasets files ----------------------------------------------------------------------------
def parquet_files(folder: Path) -> List[Path]:
    """``folder/*.parquet`` and the hub's ``folder/data/*.parquet`` (or a folder per split); never a walk of
    the whole tree, which for an image folder would list every image on every rank."""
    found = list(folder.glob('*.parquet'))
    for sub in ('data', *SPLIT_NAMES['train'], *SPLIT_NAMES['val']):
        if (folder / sub).is_dir():
            found += (folder / sub).glob('*.parquet')
    return sorted(p for p in found if not p.name.startswith('.'))


def _split_of(path: Path) -> Optional[str]:
    """The hub's file naming: ``train-00000-of-00004.parquet``, ``validation-...``; a folder per split too."""
    for part in [path.name] + [p.name for p in path.parents]:
        head = re.split(r'[-_.]', part, maxsplit=1)[0].lower()
        for split, aliases in SPLIT_NAMES.items():
            if head in aliases:
                return split
    return None


def _need_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError('reading Hugging Face datasets files needs the datasets package: '
                        'pip install "t2tvit[datasets]"') from None
    return datasets


def open_datasets(data: str) -> Dict[str, Any]:
    """{split: datasets.Dataset} of a save_to_disk folder or of parquet files (file names give the splits)."""
    datasets = _need_datasets()
    datasets.disable_progress_bars()  # its per-call bars would interleave with the run's own lines
    p = Path(data)
    try:
        if p.is_dir() and ((p / 'dataset_dict.json').is_file() or (p / 'state.json').is_file()):
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                return dict(loaded)
            return {'train': loaded}
        files = [p] if p.is_file() else parquet_files(p)
        by_split: Dict[str, List[str]] = {}
        for f in files:
            by_split.setdefault(_split_of(f.relative_to(p) if p.is_dir() else Path(f.name)) or 'train',
                                []).append(str(f))
        return {split: datasets.Dataset.from_parquet(fs, keep_in_memory=False) for split, fs in by_split.items()}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'{data}: cannot be read as a datasets folder or parquet files ({_reason(e)})') from None


def _columns(ds, data: str) -> Tuple[str, str, List[str]]:
    """(image column, label column, class names) from the features: an ``Image`` and a ``ClassLabel``
    feature, else columns named image/img and label/labels."""
    datasets = _need_datasets()
    features = ds.features
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in ('image', 'img', 'jpg', 'png') if c in features), None)
    label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((c for c in ('label', 'labels', 'cls', 'class') if c in features), None)
    columns = ', '.join(features)
    if image is None:
        raise UserError(f'{data}: no image column (columns: {columns}); the images must be an Image feature '
                        f'or a column named image')
    if label is None:
        raise UserError(f'{data}: no label column (columns: {columns}); give parquet files with a ClassLabel '
                        f'feature or a column named label beside the images')
    if isinstance(features[label], datasets.ClassLabel):
        classes = list(features[label].names)
    else:
        values = ds.unique(label)
        classes = [str(i) for i in range(int(max(values)) + 1)] if values else []
    return image, label, classes


class DatasetImages(LabelledImages):
    """One split of a Hugging Face dataset (memory-mapped Arrow, read by index): images and labels."""

    def __init__(self, ds, data: str, split: str, classes: Optional[List[str]] = None):
        datasets = _need_datasets()
        image, label, own = _columns(ds, data)
        self.classes = list(classes) if classes is not None else own
        self.where = f'{data}[{split}]'
        self.ds = ds.cast_column(image, datasets.Image(decode=False)) if isinstance(
            ds.features[image], datasets.Image) else ds
        self.image_column = image
        self.targets = [int(t) for t in ds[label]]
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            raise UserError(f'{self.where}: label {bad[0]} is outside the {len(self.classes)} classes; '
                            f'give labels 0..{len(self.classes) - 1}')

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, i: int) -> str:
        return f'{self.where}#{i}'

    def image(self, i: int) -> Image.Image:
        value = self.ds[i][self.image_column]
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict):
            data = value.get('bytes')
            if data is None and value.get('path'):
                with open(value['path'], 'rb') as f:
                    data = f.read()
            value = data
        if not isinstance(value, (bytes, bytearray)):
            raise UserError(f'{self.name(i)}: no image bytes in this row')
        return decode_image(bytes(value), self.name(i))


def datasets_split(found: Dict[str, Any], data: str, split: str,
                   classes: Optional[List[str]] = None) -> Optional[DatasetImages]:
    """Split ``split`` (or its alias: validation for val) of :func:`open_datasets`' ``found``, or None."""
    for alias in SPLIT_NAMES.get(split, (split,)):
        if alias in found:
            return DatasetImages(found[alias], data, alias, classes)
    return None
