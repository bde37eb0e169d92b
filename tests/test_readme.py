"""README.md's code runs as written: every ```python block is extracted from README.md (not copied here) and run
in a fresh Python, one thread, in an empty folder; the main command's `oscqat train` arguments parse.

Markers (HTML comments on the line before a block, invisible on the rendered page):
  <!-- not-run: REASON -->   a python block that is not meant to run as it stands (REASON must be given);
  <!-- continues-above -->   a python block that runs after the python block above, in the same Python;
  <!-- output-of-above -->   a plain ``` block of output: each of its lines is printed by the python block above.
Any other python block runs on its own, and the test fails when it fails."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
_CONTINUES = re.compile(r"^<!--\s*continues-above\s*-->$")
_OUTPUT = re.compile(r"^<!--\s*output-of-above\s*-->$")


@dataclass
class Block:
    lang: str
    line: int                   # 1-based line of the opening fence
    code: str
    marker: str                 # the line before the fence
    heading: str                # the section it is in


@dataclass
class Program:
    """Python blocks run together (a block and the blocks that continue it) and the output they must print."""
    blocks: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def code(self) -> str:
        return "\n".join(b.code for b in self.blocks)

    @property
    def name(self) -> str:
        return "+".join(f"{b.heading}:{b.line}" for b in self.blocks)


def blocks(text: str) -> list[Block]:
    out, lines, heading, i = [], text.splitlines(), "top", 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip().lower().replace(" ", "-")
        m = _FENCE.match(lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            marker = lines[i - 1].strip() if i else ""
            out.append(Block(m.group(1).lower(), i + 1, "\n".join(lines[i + 1:j]), marker, heading))
            i = j
        i += 1
    return out


def programs(text: str) -> tuple[list[Program], list[Block]]:
    """(the programs to run, the python blocks marked not-run)."""
    progs, skipped, last = [], [], None
    for b in blocks(text):
        if b.lang == "python":
            if _NOT_RUN.match(b.marker):
                skipped.append(b)
                last = None
            elif _CONTINUES.match(b.marker):
                if last is None:
                    raise ValueError(f"README.md:{b.line}: continues-above, but no python block that runs is above")
                last.blocks.append(b)
            else:
                last = Program([b])
                progs.append(last)
        elif _OUTPUT.match(b.marker):
            if last is None:
                raise ValueError(f"README.md:{b.line}: output-of-above, but no python block that runs is above")
            last.outputs.append(b)
    return progs, skipped


PROGRAMS, SKIPPED = programs(README.read_text())


def test_every_python_block_runs_or_says_why_not():
    text = README.read_text()
    python = [b for b in blocks(text) if b.lang == "python"]
    assert python and PROGRAMS, "no ```python block found in README.md"
    assert sum(len(p.blocks) for p in PROGRAMS) + len(SKIPPED) == len(python)
    for b in SKIPPED:
        assert _NOT_RUN.match(b.marker).group(1), f"README.md:{b.line}: not-run needs a reason"
    # the training loop is among the blocks that run
    assert any("oscqat.prepare(" in p.code and "for x, y in loader" in p.code for p in PROGRAMS)
    # the parser itself: markers, continuation and output blocks
    progs, skipped = programs("# a\n```python\nx = 1\n```\n<!-- continues-above -->\n```python\nprint(x)\n```\n"
                              "<!-- output-of-above -->\n```\n1\n```\n"
                              "<!-- not-run: a fragment -->\n```python\ny\n```\n")
    assert [p.code for p in progs] == ["x = 1\nprint(x)"] and progs[0].outputs[0].code == "1"
    assert [b.code for b in skipped] == ["y"]


@pytest.mark.parametrize("prog", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_readme_python_block_runs(prog, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", prog.code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (f"README.md block(s) {prog.name} failed (rc {r.returncode}):\n{prog.code}\n"
                               f"--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-6000:]}")
    for out in prog.outputs:
        for line in out.code.splitlines():
            assert line.rstrip() in r.stdout, (f"README.md:{out.line} shows output that {prog.name} does not "
                                               f"print: {line!r}\n--- stdout ---\n{r.stdout[-4000:]}")


def _main_command() -> str:
    text = README.read_text()
    m = re.search(r"<!-- main-command -->\s*```\s*\n(.*?)\n```\s*\n<!-- /main-command -->", text, re.S)
    assert m, "README.md has no main-command block"
    return m.group(1).strip()


def test_main_command_sets_up_the_data_and_its_job_arguments_parse():
    cmd = _main_command()
    assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0, cmd
    # the data the job describes is set up, or the command says in one line why not
    assert "apt-get install" in cmd and "dataset-fashion-mnist" in cmd and "echo" in cmd
    job = cmd[cmd.index("oscqat train"):]
    argv = shlex.split(job)[1:]
    from oscqat.app.args import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv[1:])
    assert argv[0] == "train" and args.subset == 20000 and args.threads == 1 and args.out == "runs/default"
