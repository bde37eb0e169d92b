"""`oscqat` command line: each subcommand lives in its own module exposing add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "toy": ("oscqat.app.toy", "the paper's 1-D toy regression through oscqat's own quantizer and tracker"),
    "train": ("oscqat.app.train", "oscillation-aware QAT of a model on real data, with a report and plots"),
    "eval": ("oscqat.app.evaluate", "re-evaluate a checkpoint, with and without BN re-estimation"),
    "export": ("oscqat.app.export", "write a checkpoint as ONNX (QDQ), encodings JSON and .pt2; check onnxruntime"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="oscqat", description="Oscillation-aware quantization-aware training")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"oscqat {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
