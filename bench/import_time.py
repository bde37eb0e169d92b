"""What `import oscqat` costs on top of `import torch`: the median over fresh interpreters, one thread.

    OMP_NUM_THREADS=1 python bench/import_time.py [--runs 9] [--markdown PATH] [--label NAME]

Each run is one `python -X importtime -c "import torch; import oscqat"`: `import torch` first, so the `oscqat` line's
cumulative time is what oscqat adds (its own modules and the parts of torch it imports that `import torch` does
not). Runs alternate with `python -c "import torch"` and `python -c "import torch; import oscqat"` timed from
outside (wall clock of the whole interpreter), whose difference of medians is the same cost seen by a CLI call.
Also lists the heavy optional modules the import pulls in (torch._dynamo, triton, onnx, matplotlib, sympy).
Results: bench/results/cpu/import_time.md.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HEAVY = ("torch._dynamo", "torch._inductor", "triton", "onnx", "onnxscript", "onnxruntime", "matplotlib", "sympy")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _importtime_us(code: str) -> dict[str, int]:
    """Cumulative microseconds of the top-level imports of one `python -X importtime -c code`."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                       env=_env(), check=True)
    out = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)   # depth 0: no indent before the name
        if m:
            out[m.group(2)] = int(m.group(1))
    return out


def _wall_s(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True)
    return time.perf_counter() - t


def measure(runs: int) -> dict:
    rows = {"torch_importtime_s": [], "oscqat_importtime_s": [], "torch_wall_s": [], "torch_oscqat_wall_s": []}
    for _ in range(runs):
        t = _importtime_us("import torch; import oscqat")
        rows["torch_importtime_s"].append(t["torch"] / 1e6)
        rows["oscqat_importtime_s"].append(t["oscqat"] / 1e6)
        rows["torch_wall_s"].append(_wall_s("import torch"))
        rows["torch_oscqat_wall_s"].append(_wall_s("import torch; import oscqat"))
    med = {k: statistics.median(v) for k, v in rows.items()}
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; before = set(sys.modules); import oscqat; "
                            f"print(oscqat.__file__); print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"],
                           capture_output=True, text=True, env=_env(), check=True).stdout.splitlines()
    return dict(runs=runs, median=med, all=rows, oscqat_file=probe[0],
                heavy_imported=probe[1].split() if len(probe) > 1 else [])


def markdown(res: dict, label: str) -> str:
    m = res["median"]
    return (f"| {label} | {m['torch_importtime_s']:.3f} | {m['oscqat_importtime_s']:.3f} | {m['torch_wall_s']:.2f} | "
            f"{m['torch_oscqat_wall_s']:.2f} | {m['torch_oscqat_wall_s'] - m['torch_wall_s']:+.2f} | "
            f"{', '.join(res['heavy_imported']) or 'none'} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--markdown", help="append the result row to this file")
    a = ap.parse_args(argv)
    res = measure(a.runs)
    print(f"oscqat from {res['oscqat_file']}; {a.runs} runs, medians (s): {res['median']}")
    row = markdown(res, a.label)
    print("| tree | import torch (importtime) | oscqat on top (importtime) | python -c 'import torch' (wall) | "
          "... + import oscqat (wall) | difference | heavy modules imported |")
    print(row)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
