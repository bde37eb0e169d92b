"""The full-precision stage: the one FP trainer (`train_fp`), which `oscqat train` runs when it loads no FP
checkpoint and bench/train_fp.py runs with the committed checkpoints' recipe, both writing the one FP checkpoint
format (checkpoint.py); and `fp_model`, the FP model `oscqat train` starts QAT from: --fp-checkpoint FILE (loaded
if it exists, else trained and saved there), the committed checkpoint of (model, dataset), else trained.
Uses only oscqat's public API."""
from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import oscqat

from .checkpoint import fp_mismatch, load_fp, save_fp
from .common import Phase, Progress, evaluate, log, with_progress
from .data import Batches, random_crop_flip
from .models import build_model
from .optim import make_sgd

SCHEDULES = ("one-cycle", "cosine")
AUGMENTATIONS = ("crop", "flip", "shift", "none")


@dataclass
class FPRecipe:
    """How `train_fp` trains. The defaults are the committed checkpoints' recipe (bench/train_fp.py); `oscqat
    train` trains with `cli_recipe(args)`."""
    epochs: int                         # as many as `steps` needs when that is given
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 1e-4          # on conv/linear weights; none on biases and BatchNorm
    steps: int | None = None            # stop after this many steps; the LR schedule spans them
    schedule: str = "one-cycle"         # 15 % warm-up from lr/10 to lr, cosine to lr/1000; "cosine": lr to 0
    nesterov: bool = True               # SGD momentum 0.9
    label_smoothing: float = 0.1
    augment: str = "crop"               # per image: flip + 2-pixel crop, "flip" alone; "shift": Batches' augment
    seed: int = 0
    bn_batches: int = 200               # BatchNorm statistics re-estimated over these training batches
    bn_batch_size: int = 256
    bn_seed: int = 7

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: expected one of {SCHEDULES}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment {self.augment!r}: expected one of {AUGMENTATIONS}")


def cli_recipe(args) -> FPRecipe:
    """`oscqat train`'s FP stage: --fp-epochs at --fp-lr, plain cosine, no label smoothing, --augment's shifts;
    BatchNorm re-estimated over the same batches as the QAT model's (common.bn_batches)."""
    return FPRecipe(epochs=args.fp_epochs, batch_size=args.batch_size, lr=args.fp_lr,
                    weight_decay=max(args.weight_decay, 1e-4), schedule="cosine", nesterov=False,
                    label_smoothing=0.0, augment="shift" if args.augment else "none", seed=args.seed,
                    bn_batches=args.bn_batches, bn_batch_size=args.batch_size, bn_seed=args.seed + 777)


def new_model(name: str, ds, seed: int, device="cpu") -> nn.Module:
    """A freshly initialised `name` for `ds`; the seed also fixes the dropout masks of the training after."""
    torch.manual_seed(seed)
    return build_model(name, ds.num_classes, ds.in_channels).to(device)


