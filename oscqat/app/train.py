"""`oscqat train`: full-precision model (trained or loaded) -> oscqat.prepare (MSE range init) -> QAT with the
chosen oscillation remedy and schedules -> evaluation before and after BN re-estimation, with a report,
a resumable checkpoint and plots in --out.

    oscqat train                                  # small MobileNetV2-style net, W4A4, dampen+freeze, defaults
    oscqat train --w-bits 3 --a-bits 32 --method lsq --subset 5000 --epochs 2 --out runs/w3
    oscqat train --resume runs/w3/checkpoint.pt   # continue an interrupted run (same final weights)
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

from ..config import METHODS, QATConfig
from .data import Batches, load_dataset
from ..prepare import quant_layers
from ..quantizers import QuantAct, WeightQuantizer

BUILTIN_MODELS = ("small-mobilenet", "small-resnet", "mobilenet-v2")
CHECKPOINT = "checkpoint.pt"
CKPT_FORMAT = 1


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
    g.add_argument("--method", default="dampen+freeze", choices=METHODS, help="oscillation remedy")
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
    g = p.add_argument_group("training")
    g.add_argument("--fp-epochs", type=int, default=5, help="epochs of full-precision training (when no "
                                                            "--fp-checkpoint is loaded)")
    g.add_argument("--fp-lr", type=float, default=0.05, help="full-precision learning rate (SGD, cosine)")
    g.add_argument("--fp-checkpoint", default=None,
                   help="full-precision starting point: loaded if the file exists, else trained for --fp-epochs "
                        "and saved there")
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
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="output folder (checkpoint, report.json, plots); default runs/train, or with --resume the "
                        "folder of the resumed checkpoint")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run saved in CHECKPOINT (its own arguments are used; --out, --quiet, "
                        "--device, --backend, --stop-after-epoch may be given)")
    g.add_argument("--record-last", type=int, default=200,
                   help="record a depthwise layer's integers over the last K steps (Fig. 2 plot)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


RESUME_OVERRIDES = ("out", "quiet", "device", "backend", "stop_after_epoch", "resume", "threads", "no_plots")


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
    for name in ("batch_size", "calib_batches", "bn_batches"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.subset is not None and a.subset <= 0:
        raise ValueError(f"--subset must be positive, got {a.subset}")
    for name in ("lr", "fp_lr", "scale_lr"):
        v = getattr(a, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v}")


def qat_config(a: argparse.Namespace) -> QATConfig:
    return QATConfig(weight_bits=a.w_bits, act_bits=a.a_bits if a.a_bits != 32 else 8,
                     quantize_activations=a.a_bits != 32, per_channel=a.per_channel, method=a.method,
                     first_last_bits=a.first_last_bits or None, momentum=a.momentum, freeze_start=a.freeze_start,
                     freeze_end=a.freeze_end, damp_lambda=a.damp_lambda, warmup=a.warmup,
                     calib_batches=a.calib_batches)


# ----------------------------------------------------------------------------------------------- models
class _RepeatChannels(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.expand(-1, self.n, -1, -1) if x.shape[1] == 1 else x


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from . import models
    key = name.lower().replace("_", "-")
    if key in ("small-mobilenet", "small-mobilenetv2", "mobilenet-small"):
        return models.small_mobilenet(num_classes, in_channels)
    if key in ("small-resnet", "resnet-small"):
        return models.small_resnet(num_classes, in_channels)
    if key in ("mobilenet-v2", "mobilenetv2"):
        return models.MobileNetV2(num_classes, in_channels)
    errors = []
    try:
        import torchvision
        try:
            m = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            return nn.Sequential(_RepeatChannels(3), m) if in_channels == 1 else m
        except (ValueError, KeyError) as e:
            errors.append(f"torchvision: {e}")
    except ImportError:
        errors.append("torchvision not installed")
    try:
        import timm
        if timm.is_model(name):
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        errors.append("timm: no such model")
    except ImportError:
        errors.append("timm not installed")
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(BUILTIN_MODELS)} or a torchvision/timm "
                     f"model name ({'; '.join(errors)})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError(f"--device {name}: MPS is not available on this machine")
    return dev


# ----------------------------------------------------------------------------------------------- helpers
class Progress:
    """tqdm bar when enabled and stdout is a TTY, otherwise nothing (or one line per epoch unless quiet)."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        self.quiet = quiet
        self.desc = desc
        if not quiet and sys.stdout.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stdout)
            except ImportError:
                pass

    def update(self, **post):
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self, **post):
        if self.bar is not None:
            self.bar.set_postfix(post)
            self.bar.close()


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(1, total)


