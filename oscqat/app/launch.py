"""Data-parallel `oscqat train`: this process's place in a `torchrun` job, and `--nproc N`, which relaunches the
command under torchrun. Uses only oscqat's public API."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from torch import nn

from .common import log


class Dist:
    """This process's place in a `torchrun` job: rank 0 of 1 without one (WORLD_SIZE unset or 1)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast_module(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (in place)."""
        if self.world > 1:
            with torch.no_grad():
                for t in model.state_dict().values():
                    if torch.is_tensor(t):
                        torch.distributed.broadcast(t, 0)


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT): nccl on CUDA (one GPU per local rank), gloo on the CPU. Without torchrun: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local, backend), device


def relaunch(args: argparse.Namespace) -> int:
    """`oscqat train --nproc N`: run the same command under `torchrun --standalone --nproc_per_node N`."""
    argv, skip = [], False
    for a in getattr(args, "argv", None) or []:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    if not argv or argv[0] != "train":
        argv = ["train"] + argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
           "oscqat.app.cli"] + argv
    log(args, f"launching {args.nproc} processes: {' '.join(cmd[1:])}")
    return subprocess.call(cmd)
