"""Data-parallel training on torch.distributed, as torchrun starts it: nothing home-made.

    torchrun --nproc-per-node N -m cnnkit train ...        N processes on one machine
    torchrun --nnodes M --node-rank R --master-addr HOST --master-port P --nproc-per-node N -m cnnkit train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; `World.from_env` reads
them (a process started without torchrun is a world of one, and trains exactly as before). gloo
carries the gradients between CPU processes, nccl between GPUs (one GPU per local rank).

What the processes share, and how (the training package does the rest):
- Every rank draws the same seeded permutation of the training split each epoch and cuts the same
  global batches of `batch_size` images; rank r takes images r, r+N, r+2N, ... of each batch. So
  the ranks' shards of an epoch are disjoint and together cover it, and `batch_size` and `lr` mean
  what they mean in one process: the gradient DistributedDataParallel averages is the global
  batch's mean gradient (batch_size must be a multiple of N; an epoch drops at most N-1 images
  so that every rank's slice of every batch has the same size).
- BatchNorm normalizes with each rank's own slice (as in most data-parallel recipes); its running
  statistics are rank 0's, broadcast at each forward pass.
- Loss and accuracy are summed over ranks; validation runs on every rank on identical weights, so
  every rank takes the same keep / stop decisions.
- Only rank 0 writes the run folder, the log and the progress bars (RunFolder.primary).
- The checkpoint holds the plain model and optimizer, independent of N, so `--resume` continues
  with any number of processes.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import CnnkitError

COLLECTIVE_TIMEOUT_SECONDS = 600  # a rank that waits longer than this for the others gives up


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process, 0..size-1 over all machines
    size: int = 1  # processes in the job
    local_rank: int = 0  # this process on its machine: its GPU index

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> "World":
        """The world torchrun describes in the environment; a world of one without it."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise CnnkitError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
        return cls(rank, size, local_rank)


def start(world: World, device_kind: str) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA); a no-op for a world of one."""
    if not world.active or dist.is_initialized():
        return
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS))
    except (RuntimeError, ValueError) as e:
        raise CnnkitError(f"cannot join the torchrun job ({backend}): {str(e).splitlines()[0]}") from None


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a process that torchrun stops (because another one
    failed) ends like Ctrl-C: one line saying which checkpoint is kept and how to resume.

    Only the first SIGTERM interrupts, and only while the job runs: a second one (torchrun repeats it),
    one arriving after the job has ended (stop() ignores them: the process has said its line and is
    exiting) and one arriving while the interpreter shuts down are ignored, or the KeyboardInterrupt
    would surface as a traceback from whatever was running then (seen in CI: torch.library's
    finalizer, and threading._shutdown after rank 0 had reported the other's failure itself)."""
    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    # atexit runs last-registered first, so this runs before the finalizers torch registered on import
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)


def stop() -> None:
    """The job has ended (it said so, or failed with its one line): leave the process group, and let
    no later SIGTERM from torchrun interrupt the exit."""
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):  # stop_on_sigterm's handler, or SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """Each local rank's own GPU; the CPU is shared."""
    if device.type == "cuda" and world.active:
        return torch.device("cuda", world.local_rank)
    return device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model in a world of more than one, else the model."""
    if not world.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(batch_index: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's slice of a global batch of image indices: every size-th from its rank on."""
    return batch_index[world.rank::world.size] if world.active else batch_index


def trim(perm: torch.Tensor, world: World) -> torch.Tensor:
    """An epoch's permutation cut to a multiple of the world size (at most size-1 images dropped,
    different ones each epoch), so every rank's slice of every batch has the same size."""
    return perm[:len(perm) - len(perm) % world.size] if world.active else perm


def sum_over_ranks(*values: torch.Tensor | float | int) -> list[float]:
    """Each value summed over all ranks (one collective for all of them)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_text(text: str, world: World) -> str:
    """Rank 0's string on every rank (e.g. the run folder's time-stamped name), as UTF-8 bytes in a
    tensor (torch's broadcast_object_list would pickle it)."""
    if not world.active:
        return text
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=device)
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    if not world.primary:
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode("utf-8")


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
