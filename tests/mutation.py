"""Mutation run: do the fast semantic tests fail when the code that implements docs/semantics.md is changed?

    OMP_NUM_THREADS=1 python tests/mutation.py [--files ops/reference.py,ops/library.py] [--timeout 60] [--json PATH]

Not collected by pytest (the name does not start with test_). Results of the last run and the explanation of
every survivor: tests/mutation_results.md.

How: the package (oscqat/, with kernels/ as oscqat/kernels/, as it is installed) and tests/ are copied to a
temporary directory; each mutant is one AST change (operator swap, comparison
boundary, constant +-1 / x0.5, round -> floor and similar, swapped call arguments, a deleted statement) written
into the copy, never into the working tree. A parent process imports torch and pytest once and forks one child
per mutant, which imports `oscqat` and `oscqat.kernels` from the copy (checked through their `__file__`) and
runs the tests with -x: the file's own tests (EXTRA_TESTS) first, then the rules tests (TESTS); for
ops/reference.py on the `torch` backend only (the cpp and triton parametrisations test another implementation
against it). A mutant is killed when a test fails, the import fails, or it exceeds the per-mutant timeout.

Scope: the functions that implement the semantics' rules, listed in SCOPE (keys: paths under oscqat/; None: the
whole file). Left out: argument validation and error messages (`raise` statements, f-strings), the fake/meta
shape functions (ops/fakes.py and the `fakes.register` call of ops/library.py, exercised only by torch.compile),
the compiled-only paths, state-dict plumbing; tests/test_layers.py and tests/test_robustness.py cover those and
are too slow to run per mutant.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_rules_reference.py", "tests/test_rules_modules.py", "tests/test_semantics.py"]
# run before TESTS for that file's mutants: the fast tests that pin the rules its code implements
_WEIGHT_CHANGED = "tests/test_detection.py::test_a_weight_changed_behind_the_quantizers_back_is_an_error"
EXTRA_TESTS = {
    # decode_flags / uninitialised, all 256 values (the file's other test runs the other backends against this one)
    "ops/reference.py": ["tests/test_flag_encoding.py::test_reference_decodes_every_value_by_the_rule"],
    # WeightQuantFn's C++ branch: eager modules use the C++ autograd op instead, so only these reach it
    "ops/library.py": [f"tests/test_cpp_parity.py::{t}" for t in (
        "test_weight_quant_fn_on_the_cpp_ops_catches_state_mutated_before_backward",
        "test_custom_ops_run_the_cpp_kernels", "test_weight_quant_op_matches_the_python_function")],
    "nn/quantizers.py": [_WEIGHT_CHANGED],
    "nn/state_check.py": ["tests/test_checkpoint_validation.py"],
    "nn/batchnorm.py": ["tests/test_fold_rules.py"],
    "training/schedule.py": [_WEIGHT_CHANGED],
    "training/transition.py": ["tests/test_transition.py"],
}
# mutants of the reference kernels are tested on the `torch` backend only (the cpp and triton parametrisations
# test another implementation against the mutant); the wiring in ops/library.py and nn/quantizers.py has a path
# per backend, so both run there
TORCH_ONLY = {"ops/reference.py"}
TORCH_ONLY_K = "not cpp and not triton"
SCOPE = {
    "ops/reference.py": None,
    "ops/library.py": {"_impl", "_bump", "_floor", "weight_fwd", "weight_fwd_track", "weight_bwd",
                       "WeightQuantFn.forward", "WeightQuantFn.backward", "quantize_weight", "act_fwd", "act_bwd",
                       "ActQuantFn.forward", "ActQuantFn.backward"},
    "nn/quantizers.py": {"<module>", "_FirstForwardChecks.arm", "_FirstForwardChecks._is_first",
                         "_FirstForwardChecks._first_forward", "WeightQuantizer.__init__", "WeightQuantizer.qmin",
                         "WeightQuantizer.qmax", "WeightQuantizer.forward", "WeightQuantizer._begin",
                         "WeightQuantizer._end", "WeightQuantizer.frozen",
                         "WeightQuantizer.frozen_int", "WeightQuantizer.last_dir", "WeightQuantizer.int_weight",
                         "QuantAct.__init__", "QuantAct.qmin", "QuantAct.qmax", "QuantAct.forward"},
    "nn/state_check.py": None,
    "nn/batchnorm.py": None,
    "training/schedule.py": {"arm_tracking", "cosine_ramp", "QATSchedule.ramp", "QATSchedule.freeze_threshold",
                             "QATSchedule.lam", "QATSchedule._apply", "QATSchedule.step",
                             "QATSchedule.load_state_dict"},
    "training/dampening.py": None,
    "training/transition.py": {"<module>", "target_rate", "TransitionRateSchedule.target",
                               "TransitionRateSchedule.last_rate", "TransitionRateSchedule.last_rates",
                               "TransitionRateSchedule.mu", "TransitionRateSchedule.lr",
                               "TransitionRateSchedule._update_lr", "TransitionRateSchedule.step",
                               "TransitionRateSchedule._control", "TransitionRateSchedule._feedforward"},
}

BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
         ast.Pow: ast.Mult, ast.Mod: ast.Mult, ast.RShift: ast.LShift, ast.LShift: ast.RShift,
         ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
CALLS = {"round": "floor", "floor": "ceil", "ceil": "floor", "clamp_min": "clamp_max", "clamp_max": "clamp_min",
         "maximum": "minimum", "minimum": "maximum", "max": "min", "min": "max", "any": "all", "all": "any",
         "sum": "mean", "sign": "neg", "exp": "log", "cos": "sin", "sqrt": "abs"}


# ---------------------------------------------------------------- finding the mutation sites
def _walk(tree: ast.Module):
    """(node, qualname) in a fixed depth-first order, skipping what is never mutated (docstrings, f-strings,
    raise and assert statements, decorators, signatures with their defaults, annotations, imports)."""
    def visit(node, qual, stack):
        yield node, qual
        for field, value in ast.iter_fields(node):
            if field in ("decorator_list", "returns", "annotation", "type_comment") or isinstance(value, ast.arguments):
                continue
            children = value if isinstance(value, list) else [value]
            for i, child in enumerate(children):
                if not isinstance(child, ast.AST):
                    continue
                if isinstance(child, (ast.Raise, ast.JoinedStr, ast.Import, ast.ImportFrom, ast.Assert)):
                    continue
                if (field == "body" and i == 0 and isinstance(child, ast.Expr)
                        and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str)):
                    continue                                   # docstring
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    yield from visit(child, ".".join(stack + [child.name]), stack + [child.name])
                else:
                    yield from visit(child, qual, stack)
    yield from visit(tree, "<module>", [])


def _in_scope(qual: str, scope) -> bool:
    if scope is None:
        return True
    if qual in scope:
        return True
    # a method's nested code belongs to the method
    return any(qual.startswith(s + ".") for s in scope if s != "<module>")


def _mutations(node):
    """[(description, mutate(node_in_copy, parent_list_info) -> None)] for one node."""
    out = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP:
        new = BINOP[type(node.op)]
        out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOP:
                new = CMPOP[type(op)]

                def f(n, i=i, new=new):
                    n.ops[i] = new()
                out.append((f"{type(op).__name__} -> {new.__name__}", f))
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    if isinstance(node, ast.IfExp):
        out.append(("`a if c else b` -> `b`", lambda n: setattr(n, "body", n.orelse)))
    if isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v} -> {not v}", lambda n: setattr(n, "value", not n.value)))
        elif isinstance(v, int):
            out += [(f"{v} -> {v + 1}", lambda n: setattr(n, "value", n.value + 1)),
                    (f"{v} -> {v - 1}", lambda n: setattr(n, "value", n.value - 1))]
        elif isinstance(v, float):
            out.append((f"{v!r} -> {v + 1.0!r}", lambda n: setattr(n, "value", n.value + 1.0)))
            if v != 0.0:
                out.append((f"{v!r} -> {v * 0.5!r}", lambda n: setattr(n, "value", n.value * 0.5)))
    if isinstance(node, ast.Call):
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
        if name in CALLS:
            new = CALLS[name]

            def f(n, new=new):
                if isinstance(n.func, ast.Attribute):
                    n.func.attr = new
                else:
                    n.func.id = new
            out.append((f"{name}() -> {new}()", f))
        pos = [a for a in node.args if not isinstance(a, ast.Starred)]
        if len(pos) >= 2 and len(pos) == len(node.args):
            out.append(("swap the first two arguments",
                        lambda n: n.args.__setitem__(slice(0, 2), [n.args[1], n.args[0]])))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        out.append((f"drop {type(node.op).__name__}", "unwrap"))
    for field in ("body", "orelse"):
        stmts = getattr(node, field, None)
        if not isinstance(stmts, list) or isinstance(node, ast.IfExp):
            continue
        for i, st in enumerate(stmts):
            deletable = (isinstance(st, ast.Expr) and isinstance(st.value, ast.Call)) or isinstance(st, ast.AugAssign) \
                or (isinstance(st, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in st.targets))
            if deletable:
                def f(n, field=field, i=i):
                    getattr(n, field)[i] = ast.Pass()
                out.append((f"delete statement `{ast.unparse(st)[:60]}`", f))
    return out


class _Unwrap(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return node.operand if node is self.target else node


def sites(path: Path, scope, key: str):
    tree = ast.parse(path.read_text())
    found = []
    for idx, (node, qual) in enumerate(_walk(tree)):
        if not _in_scope(qual, scope):
            continue
        for k, (desc, _) in enumerate(_mutations(node)):
            found.append({"file": key, "node": idx, "k": k, "qual": qual,
                          "line": getattr(node, "lineno", 0), "desc": desc})
    return tree, found


def mutant_source(tree: ast.Module, site) -> str:
    t = copy.deepcopy(tree)
    node = next(n for i, (n, _) in enumerate(_walk(t)) if i == site["node"])
    _, fn = _mutations(node)[site["k"]]
    if fn == "unwrap":
        t = _Unwrap(node).visit(t)
    else:
        fn(node)
    return ast.unparse(ast.fix_missing_locations(t))


# ---------------------------------------------------------------- running
def run_child(pkg_root: Path, tests: list[str], log: Path, timeout: float, torch_only: bool) -> tuple[str, float]:
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:                                   # child: import the copy, run the tests, exit with pytest's code
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.dont_write_bytecode = True
            sys.path.insert(0, str(pkg_root))
            import oscqat
            import oscqat.kernels
            print(f"mutation: oscqat imported from {oscqat.__file__}, oscqat.kernels from "
                  f"{oscqat.kernels.__file__}", flush=True)
            if not all(m.__file__.startswith(str(pkg_root)) for m in (oscqat, oscqat.kernels)):
                os._exit(99)
            import pytest
            rc = pytest.main([*[str(pkg_root / t) for t in tests], "-x", "-q", "-p", "no:cacheprovider",
                              *(["-k", TORCH_ONLY_K] if torch_only else []), "--rootdir", str(pkg_root)])
            sys.stdout.flush()
            os._exit(int(rc))
        except BaseException:
            import traceback
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(98)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - t0
        time.sleep(0.05)
    if rc == 99:
        raise SystemExit(f"mutation: the child imported oscqat from outside {pkg_root}; see {log}")
    return ("survived" if rc == 0 else f"killed (rc {rc})"), time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default=",".join(SCOPE),
                    help="comma-separated files to mutate, paths under oscqat/ (keys of SCOPE)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--json", default="", help="write every mutant and its outcome here")
    ap.add_argument("--limit", type=int, default=0, help="only the first N mutants (a smoke run)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the copy and the per-mutant logs")
    ap.add_argument("--only-survivors", default="", metavar="JSON",
                    help="run only the mutants that survived in this earlier --json output (same sources)")
    args = ap.parse_args(argv)

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy  # noqa: F401  (imported once here, inherited by every child)
    import pytest  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401
    try:
        import torchvision  # noqa: F401  (tests/test_detection.py imports it; once here, not per mutant)
    except ImportError:
        pass
    torch.set_num_threads(1)

    files = [f for f in args.files.split(",") if f]
    unknown = [f for f in files if f not in SCOPE]
    if unknown:
        ap.error(f"not in SCOPE: {unknown}; one of {sorted(SCOPE)}")
    all_sites, trees = [], {}
    for f in files:
        trees[f], found = sites(ROOT / "oscqat" / f, SCOPE[f], f)
        all_sites += found
    if args.only_survivors:
        keys = {(s["file"], s["node"], s["k"]) for s in json.loads(Path(args.only_survivors).read_text())
                if s["outcome"] == "survived"}
        all_sites = [s for s in all_sites if (s["file"], s["node"], s["k"]) in keys]
    if args.limit:
        all_sites = all_sites[:args.limit]
    if args.list:
        for s in all_sites:
            print(f"{s['file']}:{s['line']} {s['qual']}: {s['desc']}")
        print(f"mutation: {len(all_sites)} mutants")
        return 0

    work = Path(tempfile.mkdtemp(prefix="oscqat-mutation-"))
    pkg = work / "oscqat"
    shutil.copytree(ROOT / "oscqat", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # kernels/ is installed as oscqat.kernels (setup.py): in the copy it sits where that name resolves
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    # the tests too, as they are now: editing them during a run must not change what the run measures
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work)
    for f in files:
        (pkg / f).write_text(ast.unparse(trees[f]))          # unparsed once, as every mutant is
    logs = work / "logs"
    logs.mkdir()
    print(f"mutation: copy of oscqat/ (+ kernels/) and tests/ in {work} (the working tree is never written)",
          flush=True)
    try:
        return _run(args, files, all_sites, trees, work, pkg, logs)
    finally:
        if not args.keep:
            shutil.rmtree(work)


def _run(args, files, all_sites, trees, work, pkg, logs) -> int:
    print(f"mutation: {len(all_sites)} mutants in {', '.join(files)}", flush=True)

    base_tests = list(dict.fromkeys([t for f in files for t in EXTRA_TESTS.get(f, [])] + TESTS))
    outcome, secs = run_child(work, base_tests, logs / "baseline.log", 600, torch_only=False)
    base_log = (logs / "baseline.log").read_text().strip().splitlines()
    print(f"mutation: baseline (unmutated copy) {outcome} in {secs:.1f} s: {base_log[0]}; {base_log[-1]}", flush=True)
    if outcome != "survived":
        print((logs / "baseline.log").read_text()[-3000:])
        return 1

    t_start = time.monotonic()
    for i, site in enumerate(all_sites):
        f = site["file"]
        (pkg / f).write_text(mutant_source(trees[f], site))
        tests = list(dict.fromkeys(EXTRA_TESTS.get(f, []) + TESTS))
        site["outcome"], site["seconds"] = run_child(work, tests, logs / f"{i}.log", args.timeout,
                                                     torch_only=f in TORCH_ONLY)
        (pkg / f).write_text(ast.unparse(trees[f]))
        if site["outcome"] == "survived":
            print(f"  SURVIVED {f}:{site['line']} {site['qual']}: {site['desc']}", flush=True)
        if (i + 1) % 25 == 0:
            print(f"mutation: {i + 1}/{len(all_sites)} done, {time.monotonic() - t_start:.0f} s", flush=True)

    killed = [s for s in all_sites if s["outcome"] != "survived"]
    print(f"\nmutation: {len(killed)}/{len(all_sites)} killed ({100 * len(killed) / max(1, len(all_sites)):.1f}%), "
          f"{sum(s['outcome'] == 'timeout' for s in all_sites)} by timeout, {time.monotonic() - t_start:.0f} s")
    for f in files:
        fs = [s for s in all_sites if s["file"] == f]
        print(f"  {f}: {sum(s['outcome'] != 'survived' for s in fs)}/{len(fs)} killed")
    for s in all_sites:
        if s["outcome"] == "survived":
            print(f"  survivor {s['file']}:{s['line']} {s['qual']}: {s['desc']}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_sites, indent=1))
    if args.keep:
        print(f"mutation: logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
