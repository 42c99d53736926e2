import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'

torch.set_num_threads(min(2, torch.get_num_threads()))


def _need_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f'reference fixtures not found at {FIXTURES} (they sit beside the checkout in ../shared)')


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
    _need_fixtures()
    return FIXTURES


@pytest.fixture(scope='session')
def official_ckpt(fixtures_dir):
    """The fixtures' ``official_ckpt`` module: writes reference-layout checkpoints, makes inputs."""
    spec = importlib.util.spec_from_file_location('official_ckpt', fixtures_dir / 'official_ckpt.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_json(path: Path):
    with open(path) as f:
        return json.load(f)
