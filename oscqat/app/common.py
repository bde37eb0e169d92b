"""What `oscqat train`, `oscqat eval` and `oscqat export` share: log lines and progress bars timed from the start
of the run, phases that add their wall time to the report, evaluation, the device, and the training batches
BatchNorm statistics are re-estimated over. Uses only oscqat's public API."""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

from .data import Batches

_START = [time.time()]      # start of the current run: log lines carry the seconds elapsed since


class Progress:
    """tqdm bar when enabled and stdout is a TTY; otherwise (output redirected) a log line every `every` steps
    (default: 10 per epoch) with the elapsed time; nothing when quiet."""

    def __init__(self, total: int, desc: str, quiet: bool, every: int | None = None):
        self.bar = None
        self.quiet = quiet
        self.desc = desc
        self.total = total
        self.n = 0
        self.t0 = time.time()
        self.every = every or max(1, -(-total // 10))
        self.min_gap = 0.0 if every else 10.0      # default: no more than a line per 10 s
        self.last = self.t0
        if not quiet and sys.stdout.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stdout)
            except ImportError:
                pass

    def update(self, **post):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif not self.quiet and self.n % self.every == 0 and self.n < self.total \
                and time.time() - self.last >= self.min_gap:
            self.last = time.time()
            _print(f"{self.desc}: step {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in post.items())
                   + f" ({time.time() - self.t0:.0f} s, {(time.time() - self.t0) / self.n:.2f} s/step)")

    def close(self, **post):
        if self.bar is not None:
            self.bar.set_postfix(post)
            self.bar.close()


class with_progress:
    """`iterable` (with a len) shown as a Progress named `desc` while it is iterated (evaluation and BN
    re-estimation batches): a tqdm bar on a terminal, else a line every 10% (at most one per 10 s)."""

    def __init__(self, iterable, desc: str, args):
        self.iterable, self.desc, self.quiet = iterable, desc, getattr(args, "quiet", False)

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        bar = Progress(len(self.iterable), self.desc, self.quiet)
        try:
            for item in self.iterable:
                yield item
                bar.update()
        finally:
            bar.close()


def _print(msg: str) -> None:
    print(f"[{time.time() - _START[0]:6.0f} s] {msg}", flush=True)


def log(args, msg: str) -> None:
    if not args.quiet:
        _print(msg)


class Phase:
    """`with Phase(args, timings, "prepare_s", "prepare: ..."):` logs the start and the duration of a phase and
    adds the duration to timings[key]."""

    def __init__(self, args, timings: dict, key: str | None, what: str):
        self.args, self.timings, self.key, self.what = args, timings, key, what

    def __enter__(self):
        log(self.args, f"{self.what} ...")
        self.t = time.time()
        return self

    def __exit__(self, exc_type, *_):
        dt = time.time() - self.t
        if self.key is not None:
            self.timings[self.key] = self.timings.get(self.key, 0.0) + dt
        if exc_type is None:
            log(self.args, f"{self.what.split(':')[0]}: done in {dt:.1f} s")
        return False


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


def bn_batches(ds, args, device) -> Batches:
    """The training batches BatchNorm statistics are re-estimated over (FP model and QAT model alike)."""
    return Batches(ds.train_x, ds.train_y, args.batch_size, shuffle=True, seed=args.seed + 777, device=device,
                   max_batches=args.bn_batches)
