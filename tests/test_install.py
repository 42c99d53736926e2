"""A normal (not editable) install works: the wheel carries the presets, and the commands that read
shipped files run from it, outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from t2tvit.engine.config import shipped_presets


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the sources (an in-tree build would leave build/ in the checkout)."""
    src = tmp / 'src-copy'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / 'src', src / 'src', ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
    try:
        import setuptools
        recent = int(setuptools.__version__.split('.')[0]) >= 77
    except ImportError:
        recent = False
    # with a recent setuptools at hand (the dev extra) nothing is fetched; else pip builds in isolation as usual
    flags = ['--no-build-isolation'] if recent else []
    wheels = tmp / 'wheels'
    done = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', *flags, '-q', '-w', str(wheels),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob('t2tvit-*.whl')
    return wheel


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(wheel, site dir): the wheel installed with ``pip install --no-deps --target``."""
    tmp = tmp_path_factory.mktemp('install')
    wheel = _build_wheel(tmp)
    site = tmp / 'site'
    done = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, site


def _run(site: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` from ``cwd`` with only the install dir on PYTHONPATH (torch and timm from this venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'RANK', 'WORLD_SIZE')}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_the_presets_and_not_the_tests(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(n.rsplit('/', 1)[1][:-len('.yaml')] for n in names if n.startswith('t2tvit/configs/'))
    assert presets == sorted(shipped_presets())
    assert 'demo' in presets and 't2t_vit_14' in presets and 'finetune_cifar10' in presets
    assert 't2tvit/cli.py' in names and 't2tvit/models/t2t_vit.py' in names
    # the serve page is package data: it works from an installed wheel, offline
    assert {f't2tvit/serve/static/{n}' for n in ('index.html', 'app.js', 'style.css')} <= set(names)
    assert not [n for n in names if n.startswith(('tests/', 'benchmarks/', 'configs/')) or '__pycache__' in n]


def test_installed_wheel_trains_the_demo_preset_outside_the_checkout(installed, tmp_path):
    _, site = installed
    done = _run(site, tmp_path, '-m', 't2tvit', 'train', '--config', 'demo', '--epochs', '1', '-o', 'run',
                '--no-progress')
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'training t2t_vit_lite_32' in done.stdout and '1 epochs' in done.stdout, done.stdout
    for name in ('last.pth', 'best.pth', 'config.yaml', 'metrics.csv'):
        assert (tmp_path / 'run' / name).is_file(), name
    assert 'model: t2t_vit_lite_32' in (tmp_path / 'run' / 'config.yaml').read_text()


# one process for the quick commands (importing torch is most of their time)
COMMANDS = """
import sys, t2tvit
from t2tvit.cli import main
print('FILE', t2tvit.__file__)
for argv in (['finetune', '--config', 'finetune_cifar10', '--checkpoint', 'x.pth'],
             ['train', '--config', 'no_such_preset'],
             ['report', '--markdown', '-o', 'report']):
    print('EXIT', main(argv), file=sys.stderr, flush=True)
"""


def test_installed_wheel_finds_presets_lists_them_and_reports(installed, tmp_path):
    _, site = installed
    done = _run(site, tmp_path, '-c', COMMANDS)
    assert done.returncode == 0, done.stderr[-3000:]
    where = done.stdout.split('FILE ')[1].splitlines()[0]
    assert Path(where).resolve().is_relative_to(site.resolve()), where  # t2tvit from the wheel, not the checkout
    outs = done.stderr.split('EXIT ')
    # the finetune preset is read (it names cifar10) before the missing DATA is noticed
    assert '--dataset cifar10 needs DATA' in outs[0] and outs[1].startswith('2'), done.stderr[-3000:]
    # an unknown name lists the shipped presets
    assert 'config no_such_preset: no such file (presets: ' in outs[1] and outs[2].startswith('2'), outs[1]
    assert all(name in outs[1] for name in shipped_presets()), outs[1]
    assert outs[3].startswith('0'), done.stderr[-3000:]
    assert '| `t2t_vit_14` |' in (tmp_path / 'report' / 'report.md').read_text()


def test_a_configs_folder_in_the_working_folder_comes_first(tmp_path, monkeypatch):
    from t2tvit.engine.config import build_config, find_preset
    monkeypatch.chdir(tmp_path)
    assert find_preset('demo') == shipped_presets()['demo']
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'demo.yaml').write_text('model: t2t_vit_7\nepochs: 3\n')
    assert build_config('train', 'demo').model == 't2t_vit_7'
    (tmp_path / 'mine.yaml').write_text('model: t2t_vit_10\n')
    assert build_config('train', str(tmp_path / 'mine.yaml')).model == 't2t_vit_10'
