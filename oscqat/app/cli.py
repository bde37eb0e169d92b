"""`oscqat` command line: each subcommand lives in its own module exposing add_arguments(parser) and run(args).

Every subcommand takes --threads (THREADS_DEFAULT, one torch CPU thread): the command sets torch's thread count
for its own run and restores it after; the library itself never changes it."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

COMMANDS = {
    "toy": ("oscqat.app.toy", "the paper's 1-D toy regression through oscqat's own quantizer and tracker"),
    "train": ("oscqat.app.train", "oscillation-aware QAT of a model on real data, with a report and plots"),
    "eval": ("oscqat.app.evaluate", "re-evaluate a checkpoint, with and without BN re-estimation"),
    "export": ("oscqat.app.export", "write a checkpoint as ONNX (QDQ), encodings JSON and .pt2; check onnxruntime"),
}
THREADS_DEFAULT = 1
THREADS_HELP = ("torch CPU threads for this command; 0: torch's default, one per core (on a shared or busy machine "
                "those threads wait on each other: several times slower than one) (default: %(default)s)")
EPILOG = (f"Every command takes --threads N (torch CPU threads; default {THREADS_DEFAULT}, 0 = torch's default of "
          f"one per core). `oscqat COMMAND --help` lists a command's options.")


def process_start() -> float:
    """When this process started (time.time() scale; Linux: from /proc), so that a command's "in all" includes
    Python's imports; where that cannot be read, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])      # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return min(time.time(), time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def add_threads_argument(p) -> None:
    """--threads, the same on every subcommand (`p`: a parser or an argument group)."""
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT, help=THREADS_HELP)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="oscqat", description="Oscillation-aware quantization-aware training",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    # only the chosen command's module is imported (`oscqat --help` needs none of them)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            parser.error(f"the {name} command is not installed ({module})")
        modules[name].add_arguments(p)
        if "--threads" not in p._option_string_actions:
            add_threads_argument(p)
    args = parser.parse_args(argv)
    args.argv = argv        # the command line as given (`train --nproc N` relaunches it under torchrun)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        print(f"oscqat {args.command}: error: --threads must be >= 0 (0: torch's default), got {threads}",
              file=sys.stderr)
        return 2
    import torch
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"oscqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.get_num_threads() != before:   # in-process callers (tests) get their setting back
            torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(main())
