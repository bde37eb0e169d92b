"""The end of `oscqat train`: the quantized model evaluated before and after BatchNorm re-estimation (averaged
over the ranks under torchrun), the BN-re-estimated model, report.json, the ONNX export and the plots in --out.
Uses only oscqat's public API."""
from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

import oscqat

from .args import recorded_args
from .checkpoint import CHECKPOINT
from .common import Phase, evaluate, log, with_progress
from .launch import Dist


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "oscqat": oscqat.__version__,
         "platform": platform.platform()}
    for mod in ("numpy", "tqdm", "matplotlib", "sklearn", "PIL", "triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return v


def finish(args, ds, trainer, dist: Dist, device, out: Path, fp_info: dict, epochs_log: list, timings: dict,
           t0: float, earlier_s: float = 0.0) -> dict:
    """Evaluate, write --out's files and return the report; the other ranks take part in the BN re-estimation
    alone. `earlier_s`: the wall time of the run before it was resumed."""
    model, config = trainer.model, trainer.config
    if dist.main:
        with Phase(args, timings, "eval_s", f"eval: quantized model on {len(ds.test_y)} test images"):
            acc_pre = evaluate(model, with_progress(trainer.test_data, "eval", args))
        log(args, f"quantized test accuracy before BN re-estimation: {acc_pre:.2f}%")
    rep = oscqat.oscillation_report(model)
    bn_model = copy.deepcopy(model)
    bn = trainer.bn_batches()
    with Phase(args, timings, "bn_reestimate_s", f"BN re-estimation over {len(bn)} training batches"
               + (f", {dist.world} processes, statistics averaged" if dist.world > 1 else "")):
        oscqat.reestimate_bn(bn_model, with_progress(bn, "BN re-estimation", args), num_batches=args.bn_batches)
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
        "config": asdict(config), "args": recorded_args(args),
        "fp": fp_info, "device": str(device), "threads": torch.get_num_threads(),
        "backend": oscqat.get_backend(device.type), "steps": trainer.step, "versions": versions(),
        "checkpoint": str(out / CHECKPOINT), "world_size": dist.world,
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
    timings["total_s"] = time.time() - t0 + earlier_s
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log(args, "oscillation report:\n" + oscqat.format_report(rep))
    log(args, f"{ds.name}: fp acc {fp_info['fp_acc']:.2f}% ({fp_info.get('fp_acc_method', '?')}); "
              f"W{args.w_bits}A{args.a_bits} {args.method}: QAT acc pre-BN {acc_pre:.2f}%  post-BN "
              f"{acc_post:.2f}%  oscillating {report['osc_pct']:.3f}%  frozen {report['frozen_pct']:.3f}%  "
              f"total {timings['total_s']:.0f} s -> {out}")
    return report