def split_params(model: nn.Module):
    """(weights and biases, quantizer scales/offsets)."""
    qparams = set()
    for m in model.modules():
        if isinstance(m, (WeightQuantizer, QuantAct)):
            qparams.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay, quant = [], [], []
    for n, p in model.named_parameters():
        if id(p) in qparams:
            quant.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    return decay, no_decay, quant


def make_sgd(model, lr, wd):
    decay, no_decay, _ = split_params(model)
    return torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9)


def osc_stats(model: nn.Module) -> tuple[float, float]:
    r = oscqat.oscillation_report(model)["total"]
    return r["osc_pct"], r["frozen_pct"]


def pick_depthwise(model: nn.Module):
    """(name, quantizer) of the tracked depthwise layer with the most oscillating weights now (else the first
    tracked layer)."""
    best, first = None, None
    for name, layer in quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        first = first or (name, q)
        if getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels:
            score = float((q.freq > 0.005).float().mean())
            if best is None or score > best[0]:
                best = (score, name, q)
    return (best[1], best[2]) if best else first


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
    for epoch in range(args.fp_epochs):
        data.set_epoch(epoch)
        bar = Progress(len(data), f"fp {epoch + 1}/{args.fp_epochs}", args.quiet)
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
            bar.update(loss=f"{tl / tn:.3f}", acc=f"{100 * tc / tn:.1f}")
        bar.close(loss=f"{tl / max(1, tn):.3f}", acc=f"{100 * tc / max(1, tn):.1f}")
        if bar.bar is None:
            log(args, f"fp epoch {epoch + 1}/{args.fp_epochs}: loss {tl / max(1, tn):.4f} "
                      f"train acc {100 * tc / max(1, tn):.2f}%")
    return {"steps": steps}


def fp_model(ds, args, device, timings) -> tuple[nn.Module, dict]:
    model = build_model(args.model, ds.num_classes, ds.in_channels).to(device)
    info = {"model_name": args.model, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "dataset": ds.name}
    path = Path(args.fp_checkpoint) if args.fp_checkpoint else None
    test = Batches(ds.test_x, ds.test_y, 512, device=device)
    if path is not None and path.is_file():
        t = time.time()
        try:
            ck = torch.load(path, map_location=device, weights_only=False)
            sd = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
            model.load_state_dict(sd)
        except (RuntimeError, KeyError, EOFError, OSError, TypeError) as e:
            raise RuntimeError(f"--fp-checkpoint {path}: cannot load a full-precision {args.model!r} state "
                               f"({ds.num_classes} classes, {ds.in_channels} input channels) from it: "
                               f"{str(e).splitlines()[0]}") from e
        fp_acc = ck.get("fp_acc") if isinstance(ck, dict) else None
        if fp_acc is None or ck.get("test_size") != len(ds.test_y):
            fp_acc = evaluate(model, test)
        timings["fp_load_s"] = time.time() - t
        log(args, f"loaded full-precision model from {path} (test acc {fp_acc:.2f}%)")
        return model, dict(info, fp_acc=fp_acc, fp_source=str(path))
    if path is None and args.fp_epochs == 0:
        log(args, "warning: --fp-epochs 0 and no --fp-checkpoint: QAT starts from a randomly initialised model")
    t = time.time()
    torch.manual_seed(args.seed)
    model = build_model(args.model, ds.num_classes, ds.in_channels).to(device)
    train_fp(model, ds, args, device) if args.fp_epochs else None
    fp_acc = evaluate(model, test)
    timings["fp_train_s"] = time.time() - t
    log(args, f"full-precision test accuracy: {fp_acc:.2f}%")
    state = {"model": model.state_dict(), "fp_acc": fp_acc, "test_size": len(ds.test_y), **info,
             "fp_epochs": args.fp_epochs, "seed": args.seed}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        log(args, f"saved full-precision model to {path}")
    return model, dict(info, fp_acc=fp_acc, fp_source=str(path) if path else "trained")


