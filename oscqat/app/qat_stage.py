"""The QAT stage of `oscqat train`: the quantized model, its optimizers and schedules, the training epochs
(data parallel under torchrun), the integers recorded for the plots, and the resumable state (checkpoint.py's
QAT format). Uses only oscqat's public API."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import oscqat

from .args import recorded_args
from .checkpoint import CKPT_FORMAT, save_checkpoint
from .common import Progress, bn_batches, log
from .data import Batches
from .launch import Dist
from .optim import qat_optimizers

QATConfig = oscqat.QATConfig


def osc_stats(model: nn.Module) -> tuple[float, float]:
    r = oscqat.oscillation_report(model)["total"]
    return r["osc_pct"], r["frozen_pct"]


def pick_depthwise(model: nn.Module):
    """(name, quantizer, mean oscillation frequency) of the tracked depthwise layer whose weights oscillate most
    now (highest mean frequency), else of the tracked layer that does."""
    best, best_dw = None, None
    for name, layer in oscqat.quant_layers(model):
        q = layer.weight_quant
        if q.freq is None:
            continue
        score = float(q.freq.double().mean())
        if best is None or score > best[2]:
            best = (name, q, score)
        if oscqat.is_depthwise(layer) and (best_dw is None or score > best_dw[2]):
            best_dw = (name, q, score)
    return best_dw or best


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
                "args": recorded_args(self.args),
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

    def save(self, path: Path, epochs_log: list) -> None:
        save_checkpoint(path, dict(self.state(), epochs_log=epochs_log))

    def fit(self, ckpt: Path, epochs_log: list, timings: dict) -> bool:
        """The remaining QAT epochs, the checkpoint written after each (rank 0); False when --stop-after-epoch
        stopped them early."""
        args = self.args
        t = time.time()
        for epoch in range(self.epoch, args.epochs):
            epochs_log.append(self.train_epoch(epoch))
            self.epoch = epoch + 1
            timings["qat_s"] = timings.get("qat_s", 0.0) + time.time() - t
            t = time.time()
            if self.dist.main:
                self.save(ckpt, epochs_log)
            if args.stop_after_epoch is not None and args.stop_after_epoch <= self.epoch < args.epochs:
                log(args, f"stopped after epoch {self.epoch} (--stop-after-epoch); resume with "
                          f"`oscqat train --resume {ckpt}`")
                return False
        return True

    def _record_integers(self, model: nn.Module) -> None:
        rec = self.record
        if rec.get("layers") is None:
            tracked = [(n, m) for n, m in oscqat.quant_layers(model) if m.weight_quant.freq is not None]
            names = [n for n, m in tracked if oscqat.is_depthwise(m)]
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
