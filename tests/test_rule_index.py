"""docs/semantics.md names the tests of each of its rules: every rule section (each `##` and `###` heading) ends
with a paragraph

    Tested by: `tests/test_x.py::test_name`, `tests/test_y.py::TestClass`, ...

and every test named there exists (the file, and a test function or class of that name at its top level).
tests/README.md, the index of the test files, names every tests/test_*.py."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEMANTICS = ROOT / "docs" / "semantics.md"
_HEADING = re.compile(r"^(#{2,3})\s+(.+?)\s*$")
_REF = re.compile(r"`(tests/[\w/.-]+\.py)::(\w+)`")


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines up to the next ## or ### heading) for every ## / ### heading outside fenced code."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line)
        if m:
            out.append((m.group(2), []))
        elif out:
            out[-1][1].append(line)
    return out


def named_tests_paragraph(lines: list[str]) -> list[str] | None:
    """The text of the section's `Tested by:` paragraph (its line and the non-blank lines after it), or None."""
    for i, line in enumerate(lines):
        if line.startswith("Tested by:"):
            para = [line[len("Tested by:"):]]
            for more in lines[i + 1:]:
                if not more.strip():
                    break
                para.append(more)
            return para
    return None


def defined_tests(path: Path) -> set[str]:
    """The test functions and test classes defined at the top level of a test file."""
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body
            if (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test"))
            or (isinstance(n, ast.ClassDef) and n.name.startswith("Test"))}


def problems(text: str, root: Path = ROOT) -> list[str]:
    """What is wrong with the `Tested by:` lines of a semantics page: a rule section without one, one that names
    no test, an entry that is not `tests/...py::name`, a file or a test that does not exist."""
    out, names = [], {}
    secs = sections(text)
    if not secs:
        return ["no ## / ### section found"]
    for heading, lines in secs:
        para = named_tests_paragraph(lines)
        if para is None:
            out.append(f"{heading!r}: no 'Tested by:' line")
            continue
        body = " ".join(para)
        refs = _REF.findall(body)
        rest = _REF.sub("", body).replace(",", "").replace(".", "").strip()
        if not refs:
            out.append(f"{heading!r}: 'Tested by:' names no test")
        if rest:
            out.append(f"{heading!r}: 'Tested by:' holds something other than `tests/...py::name` entries: {rest!r}")
        for file, name in refs:
            path = root / file
            if file not in names:
                names[file] = defined_tests(path) if path.is_file() else None
            if names[file] is None:
                out.append(f"{heading!r}: {file} does not exist")
            elif name not in names[file]:
                out.append(f"{heading!r}: {file} defines no test {name}")
    return out


def test_every_rule_section_names_tests_that_exist():
    found = problems(SEMANTICS.read_text())
    assert not found, "docs/semantics.md:\n" + "\n".join(found)


def test_the_checker_fails_on_a_wrong_or_missing_name():
    a = "tests/test_rule_index.py::test_tests_readme_names_every_test_file"
    b = "tests/test_rule_index.py::test_every_rule_section_names_tests_that_exist"
    good = f"## A rule\ntext\n\nTested by: `{a}`,\n`{b}`.\n"
    assert problems(good) == []
    assert problems(good.replace(a, a + "_wrong")) == [
        "'A rule': tests/test_rule_index.py defines no test test_tests_readme_names_every_test_file_wrong"]
    assert problems(good.replace(a, "tests/test_no_such_file.py::test_x")) == [
        "'A rule': tests/test_no_such_file.py does not exist"]
    assert problems(good + "\n### A sub-rule\nno line here\n") == ["'A sub-rule': no 'Tested by:' line"]
    assert problems("## A rule\n\nTested by: nothing yet\n")[0] == "'A rule': 'Tested by:' names no test"
    assert problems(good.replace("`,\n", "`, some words,\n")) == [
        "'A rule': 'Tested by:' holds something other than `tests/...py::name` entries: 'some words'"]
    # a heading inside a fenced block is not a section; a `Tested by:` paragraph ends at a blank line
    assert problems("```\n## not a heading\n```\n" + good) == []
    assert problems(good + "\nA later paragraph, not a list of tests.\n") == []


def test_tests_readme_names_every_test_file():
    readme = (ROOT / "tests" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name not in readme]
    assert not missing, f"tests/README.md does not name {missing}"
