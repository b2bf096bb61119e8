"""No history in code: comments and docstrings say what the code does and why, never when or at which commit.

Dates (2026-12-03) and commit hashes (7-40 hex digits with a letter and a digit) are looked for in the comments
and docstrings of reference/, gpu/, jetmoe/ and scripts/ (every .py below them) and in the Makefile's comment
lines. Measured figures and their dates belong in docs/benchmarks.md (append-only rows naming command, commit and
machine); the history of a change belongs in git.
"""

import ast
import io
import os
import re
import tokenize

import pytest

from paths import ROOT

FOLDERS = ("reference", "gpu", "jetmoe", "scripts")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")  # hex with a letter and a digit


def history(text):
    """The dates and commit hashes in a piece of prose."""
    return [m.group() for m in [*DATE.finditer(text), *COMMIT.finditer(text)]]


def python_prose(source):
    """[(line, text)] for every comment and docstring of a module's source."""
    prose = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                prose.append((first.lineno, first.value.value))
    return prose


def makefile_prose(source):
    """[(line, text)] for every comment line of a Makefile."""
    return [(n, line) for n, line in enumerate(source.splitlines(), 1) if line.lstrip().startswith("#")]


def sources():
    found = []
    for folder in FOLDERS:
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            found += [os.path.relpath(os.path.join(dirpath, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(found) + ["Makefile"]


def findings(path, source):
    prose = makefile_prose(source) if path == "Makefile" else python_prose(source)
    return [f"{path}:{line}: {hit}" for line, text in prose for hit in history(text)]


@pytest.mark.parametrize("path", sources())
def test_no_dates_or_commit_hashes_in_comments(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        found = findings(path, f.read())
    assert not found, "history goes to git and docs/benchmarks.md, not into comments:\n" + "\n".join(found)


def test_a_date_or_hash_in_a_comment_or_docstring_is_found():
    source = '"""Module, 2026-12-03."""\n\n\ndef f():\n    """At e9a62c4."""\n    return 0x7F80  # was 3398b19\n'
    assert findings("x.py", source) == ["x.py:6: 3398b19", "x.py:1: 2026-12-03", "x.py:5: e9a62c4"]
    assert findings("Makefile", "# run 2026-12-02\nall:\n\techo 2026-12-02\n") == ["Makefile:1: 2026-12-02"]


def test_code_and_plain_numbers_are_not_history():
    source = 'x = "2026-12-03"  # sizes: 32000 1024, dtype bf16, 0x7F80, deadbeef\n'
    assert findings("x.py", source) == []
