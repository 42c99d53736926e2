"""torch.distributed under torchrun: NCCL on GPUs, gloo on CPU, nothing else to configure.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous for ``--nnodes`` /
``--rdzv-endpoint``); a plain ``python -m t2tvit`` is a world of one and never touches
torch.distributed.
"""

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def env_rank() -> int:
    return int(os.environ.get('RANK', '0'))


def pick_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def init_distributed(requested_device: Optional[str] = None) -> DistEnv:
    """The process's place in the job; joins the process group when launched by torchrun."""
    if not launched_by_torchrun():
        return DistEnv(device=pick_device(requested_device))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(requested_device, local_rank)
    if not dist.is_initialized():
        store = round_store() if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True' else None
        joined = {} if store is None else {'store': store, 'rank': env_rank(),
                                          'world_size': int(os.environ['WORLD_SIZE'])}
        if device.type == 'cuda':
            torch.cuda.set_device(device)
            dist.init_process_group(backend='nccl', device_id=device, **joined)
        else:
            dist.init_process_group(backend='gloo', **joined)
    return DistEnv(
        rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device
    )


ROUND_KEY = 't2tvit/process_group_store'


def round_store(timeout: float = 600.0, attempt: float = 2.0) -> 'dist.Store':
    """A store of this round's workers only, for ``init_process_group`` under torchrun.

    torchrun's agent shares one TCPStore server (MASTER_ADDR:MASTER_PORT) with the workers of every
    round: after an elastic restart it still holds the keys the first round's process group wrote, the
    dead workers' gloo addresses (or NCCL ids) among them, and a restarted worker that reads a peer's key
    before that peer rewrites it connects to a dead port ("Gloo connectFullMesh failed ... Connection
    refused"). torch keys rounds by TORCHELASTIC_RESTART_COUNT, which each node counts on its own (a node
    whose workers were healthy restarts without counting), so a prefix of it is not safe either
    (pytorch/pytorch#135712). Instead rank 0 starts a fresh store on a free port and publishes its address
    in the shared one; the other ranks read it and connect, and an address a dead rank 0 left behind
    refuses the connection, so they read again until this round's rank 0 has written its own.
    """
    host, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    rank, world = env_rank(), int(os.environ['WORLD_SIZE'])
    wait = datetime.timedelta(seconds=timeout)
    shared = dist.TCPStore(host, port, world, is_master=False, timeout=wait)
    if rank == 0:
        store = dist.TCPStore(host, 0, world, is_master=True, timeout=wait, wait_for_workers=False)
        shared.set(ROUND_KEY, f'{host}:{store.port}')
        return store
    deadline = time.monotonic() + timeout
    while True:
        shared.wait([ROUND_KEY], wait)
        addr, _, p = shared.get(ROUND_KEY).decode().rpartition(':')
        try:
            store = dist.TCPStore(addr, int(p), world, is_master=False,
                                  timeout=datetime.timedelta(seconds=attempt))
        except (RuntimeError, ValueError, OSError):  # a dead round's address: read it again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        store.set_timeout(wait)
        return store


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place across ranks (a no-op in a world of one); returns the tensor."""
    if env.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    """Every rank's ``obj``, in rank order (RNG states for the checkpoint)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (a decision only rank 0 can take, e.g. about the output folder)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
