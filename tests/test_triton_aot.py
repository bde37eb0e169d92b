"""The Triton kernels compiled ahead of time for sm_80, sm_90 and sm_100 with Triton's bundled ptxas (no GPU):
no compile error, no register spill, no fused multiply-add, only IEEE divisions, and global loads/stores of
aligned fp32/bf16 tensors vectorised to 16 bytes per instruction.

What the launch code asks for is recorded by driving it (oscqat.kernels.triton.aot), not copied here. This test
compiles, for each GPU, every kernel at the launch code's widest tile (2048 elements, 8 per thread: the most
registers) with every state/dampening/tracking flag, for fp32 and bf16, on 16-byte-aligned tensors whose
length is a multiple of 16 (so Triton may vectorise). CI's AOT stage (`python -m
oscqat.kernels.triton.aot`, .ci/run) compiles the larger cover: every feature combination and every tile shape.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.backends.nvidia")

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from oscqat.kernels.triton import aot
    # per-tensor weights of 4096 elements (a 1x2048 tile, as per-channel ones with K >= 2048); activations of 2^20
    log = aot.launches(shapes=[(1, 4096)], ns=[1 << 20], dtypes=(torch.float32, torch.bfloat16))
    cfgs = [c for c in aot.configs(log) if aot.elems_per_program(c) == 2048 or c.kernel == "_finalize_kernel"]
    res = aot.compile_all(cfgs, aot.ARCHS, jobs=2)
    # the launch code on meta tensors, where reading a device value (.item(), a bool of a tensor, .cpu())
    # raises: per-tensor and per-channel weights with multi-program grids (finalize pass), odd sizes
    sync_free = len(aot.launches(shapes=[(1, 100_003), (64, 4096), (3, 12347), (960, 9)], ns=[17, 1 << 20]))
    json.dump(dict(results=res, sync_free_launches=sync_free), open(sys.argv[1], "w"))
""")

# bytes per element of each per-element tensor, read (ld) and written (st), by the bytes model in
# kernels/triton/backend.py with E = element size (fp32 4, bf16 2); states: prev_int/flags int8, freq/ema fp32
E_ARGS = {"w_ptr", "out_ptr", "g_ptr", "gw_ptr", "x_ptr", "y_ptr", "gx_ptr"}


def _expected_width(arg: str, esize: int, per_thread: int) -> int:
    return min(16, per_thread * (esize if arg in E_ARGS else {"prev_ptr": 1, "flags_ptr": 1}.get(arg, 4)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    _table(res["results"])
    return res


def _table(res):
    print(f"\n{'sm':>4} {'regs':>4}  {'kernel':<62} global ld/st bytes per instruction (per-element tensors)")
    for r in sorted(res, key=lambda r: (r["describe"], r["cap"])):
        if "error" in r:
            print(f"{r['cap']:>4}  ERROR {r['describe']}")
            continue
        acc = " ".join(f"{a[:-4]}:{'/'.join(map(str, sorted(set(v['ld'] + v['st']))))}"
                       for a, v in r["args"].items() if a in r["per_element"])
        print(f"{r['cap']:>4} {r['regs']:>4}  {r['describe']:<62} {acc}")


def test_launch_code_never_reads_device_values(results):
    """No host-device synchronisation in the triton backend's launch code: it runs to the end on meta tensors
    (and records launches of all five kernels there, the finalize pass included)."""
    assert results["sync_free_launches"] > 100


def test_every_kernel_compiles_for_sm80_sm90_sm100(results):
    from collections import Counter
    results = results["results"]
    kernels = Counter((r["kernel"], r["cap"]) for r in results)
    for cap in (80, 90, 100):
        for k in ("_weight_fwd_kernel", "_weight_bwd_kernel", "_act_fwd_kernel", "_act_bwd_kernel",
                  "_finalize_kernel"):
            assert kernels[(k, cap)] > 0, f"{k} not compiled for sm_{cap}"
    errors = [f"sm_{r['cap']} {r['describe']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    # every flag combination of each weight kernel, at fp32 and bf16
    assert kernels[("_weight_fwd_kernel", 90)] == 6 * 2 and kernels[("_weight_bwd_kernel", 90)] == 8 * 2


def test_no_spills_no_fma_ieee_division(results):
    results = results["results"]
    bad = [f"sm_{r['cap']} {r['describe']}: {msg}" for r in results if "error" not in r
           for msg in __import__("oscqat.kernels.triton.aot", fromlist=["problems"]).problems(r)]
    assert not bad, "\n".join(bad)
    for r in results:
        if r["kernel"] != "_finalize_kernel":
            assert r["div_rn"] >= 1, f"{r['describe']}: 1/s must be div.rn.f32"
        assert r["regs"] <= 255


def test_aligned_global_accesses_are_vectorised(results):
    """Each per-element tensor moves its 8 elements per thread in 16-byte (8-byte for int8 state)
    instructions: so the bytes model's per-element counts are also the instruction widths."""
    for r in (r for r in results["results"] if r["kernel"] != "_finalize_kernel"):
        esize = 2 if "bf16" in r["describe"].split()[1] else 4
        per_thread = r["elems"] // (32 * r["num_warps"])
        assert per_thread == 8
        for arg in r["per_element"]:
            v = r["args"].get(arg, {"ld": [], "st": []})
            want = _expected_width(arg, esize, per_thread)
            for op in ("ld", "st"):
                if arg == "ema_ptr" and op == "ld" and "TRACK" not in r["describe"].replace("TRACKED", ""):
                    # read only where frozen: a per-weight predicate, one 4-byte load each
                    assert all(w == 4 for w in v[op]), f"{r['describe']}: ema {v[op]}"
                    continue
                assert all(w == want for w in v[op]), f"sm_{r['cap']} {r['describe']}: {arg} {op} {v[op]} != {want}"
            moved = sum(v["ld"]) + sum(v["st"])
            assert moved > 0 or arg == "ema_ptr", f"{r['describe']}: {arg} never accessed"
