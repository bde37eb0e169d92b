"""`oscqat eval --checkpoint PATH`: re-evaluate an `oscqat train` checkpoint on its test set, before and after
BatchNorm re-estimation, with the oscillation report."""
from __future__ import annotations

import argparse
import json
import time

import torch

import oscqat

from ..config import QATConfig
from .data import Batches, load_dataset
from .train import build_model, evaluate, load_checkpoint, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `oscqat train`")
    p.add_argument("--dataset", default=None, help="override the checkpoint's dataset (same classes)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-subset", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--bn-batches", type=int, default=None, help="default: the checkpoint's --bn-batches")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cpp", "cuda"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true")


def load_model(ck: dict, device="cpu") -> torch.nn.Module:
    """The quantized model of an `oscqat train` checkpoint, in eval mode."""
    cfg = QATConfig(**ck["config"])
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"])
    model = oscqat.prepare(model, cfg)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    ck = load_checkpoint(args.checkpoint)
    a = ck["args"]
    device = resolve_device(args.device)
    with oscqat.use_backend(args.backend):
        ds = load_dataset(args.dataset or a["dataset"], args.data_dir if args.dataset else a.get("data_dir"),
                          subset=a.get("subset"), test_subset=args.test_subset or a.get("test_subset"),
                          image_size=a.get("image_size"), seed=a.get("seed", 0))
        if ds.num_classes != ck["num_classes"] or ds.in_channels != ck["in_channels"]:
            raise ValueError(f"dataset {ds.name!r} has {ds.num_classes} classes and {ds.in_channels} channels; the "
                             f"checkpoint's model expects {ck['num_classes']} and {ck['in_channels']}")
        model = load_model(ck, device)
        bs = args.batch_size or a.get("batch_size", 128)
        test = Batches(ds.test_x, ds.test_y, 512, device=device)
        t = time.time()
        pre = evaluate(model, test)
        n_bn = args.bn_batches or a.get("bn_batches", 50)
        oscqat.reestimate_bn(model, Batches(ds.train_x, ds.train_y, bs, shuffle=True, seed=a.get("seed", 0) + 777,
                                            device=device, max_batches=n_bn), num_batches=n_bn)
        post = evaluate(model, test)
        rep = oscqat.oscillation_report(model)
    res = {"checkpoint": args.checkpoint, "epoch": ck["epoch"], "epochs": a.get("epochs"),
           "fp_acc": ck["fp"]["fp_acc"], "acc_pre_bn": pre, "acc_post_bn": post,
           "osc_pct": rep["total"]["osc_pct"], "frozen_pct": rep["total"]["frozen_pct"],
           "test_size": len(ds.test_y), "eval_s": time.time() - t}
    if args.json:
        print(json.dumps(res, indent=2))
    elif not args.quiet:
        print(oscqat.format_report(rep))
        print(f"{args.checkpoint} (epoch {ck['epoch']}/{a.get('epochs')}): fp {res['fp_acc']:.2f}%  "
              f"pre-BN {pre:.2f}%  post-BN {post:.2f}%  oscillating {res['osc_pct']:.3f}%  "
              f"frozen {res['frozen_pct']:.3f}%")
    return 0
