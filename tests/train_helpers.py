"""Tiny data and a tiny model for the training tests (seconds on 2 CPU cores)."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from conftest import ROOT

# t2t_vit_7_32's geometry (32x32 -> 8x8 tokens) with a one-block, 32-wide backbone
TINY = ['--model', 't2t_vit_7_32', '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2', 'token_dim=16']
QUICK = ['--no-progress', '-j', '0', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--lr-base-size', '0']


def write_folder(
    root: Path,
    classes: Sequence[str] = ('circle', 'square', 'stripes'),
    train: int = 8,
    val: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """DATA/train/<class>/*.png|jpg and DATA/val/<class>/*: a pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = {
        'circle': ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2),
        'square': (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
        'stripes': (xx // 4) % 2 == 0,
        'cross': (abs(yy - size / 2) < 3) | (abs(xx - size / 2) < 3),
    }
    for split, count in (('train', train), ('val', val)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            base = patterns.get(cls, (xx + ci) % (ci + 2) == 0).astype(np.float64)
            for i in range(count):
                img = (base[..., None] * 180 + rng.normal(0, 30, (size, size, 3)).clip(-60, 60) + 40).clip(
                    0, 255
                )
                pil = Image.fromarray(img.astype(np.uint8), 'RGB')
                ext = 'jpg' if i % 2 else 'png'
                pil.save(d / f'{cls}_{i:03d}.{ext}')
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(ROOT / 'src') + os.pathsep + env.get('PYTHONPATH', '')
    env['OMP_NUM_THREADS'] = '1'
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def run_cli(args: List[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 't2tvit', *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **{'env': subprocess_env(), **kw},
    )


# ``python -m t2tvit ARGS`` whose process signals itself from inside the loss of step N: the handler's flag is
# read at the end of that step, so the run stops after exactly N batches, however fast the machine is
_SIGNAL_AT_STEP = """
import os, sys
from t2tvit.engine import builders
real, step, signum = builders.build_train_loss, int(sys.argv[1]), int(sys.argv[2])

def counted(cfg, mixup):
    base, calls = real(cfg, mixup), [0]

    def loss(outputs, targets):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signum)
        return base(outputs, targets)
    return loss

builders.build_train_loss = counted
from t2tvit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_cli_signalled_at_step(step: int, signum: int, args: List[str], cwd: Path, timeout: float = 300):
    return subprocess.run([sys.executable, '-c', _SIGNAL_AT_STEP, str(step), str(int(signum)), *args], check=False,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, exact: bool = True, atol: float = 0.0, rtol: float = 0.0, where: str = ''):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        if exact:
            assert torch.equal(a, b), f'{where} differs (max {(a.double() - b.double()).abs().max().item()})'
        else:
            assert torch.allclose(a, b, atol=atol, rtol=rtol), (
                f'{where} differs (max {(a.double() - b.double()).abs().max().item()})'
            )
    elif isinstance(a, dict):
        assert set(a) == set(b), f'{where}: keys {set(a) ^ set(b)}'
        for k in a:
            assert_same_tensors(a[k], b[k], exact, atol, rtol, f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, exact, atol, rtol, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def fails_in_one_line(capsys, argv, *needles):
    """``main(argv)`` exits 2 with one stderr line, ``t2tvit CMD: error: ...``, holding every needle."""
    from t2tvit.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f't2tvit {argv[0]}: error: ') and 'Traceback' not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
