"""Bytes DistributedDataParallel communicates per training step: float torchvision mobilenet_v2 vs the same model
after oscqat.prepare (W4A4, dampen+freeze), and the QAT model as DDP saw it before oscqat excluded its state
from DDP's buffer broadcast ("QAT, state broadcast": the `_ddp_params_and_buffers_to_ignore` that prepare sets is
removed). Counted by wrapping what DDP calls: its buffer broadcast before each forward
(`DistributedDataParallel._distributed_broadcast_coalesced`) and its gradient all-reduce (a communication hook
that counts each bucket, then runs DDP's default all-reduce). Bytes are per rank, per step (what each process
hands to the collective), after one warm-up step.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/ddp_bytes.py [--steps 3] [--batch 2]

Writes bench/results/cpu/ddp_bytes.{md,json} (rank 0). Runs on gloo (CPU); the same counts hold for nccl, where
the buffers and buckets are the same tensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import oscqat

OUT = Path(__file__).resolve().parent / "results" / "cpu"


def measure(model: nn.Module, steps: int, batch: int, rank: int, qat: bool) -> dict:
    ddp = nn.parallel.DistributedDataParallel(model)
    bcast, grads = [], []
    real = ddp._distributed_broadcast_coalesced

    def counted_broadcast(bufs, *a, **k):
        bcast.append(sum(b.numel() * b.element_size() for b in bufs))
        return real(bufs, *a, **k)

    def counting_hook(state, bucket):
        grads.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(state, bucket)

    ddp._distributed_broadcast_coalesced = counted_broadcast
    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    sched = oscqat.QATSchedule(ddp, 1000) if qat else None
    g = torch.Generator().manual_seed(rank)
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            bcast.clear()
            grads.clear()
            t0 = time.time()
        x = torch.randn(batch, 3, 224, 224, generator=g)
        y = torch.randint(0, 1000, (batch,), generator=g)
        loss = F.cross_entropy(ddp(x), y)
        if sched is not None:
            loss = loss + sched.lam * oscqat.dampening_loss(ddp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    dt = (time.time() - t0) / steps
    names = oscqat.training.distributed.ddp_broadcast_names(ddp)
    state = set(oscqat.nn.wrappers.state_buffer_names(model))
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"broadcast_bytes_per_step": sum(bcast) / steps, "allreduce_bytes_per_step": sum(grads) / steps,
            "total_bytes_per_step": (sum(bcast) + sum(grads)) / steps, "buffers_broadcast": len(names),
            "oscqat_buffers_broadcast": sum(n in state for n in names), "trainable_param_bytes": params,
            "step_s": dt}


def fsdp_memory(rank: int) -> dict:
    """Per rank, after `fully_shard` of every block of `features` and of the root (FSDP2): bytes of the parameter
    shard this rank holds and of the oscqat tracking state it holds (not sharded: all of it), after 2 steps."""
    import torchvision
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(weights=None)
    calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))]
    oscqat.prepare(m, oscqat.QATConfig(4, 4, "dampen+freeze"), calib_data=calib, verbose=False)
    for block in m.features:
        fully_shard(block)
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    sched = oscqat.QATSchedule(m, 1000)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        loss = F.cross_entropy(m(torch.randn(2, 3, 224, 224, generator=g)), torch.randint(0, 1000, (2,), generator=g))
        (loss + sched.lam * oscqat.dampening_loss(m)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    state = sum(t.numel() * t.element_size() for q in oscqat.weight_quantizers(m)
                for t in (q.prev_int, q.flags, q.freq, q.ema) if t is not None)
    params = sum(p.to_local().numel() * p.element_size() for p in m.parameters())
    full = sum(p.numel() * p.element_size() for p in m.parameters())
    return {"param_shard_bytes": params, "param_full_bytes": full, "state_bytes": state}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="images per rank")
    p.add_argument("--fsdp-only", action="store_true", help="only the FSDP2 memory rows (updates the files)")
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import torchvision

    def qat_model(exclude: bool):
        torch.manual_seed(0)
        m = torchvision.models.mobilenet_v2(weights=None)
        calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))]
        oscqat.prepare(m, oscqat.QATConfig(4, 4, "dampen+freeze"), calib_data=calib, verbose=False)
        if not exclude:     # as before oscqat marked its state for DDP
            del m._ddp_params_and_buffers_to_ignore
            for b in m.buffers():
                if hasattr(b, "_ddp_ignored"):
                    del b._ddp_ignored
        return m

    fsdp = fsdp_memory(rank)
    fsdp_all = [None] * world
    dist.all_gather_object(fsdp_all, fsdp)
    if a.fsdp_only:
        if rank == 0:
            path = OUT / "ddp_bytes.json"
            data = json.loads(path.read_text())
            data["fsdp2_per_rank"] = fsdp_all
            path.write_text(json.dumps(data, indent=2))
            md = (OUT / "ddp_bytes.md").read_text().split("\n## FSDP2")[0].rstrip("\n")
            (OUT / "ddp_bytes.md").write_text(md + "\n" + fsdp_md(fsdp_all, world))
            print(fsdp_md(fsdp_all, world))
        dist.destroy_process_group()
        return
    torch.manual_seed(0)
    rows = {"float": measure(torchvision.models.mobilenet_v2(weights=None), a.steps, a.batch, rank, qat=False),
            "QAT (oscqat)": measure(qat_model(True), a.steps, a.batch, rank, qat=True),
            "QAT, state broadcast (before)": measure(qat_model(False), a.steps, a.batch, rank, qat=True)}
    if rank != 0:
        dist.destroy_process_group()
        return
    cmd = f"OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node {world} bench/ddp_bytes.py --steps {a.steps} " \
          f"--batch {a.batch}"
    meta = {"command": cmd, "date": datetime.datetime.now().isoformat(timespec="seconds"), "world_size": world,
            "backend": "gloo", "model": "torchvision mobilenet_v2 (weights=None), 224x224, W4A4 dampen+freeze",
            "torch": torch.__version__, "platform": platform.platform(), "python": sys.version.split()[0]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ddp_bytes.json").write_text(json.dumps({"meta": meta, "rows": rows, "fsdp2_per_rank": fsdp_all},
                                                   indent=2))
    mb = 1e6
    lines = [f"# Bytes DDP communicates per step: mobilenet_v2, float vs QAT ({world} processes, gloo, CPU)", "",
             f"`{cmd}` ({meta['date']}, torch {torch.__version__}). Per rank, per step, after one warm-up step: "
             f"DDP's buffer broadcast before the forward + its gradient all-reduce (buckets), counted by wrapping "
             f"both (bench/ddp_bytes.py).", "",
             "| model | buffer broadcast MB | gradient all-reduce MB | total MB | vs float | buffers broadcast "
             "(oscqat's) |", "|---|---:|---:|---:|---:|---:|"]
    base = rows["float"]["total_bytes_per_step"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['broadcast_bytes_per_step'] / mb:.3f} | "
                     f"{r['allreduce_bytes_per_step'] / mb:.3f} | "
                     f"{r['total_bytes_per_step'] / mb:.3f} | {r['total_bytes_per_step'] / base:.4f}x | "
                     f"{r['buffers_broadcast']} ({r['oscqat_buffers_broadcast']}) |")
    q = rows["QAT (oscqat)"]
    lines += ["", f"Trainable parameter bytes: float {rows['float']['trainable_param_bytes'] / mb:.3f} MB, QAT "
                  f"{q['trainable_param_bytes'] / mb:.3f} MB (the QAT model's scales are parameters too: "
                  f"{(q['trainable_param_bytes'] - rows['float']['trainable_param_bytes'])} bytes more all-reduced)."]
    lines.append(fsdp_md(fsdp_all, world))
    (OUT / "ddp_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    dist.destroy_process_group()


def fsdp_md(rows, world) -> str:
    mb = 1e6
    out = ["", f"## FSDP2 (`fully_shard` per block of `features` + root), memory per rank, {world} processes", "",
           "| rank | parameter shard MB | parameters, full MB | oscqat tracking state MB (not sharded) |",
           "|---:|---:|---:|---:|"]
    for r, row in enumerate(rows):
        out.append(f"| {r} | {row['param_shard_bytes'] / mb:.3f} | {row['param_full_bytes'] / mb:.3f} | "
                   f"{row['state_bytes'] / mb:.3f} |")
    out += ["", "Every rank holds the whole tracking state next to its parameter shard (docs/semantics.md, "
                "\"Distributed\": why, and the design that would shard it)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
