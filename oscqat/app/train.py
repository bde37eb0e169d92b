"""`oscqat train`: full-precision model (trained or loaded) -> oscqat.prepare (MSE range init) -> QAT with the
chosen oscillation remedy and schedules -> evaluation before and after BN re-estimation, with a report,
a resumable checkpoint and plots in --out.

    oscqat train                                  # small MobileNetV2-style net, W4A4, dampen+freeze, defaults
    oscqat train --w-bits 3 --a-bits 32 --method lsq --subset 5000 --epochs 2 --out runs/w3
    oscqat train --resume runs/w3/checkpoint.pt   # continue an interrupted run (same final weights)

This module runs the stages in order; each lives in its own module: the arguments (args.py), torchrun and --nproc
(launch.py), the full-precision model (fp_stage.py: --fp-checkpoint FILE, loaded if it exists, else trained and
saved there; the committed checkpoint of (model, dataset); else trained for --fp-epochs), QAT (qat_stage.py), and
the evaluation, report, export and plots (report.py). Uses only oscqat's public API.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import oscqat

from .args import add_arguments, check_args, qat_config, restore_args
from .checkpoint import CHECKPOINT, load_checkpoint
from .common import _START, Phase, log, resolve_device
from .data import describe, load_dataset
from .fp_stage import fp_model
from .launch import Dist, init_distributed, relaunch
from .models import build_model
from .qat_stage import Trainer
from .report import finish

__all__ = ["add_arguments", "run", "run_training"]     # add_arguments and run: the subcommand, for cli.py


def _busy_cpu_note(args, device: torch.device) -> str | None:
    """A warning when torch's several CPU threads will compete with other processes: on a 2-core machine with
    one other busy process, 2 threads ran prepare 18x and QAT steps 5x slower than 1 thread."""
    if args.threads or device.type != "cpu" or torch.get_num_threads() < 2 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load < 0.75:
        return None
    return (f"note: load average {load:.1f} on {os.cpu_count()} cores: other processes are running, and torch's "
            f"{torch.get_num_threads()} threads then wait on each other (several times slower); --threads 1 avoids it")


def run_training(args: argparse.Namespace) -> dict:
    """The whole `oscqat train` flow; returns the report (also written to OUT/report.json)."""
    t0 = _START[0] = time.time()
    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        args = restore_args(args, resume["args"])
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else "runs/train"
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    config = qat_config(args)   # validates bits, method, schedule values
    dist, device = init_distributed(device)
    try:
        return _run_training(args, resume, config, dist, device, out, t0)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_training(args, resume, config, dist: Dist, device, out: Path, t0: float) -> dict:
    if dist.world > 1:
        if args.batch_size % dist.world:
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) must be a multiple of the "
                             f"{dist.world} processes")
        if not dist.main:
            args.quiet = True       # rank 0 alone logs and writes
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    with oscqat.use_backend(args.backend):
        timings: dict = {}
        t = time.time()     # the first line names the dataset: logged once it is loaded (a few seconds)
        ds = load_dataset(args.dataset, args.data_dir, subset=args.subset, test_subset=args.test_subset,
                          image_size=args.image_size, seed=args.seed)
        timings["data_s"] = time.time() - t
        if resume is not None and resume.get("dataset", {}).get("name") not in (None, ds.name):
            raise ValueError(f"--resume {args.resume}: the run was on {resume['dataset']['name']}, but its "
                             f"--dataset {args.dataset} now resolves to {ds.name}")
        # from here on the dataset is the resolved one ('auto' is decided once, and a resume reloads the same)
        args.dataset_requested = getattr(args, "dataset_requested", None) or args.dataset
        args.dataset = ds.info["spec"]
        if ds.name == "fashion-mnist":
            args.data_dir = ds.info["path"]
        log(args, f"data: {describe(ds.info)}, {ds.num_classes} classes (loaded in {timings['data_s']:.1f} s)"
                  + (f"; {ds.info['why']}" if ds.info.get("why") else "")
                  + f"; device {device}, {torch.get_num_threads()} torch threads")
        busy = _busy_cpu_note(args, device)
        if busy:
            log(args, busy)
        if dist.world > 1:
            log(args, f"data parallel: {dist.world} processes ({dist.backend}), global batch {args.batch_size} = "
                      f"{dist.world} x {args.batch_size // dist.world}")
        trainer = Trainer(args, ds, device, dist)
        if resume is None:
            dist.barrier()      # every rank looks for the full-precision checkpoint before rank 0 may write it
            model, fp_info = fp_model(ds, args, device, timings, write=dist.main)
            dist.broadcast_module(model)    # rank 0's full-precision model everywhere
            torch.manual_seed(args.seed + 1)
            with Phase(args, timings, "prepare_s", f"prepare: quantizing the model, MSE range init of the "
                                                   f"activations over {args.calib_batches} batches"):
                trainer.setup(model, config, calibrate=True)
        else:
            fp_info = resume["fp"]
            timings = dict(resume["timings"])
            torch.manual_seed(args.seed + 1)
            trainer.setup(build_model(args.model, ds.num_classes, ds.in_channels).to(device), config,
                          calibrate=False)
            trainer.load(resume)
            log(args, f"resumed from {args.resume} at epoch {trainer.epoch}/{args.epochs} (step {trainer.step})")
        trainer.fp_info, trainer.timings = fp_info, timings
        epochs_log = list(resume.get("epochs_log", [])) if resume else []
        log(args, f"qat: {args.epochs} epochs x {trainer.steps_per_epoch} steps of {args.batch_size} images, "
                  f"W{args.w_bits}A{args.a_bits}, method {args.method}")
        if not trainer.fit(out / CHECKPOINT, epochs_log, timings):
            return {"stopped_at_epoch": trainer.epoch, "checkpoint": str(out / CHECKPOINT)}
        return finish(args, ds, trainer, dist, device, out, fp_info, epochs_log, timings, t0,
                      earlier_s=resume["timings"].get("total_s", 0.0) if resume else 0.0)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", None) is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return relaunch(args)
    try:
        run_training(args)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    except oscqat.BackendUnavailable as e:
        raise RuntimeError(str(e)) from e
    return 0
