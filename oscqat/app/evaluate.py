"""`oscqat eval --checkpoint PATH`: re-evaluate an `oscqat train` checkpoint on the test set of the dataset it was
trained on (as recorded in the checkpoint: name, path, image size, subset), before and after BatchNorm
re-estimation, with the oscillation report. Another dataset is refused unless --allow-dataset-mismatch."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import oscqat

from .cli import process_start
from .data import Batches, describe, load_dataset
from .checkpoint import load_checkpoint
from .common import _START, Phase, bn_batches, evaluate, log, resolve_device, with_progress
from .models import build_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `oscqat train`")
    p.add_argument("--dataset", default=None,
                   help="default: the dataset the checkpoint was trained on; another one is refused unless "
                        "--allow-dataset-mismatch")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files, when they moved")
    p.add_argument("--allow-dataset-mismatch", action="store_true",
                   help="score the checkpoint on a --dataset other than the one it was trained on")
    p.add_argument("--test-subset", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--bn-batches", type=int, default=None, help="default: the checkpoint's --bn-batches")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cpp", "cuda"))
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress lines go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


@contextlib.contextmanager
def json_to_stdout(args):
    """With --json, what is printed inside (progress lines, bars) goes to stderr: stdout holds the JSON alone."""
    if getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def load_model(ck: dict, device="cpu") -> torch.nn.Module:
    """The quantized model of an `oscqat train` checkpoint, in eval mode."""
    cfg = oscqat.QATConfig(**ck["config"])
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"])
    model = oscqat.prepare(model, cfg, verbose=False)
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def trained_dataset(ck: dict) -> dict:
    """What the checkpoint records of its dataset: name, spec (what load_dataset takes), path, image size..."""
    a = ck.get("args", {})
    info = dict(ck.get("dataset") or {})
    if "spec" not in info:   # checkpoints of before the dataset was recorded resolved: best effort
        name = info.get("name")
        info["spec"] = name if name in ("fashion-mnist", "digits") else info.get("root") or a.get("dataset")
    info.setdefault("name", info["spec"])
    if "path" not in info:
        info["path"] = info.get("data_dir") or info.get("root") or a.get("data_dir")
    return info


def load_trained_dataset(ck: dict, data_dir=None, test_subset=None):
    """The dataset the checkpoint was trained on, as it was loaded then (subset, image size, seed); `data_dir`
    (else the recorded folder, where it still exists) and `test_subset` (else the recorded one) override."""
    a, saved = ck["args"], trained_dataset(ck)
    path = saved.get("path") if saved["name"] == "fashion-mnist" else None
    data_dir = data_dir or (path if path and Path(path).is_dir() else None)
    return load_dataset(saved["spec"], data_dir, subset=a.get("subset"),
                        test_subset=test_subset or a.get("test_subset"), image_size=a.get("image_size"),
                        seed=a.get("seed", 0))


def _mismatch(saved: dict, ds) -> list[str]:
    why = []
    if saved.get("name") != ds.name:
        why.append(f"it was trained on {saved.get('name')}, --dataset gives {ds.name}")
    size = saved.get("image_size")
    if isinstance(size, int):
        size = [size, size]
    if size and list(size) != list(ds.image_size):
        why.append(f"its images were {'x'.join(map(str, size))}, these are "
                   f"{ds.image_size[0]}x{ds.image_size[1]}")
    return why


def run(args: argparse.Namespace) -> int:
    t0 = _START[0] = process_start()        # log lines and the total count from the start of the process
    with json_to_stdout(args):
        res, rep, mismatch = _run(args, t0)
    if args.json:
        print(json.dumps(res, indent=2))
    elif not args.quiet:
        print(oscqat.format_report(rep))
        print(f"dataset: {describe(res['dataset'])}"
              + (f" -- NOT the checkpoint's: {res['dataset_mismatch']}" if mismatch else ""))
        print(f"{args.checkpoint} (epoch {res['epoch']}/{res['epochs']}) on {res['dataset']['name']}: fp "
              f"{res['fp_acc']:.2f}%  pre-BN {res['acc_pre_bn']:.2f}%  post-BN {res['acc_post_bn']:.2f}%  "
              f"oscillating {res['osc_pct']:.3f}%  frozen {res['frozen_pct']:.3f}%")
        tm = res["timings"]
        print(f"{res['total_s']:.0f} s in all: Python start-up and imports {tm['startup_s']:.0f} s, data "
              f"{tm['data_s']:.0f} s, eval {tm['eval_s']:.0f} s, BN re-estimation {tm['bn_reestimate_s']:.0f} s")
    return 0


def _run(args: argparse.Namespace, t0: float):
    timings: dict = {"startup_s": time.time() - t0}
    ck = load_checkpoint(args.checkpoint)
    a = ck["args"]
    saved = trained_dataset(ck)
    device = resolve_device(args.device)
    with oscqat.use_backend(args.backend):
        if args.dataset is None:
            try:
                ds = load_trained_dataset(ck, args.data_dir, args.test_subset)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"the checkpoint was trained on {saved['name']} ({saved.get('path')}), "
                                        f"which cannot be loaded here: {e}") from e
        else:
            ds = load_dataset(args.dataset, args.data_dir, subset=a.get("subset"),
                              test_subset=args.test_subset or a.get("test_subset"),
                              image_size=a.get("image_size"), seed=a.get("seed", 0))
        timings["data_s"] = time.time() - t0 - timings["startup_s"]
        mismatch = _mismatch(saved, ds)
        if mismatch and not args.allow_dataset_mismatch:
            raise ValueError(f"{args.checkpoint}: {'; '.join(mismatch)}. Omit --dataset to use the checkpoint's, "
                             f"or pass --allow-dataset-mismatch to score it on this one anyway")
        if ds.num_classes != ck["num_classes"] or ds.in_channels != ck["in_channels"]:
            raise ValueError(f"dataset {ds.name!r} has {ds.num_classes} classes and {ds.in_channels} channels; the "
                             f"checkpoint's model expects {ck['num_classes']} and {ck['in_channels']}")
        log(args, f"data: {describe(ds.info)} (loaded in {timings['data_s']:.1f} s); device {device}, "
                  f"{torch.get_num_threads()} torch threads")
        model = load_model(ck, device)
        bs = args.batch_size or a.get("batch_size", 128)
        test = Batches(ds.test_x, ds.test_y, 512, device=device)
        t = time.time()
        with Phase(args, timings, "eval_s", f"eval: the checkpoint on {len(ds.test_y)} test images"):
            pre = evaluate(model, with_progress(test, "eval", args))
        n_bn = args.bn_batches or a.get("bn_batches", 50)
        run_args = argparse.Namespace(**dict(a, batch_size=bs, bn_batches=n_bn, seed=a.get("seed", 0)))
        batches = bn_batches(ds, run_args, device)     # the batches `oscqat train` re-estimates over
        with Phase(args, timings, "bn_reestimate_s", f"BN re-estimation over {len(batches)} training batches"):
            oscqat.reestimate_bn(model, with_progress(batches, "BN re-estimation", args), num_batches=n_bn)
        with Phase(args, timings, "eval_s", "eval: after BN re-estimation"):
            post = evaluate(model, with_progress(test, "eval", args))
        rep = oscqat.oscillation_report(model)
    res = {"checkpoint": args.checkpoint, "dataset": ds.info, "trained_on": saved,
           "dataset_mismatch": "; ".join(mismatch) or None, "epoch": ck["epoch"], "epochs": a.get("epochs"),
           "fp_acc": ck["fp"]["fp_acc"], "fp_acc_method": ck["fp"].get("fp_acc_method"), "acc_pre_bn": pre,
           "acc_post_bn": post, "osc_pct": rep["total"]["osc_pct"], "frozen_pct": rep["total"]["frozen_pct"],
           "test_size": len(ds.test_y), "eval_s": time.time() - t, "timings": timings, "total_s": time.time() - t0}
    return res, rep, mismatch
