"""Full-precision starting points for the experiments (the paper starts QAT from pre-trained models): the command
line of the app's one FP trainer (oscqat/app/fp_stage.py, which `oscqat train` runs for its FP stage), writing the
one FP checkpoint format (oscqat/app/checkpoint.py) that `oscqat train --fp-checkpoint` loads, and beside it a
.json training log. Commands that made the committed checkpoints: oscqat/app/checkpoints/README.md.

    python bench/train_fp.py --model small-mobilenet --epochs 8 --out oscqat/app/checkpoints/small-mobilenet_fashion-mnist.pt

Recipe (the defaults): SGD (momentum 0.9, nesterov), one-cycle LR (15% warm-up to --lr, cosine to ~0), weight
decay on conv/linear weights, label smoothing 0.1, random crop (2-pixel zero padding, per image) + horizontal flip;
with --init (fine-tuning stage) a plain cosine LR from --lr to 0. After every epoch the BatchNorm statistics are
re-estimated (200 un-augmented training batches of 256), the test accuracy is measured and the checkpoint is
rewritten, so an interrupted run leaves a usable file; training goes on from the running statistics.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oscqat.app.checkpoint import load_fp  # noqa: E402
from oscqat.app.data import Batches, load_dataset  # noqa: E402
from oscqat.app.fp_stage import AUGMENTATIONS, SCHEDULES, FPRecipe, new_model, train_fp  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-mobilenet")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (fine-tuning stage): plain "
                                                 "cosine LR from --lr to 0 instead of the one-cycle schedule")
    p.add_argument("--crop", type=int, default=1, help="1: random crop + flip; 0: flip only")
    p.add_argument("--image-size", type=int, default=None, help="resize the images (default: the dataset's own)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (the LR schedule spans "
                                                           "them); --epochs is then the number of epochs they need")
    # the rest of FPRecipe, so that any recipe of the FP trainer can be given here (`oscqat train`'s too)
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="default: one-cycle, cosine with --init")
    p.add_argument("--nesterov", type=int, default=1, choices=(0, 1))
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None, help="default: from --crop")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    command = "python bench/train_fp.py " + " ".join(shlex.quote(s) for s in (sys.argv[1:] if argv is None else argv))
    ds = load_dataset(a.dataset, seed=0, image_size=a.image_size)
    recipe = FPRecipe(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, steps=a.steps,
                      schedule=a.schedule or ("cosine" if a.init else "one-cycle"), nesterov=bool(a.nesterov),
                      label_smoothing=a.label_smoothing, augment=a.augment or ("crop" if a.crop else "flip"),
                      seed=a.seed)
    model = new_model(a.model, ds, a.seed)
    init = None
    if a.init:
        init = load_fp(a.init, "--init")
        model.load_state_dict(init["model"])
        print(f"init from {a.init} (test acc {init['fp_acc']:.2f}%)", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    ui = argparse.Namespace(quiet=False, log_every=None)
    print(f"{a.model}: {nparams} parameters, {recipe}", flush=True)
    t0 = time.time()
    ck = train_fp(model, a.model, ds, recipe, "cpu", ui, test=Batches(ds.test_x, ds.test_y, 1000), timings={},
                  out=Path(a.out), every_epoch=True, command=command, init=init,
                  extra_recipe={"model": a.model, "dataset": a.dataset, "image_size": a.image_size, "init": a.init})
    log = {"command": command, "model_name": a.model, "params": nparams, "epochs": ck["train_log"],
           "final_test_acc": ck["fp_acc"], "seconds": time.time() - t0, "init_command": ck["init_command"]}
    Path(a.out).with_suffix(".json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
