"""Full-precision starting points for the experiments (the paper starts QAT from pre-trained models):
a built-in model trained on Fashion-MNIST 28x28, saved in the format `oscqat train --fp-checkpoint` loads
({"model": state_dict, "fp_acc", "test_size", "model_name", "num_classes", "in_channels", "dataset", ...}).

    python bench/train_fp.py --model small-mobilenet --epochs 14 --out oscqat/app/checkpoints/small-mobilenet_fashion-mnist.pt
    python bench/train_fp.py --model small-resnet --epochs 4 --out oscqat/app/checkpoints/small-resnet_fashion-mnist.pt

Recipe: SGD (momentum 0.9, nesterov), one-cycle LR (15% warm-up to --lr, cosine to ~0), weight decay on
conv/linear weights, label smoothing 0.1, random crop (2-pixel zero padding, per image) + horizontal flip.
After training, the BatchNorm statistics are re-estimated (cumulative average over 200 un-augmented training
batches) before the test accuracy is measured. The checkpoint is rewritten after every epoch (with the test
accuracy of that epoch), so an interrupted run leaves a usable file.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import oscqat  # noqa: E402
from oscqat.app.data import Batches, load_dataset  # noqa: E402
from oscqat.app.train import evaluate, split_params  # noqa: E402


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))        # background value of the normalised images
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, c, h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, c, h, w)
    return torch.gather(xp, 3, cols)


def main() -> None:
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
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    command = "python bench/train_fp.py " + " ".join(shlex.quote(s) for s in sys.argv[1:])
    ds = load_dataset(a.dataset, seed=0, image_size=a.image_size)
    torch.manual_seed(a.seed)
    from experiments import make_model
    model = make_model(a.model, ds.num_classes, ds.in_channels)
    prev_log = []
    if a.init:
        init = torch.load(a.init, map_location="cpu", weights_only=False)
        model.load_state_dict(init["model"])
        prev_log = [dict(e, stage=init.get("command", "")) for e in init.get("train_log", [])]
        print(f"init from {a.init} (test acc {init['fp_acc']:.2f}%)", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    train = Batches(ds.train_x, ds.train_y, a.batch_size, shuffle=True, seed=a.seed + 99, drop_last=True)
    test = Batches(ds.test_x, ds.test_y, 1000)
    if a.steps:
        a.epochs = -(-a.steps // len(train))
    steps = a.steps or a.epochs * len(train)
    decay, no_decay, _ = split_params(model)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, momentum=0.9, nesterov=True)
    if a.init:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.15,
                                                    anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    g = torch.Generator().manual_seed(a.seed + 12345)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = {"command": command, "model_name": a.model, "params": nparams, "epochs": []}
    print(f"{a.model}: {nparams} parameters, {len(train)} steps/epoch x {a.epochs} epochs", flush=True)
    t0 = time.time()
    for epoch in range(a.epochs):
        train.set_epoch(epoch)
        model.train()
        tl = tc = tn = 0.0
        for i, (x, y) in enumerate(train):
            if epoch * len(train) + i == steps:
                break
            x = random_crop_flip(x, g, pad=2 if a.crop else 0)
            out_ = model(x)
            loss = F.cross_entropy(out_, y, label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item() * len(y)
            tc += float((out_.argmax(1) == y).sum())
            tn += len(y)
        acc_running = evaluate(model, test)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        bn = Batches(ds.train_x, ds.train_y, 256, shuffle=True, seed=a.seed + 7, max_batches=200)
        oscqat.reestimate_bn(model, bn, num_batches=200)
        acc = evaluate(model, test)
        e = {"epoch": epoch + 1, "loss": tl / tn, "train_acc": 100 * tc / tn, "test_acc_running_bn": acc_running,
             "test_acc": acc, "elapsed_s": time.time() - t0}
        log["epochs"].append(e)
        print(json.dumps(e), flush=True)
        ck = {"model": model.state_dict(), "fp_acc": acc, "test_size": len(ds.test_y), "model_name": a.model,
              "num_classes": ds.num_classes, "in_channels": ds.in_channels, "dataset": ds.name,
              "image_size": list(ds.image_size), "steps": min(steps, (epoch + 1) * len(train)),
              "fp_epochs": len(prev_log) + epoch + 1, "epochs_planned": len(prev_log) + a.epochs, "seed": a.seed,
              "command": command, "init_command": init.get("command") if a.init else None,
              "recipe": vars(a), "train_log": prev_log + log["epochs"], "bn": "re-estimated, 200 x 256 training images"}
        tmp = out.with_suffix(".tmp")
        torch.save(ck, tmp)
        os.replace(tmp, out)
        model.load_state_dict(state)                # continue training from the running statistics
    log.update(final_test_acc=log["epochs"][-1]["test_acc"], seconds=time.time() - t0,
               init_command=ck.get("init_command"), epochs=prev_log + log["epochs"])
    out.with_suffix(".json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
