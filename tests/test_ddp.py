"""DDP under torchrun on CPU (gloo): 2 processes give the weights of 1 process with the same global batch."""

import subprocess
import sys

import pytest

from train_helpers import (
    QUICK,
    TINY,
    assert_same_tensors,
    free_port,
    load,
    run_cli,
    subprocess_env,
    write_folder,
)

# no randomness that depends on the process: no augmentation, mixup, drop-path or dropout
# (a Transformer T2T: the Performer's fixed dropout would draw per rank)
DETERMINISTIC = [
    '--augment', 'none', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--smoothing', '0.1', '--model-kwargs',
    'embed_dim=32', 'depth=1', 'num_heads=2', 'token_dim=16', 'token_mixer=transformer'
]


def _torchrun(args, cwd, nproc=2):
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port',
        str(free_port()), '-m', 't2tvit', *args
    ]
    return subprocess.run(
        cmd, check=False, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('data') / 'shapes', train=8, val=3)


def _args(folder, out, batch):
    tiny = [a for a in TINY if a not in TINY[2:]]  # --model only; the kwargs come with DETERMINISTIC
    return [
        'train', str(folder), *tiny, *QUICK, *DETERMINISTIC, '--epochs', '1', '-b', str(batch), '--lr', '1e-3',
        '--model-ema-decay', '0.9', '--no-amp', '--output', str(out)  # fp32: the sums compared to 1e-6
    ]


@pytest.fixture(scope='module')
def shards(folder, tmp_path_factory):
    pytest.importorskip('wids', reason='wids is not installed (pip install -e .[dev])')
    out = tmp_path_factory.mktemp('shards') / 'shapes'
    from t2tvit.cli import main
    assert main(['prepare', str(folder), str(out), '--shard-images', '5', '--no-progress']) == 0
    return out


@pytest.mark.parametrize('source', ['folder', 'shards'])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(source, request, tmp_path):
    folder = request.getfixturevalue(source)  # shards: each rank reads its share through the shard-local shuffle
    single = run_cli(_args(folder, tmp_path / 'single', 8), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(_args(folder, tmp_path / 'ddp', 4), cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # rank 0 alone speaks: one start line, one epoch line
    assert ddp.stdout.count('training t2t_vit_7_32') == 1 and ddp.stdout.count('epoch 1/1') == 1
    assert '2 process(es) x batch 4' in ddp.stdout
    a, b = load(tmp_path / 'single' / 'last.pth'), load(tmp_path / 'ddp' / 'last.pth')
    assert a['step'] == b['step'] == 24 // 8
    assert_same_tensors(a['model'], b['model'], exact=False, atol=1e-6, rtol=1e-5, where='model')
    assert_same_tensors(a['ema'], b['ema'], exact=False, atol=1e-6, rtol=1e-5, where='ema')
    assert b['rng']['world_size'] == 2 and len(b['rng']['ranks']) == 2
    # the all-reduced evaluation sees all 9 val images exactly once
    rows_a = (tmp_path / 'single' / 'metrics.csv').read_text().splitlines()[1].split(',')
    rows_b = (tmp_path / 'ddp' / 'metrics.csv').read_text().splitlines()[1].split(',')
    assert rows_a[4] == rows_b[4]  # top1


@pytest.mark.slow
def test_ddp_resume_matches_an_uninterrupted_ddp_run(folder, tmp_path):
    args = _args(folder, tmp_path / 'a', 4)
    args[args.index('--epochs') + 1] = '2'
    assert _torchrun(args, cwd=tmp_path).returncode == 0
    split = [a if a != str(tmp_path / 'a') else str(tmp_path / 'b') for a in args]
    assert _torchrun(split + ['--stop-after-epochs', '1'], cwd=tmp_path).returncode == 0
    assert _torchrun(split + ['--resume', 'auto'], cwd=tmp_path).returncode == 0
    a, b = load(tmp_path / 'a' / 'last.pth'), load(tmp_path / 'b' / 'last.pth')
    assert_same_tensors(a['model'], b['model'], where='model')
    assert_same_tensors(a['optimizer'], b['optimizer'], where='optimizer')


# the torchrun entry point: ``python -m t2tvit ARGS`` that counts, per rank, the class folders it lists itself
COUNT_SCANS = """
import atexit, os, sys
from t2tvit import data
real, calls = data.images_under, [0]

def counted(*a, **k):
    calls[0] += 1
    return real(*a, **k)

data.images_under = counted
atexit.register(lambda: open(f'scans_rank{os.environ["RANK"]}', 'w').write(str(calls[0])))
from t2tvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_folder_is_scanned_by_rank_0_alone_and_a_bad_folder_fails_on_every_rank(folder, tmp_path):
    script = tmp_path / 'count.py'
    script.write_text(COUNT_SCANS)

    def torchrun_counting(args):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
               str(free_port()), str(script), *args]
        return subprocess.run(cmd, check=False, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                              timeout=300)
    r = torchrun_counting(_args(folder, tmp_path / 'ddp', 4))
    assert r.returncode == 0, r.stderr[-3000:]
    classes = len([p for p in (folder / 'train').iterdir() if p.is_dir()])
    # train/ and val/ listed once each, class by class, by rank 0; rank 1 got the lists
    assert (tmp_path / 'scans_rank0').read_text() == str(2 * classes)
    assert (tmp_path / 'scans_rank1').read_text() == '0'
    # rank 0's UserError reaches the other rank too: both exit with the one-line error, no hang
    bad = tmp_path / 'bad'
    (bad / 'train' / 'empty_class').mkdir(parents=True)
    (bad / 'val').mkdir()
    r = torchrun_counting(_args(bad, tmp_path / 'bad_run', 4))
    assert r.returncode != 0 and r.stderr.count('t2tvit train: error: no images found in') == 1  # rank 0 speaks
    # no traceback of ours (torchrun's own summary follows)
    assert 'UserError' not in r.stderr and 't2tvit/data.py' not in r.stderr
