"""Under torchrun: a worker killed mid-step is survived (elastic restart + --resume auto, bit for bit the
uninterrupted run), and a preemption signal stops every rank at one step with a resumable checkpoint."""
import os
import signal
import subprocess
import sys

import pytest

from train_helpers import QUICK, assert_same_tensors, free_port, load, subprocess_env

# a 2-rank run of a narrow model on the digits (1437 images: 22 steps an epoch of 2 ranks x batch 32); the
# Performer's dropout, crops and flips on: each rank's RNG streams must come back from the checkpoint
ARGS = ['train', '--model', 't2t_vit_lite_32', '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2',
        'token_dim=16', *QUICK, '--epochs', '3', '-b', '32', '--no-amp', '--resume', 'auto']

# the torchrun entry point: ``python -m t2tvit ARGS`` whose rank RANK, in the first round only, sends SIGNAL
# to TARGET ('self': itself, 'job': its whole process group, as a cluster's scheduler does) from inside
# the loss of its step STEP, after the forward pass and before the gradients' all-reduce
FAULT = """
import os, signal, sys
from t2tvit.engine import builders
rank, step, signum, target = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
real = builders.build_train_loss

def counted(cfg, mixup):
    base, calls = real(cfg, mixup), [0]

    def loss(outputs, targets):
        calls[0] += 1
        if (calls[0] == step and int(os.environ['RANK']) == rank
                and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'):
            if target == 'self':
                os.kill(os.getpid(), signum)
            else:
                os.killpg(os.getpgid(0), signum)
        return base(outputs, targets)
    return loss

builders.build_train_loss = counted
from t2tvit.cli import main
sys.exit(main(sys.argv[5:]))
"""


def torchrun(tmp_path, out, fault=None, restarts=0, extra_env=None, timeout=400):
    """(exit status, stdout, stderr) of a 2-process torchrun of ARGS writing to ``out``; ``fault``:
    (rank, step, signal, 'self' or 'job')."""
    script = tmp_path / 'fault.py'
    script.write_text(FAULT)
    rank, step, signum, target = fault or (-1, 0, 0, 'self')
    # README's one-machine command: --standalone (a c10d rendezvous on a free local port)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--max-restarts',
           str(restarts), '--monitor-interval', '0.2', str(script), str(rank), str(step), str(int(signum)), target,
           *ARGS, '-o', str(out)]
    env = {**subprocess_env(), **(extra_env or {})}
    # a session of its own: a signal to the "job" reaches torchrun and its workers, not pytest
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f'torchrun hung:\n{stderr[-3000:]}')
    return proc.returncode, stdout, stderr


def two_nodes(tmp_path, out, fault, timeout=400):
    """Two torchrun launchers of one process each ("nodes" on loopback, one c10d rendezvous); exit statuses."""
    script = tmp_path / 'fault.py'
    script.write_text(FAULT)
    endpoint, env = f'127.0.0.1:{free_port()}', subprocess_env()
    procs = []
    for node in range(2):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
               '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint, '--rdzv-id', 'two-nodes', '--max-restarts', '1',
               '--monitor-interval', '0.2', str(script), *(str(int(v)) if not isinstance(v, str) else v for v in fault),
               *ARGS, '-o', str(out)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError('two-node torchrun hung')
        results.append((proc.returncode, stdout, stderr))
    return results


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('elastic')
    rc, out, err = torchrun(tmp, tmp / 'a')
    assert rc == 0, err[-3000:]
    return load(tmp / 'a' / 'last.pth')


def assert_same_run(a, b):
    assert a['epoch'] == b['epoch'] and a['step'] == b['step']
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'rng'):
        assert_same_tensors(a[key], b[key], where=key)


def test_a_worker_killed_mid_step_is_restarted_by_torchrun_and_ends_bit_identical(uninterrupted, tmp_path):
    # rank 1 dies by SIGKILL in the forward pass of step 30 (epoch 2: epoch 1's last.pth is the resume point)
    rc, out, err = torchrun(tmp_path, tmp_path / 'b', fault=(1, 30, signal.SIGKILL, 'self'), restarts=1)
    assert rc == 0, err[-3000:]
    assert 'resumed from' in out and out.count('epoch 1/3') == 1 and out.count('epoch 3/3') == 1
    assert 'connectFullMesh' not in err
    # the survivor says so in one line, no traceback
    assert 'rank 0 stopped: another process of the job is gone' in err and 'Traceback' not in err, err[-3000:]
    assert_same_run(uninterrupted, load(tmp_path / 'b' / 'last.pth'))


def test_a_preemption_signal_stops_every_rank_at_one_step_and_the_run_resumes_bit_identical(uninterrupted,
                                                                                           tmp_path):
    # SIGUSR1 to the whole job (torchrun and both workers, as SLURM's --signal=USR1@90 sends it) during
    # rank 0's step 30; torchrun is told to pass SIGUSR1 on rather than die of it
    env = {'TORCHELASTIC_SIGNALS_TO_HANDLE': 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'}
    rc, out, err = torchrun(tmp_path, tmp_path / 'b', fault=(0, 30, signal.SIGUSR1, 'job'), extra_env=env)
    assert rc != 0, 'a preempted job must not look finished'
    assert 'interrupted by SIGUSR1 in epoch 2 after 8 batches' in err, err[-3000:]
    assert 'SIGUSR1' in (tmp_path / 'b' / 'INTERRUPTED').read_text()  # what a requeue script tests for
    stopped = load(tmp_path / 'b' / 'last.pth')
    assert stopped['step'] == 30  # both ranks stopped after step 30 (22 of epoch 1, 8 of epoch 2)
    rc, out, err = torchrun(tmp_path, tmp_path / 'b')
    assert rc == 0, err[-3000:]
    assert 'resumed from' in out and not (tmp_path / 'b' / 'INTERRUPTED').exists()
    assert_same_run(uninterrupted, load(tmp_path / 'b' / 'last.pth'))


def test_two_nodes_on_loopback_survive_one_nodes_worker_killed(uninterrupted, tmp_path):
    # global rank 1 is the worker of the second launcher: it dies mid-step 30; both nodes re-rendezvous
    results = two_nodes(tmp_path, tmp_path / 'b', (1, 30, signal.SIGKILL, 'self'))
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    out = ''.join(o for _, o, _ in results)
    assert 'resumed from' in out and out.count('epoch 3/3') == 1
    assert_same_run(uninterrupted, load(tmp_path / 'b' / 'last.pth'))