# ----------------------------------------------------------------------------------------------- QAT stage
class Trainer:
    def __init__(self, args, ds, device):
        self.args, self.ds, self.device = args, ds, device
        self.train_data = Batches(ds.train_x, ds.train_y, args.batch_size, shuffle=True, seed=args.seed,
                                  drop_last=len(ds.train_y) >= args.batch_size, augment=args.augment, device=device)
        self.test_data = Batches(ds.test_x, ds.test_y, 512, device=device)
        self.steps_per_epoch = len(self.train_data)
        self.total = self.steps_per_epoch * args.epochs
        self.history = {"step": [], "osc_pct": [], "frozen_pct": [], "loss": [], "lam": [], "f_th": []}
        self.record = {"layer": None, "start": None, "ints": [], "steps": []}
        self.epoch = 0
        self.step = 0

    def calib_batches(self):
        return Batches(self.ds.train_x, self.ds.train_y, self.args.batch_size, shuffle=True,
                       seed=self.args.seed + 555, device=self.device, max_batches=self.args.calib_batches)

    def bn_batches(self):
        return Batches(self.ds.train_x, self.ds.train_y, self.args.batch_size, shuffle=True,
                       seed=self.args.seed + 777, device=self.device, max_batches=self.args.bn_batches)

    def setup(self, model, config: QATConfig, calibrate: bool = True):
        self.config = config
        self.model = oscqat.prepare(model, config, calib_data=self.calib_batches() if calibrate else None)
        self.model.to(self.device)
        decay, no_decay, quant = split_params(self.model)
        self.opt_w = torch.optim.SGD([{"params": decay, "weight_decay": self.args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=self.args.lr, momentum=0.9)
        self.opt_s = torch.optim.Adam(quant, lr=self.args.scale_lr) if quant else None
        self.lr_w = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_w, self.total)
        self.lr_s = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_s, self.total) if self.opt_s else None
        self.sched = oscqat.QATSchedule(self.model, self.total, config)

    def state(self) -> dict:
        return {"format": CKPT_FORMAT, "model": self.model.state_dict(), "config": asdict(self.config),
                "args": {k: v for k, v in vars(self.args).items() if k != "func"},
                "schedule": self.sched.state_dict(), "opt_w": self.opt_w.state_dict(),
                "opt_s": self.opt_s.state_dict() if self.opt_s else None, "lr_w": self.lr_w.state_dict(),
                "lr_s": self.lr_s.state_dict() if self.lr_s else None, "epoch": self.epoch, "step": self.step,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history, "record": self.record, "fp": self.fp_info, "timings": self.timings,
                "model_name": self.args.model, "num_classes": self.ds.num_classes,
                "in_channels": self.ds.in_channels, "dataset": self.ds.info | {"name": self.ds.name}}

    def load(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.sched.load_state_dict(ck["schedule"])
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

    def train_epoch(self, epoch: int) -> dict:
        args, model = self.args, self.model
        model.train()
        self.train_data.set_epoch(epoch)
        bar = Progress(self.steps_per_epoch, f"qat {epoch + 1}/{args.epochs}", args.quiet)
        every = max(1, self.steps_per_epoch // 20)
        rec_k = args.record_last
        tl = tc = tn = 0.0
        osc = frz = 0.0
        for x, y in self.train_data:
            out = model(x)
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
            self.step += 1
            # Fig. 2: a depthwise layer's integers (prev_int = w_eff of this step's tracked forward), last K steps
            if rec_k > 0 and self.step > self.total - rec_k:
                if self.record["layer"] is None:
                    picked = pick_depthwise(model)
                    if picked is not None:
                        self.record.update(layer=picked[0], start=self.step)
                if self.record["layer"] is not None:
                    q = model.get_submodule(self.record["layer"]).weight_quant
                    self.record["ints"].append(q.prev_int.detach().flatten().to("cpu", copy=True))
                    self.record["steps"].append(self.step)
            tl += task.item() * len(y)
            tc += float((out.argmax(1) == y).sum())
            tn += len(y)
            if self.step % every == 0 or self.step == self.total:
                osc, frz = osc_stats(model)
                for k, v in (("step", self.step), ("osc_pct", osc), ("frozen_pct", frz), ("loss", tl / tn),
                             ("lam", lam), ("f_th", f_th)):
                    self.history[k].append(v)
            bar.update(loss=f"{tl / tn:.3f}", acc=f"{100 * tc / tn:.1f}", osc=f"{osc:.2f}%", frozen=f"{frz:.2f}%")
        osc, frz = osc_stats(model)
        res = {"epoch": epoch + 1, "loss": tl / max(1, tn), "train_acc": 100 * tc / max(1, tn), "osc_pct": osc,
               "frozen_pct": frz}
        bar.close(loss=f"{res['loss']:.3f}", acc=f"{res['train_acc']:.1f}", osc=f"{osc:.2f}%", frozen=f"{frz:.2f}%")
        if bar.bar is None:
            log(args, f"qat epoch {epoch + 1}/{args.epochs}: loss {res['loss']:.4f} train acc "
                      f"{res['train_acc']:.2f}% oscillating {osc:.3f}% frozen {frz:.3f}%")
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


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected the {CHECKPOINT} written by "
                                f"`oscqat train --out DIR`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise RuntimeError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}; expected the {CHECKPOINT} "
                           f"written by `oscqat train`") from e
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "config" not in ck:
        raise ValueError(f"{path} is not an `oscqat train` checkpoint (a full-precision --fp-checkpoint file "
                         f"cannot be resumed or evaluated; pass the {CHECKPOINT} from the QAT --out folder)")
    return ck


def run_training(args: argparse.Namespace) -> dict:
    """The whole `oscqat train` flow; returns the report (also written to OUT/report.json)."""
    t0 = time.time()
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
    out.mkdir(parents=True, exist_ok=True)
    config = qat_config(args)   # validates bits, method, schedule values
    with oscqat.use_backend(args.backend):
        timings: dict = {}
        t = time.time()
        ds = load_dataset(args.dataset, args.data_dir, subset=args.subset, test_subset=args.test_subset,
                          image_size=args.image_size, seed=args.seed)
        timings["data_s"] = time.time() - t
        log(args, f"data: {ds.name}, {len(ds.train_y)} train / {len(ds.test_y)} test images "
                  f"{ds.in_channels}x{ds.image_size[0]}x{ds.image_size[1]}, {ds.num_classes} classes; device "
                  f"{device}")
        trainer = Trainer(args, ds, device)
        if resume is None:
            model, fp_info = fp_model(ds, args, device, timings)
            torch.manual_seed(args.seed + 1)
            t = time.time()
            trainer.setup(model, config, calibrate=True)
            timings["prepare_s"] = time.time() - t
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
        t = time.time()
        ckpt = out / CHECKPOINT
        for epoch in range(trainer.epoch, args.epochs):
            epochs_log.append(trainer.train_epoch(epoch))
            trainer.epoch = epoch + 1
            timings["qat_s"] = timings.get("qat_s", 0.0) + time.time() - t
            t = time.time()
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
        t = time.time()
        acc_pre = evaluate(model, trainer.test_data)
        timings["eval_s"] = time.time() - t
        rep = oscqat.oscillation_report(model)
        t = time.time()
        bn_model = copy.deepcopy(model)
        oscqat.reestimate_bn(bn_model, trainer.bn_batches(), num_batches=args.bn_batches)
        timings["bn_reestimate_s"] = time.time() - t
        acc_post = evaluate(bn_model, trainer.test_data)
        torch.save({"model": bn_model.state_dict(), "config": asdict(config), "model_name": args.model,
                    "num_classes": ds.num_classes, "in_channels": ds.in_channels}, out / "model_bn_reestimated.pt")
        timings["total_s"] = time.time() - t0 + (resume["timings"].get("total_s", 0.0) if resume else 0.0)
        report = {
            "fp_acc": fp_info["fp_acc"], "acc_pre_bn": acc_pre, "acc_post_bn": acc_post,
            "osc_pct": rep["total"]["osc_pct"], "osc_unfrozen_pct": rep["total"]["osc_unfrozen_pct"],
            "frozen_pct": rep["total"]["frozen_pct"], "mean_freq": rep["total"]["mean_freq"], "osc_threshold": rep["threshold"],
            "layers": rep["layers"], "epochs": epochs_log, "timings": timings,
            "config": asdict(config), "args": {k: v for k, v in vars(args).items() if k != "func"},
            "dataset": ds.info | {"name": ds.name, "num_classes": ds.num_classes},
            "fp": fp_info, "device": str(device), "backend": oscqat.backend.resolve(device.type),
            "steps": trainer.step, "versions": versions(), "checkpoint": str(ckpt),
        }
        if not args.no_plots:
            try:
                from . import plots
                report["plots"] = plots.write_all(model, trainer.history, trainer.record, out)
            except ImportError as e:
                report["plots"] = {}
                log(args, f"plots skipped: {e}")
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        log(args, oscqat.format_report(rep))
        log(args, f"fp acc {fp_info['fp_acc']:.2f}%  QAT acc pre-BN {acc_pre:.2f}%  post-BN {acc_post:.2f}%  "
                  f"oscillating {report['osc_pct']:.3f}%  frozen {report['frozen_pct']:.3f}%  -> {out}")
        return report


def run(args: argparse.Namespace) -> int:
    try:
        run_training(args)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    except oscqat.BackendUnavailable as e:
        raise RuntimeError(str(e)) from e
    return 0
