"""`oscqat export --checkpoint PATH --out model.onnx`: ship an `oscqat train` checkpoint. Writes the ONNX (QDQ),
its encodings JSON and a torch.export `.pt2` beside it, and prints how close onnxruntime comes to the quantized
model's eval output on a batch of the checkpoint's test set. By default BatchNorm is re-estimated first, as
`oscqat eval` does (the model the main job reports after BN re-estimation); `--bn-batches 0` exports the
checkpoint as it is. Formats and tolerance: docs/export.md."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import oscqat

from .cli import process_start
from .data import describe as describe_data
from .evaluate import json_to_stdout, load_model, load_trained_dataset
from .checkpoint import load_checkpoint
from .common import _START, Phase, bn_batches, log, with_progress

COMPARE_IMAGES = 256       # the batch onnxruntime is compared on (a few hundred ms of inference on a CPU)


def export_files(model: torch.nn.Module, images: torch.Tensor, onnx_path, pt2: bool = True, say=None) -> dict:
    """Convert `model` (QAT, eval mode) once; write ONNX, encodings and (with `pt2`) the .pt2 next to each
    other; compare onnxruntime with the model's eval output on `images`. `say(line)`, when given, gets a line as
    each step starts and one with its wall time. Returns the paths, the comparison and the wall time of each step
    ("steps_s") and of all of them ("export_s")."""
    t = time.time()
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    steps: dict = {}

    def step(name: str, what: str, fn):
        if say:
            say(f"export: {what} ...")
        t1 = time.time()
        out = fn()
        steps[name] = time.time() - t1
        if say:
            say(f"export: {what.split(' (')[0]} done in {steps[name]:.1f} s")
        return out

    model = model.cpu()
    conv = step("convert", "convert (integer weights, fixed activation quantizers)", lambda: oscqat.convert(model))
    example = images[:2].cpu()
    files = {"onnx": str(onnx_path), "encodings": str(onnx_path.with_suffix(".encodings.json"))}
    step("onnx", f"ONNX {onnx_path.name} (torch.onnx traces the model: the longest step)",
         lambda: oscqat.export_onnx(conv, example, files["onnx"]))
    step("encodings", "encodings", lambda: oscqat.export_encodings(conv, files["encodings"]))
    if pt2:
        files["pt2"] = step("pt2", f"torch.export {onnx_path.with_suffix('.pt2').name}",
                            lambda: oscqat.export_pt2(conv, example, onnx_path.with_suffix(".pt2")))
    cmp = step("onnxruntime", f"onnxruntime check on {len(images)} test images",
               lambda: oscqat.compare_onnxruntime(files["onnx"], model, images.cpu()))
    sizes = {k: os.path.getsize(p) for k, p in files.items()}
    return {"files": files, "bytes": sizes, "onnxruntime": dict(cmp, images=len(images)),
            "export_s": time.time() - t, "steps_s": steps}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def describe(res: dict) -> str:
    c = res["onnxruntime"]
    sizes = res.get("bytes", {})
    names = [f"{Path(p).name}{f' {_mb(sizes[k])}' if k in sizes else ''}" for k, p in res["files"].items()]
    return (f"exported {Path(res['files']['onnx']).parent}/: {', '.join(names)} in {res['export_s']:.0f} s; "
            f"onnxruntime vs eval on {c['images']} test images: max |diff| {c['max_abs_diff']:.3g} (max |output| "
            f"{c['max_abs_output']:.3g}), argmax agrees on {100 * c['argmax_agreement']:.1f}%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `oscqat train`")
    p.add_argument("--out", default="model.onnx",
                   help="the ONNX file; MODEL.encodings.json and MODEL.pt2 are written beside it")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files, when they moved")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="BatchNorm re-estimation batches before export (default: the checkpoint's; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress lines go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    t0 = _START[0] = process_start()        # log lines and the total count from the start of the process
    timings: dict = {"startup_s": time.time() - t0}
    ck = load_checkpoint(args.checkpoint)
    a = ck["args"]
    with json_to_stdout(args):      # with --json, the progress lines go to stderr
        t = time.time()
        ds = load_trained_dataset(ck, args.data_dir)
        timings["data_s"] = time.time() - t
        log(args, f"data: {describe_data(ds.info)} (the checkpoint's; loaded in {timings['data_s']:.1f} s); "
                  f"{torch.get_num_threads()} torch threads")
        model = load_model(ck, "cpu")
        n_bn = a.get("bn_batches", 50) if args.bn_batches is None else args.bn_batches
        if n_bn > 0:     # the batches `oscqat train` re-estimates over
            batches = bn_batches(ds, argparse.Namespace(**dict(a, bn_batches=n_bn)), "cpu")
            with Phase(args, timings, "bn_reestimate_s", f"BN re-estimation over {len(batches)} training batches"):
                oscqat.reestimate_bn(model, with_progress(batches, "BN re-estimation", args), num_batches=n_bn)
        res = export_files(model.eval(), ds.test_x[:COMPARE_IMAGES], args.out, say=lambda m: log(args, m))
        timings["export_s"] = res["export_s"]
        res.update(checkpoint=args.checkpoint, bn_batches=n_bn, dataset=ds.name, timings=timings,
                   total_s=time.time() - t0)
    print(json.dumps(res, indent=2) if args.json else
          f"{describe(res)}; {res['total_s']:.0f} s in all (Python start-up and imports {timings['startup_s']:.0f} s, "
          f"data {timings['data_s']:.0f} s, BN re-estimation {timings.get('bn_reestimate_s', 0.0):.0f} s, export "
          f"{res['export_s']:.0f} s)")
    return 0
