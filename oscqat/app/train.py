"""`oscqat train`: full-precision model (trained or loaded) -> oscqat.prepare (MSE range init) -> QAT with the
chosen oscillation remedy and schedules -> evaluation before and after BN re-estimation, with a report,
a resumable checkpoint and plots in --out.

    oscqat train                                  # small MobileNetV2-style net, W4A4, dampen+freeze, defaults
    oscqat train --w-bits 3 --a-bits 32 --method lsq --subset 5000 --epochs 2 --out runs/w3
    oscqat train --resume runs/w3/checkpoint.pt   # continue an interrupted run (same final weights)

The full-precision starting point is, in this order: --fp-checkpoint FILE (loaded if it exists, else trained and
saved there), the committed checkpoint of (model, dataset) in oscqat/app/checkpoints/ (`models.fp_checkpoint`),
else trained for --fp-epochs; `--fp-checkpoint none` always trains. A trained model's full-precision accuracy is
measured after re-estimating its BatchNorm statistics (the running statistics of a short training lag behind the
weights). Uses only oscqat's public API.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import oscqat

from .cli import add_threads_argument
from .common import (CHECKPOINT, CKPT_FORMAT, _START, Phase, Progress, _print, bn_batches,  # noqa: F401
                     evaluate, load_checkpoint, log, resolve_device, with_progress)
from .data import Batches, describe, load_dataset
from .models import BUILTIN_MODELS, build_model  # noqa: F401 (build_model: bench/, oscqat eval)
from .optim import make_sgd, qat_optimizers, split_params  # noqa: F401 (split_params: bench/)

QATConfig = oscqat.QATConfig
FP_FORMAT = "oscqat-fp/2"      # full-precision checkpoints: {"model": state_dict, ...}; see save_fp_checkpoint
quant_layers = oscqat.quant_layers
is_depthwise = oscqat.is_depthwise


def _method(value: str) -> str:
    """--method, validated by oscqat.QATConfig itself (so that every method it knows is accepted)."""
    try:
        QATConfig(method=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


# ----------------------------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="auto",
                   help="fashion-mnist | digits | PATH of an ImageFolder tree; 'auto': Fashion-MNIST when its IDX "
                        "files are installed (/usr/share/datasets/fashion-mnist), else scikit-learn's digits")
    g.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (.gz or raw)")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize ImageFolder images to this (default 28); digits: 8 (native) or e.g. 28")
    g.add_argument("--subset", "--limit", dest="subset", type=int, default=None,
                   help="use a fixed random subset of this many training images (quick runs)")
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images")
    g.add_argument("--augment", action="store_true", help="random horizontal flip and 2-pixel shifts")
    g = p.add_argument_group("model and quantization")
    g.add_argument("--model", default="small-mobilenet",
                   help=f"{' | '.join(BUILTIN_MODELS)} | any torchvision or timm model name (when installed)")
    g.add_argument("--w-bits", type=int, default=4, help="weight bits (2..8)")
    g.add_argument("--a-bits", type=int, default=4, help="activation bits (2..8); 32 = activations in float")
    g.add_argument("--first-last-bits", type=int, default=8, help="bits of the first and last layer; 0 = same "
                                                                   "as the others")
    g.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    g.add_argument("--method", default="dampen+freeze", type=_method,
                   help="oscillation remedy, one of oscqat.QATConfig's methods (lsq, dampen, freeze, dampen+freeze, "
                        "...)")
    d = QATConfig()
    g = p.add_argument_group("oscillation schedules")
    g.add_argument("--freeze-start", "--f-th-start", dest="freeze_start", type=float, default=d.freeze_start,
                   help="freezing threshold f_th at the end of the warm-up (cosine-annealed to --freeze-end)")
    g.add_argument("--freeze-end", "--f-th-end", dest="freeze_end", type=float, default=d.freeze_end,
                   help="freezing threshold f_th at the end of training")
    g.add_argument("--damp-lambda", "--lambda-max", dest="damp_lambda", type=float, default=d.damp_lambda,
                   help="dampening strength, cosine-annealed from 0 to this")
    g.add_argument("--momentum", type=float, default=d.momentum, help="EMA momentum of the oscillation tracker")
    g.add_argument("--warmup", type=float, default=d.warmup,
                   help="fraction of QAT steps before freezing and dampening start")
    g.add_argument("--tr-start", type=float, default=1e-2,
                   help="methods tr...: target transition rate at the start (cosine-annealed to --tr-end)")
    g.add_argument("--tr-end", type=float, default=1e-3, help="methods tr...: target transition rate at the end")
    g = p.add_argument_group("training")
    g.add_argument("--fp-epochs", type=int, default=5, help="epochs of full-precision training (when no "
                                                            "--fp-checkpoint is loaded)")
    g.add_argument("--fp-lr", type=float, default=0.05, help="full-precision learning rate (SGD, cosine)")
    g.add_argument("--fp-checkpoint", default=None,
                   help="full-precision starting point: loaded if the file exists, else trained for --fp-epochs "
                        "and saved there; default: the committed checkpoint of (--model, dataset) when there is "
                        "one, else trained; 'none': always train")
    g.add_argument("--epochs", type=int, default=5, help="QAT epochs")
    g.add_argument("--lr", type=float, default=0.01, help="QAT learning rate of the weights (SGD momentum 0.9, "
                                                           "cosine)")
    g.add_argument("--scale-lr", type=float, default=1e-3, help="learning rate of scales/offsets (Adam, cosine)")
    g.add_argument("--weight-decay", type=float, default=5e-5, help="weight decay of conv/linear weights")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--calib-batches", type=int, default=8, help="batches for MSE activation range init")
    g.add_argument("--bn-batches", type=int, default=50, help="batches for BN re-estimation")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cpp", "cuda"),
                   help="oscqat kernel backend")
    add_threads_argument(g)      # --threads, as on every subcommand (default 1)
    g.add_argument("--batch-weights", action="store_true",
                   help="quantize every layer's weight in one call per forward (QATConfig.batch_weights: the same "
                        "results, less per-layer overhead)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel over N processes on this machine: relaunches itself under `torchrun "
                        "--standalone --nproc_per_node N` (or run `torchrun ... -m oscqat.app.cli train` yourself); "
                        "--batch-size is the global batch, split across the processes")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="output folder (checkpoint, report.json, plots); default runs/train, or with --resume the "
                        "folder of the resumed checkpoint")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run saved in CHECKPOINT (its own arguments are used; --out, --quiet, "
                        "--device, --backend, --stop-after-epoch may be given)")
    g.add_argument("--record-last", type=int, default=200,
                   help="record the depthwise layers' integers over the last K steps (Fig. 2 plot of the most "
                        "oscillating one)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-export", action="store_true",
                   help="skip writing OUT/model.onnx + encodings and the onnxruntime check (`oscqat export` does it "
                        "later)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="without a terminal (output redirected): a progress line every N steps (default: 10 "
                        "lines per epoch)")
    g.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


RESUME_OVERRIDES = ("out", "quiet", "device", "backend", "stop_after_epoch", "resume", "threads", "no_plots",
                    "log_every", "no_export", "batch_weights", "nproc", "argv")


def check_args(a: argparse.Namespace) -> None:
    for name in ("w_bits", "first_last_bits"):
        v = getattr(a, name)
        if name == "first_last_bits" and v == 0:
            continue
        if not 2 <= v <= 8:
            raise ValueError(f"--{name.replace('_', '-')} must be in 2..8, got {v}")
    if a.a_bits != 32 and not 2 <= a.a_bits <= 8:
        raise ValueError(f"--a-bits must be in 2..8, or 32 for float activations, got {a.a_bits}")
    for name in ("epochs", "fp_epochs"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.epochs == 0:
        raise ValueError("--epochs must be >= 1 (QAT epochs)")
    log_every = ("log_every",) if getattr(a, "log_every", None) is not None else ()
    for name in ("batch_size", "calib_batches", "bn_batches") + log_every:
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.subset is not None and a.subset <= 0:
        raise ValueError(f"--subset must be positive, got {a.subset}")
    for name in ("lr", "fp_lr", "scale_lr"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in ("tr_start", "tr_end"):
        v = getattr(a, name, 1e-2)
        if not 0 < v <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a transition rate in (0, 1], got {v}")


def qat_config(a: argparse.Namespace) -> QATConfig:
    return QATConfig(weight_bits=a.w_bits, act_bits=a.a_bits if a.a_bits != 32 else 8,
                     quantize_activations=a.a_bits != 32, per_channel=a.per_channel, method=a.method,
                     first_last_bits=a.first_last_bits or None, momentum=a.momentum, freeze_start=a.freeze_start,
                     freeze_end=a.freeze_end, damp_lambda=a.damp_lambda, warmup=a.warmup,
                     calib_batches=a.calib_batches, batch_weights=getattr(a, "batch_weights", False))


# ----------------------------------------------------------------------------------------------- distributed
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
    import subprocess
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


def osc_stats(model: nn.Module) -> tuple[float, float]:
    r = oscqat.oscillation_report(model)["total"]
    return r["osc_pct"], r["frozen_pct"]


def pick_depthwise(model: nn.Module):
    """(name, quantizer, mean oscillation frequency) of the tracked depthwise layer whose weights oscillate most
    now (highest mean frequency), else of the tracked layer that does."""
    best, best_dw = None, None
    for name, layer in quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        score = float(q.freq.double().mean())
        if best is None or score > best[2]:
            best = (name, q, score)
        if is_depthwise(layer) and (best_dw is None or score > best_dw[2]):
            best_dw = (name, q, score)
    return best_dw or best


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "oscqat": oscqat.__version__,
         "platform": platform.platform()}
    for mod in ("numpy", "tqdm", "matplotlib", "sklearn", "PIL", "triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return v


# ----------------------------------------------------------------------------------------------- FP stage
def train_fp(model, ds, args, device) -> dict:
    steps = max(1, args.fp_epochs * len(Batches(ds.train_x, ds.train_y, args.batch_size, drop_last=True)))
    opt = make_sgd(model, args.fp_lr, max(args.weight_decay, 1e-4))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    data = Batches(ds.train_x, ds.train_y, args.batch_size, shuffle=True, seed=args.seed + 99, drop_last=True,
                   augment=args.augment, device=device)
    model.train()
    train_acc = None
    for epoch in range(args.fp_epochs):
        data.set_epoch(epoch)
        bar = Progress(len(data), f"fp {epoch + 1}/{args.fp_epochs}", args.quiet, args.log_every)
        tl = tc = tn = 0.0
        for x, y in data:
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item() * len(y)
            tc += float((out.argmax(1) == y).sum())
            tn += len(y)
            bar.update(loss=f"{tl / tn:.3f}", acc=f"{100 * tc / tn:.1f}%")
        train_acc = 100 * tc / max(1, tn)
        bar.close(loss=f"{tl / max(1, tn):.3f}", acc=f"{train_acc:.1f}%")
        if bar.bar is None:
            log(args, f"fp epoch {epoch + 1}/{args.fp_epochs}: loss {tl / max(1, tn):.4f} "
                      f"train acc {train_acc:.2f}% ({time.time() - bar.t0:.0f} s)")
    return {"steps": steps, "train_acc": train_acc}


def fp_source(args, ds) -> tuple[Path | None, bool]:
    """(checkpoint to load or to save to, whether it is a committed one) for the full-precision model."""
    spec = args.fp_checkpoint
    if spec is not None and str(spec).lower() == "none":
        return None, False
    if spec:
        return Path(spec), False
    try:
        from .models import fp_checkpoint
    except ImportError:
        return None, False
    path = fp_checkpoint(args.model, ds.name)
    return (Path(path), True) if path else (None, False)


def _fp_dataset(meta: dict) -> tuple[str | None, list | None]:
    """(dataset name, [H, W]) recorded in a full-precision checkpoint, as far as it records them."""
    d = meta.get("dataset")
    info = meta.get("dataset_info") or (d if isinstance(d, dict) else {})
    name = d if isinstance(d, str) else info.get("name")
    size = meta.get("image_size") or info.get("image_size")
    if isinstance(size, int):
        size = [size, size]
    return name, list(size) if size else None


def save_fp_checkpoint(path: Path, model: nn.Module, ds, args, info: dict) -> None:
    """Full-precision checkpoint (FP_FORMAT). Required by the loader: "model" (state_dict of
    build_model(model_name, num_classes, in_channels)); checked when present: "dataset" (name, e.g.
    'fashion-mnist'), "image_size" ([H, W]); "fp_acc" is reused as is (no test pass) when "fp_acc_method" says
    how the BN statistics were obtained and "test_size" is the full test set's."""
    state = {"format": FP_FORMAT, "model": model.state_dict(), "model_name": args.model,
             "num_classes": ds.num_classes, "in_channels": ds.in_channels, "dataset": ds.name,
             "image_size": list(ds.image_size), "dataset_info": ds.info, "fp_acc": info["fp_acc"],
             "fp_acc_method": info["fp_acc_method"], "fp_acc_running_bn": info.get("fp_acc_running_bn"),
             "test_size": len(ds.test_y), "fp_epochs": args.fp_epochs, "seed": args.seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_fp(path: Path, committed: bool, model: nn.Module, ds, args, device) -> dict | None:
    """Load `path` into `model`; None when a committed checkpoint does not fit the dataset (then FP trains)."""
    what = "committed full-precision checkpoint" if committed else "--fp-checkpoint"
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise RuntimeError(f"{what} {path}: cannot read it: {str(e).splitlines()[0]}") from e
    meta = ck if isinstance(ck, dict) and "model" in ck else {}
    name, size = _fp_dataset(meta)
    wrong = []
    if name is not None and name != ds.name:
        wrong.append(f"it was trained on {name}, this run uses {ds.name}")
    if size is not None and size != list(ds.image_size):
        wrong.append(f"its images are {size[0]}x{size[1]}, this run's {ds.image_size[0]}x{ds.image_size[1]}")
    if wrong:
        if committed:
            log(args, f"not using the {what} {path}: {'; '.join(wrong)}")
            return None
        raise ValueError(f"--fp-checkpoint {path}: {'; '.join(wrong)} (pass --fp-checkpoint none to train a "
                         f"full-precision model on this dataset)")
    try:
        model.load_state_dict(meta["model"] if meta else ck)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(f"{what} {path}: cannot load a full-precision {args.model!r} state "
                           f"({ds.num_classes} classes, {ds.in_channels} input channels) from it: "
                           f"{str(e).splitlines()[0]}") from e
    return meta


def fp_model(ds, args, device, timings) -> tuple[nn.Module, dict]:
    """The full-precision model QAT starts from, and what is known of it (fp_acc measured with correct BN
    statistics, and how)."""
    model = build_model(args.model, ds.num_classes, ds.in_channels).to(device)
    info = {"model_name": args.model, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "dataset": ds.name}
    path, committed = fp_source(args, ds)
    test = with_progress(Batches(ds.test_x, ds.test_y, 512, device=device), "eval", args)
    full_test = len(ds.test_y) == ds.info.get("full_test_size")
    if path is not None and path.is_file():
        with Phase(args, timings, "fp_load_s", f"full-precision model: loading {path}"):
            meta = _load_fp(path, committed, model, ds, args, device)
        if meta is not None:
            source = f"{'committed checkpoint' if committed else '--fp-checkpoint'} {path}"
            # how its BN statistics were made: "fp_acc_method" (this module), "bn" (bench/train_fp.py)
            bn_method = meta.get("fp_acc_method") or (f"BN statistics {meta['bn']}" if meta.get("bn") else None)
            if bn_method and meta.get("fp_acc") is not None and full_test and meta.get("test_size") == len(ds.test_y):
                fp_acc, method = float(meta["fp_acc"]), f"{bn_method}; recorded in the checkpoint"
            elif bn_method:
                with Phase(args, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images"):
                    fp_acc = evaluate(model, test)
                method = f"{bn_method}, as saved"
            else:   # an older checkpoint: its BN statistics may be stale, re-estimate them
                with Phase(args, timings, "fp_bn_reestimate_s",
                           f"full-precision BN re-estimation over {len(bn_batches(ds, args, device))} training "
                           f"batches"):
                    n = oscqat.reestimate_bn(model, with_progress(bn_batches(ds, args, device), "BN re-estimation",
                                                                  args), num_batches=args.bn_batches)
                with Phase(args, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images"):
                    fp_acc = evaluate(model, test)
                method = f"BN statistics re-estimated over {n} training batches"
            log(args, f"full-precision model: {source}; test accuracy {fp_acc:.2f}% ({method})")
            return model, dict(info, fp_acc=fp_acc, fp_acc_method=method, fp_source=str(path),
                               fp_committed=committed, fp_checkpoint_format=meta.get("format"))
    if args.fp_epochs == 0:
        log(args, "warning: --fp-epochs 0 and no full-precision checkpoint: QAT starts from a randomly "
                  "initialised model")
    else:
        why = "--fp-checkpoint none" if path is None and args.fp_checkpoint else \
            f"no committed checkpoint for {args.model} on {ds.name}" if path is None else f"{path} does not exist yet"
        log(args, f"full-precision model: training {args.model} for {args.fp_epochs} epochs ({why})")
    torch.manual_seed(args.seed)
    model = build_model(args.model, ds.num_classes, ds.in_channels).to(device)
    t = time.time()
    res = train_fp(model, ds, args, device) if args.fp_epochs else {}
    timings["fp_train_s"] = time.time() - t
    # The running statistics of a short training lag behind the weights (eval-mode accuracy near chance after a
    # few dozen steps): measure them, then replace them by statistics of the final weights.
    with Phase(args, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images (running BN "
                                           f"statistics of training)"):
        acc_running = evaluate(model, test)
    with Phase(args, timings, "fp_bn_reestimate_s",
               f"full-precision BN re-estimation over {len(bn_batches(ds, args, device))} training batches"):
        n = oscqat.reestimate_bn(model, with_progress(bn_batches(ds, args, device), "BN re-estimation", args),
                                 num_batches=args.bn_batches)
    with Phase(args, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images"):
        fp_acc = evaluate(model, test)
    method = f"BN statistics re-estimated over {n} training batches"
    log(args, f"full-precision test accuracy: {fp_acc:.2f}% ({method}; {acc_running:.2f}% with the running "
              f"statistics of training" + (f", train acc {res['train_acc']:.2f}%)" if res.get("train_acc")
                                           is not None else ")"))
    info = dict(info, fp_acc=fp_acc, fp_acc_method=method, fp_acc_running_bn=acc_running,
                fp_train_acc=res.get("train_acc"), fp_source=str(path) if path else "trained", fp_committed=False)
    if path is not None and _rank() == 0:     # rank 0 alone writes
        save_fp_checkpoint(path, model, ds, args, info)
        log(args, f"saved full-precision model to {path}")
    return model, info


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


# ----------------------------------------------------------------------------------------------- QAT stage
class Trainer:
    def __init__(self, args, ds, device, dist: Dist | None = None):
        self.args, self.ds, self.device = args, ds, device
        self.dist = dist or Dist()
        # data parallel: every rank walks the same global batches of --batch-size and takes its part of each
        self.shard = (self.dist.rank, self.dist.world) if self.dist.world > 1 else None
        self.train_data = Batches(ds.train_x, ds.train_y, args.batch_size, shuffle=True, seed=args.seed,
                                  drop_last=len(ds.train_y) >= args.batch_size, augment=args.augment, device=device,
                                  shard=self.shard)
        self.test_data = Batches(ds.test_x, ds.test_y, 512, device=device)
        self.steps_per_epoch = len(self.train_data)
        self.total = self.steps_per_epoch * args.epochs
        self.history = {"step": [], "osc_pct": [], "frozen_pct": [], "loss": [], "lam": [], "f_th": []}
        self.record = {"layers": None, "start": None, "ints": {}, "steps": []}
        self.epoch = 0
        self.step = 0

    def calib_batches(self):
        return Batches(self.ds.train_x, self.ds.train_y, self.args.batch_size, shuffle=True,
                       seed=self.args.seed + 555, device=self.device, max_batches=self.args.calib_batches)

    def bn_batches(self):
        """The QAT model's BN re-estimation batches; data parallel: this rank's part of each (reestimate_bn then
        averages the ranks' statistics: one process over all of them)."""
        b = bn_batches(self.ds, self.args, self.device)
        b.shard = self.shard
        return b

    def setup(self, model, config: QATConfig, calibrate: bool = True):
        self.config = config
        self.model = oscqat.prepare(model, config, calib_data=self.calib_batches() if calibrate else None,
                                    verbose=False)
        summary = getattr(self.model, "oscqat_summary", None)
        if summary is not None and calibrate:
            log(self.args, str(summary.short()))
        self.model.to(self.device)
        # SGD for the weights (weight decay on conv/linear weights), Adam for the scales, both cosine
        self.opt_w, self.opt_s, self.lr_w, self.lr_s = qat_optimizers(
            self.model, self.args.lr, self.args.weight_decay, self.args.scale_lr, self.total)
        # methods tr...: the tracked latent weights get the transition-adaptive LR instead of the cosine one
        self.talr = oscqat.TransitionRateSchedule(self.model, self.opt_w, self.total, tr_start=self.args.tr_start,
                                                  tr_end=self.args.tr_end) if config.transition else None
        self.sched = oscqat.QATSchedule(self.model, self.total, config)
        # data parallel: DDP averages the gradients; prepare() marked oscqat's state, which DDP then leaves alone
        # (identical on every rank without communication); BatchNorm buffers keep DDP's default broadcast
        self.net = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def state(self) -> dict:
        return {"format": CKPT_FORMAT, "model": self.model.state_dict(), "config": asdict(self.config),
                "args": {k: v for k, v in vars(self.args).items() if k != "func"},
                "schedule": self.sched.state_dict(), "opt_w": self.opt_w.state_dict(),
                "talr": self.talr.state_dict() if getattr(self, "talr", None) else None,
                "opt_s": self.opt_s.state_dict() if self.opt_s else None, "lr_w": self.lr_w.state_dict(),
                "lr_s": self.lr_s.state_dict() if self.lr_s else None, "epoch": self.epoch, "step": self.step,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history, "record": self.record, "fp": self.fp_info, "timings": self.timings,
                "model_name": self.args.model, "num_classes": self.ds.num_classes,
                "in_channels": self.ds.in_channels, "dataset": self.ds.info | {"name": self.ds.name},
                "world_size": self.dist.world}

    def load(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.sched.load_state_dict(ck["schedule"])
        if getattr(self, "talr", None) and ck.get("talr"):
            self.talr.load_state_dict(ck["talr"])
        self.opt_w.load_state_dict(ck["opt_w"])
        if self.opt_s and ck["opt_s"]:
            self.opt_s.load_state_dict(ck["opt_s"])
        self.lr_w.load_state_dict(ck["lr_w"])
        if self.lr_s and ck["lr_s"]:
            self.lr_s.load_state_dict(ck["lr_s"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.history, self.record = ck["history"], ck["record"]
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def _record_integers(self, model: nn.Module) -> None:
        rec = self.record
        if rec.get("layers") is None:
            tracked = [(n, m) for n, m in quant_layers(model) if m.weight_quant.freq is not None]
            names = [n for n, m in tracked if is_depthwise(m)]
            if not names and tracked:      # no depthwise layer: the one oscillating most now
                names = [pick_depthwise(model)[0]]
            rec.update(layers=names, start=self.step, ints={n: [] for n in names}, steps=[])
        for n in rec["layers"]:
            q = model.get_submodule(n).weight_quant
            rec["ints"][n].append(q.prev_int.detach().flatten().to("cpu", torch.int8, copy=True))
        rec["steps"].append(self.step)

    def train_epoch(self, epoch: int) -> dict:
        args, model = self.args, self.model
        model.train()
        self.train_data.set_epoch(epoch)
        bar = Progress(self.steps_per_epoch, f"qat {epoch + 1}/{args.epochs}", args.quiet, args.log_every)
        every = max(1, self.steps_per_epoch // 20)
        rec_k = args.record_last
        tl = tc = tn = 0.0
        osc = frz = 0.0
        for x, y in self.train_data:
            out = self.net(x)
            task = F.cross_entropy(out, y)
            lam = self.sched.lam
            loss = task + lam * oscqat.dampening_loss(model) if lam > 0 else task
            self.opt_w.zero_grad(set_to_none=True)
            if self.opt_s:
                self.opt_s.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_w.step()
            self.lr_w.step()
            if self.opt_s:
                self.opt_s.step()
                self.lr_s.step()
            f_th = self.sched.freeze_threshold
            self.sched.step()
            if self.talr is not None:
                self.talr.step()    # after lr_w.step(): it rewrites the TALR group's lr
            self.step += 1
            # Fig. 2: the integers of every tracked depthwise layer (prev_int = w_eff of this step's tracked
            # forward) over the last K steps; the plot shows the layer that oscillates most at the end
            if rec_k > 0 and self.step > self.total - rec_k:
                self._record_integers(model)
            tl += task.item() * len(y)
            tc += float((out.argmax(1) == y).sum())
            tn += len(y)
            if self.step % every == 0 or self.step == self.total:
                osc, frz = osc_stats(model)
                for k, v in (("step", self.step), ("osc_pct", osc), ("frozen_pct", frz), ("loss", tl / tn),
                             ("lam", lam), ("f_th", f_th)):
                    self.history[k].append(v)
                if self.talr is not None:
                    for k, v in (("tr", float(self.talr.last_rate)), ("tr_target", self.talr.last_target),
                                 ("talr_lr", float(self.talr.lr.flatten()[0]))):
                        self.history.setdefault(k, []).append(v)
            bar.update(loss=f"{tl / tn:.3f}", acc=f"{100 * tc / tn:.1f}%", osc=f"{osc:.2f}%", frozen=f"{frz:.2f}%")
        tl, tc, tn = self.dist.all_sum([tl, tc, tn], self.device)     # over all ranks' samples
        osc, frz = osc_stats(model)
        res = {"epoch": epoch + 1, "loss": tl / max(1, tn), "train_acc": 100 * tc / max(1, tn), "osc_pct": osc,
               "frozen_pct": frz}
        bar.close(loss=f"{res['loss']:.3f}", acc=f"{res['train_acc']:.1f}", osc=f"{osc:.2f}%", frozen=f"{frz:.2f}%")
        if bar.bar is None:
            log(args, f"qat epoch {epoch + 1}/{args.epochs}: loss {res['loss']:.4f} train acc "
                      f"{res['train_acc']:.2f}% oscillating {osc:.3f}% frozen {frz:.3f}% "
                      f"({time.time() - bar.t0:.0f} s)")
        return res


def _restore_args(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    new = argparse.Namespace(**saved)
    for k in RESUME_OVERRIDES:
        if hasattr(args, k):
            setattr(new, k, getattr(args, k))
    if new.out is None:
        new.out = str(Path(args.resume).parent)
    for k, v in vars(args).items():
        if not hasattr(new, k):
            setattr(new, k, v)
    return new


def resolved_backend(device: torch.device) -> str:
    """The kernel backend the current setting runs on `device`."""
    return oscqat.get_backend(device.type)


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
        args = _restore_args(args, resume["args"])
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
            model, fp_info = fp_model(ds, args, device, timings)
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
        model = trainer.model
        epochs_log = list(resume.get("epochs_log", [])) if resume else []
        log(args, f"qat: {args.epochs} epochs x {trainer.steps_per_epoch} steps of {args.batch_size} images, "
                  f"W{args.w_bits}A{args.a_bits}, method {args.method}")
        t = time.time()
        ckpt = out / CHECKPOINT
        for epoch in range(trainer.epoch, args.epochs):
            epochs_log.append(trainer.train_epoch(epoch))
            trainer.epoch = epoch + 1
            timings["qat_s"] = timings.get("qat_s", 0.0) + time.time() - t
            t = time.time()
            if dist.main:
                state = trainer.state()
                state["epochs_log"] = epochs_log
                tmp = ckpt.with_suffix(".tmp")
                torch.save(state, tmp)
                os.replace(tmp, ckpt)
            if args.stop_after_epoch is not None and trainer.epoch >= args.stop_after_epoch \
                    and trainer.epoch < args.epochs:
                log(args, f"stopped after epoch {trainer.epoch} (--stop-after-epoch); resume with "
                          f"`oscqat train --resume {ckpt}`")
                return {"stopped_at_epoch": trainer.epoch, "checkpoint": str(ckpt)}
        if dist.main:
            with Phase(args, timings, "eval_s", f"eval: quantized model on {len(ds.test_y)} test images"):
                acc_pre = evaluate(model, with_progress(trainer.test_data, "eval", args))
            log(args, f"quantized test accuracy before BN re-estimation: {acc_pre:.2f}%")
        rep = oscqat.oscillation_report(model)
        bn_model = copy.deepcopy(model)
        with Phase(args, timings, "bn_reestimate_s",
                   f"BN re-estimation over {len(trainer.bn_batches())} training batches"
                   + (f", {dist.world} processes, statistics averaged" if dist.world > 1 else "")):
            oscqat.reestimate_bn(bn_model, with_progress(trainer.bn_batches(), "BN re-estimation", args),
                                 num_batches=args.bn_batches)
        if not dist.main:
            return {"rank": dist.rank, "world_size": dist.world}
        with Phase(args, timings, "eval_s", "eval: quantized model after BN re-estimation"):
            acc_post = evaluate(bn_model, with_progress(trainer.test_data, "eval", args))
        torch.save({"model": bn_model.state_dict(), "config": asdict(config), "model_name": args.model,
                    "num_classes": ds.num_classes, "in_channels": ds.in_channels, "dataset": ds.info},
                   out / "model_bn_reestimated.pt")
        report = {
            "dataset": ds.info, "fp_acc": fp_info["fp_acc"], "fp_acc_method": fp_info.get("fp_acc_method"),
            "acc_pre_bn": acc_pre, "acc_post_bn": acc_post,
            "osc_pct": rep["total"]["osc_pct"], "osc_unfrozen_pct": rep["total"]["osc_unfrozen_pct"],
            "frozen_pct": rep["total"]["frozen_pct"], "mean_freq": rep["total"]["mean_freq"],
            "osc_threshold": rep["threshold"], "layers": rep["layers"], "epochs": epochs_log, "timings": timings,
            "config": asdict(config), "args": {k: v for k, v in vars(args).items() if k != "func"},
            "fp": fp_info, "device": str(device), "threads": torch.get_num_threads(),
            "backend": resolved_backend(device), "steps": trainer.step, "versions": versions(),
            "checkpoint": str(ckpt), "world_size": dist.world,
            "distributed": {"processes": dist.world, "backend": dist.backend or "none",
                            "global_batch": args.batch_size, "batch_per_process": args.batch_size // dist.world},
        }
        if getattr(args, "no_export", False):
            report["export"] = {"skipped": "--no-export"}
        else:
            try:
                from .export import COMPARE_IMAGES, describe as describe_export, export_files
                with Phase(args, timings, "export_s", "export: ONNX and encodings of the BN-re-estimated model"):
                    report["export"] = export_files(bn_model, ds.test_x[:COMPARE_IMAGES], out / "model.onnx",
                                                    pt2=False, say=lambda m: log(args, m))
                log(args, describe_export(report["export"]))
            except ImportError as e:
                report["export"] = {"skipped": f"onnx/onnxruntime not installed: {e}"}
                log(args, f"export skipped: {e}")
        if not args.no_plots:
            try:
                with Phase(args, timings, "plots_s", "plots"):
                    from . import plots
                    report["plots"] = plots.write_all(model, trainer.history, trainer.record, out)
            except ImportError as e:
                report["plots"] = {}
                log(args, f"plots skipped: {e}")
        timings["total_s"] = time.time() - t0 + (resume["timings"].get("total_s", 0.0) if resume else 0.0)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        log(args, "oscillation report:\n" + oscqat.format_report(rep))
        log(args, f"{ds.name}: fp acc {fp_info['fp_acc']:.2f}% ({fp_info.get('fp_acc_method', '?')}); "
                  f"W{args.w_bits}A{args.a_bits} {args.method}: QAT acc pre-BN {acc_pre:.2f}%  post-BN "
                  f"{acc_post:.2f}%  oscillating {report['osc_pct']:.3f}%  frozen {report['frozen_pct']:.3f}%  "
                  f"total {timings['total_s']:.0f} s -> {out}")
        return report


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
