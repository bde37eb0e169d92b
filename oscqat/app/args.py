"""`oscqat train`'s command line: its arguments, their checks, the QATConfig they make, and the arguments a
--resume takes over from the checkpoint. Uses only oscqat's public API."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import oscqat

from .cli import add_threads_argument
from .models import BUILTIN_MODELS

QATConfig = oscqat.QATConfig


def _method(value: str) -> str:
    """--method, validated by oscqat.QATConfig itself (so that every method it knows is accepted)."""
    try:
        QATConfig(method=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


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


def recorded_args(args: argparse.Namespace) -> dict:
    """The arguments as a checkpoint and report.json record them (what `restore_args` takes back)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def restore_args(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """The resumed run's own arguments, but RESUME_OVERRIDES from the command line."""
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
