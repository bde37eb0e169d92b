#!/usr/bin/env bash
# Wheel smoke test: build the wheel against the installed torch (--no-build-isolation), install it into a fresh
# venv that reuses this interpreter's packages (torch is not downloaded again), and check, from outside the
# source tree, that oscqat imports from the venv, that oscqat._C loaded and registered its ops, and that one
# `cpp` op gives the reference's bits. Works from a plain interpreter and from inside a virtualenv.
# Usage: bash tests/wheel_smoke.sh      (PYTHON=... to pick the interpreter; exit status 0 = ok)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "wheel_smoke: building the wheel"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/dist" .
wheel=$(ls "$tmp"/dist/oscqat-*.whl)
echo "wheel_smoke: $(basename "$wheel")"
# --system-site-packages reaches the *base* interpreter's packages, which is not enough where $PY itself runs in
# a virtualenv (CI inside a venv): a .pth file appends $PY's own site directories too, after the venv's own
# (oscqat comes from the wheel) and without running their .pth files (an editable oscqat stays out).
"$PY" -m venv --system-site-packages "$tmp/venv"
inner_site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" - >"$inner_site/_wheel_smoke_outer.pth" <<'PYEOF'
import os, site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print("\n".join(d for d in dirs if os.path.isdir(d)))
PYEOF
"$tmp/venv/bin/python" -m pip install -q --no-deps --no-index --ignore-installed "$wheel"

cd "$tmp"
"$tmp/venv/bin/python" - <<'PYEOF'
import os
import sys

import torch

import oscqat
from oscqat.ops import backends as backend, cpp as cpp_backend, reference as ref

here = os.path.realpath(oscqat.__file__)
assert here.startswith(os.path.realpath(sys.prefix)), f"oscqat imported from {here}, not from the venv"
assert cpp_backend._C is not None, f"oscqat._C did not load: {cpp_backend._LOAD_ERROR}"
import oscqat._C  # noqa: E402
import oscqat.kernels  # noqa: E402,F401  (kernels/ is packaged as oscqat.kernels)
backend.check("cpp", "cpu")

gen = torch.Generator().manual_seed(0)
w = torch.randn(8, 3, 3, 3, generator=gen) * 0.2
scale = torch.rand(8, generator=gen) * 0.05 + 0.02
state = dict(prev_int=torch.zeros(w.shape, dtype=torch.int8), flags=torch.full(w.shape, -128, dtype=torch.int8),
             freq=torch.zeros(w.shape), ema=torch.zeros(w.shape))
outs = []
for impl in (cpp_backend, ref):
    st = {k: v.clone() for k, v in state.items()}
    for _ in range(2):  # initialise, then track
        w_hat, d, counts = impl.weight_fwd_track(w, scale, st["prev_int"], st["flags"], st["freq"], st["ema"],
                                                 torch.tensor(0.01), -8, 7, 0.01, True, 27.0)
    outs.append((w_hat, counts, *st.values()))
for a, b in zip(*outs):
    assert a.dtype == b.dtype and torch.equal(a, b), "cpp and reference differ"
so = os.path.basename(oscqat._C.__file__)
kernels = "CPU+CUDA" if torch._C._dispatch_has_kernel_for_dispatch_key("oscqat_C::weight_fwd", "CUDA") else "CPU"
print(f"wheel_smoke: ok (oscqat {oscqat.__version__} from {os.path.dirname(here)}, {so}, {kernels} kernels, "
      f"torch {torch.__version__} from {os.path.dirname(torch.__file__)})")
PYEOF
