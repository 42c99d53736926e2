"""README's "Serve it" section as written: the serve command, both curl lines and the Python client run
against a one-epoch `--config demo` model (the demo's checkpoint layout and samples); the T2T-attention
line of "Look inside" runs too, and the page's screenshot the README shows is there."""
import ast
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT

pytest.importorskip('fastapi', reason="t2tvit serve needs FastAPI (pip install 't2tvit[serve]')")

from serve_helpers import Server  # noqa: E402

README = (ROOT / 'README.md').read_text()
SECTION = README.split('## Serve it\n')[1].split('\n## ')[0]


def _block(lang: str, text: str = SECTION) -> str:
    return re.findall(r'```' + lang + r'\n(.*?)```', text, flags=re.S)[0]


def _commands(lang_block: str):
    return [line for line in lang_block.splitlines() if line.strip() and not line.startswith('#')]


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """A one-epoch demo run in a fresh folder: runs/demo/best.pth and runs/demo/samples/ as `make demo` leaves them."""
    from pathlib import Path

    from t2tvit.cli import main
    from t2tvit.data import digits_samples
    root = tmp_path_factory.mktemp('readme_serve')
    cwd = Path.cwd()
    try:
        import os
        os.chdir(root)
        assert main(['train', '--config', 'demo', '-o', 'runs/demo', '--epochs', '1', '--warmup-epochs', '0',
                     '--no-progress']) == 0
    finally:
        os.chdir(cwd)
    digits_samples(root / 'runs' / 'demo' / 'samples')
    return root


def test_serve_section_runs_as_written(demo_run):
    serve, *curls = _commands(_block('bash'))
    args = shlex.split(serve)
    assert args[:2] == ['t2tvit', 'serve'] and len(curls) == 2
    server = Server(args[2:], cwd=demo_run)
    try:
        def here(line: str) -> str:
            return line.replace('http://127.0.0.1:8000', server.url)
        if shutil.which('curl'):
            out = subprocess.run(shlex.split(here(curls[0])), cwd=demo_run, capture_output=True, text=True,
                                 timeout=120, check=True).stdout
            answer = json.loads(out)
            assert answer['model'] == 't2t_vit_lite_32' and len(answer['topk']) == 3
            assert {t['label'] for t in answer['topk']} <= set('0123456789')
            subprocess.run(shlex.split(here(curls[1])), cwd=demo_run, timeout=120, check=True, capture_output=True)
            assert Image.open(demo_run / 'rollout.png').size == (256, 256)
        else:
            pytest.skip('curl is not installed (apt-get install curl): the two curl lines were not run')
        code = here(_block('python'))
        done = subprocess.run([sys.executable, '-c', code], cwd=demo_run, capture_output=True, text=True,
                              timeout=120, check=True).stdout
        top = ast.literal_eval(done.strip())  # the dict print() showed
        assert set(top) == {'index', 'label', 'prob'} and top['label'] == str(top['index'])
        assert top['label'] == answer['topk'][0]['label']
    finally:
        server.stop()


def test_look_inside_t2t_attention_line_runs(demo_run, monkeypatch, capsys):
    from t2tvit.cli import main
    block = README.split('## Look inside\n')[1].split('\n## ')[0]
    line = next(c for c in _commands(_block('bash', block)) if '--stages' in c)
    monkeypatch.chdir(demo_run)
    assert main(shlex.split(line)[1:]) == 0
    assert (demo_run / 'runs' / 'look' / 'attention_t2t.png').is_file()
    assert 'attention_t2t.png' in capsys.readouterr().out


def test_readme_pictures_exist():
    for path in re.findall(r'!\[[^\]]*\]\(([^)]+)\)', README):
        assert (ROOT / path).is_file(), path
