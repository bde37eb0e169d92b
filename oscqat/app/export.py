"""`oscqat export --checkpoint PATH --out model.onnx`: ship an `oscqat train` checkpoint. Writes the ONNX (QDQ),
its encodings JSON and a torch.export `.pt2` beside it, and prints how close onnxruntime comes to the quantized
model's eval output on a batch of the checkpoint's test set. By default BatchNorm is re-estimated first, as
`oscqat eval` does (the model the main job reports after BN re-estimation); `--bn-batches 0` exports the
checkpoint as it is. Formats and tolerance: docs/export.md."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import oscqat

from .data import load_dataset
from .evaluate import load_model, trained_dataset
from .train import bn_batches, load_checkpoint

COMPARE_IMAGES = 256       # the batch onnxruntime is compared on (a few hundred ms of inference on a CPU)


def export_files(model: torch.nn.Module, images: torch.Tensor, onnx_path, pt2: bool = True) -> dict:
    """Convert `model` (QAT, eval mode) once; write ONNX, encodings and (with `pt2`) the .pt2 next to each
    other; compare onnxruntime with the model's eval output on `images`. Returns the paths and the comparison."""
    t = time.time()
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    conv = oscqat.convert(model)
    example = images[:2].cpu()
    files = {"onnx": str(onnx_path), "encodings": str(onnx_path.with_suffix(".encodings.json"))}
    oscqat.export_onnx(conv, example, files["onnx"])
    oscqat.export_encodings(conv, files["encodings"])
    if pt2:
        files["pt2"] = oscqat.export_pt2(conv, example, onnx_path.with_suffix(".pt2"))
    cmp = oscqat.compare_onnxruntime(files["onnx"], model, images.cpu())
    return {"files": files, "onnxruntime": dict(cmp, images=len(images)), "export_s": time.time() - t}


def describe(res: dict) -> str:
    c = res["onnxruntime"]
    beside = ", ".join(Path(p).name for k, p in res["files"].items() if k != "onnx")
    return (f"exported {res['files']['onnx']} (+ {beside}) in {res['export_s']:.0f} s; onnxruntime vs eval on "
            f"{c['images']} test images: max |diff| {c['max_abs_diff']:.3g} (max |output| {c['max_abs_output']:.3g}), "
            f"argmax agrees on {100 * c['argmax_agreement']:.1f}%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `oscqat train`")
    p.add_argument("--out", default="model.onnx",
                   help="the ONNX file; MODEL.encodings.json and MODEL.pt2 are written beside it")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files, when they moved")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="BatchNorm re-estimation batches before export (default: the checkpoint's; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    ck = load_checkpoint(args.checkpoint)
    a = ck["args"]
    saved = trained_dataset(ck)
    path = saved.get("path") if saved["name"] == "fashion-mnist" else None
    data_dir = args.data_dir or (path if path and Path(path).is_dir() else None)
    ds = load_dataset(saved["spec"], data_dir, subset=a.get("subset"), test_subset=a.get("test_subset"),
                      image_size=a.get("image_size"), seed=a.get("seed", 0))
    model = load_model(ck, "cpu")
    n_bn = a.get("bn_batches", 50) if args.bn_batches is None else args.bn_batches
    if n_bn > 0:     # the batches `oscqat train` re-estimates over
        oscqat.reestimate_bn(model, bn_batches(ds, argparse.Namespace(**dict(a, bn_batches=n_bn)), "cpu"),
                             num_batches=n_bn)
    res = export_files(model.eval(), ds.test_x[:COMPARE_IMAGES], args.out)
    res.update(checkpoint=args.checkpoint, bn_batches=n_bn, dataset=ds.name)
    print(json.dumps(res, indent=2) if args.json else describe(res))
    return 0