def train_fp(model: nn.Module, model_name: str, ds, recipe: FPRecipe, device, ui, *, test, timings: dict,
             out: Path | None = None, every_epoch: bool = False, command: str | None = None,
             init: dict | None = None, extra_recipe: dict | None = None) -> dict:
    """Train `model` (built by new_model, or loaded from the FP checkpoint `init`, whose training log it
    continues) by `recipe` on `ds`, then re-estimate its BatchNorm statistics and measure its accuracy on `test`
    (batches) before and after. `out`: written there (checkpoint.py's format) at the end, and with `every_epoch`
    after every epoch too (an interrupted run leaves a usable file); the statistics are re-estimated for each
    write, and training goes on from the running ones. `ui`: quiet, log_every (the command's args). Returns the
    checkpoint dict (also when `out` is None)."""
    data = Batches(ds.train_x, ds.train_y, recipe.batch_size, shuffle=True, seed=recipe.seed + 99, drop_last=True,
                   augment=recipe.augment == "shift", device=device)
    bn = Batches(ds.train_x, ds.train_y, recipe.bn_batch_size, shuffle=True, seed=recipe.bn_seed, device=device,
                 max_batches=recipe.bn_batches)
    epochs = -(-recipe.steps // len(data)) if recipe.steps else recipe.epochs
    steps = recipe.steps or epochs * len(data)
    opt = make_sgd(model, recipe.lr, recipe.weight_decay, nesterov=recipe.nesterov)
    if recipe.schedule == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(1, steps),
                                                    pct_start=0.15, anneal_strategy="cos", div_factor=10.0,
                                                    final_div_factor=100.0)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(recipe.seed + 12345)
    pad = 2 if recipe.augment == "crop" else 0
    prev_log = [dict(e, stage=init.get("command", "")) for e in init.get("train_log", [])] if init else []
    ck = {"model_name": model_name, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
          "dataset": ds.name, "image_size": list(ds.image_size), "dataset_info": ds.info,
          "test_size": len(ds.test_y), "epochs_planned": len(prev_log) + epochs, "seed": recipe.seed,
          "command": command, "init_command": init.get("command") if init else None,
          "recipe": dict(asdict(recipe), **(extra_recipe or {}))}
    entries: list[dict] = []

    def measure(entry: dict, keep: bool) -> None:
        """Accuracy with the running statistics, then re-estimated ones; the model keeps the latter if `keep`."""
        with Phase(ui, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images (running BN "
                                             f"statistics of training)"):
            entry["test_acc_running_bn"] = evaluate(model, test)
        running = None if keep else {k: v.clone() for k, v in model.state_dict().items()}
        with Phase(ui, timings, "fp_bn_reestimate_s",
                   f"full-precision BN re-estimation over {len(bn)} training batches"):
            n = oscqat.reestimate_bn(model, with_progress(bn, "BN re-estimation", ui),
                                     num_batches=recipe.bn_batches)
        with Phase(ui, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images"):
            entry["test_acc"] = evaluate(model, test)
        entry["elapsed_s"] = time.time() - t0
        ck.update(model=model.state_dict(), fp_acc=entry["test_acc"],
                  fp_acc_running_bn=entry["test_acc_running_bn"], train_log=prev_log + entries,
                  fp_epochs=len(prev_log) + len(entries), steps=min(steps, len(entries) * len(data)),
                  bn=f"re-estimated, {n} x {recipe.bn_batch_size} training images")
        if out is not None:
            save_fp(out, ck)
        if running is not None:
            model.load_state_dict(running)

    t0 = time.time()
    for epoch in range(epochs):
        t = time.time()
        data.set_epoch(epoch)
        model.train()
        bar = Progress(min(len(data), steps - epoch * len(data)), f"fp {epoch + 1}/{epochs}", ui.quiet,
                       ui.log_every)
        tl = tc = tn = 0.0
        for i, (x, y) in enumerate(data):
            if epoch * len(data) + i == steps:
                break
            if pad or recipe.augment == "flip":
                x = random_crop_flip(x, g, pad)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item() * len(y)
            tc += float((logits.argmax(1) == y).sum())
            tn += len(y)
            bar.update(loss=f"{tl / tn:.3f}", acc=f"{100 * tc / tn:.1f}%")
        timings["fp_train_s"] = timings.get("fp_train_s", 0.0) + time.time() - t
        entry = {"epoch": epoch + 1, "loss": tl / max(1, tn), "train_acc": 100 * tc / max(1, tn)}
        bar.close(loss=f"{entry['loss']:.3f}", acc=f"{entry['train_acc']:.1f}%")
        entries.append(entry)
        if every_epoch or epoch == epochs - 1:
            measure(entry, keep=epoch == epochs - 1)
        else:
            entry["elapsed_s"] = time.time() - t0
        if bar.bar is None:
            log(ui, f"fp epoch {epoch + 1}/{epochs}: loss {entry['loss']:.4f} train acc {entry['train_acc']:.2f}%"
                    + (f", test acc {entry['test_acc']:.2f}% ({entry['test_acc_running_bn']:.2f}% with the running "
                       f"BN statistics)" if "test_acc" in entry else "") + f" ({time.time() - t:.0f} s)")
    if not entries:         # no training: the initial model, measured and written all the same
        measure({}, keep=True)
    return ck


# ----------------------------------------------------------------------------------------------- oscqat train
def fp_source(args, ds) -> tuple[Path | None, bool]:
    """(checkpoint to load or to save to, whether it is a committed one) for the full-precision model."""
    spec = args.fp_checkpoint
    if spec is not None and str(spec).lower() == "none":
        return None, False
    if spec:
        return Path(spec), False
    from . import models        # looked up at each call: tests replace models.fp_checkpoint
    path = models.fp_checkpoint(args.model, ds.name)
    return (Path(path), True) if path else (None, False)


def _load(path: Path, committed: bool, model: nn.Module, ds, args) -> dict | None:
    """Load `path` into `model`; None when a committed checkpoint does not fit the dataset (then FP trains)."""
    what = "committed full-precision checkpoint" if committed else "--fp-checkpoint"
    ck = load_fp(path, what)
    wrong = fp_mismatch(ck, ds)
    if wrong:
        if committed:
            log(args, f"not using the {what} {path}: {'; '.join(wrong)}")
            return None
        raise ValueError(f"--fp-checkpoint {path}: {'; '.join(wrong)} (pass --fp-checkpoint none to train a "
                         f"full-precision model on this dataset)")
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(f"{what} {path}: cannot load a full-precision {args.model!r} state "
                           f"({ds.num_classes} classes, {ds.in_channels} input channels) from it: "
                           f"{str(e).splitlines()[0]}") from e
    return ck


def fp_model(ds, args, device, timings: dict, write: bool = True) -> tuple[nn.Module, dict]:
    """The full-precision model QAT starts from, and what is known of it (fp_acc, measured with the BatchNorm
    statistics of the final weights, and how). `write`: save a trained one to --fp-checkpoint (rank 0 alone)."""
    info = {"model_name": args.model, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "dataset": ds.name}
    path, committed = fp_source(args, ds)
    test = with_progress(Batches(ds.test_x, ds.test_y, 512, device=device), "eval", args)
    if path is not None and path.is_file():
        model = build_model(args.model, ds.num_classes, ds.in_channels).to(device)
        with Phase(args, timings, "fp_load_s", f"full-precision model: loading {path}"):
            ck = _load(path, committed, model, ds, args)
        if ck is not None:
            source = f"{'committed checkpoint' if committed else '--fp-checkpoint'} {path}"
            if len(ds.test_y) == ds.info.get("full_test_size") and ck["test_size"] == len(ds.test_y):
                fp_acc, method = float(ck["fp_acc"]), f"BN statistics {ck['bn']}; recorded in the checkpoint"
            else:
                with Phase(args, timings, "fp_eval_s", f"full-precision eval on {len(ds.test_y)} test images"):
                    fp_acc = evaluate(model, test)
                method = f"BN statistics {ck['bn']}, as saved"
            log(args, f"full-precision model: {source}; test accuracy {fp_acc:.2f}% ({method})")
            return model, dict(info, fp_acc=fp_acc, fp_acc_method=method, fp_source=str(path),
                               fp_committed=committed)
    if args.fp_epochs == 0:
        log(args, "warning: --fp-epochs 0 and no full-precision checkpoint: QAT starts from a randomly "
                  "initialised model")
    else:
        why = "--fp-checkpoint none" if path is None and args.fp_checkpoint else \
            f"no committed checkpoint for {args.model} on {ds.name}" if path is None else f"{path} does not exist yet"
        log(args, f"full-precision model: training {args.model} for {args.fp_epochs} epochs ({why})")
    model = new_model(args.model, ds, args.seed, device)
    command = "oscqat " + shlex.join(args.argv) if getattr(args, "argv", None) else None
    ck = train_fp(model, args.model, ds, cli_recipe(args), device, args, test=test, timings=timings,
                  out=path if write else None, command=command)
    last = ck["train_log"][-1] if ck["train_log"] else {}
    method = f"BN statistics {ck['bn']}"
    log(args, f"full-precision test accuracy: {ck['fp_acc']:.2f}% ({method}; {ck['fp_acc_running_bn']:.2f}% with "
              f"the running statistics of training" + (f", train acc {last['train_acc']:.2f}%)" if last else ")"))
    if path is not None and write:
        log(args, f"saved full-precision model to {path}")
    return model, dict(info, fp_acc=ck["fp_acc"], fp_acc_method=method, fp_acc_running_bn=ck["fp_acc_running_bn"],
                       fp_train_acc=last.get("train_acc"), fp_source=str(path) if path else "trained",
                       fp_committed=False)
