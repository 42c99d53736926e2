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


def fixture_model(name: str, fixtures_dir: Path, official_ckpt):
    """``name`` in eval mode with the reference-layout fixture weights (real logit scales, Performer
    features near underflow); a model the fixtures have no spec for keeps a seeded init."""
    import t2tvit

    path = fixtures_dir / f'{name}.spec.json'
    if not path.is_file():
        torch.manual_seed(0)
        return t2tvit.create_model(name).eval()
    spec = load_json(path)
    model = t2tvit.create_model(name, img_size=spec.get('img_size', 224)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in official_ckpt.make_state_dict(spec).items()})
    return model
