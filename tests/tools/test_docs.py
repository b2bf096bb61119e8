"""Every ```python block in README.md and docs/*.md runs as written.

Each block runs on its own, as a reader pastes it: in a fresh subprocess of .venv's python (this interpreter when
there is no .venv), with the repository root as its working directory. A failing block fails its test with the
file and line where the block starts. A block that cannot run here (it needs a GPU, torch, or a checkpoint that is
not in the repository) is written as ```text or ```bash, never as a python block that is skipped.

Also: the README is the short entry point (at most 150 lines), and neither it nor docs/ outside benchmarks.md
logs history (dates, commit hashes): that belongs in git and in docs/benchmarks.md. A hash after "at commit" pins
another project's source (the original JetMoE code in docs/semantics.md) and is allowed.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from paths import ROOT

PYTHON_FENCES = frozenset({"python", "py", "python3"})
BLOCK_TIMEOUT_S = 300  # the slowest block loads the bundled 6.8M model and runs three training steps: seconds
README_MAX_LINES = 150
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")  # hex with a letter and a digit


def doc_files():
    """README.md and docs/*.md, relative to the repository root."""
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return ["README.md", *docs]


def python_blocks(text):
    """[(line, code)] for every fenced block whose info string is python (line: 1-based, the opening fence's).
    An unclosed fence is an error: everything after it would silently stop being checked."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, marker, lang = fence.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start}: a ``` fence that is never closed")
        i += 1
        if lang.lower() in PYTHON_FENCES:
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def interpreter():
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def run_block(path, line, code, cwd=ROOT, timeout=BLOCK_TIMEOUT_S):
    """Run one block in a fresh interpreter; fail naming path:line with the block's stderr."""
    env = {**os.environ, "MPLBACKEND": "Agg"}  # a block that plots writes no window
    try:
        done = subprocess.run([interpreter(), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path}:{line}: the python block did not finish in {timeout} s")
    if done.returncode != 0:
        pytest.fail(f"{path}:{line}: the python block failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def all_blocks():
    found = []
    for path in doc_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        found += [pytest.param(path, line, code, id=f"{path}:{line}") for line, code in python_blocks(text)]
    return found


BLOCKS = all_blocks()


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 3, [b.id for b in BLOCKS]  # the API, training and debugger snippets at least


@pytest.mark.parametrize("path, line, code", BLOCKS)
def test_python_block_runs(path, line, code):
    run_block(path, line, code)


def test_a_failing_block_is_named_by_file_and_line(tmp_path):
    text = "# t\n\n```python\nprint('fine')\n```\n\ntext\n\n```python\nundefined_name + 1\n```\n"
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [3, 9]
    run_block("t.md", 3, blocks[0][1], cwd=tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)t\.md:9: the python block failed.*NameError"):
        run_block("t.md", 9, blocks[1][1], cwd=tmp_path)


def test_other_fences_are_not_run():
    text = "```text\nnot python\n```\n```bash\nmake run\n```\n```\nplain\n```\n"
    assert python_blocks(text) == []


def test_an_unclosed_fence_is_an_error():
    with pytest.raises(ValueError, match="line 2: a ``` fence that is never closed"):
        python_blocks("x\n```python\nprint(1)\n")


def test_the_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        count = len(f.read().splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; move detail to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", [p for p in doc_files() if p != os.path.join("docs", "benchmarks.md")])
def test_no_history_outside_the_benchmark_log(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    found = [f"{path}:{n}: {m.group()}" for n, text in enumerate(lines, 1)
             for m in [*DATE.finditer(text), *COMMIT.finditer(text)]
             if not text[:m.start()].endswith("at commit ")]  # a pin of another project's source is no history
    assert not found, "dates and commit hashes go to docs/benchmarks.md:\n" + "\n".join(found)


LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target


def broken_links(path, text):
    """The relative link targets of a markdown file (path from the repo root) that name no file or folder."""
    broken = []
    for n, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same file
            where = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target.split("#")[0]))
            if not os.path.exists(where):
                broken.append(f"{path}:{n}: {target}")
    return broken


@pytest.mark.parametrize("path", doc_files())
def test_relative_links_name_files_that_exist(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        broken = broken_links(path, f.read())
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_a_broken_link_is_found():
    text = "[ok](docs/usage.md), [web](https://x.org/a), [gone](docs/nothing.md)\n"
    assert broken_links("README.md", text) == ["README.md:1: docs/nothing.md"]
