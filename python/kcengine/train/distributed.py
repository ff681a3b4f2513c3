"""torch.distributed helpers: process group from ``torchrun``'s environment, DDP loaders, reductions.

Launch with ``torchrun --nproc_per_node N script.py`` (or ``python -m torch.distributed.run``): each
process reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment.  The backend is gloo
on CPU and nccl when CUDA is available.  :func:`kcengine.finetune` uses the group when one is
initialized: the model is wrapped in ``DistributedDataParallel``, each process gets ``1/world`` of every
batch (the global batch stays the loader's ``batch_size``), metrics are summed over processes and only
rank 0 writes checkpoints, plots and progress bars.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "distributed_loader", "all_sum",
           "cleanup"]


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's environment when WORLD_SIZE > 1.

    Returns True when a group is (now) initialized.  ``backend`` defaults to nccl with CUDA, else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def cleanup() -> None:
    """Leave the process group together: a barrier first, so no rank tears down its gloo connections while
    another is still using them (that peer then aborts: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def distributed_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A loader over ``loader.dataset`` giving this process its share: a ``DistributedSampler`` (shuffled
    when ``loader`` shuffles, with ``seed``) and ``batch_size // world`` per process."""
    world = world_size()
    if world == 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError("distributed training needs a DataLoader with a batch_size (not a batch_sampler)")
    if loader.batch_size % world:
        raise ValueError(f"the loader's batch_size={loader.batch_size} must be divisible by the world size {world}")
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                      pin_memory=loader.pin_memory)


def all_sum(values: list[float], device="cpu") -> list[float]:
    """Element-wise sum of ``values`` over processes (identity without a group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
