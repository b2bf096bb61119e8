"""Who may import what, read from the source with `ast` (nothing is imported or run):

- reference/ (the semantics): numpy, safetensors, ml_dtypes, tokenizers, the standard library and itself;
- gpu/ (the CuPy twin): reference, cupy, cudasim, numpy, the standard library and itself (bf16 via
  reference.io.safetensors.BF16); cupy and cudasim only in gpu/device.py, whose require_cupy() hands out one of them;
- cudasim/ (the CPU execution backend for CUDA C++): numpy, the standard library and itself (it knows no JetMoE);
- notebooks/*.ipynb never import jetmoe (the command-line package): they walk through reference/ and gpu/;
- no import cycle among the project's modules (reference, gpu, cudasim, jetmoe), imports inside functions included.

An import is `import x`, `from x import y` (a relative `from . import y` is the package itself), or a call
`importlib.import_module("x")` / `import_module("x")` / `__import__("x")`; a dynamic import whose module is not a
string constant cannot be checked, so it is reported too. Imports inside functions count as well.
"""

import ast
import json
import os
import sys

import pytest

from paths import ROOT

STDLIB = frozenset(sys.stdlib_module_names)
ALLOWED = {  # package -> third-party top-level modules it may import (besides the standard library and itself)
    "reference": frozenset({"numpy", "safetensors", "ml_dtypes", "tokenizers"}),
    "gpu": frozenset({"reference", "cupy", "cudasim", "numpy"}),
    "cudasim": frozenset({"numpy"}),
}
ARRAY_MODULES = frozenset({"cupy", "cudasim"})  # imported in gpu/ by gpu/device.py alone
NOTEBOOK_FORBIDDEN = frozenset({"jetmoe"})
DYNAMIC = "<a module computed at run time>"


def dynamic_import(call):
    """The module a call imports: its name for importlib.import_module / import_module / __import__ with a string
    constant, "." + name when import_module gets a relative name, DYNAMIC for a non-constant, None when the call is
    not an import."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "importlib":
        name = func.attr
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return None
    if name not in ("import_module", "__import__"):
        return None
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return DYNAMIC


def imported_modules(source, filename="<string>"):
    """-> [(line, module)] for every import in `source`, in order; relative imports come back starting with '.'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call) and (module := dynamic_import(node)) is not None:
            found.append((node.lineno, module))
    return sorted(found)


def forbidden_imports(source, filename, allowed):
    """-> ["<filename>:<line>: imports <module>"] for each import of `source` whose top-level module fails
    `allowed(top_level_name)` (relative imports never do: they are the package itself)."""
    return [f"{filename}:{line}: imports {module}" for line, module in imported_modules(source, filename)
            if not module.startswith(".") and not allowed(module.split(".")[0])]


def package_violations(package, source, filename):
    return forbidden_imports(source, filename, lambda top: top in STDLIB or top in ALLOWED[package] or top == package)


def notebook_violations(source, filename):
    return forbidden_imports(source, filename, lambda top: top not in NOTEBOOK_FORBIDDEN)


def python_files(package):
    """Every .py file under ROOT/<package>, recursively, as paths relative to ROOT."""
    files = []
    for folder, dirs, names in os.walk(os.path.join(ROOT, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in sorted(names) if n.endswith(".py")]
    return files


def notebook_cells(path):
    """-> [(cell number, code)] of a notebook's code cells, without IPython's %magic and !shell lines."""
    with open(path, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    out = []
    for number, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        lines = (source if isinstance(source, str) else "".join(source)).splitlines()
        out.append((number, "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)))
    return out


# ------------------------------------------------------------------------------------------------ the repository

@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    files = python_files(package)
    assert f"{package}/__init__.py" in files, f"no {package}/__init__.py under {ROOT}: the walk found {files}"
    problems = []
    for name in files:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            problems += package_violations(package, f.read(), name)
    allowed = ", ".join(sorted(ALLOWED[package] | {package}))
    assert not problems, (f"{package}/ may import only {allowed} and the standard library:\n  "
                          + "\n  ".join(problems))


def test_only_gpu_device_imports_the_array_module():
    problems = []
    for name in python_files("gpu"):
        if name == os.path.join("gpu", "device.py"):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            problems += forbidden_imports(f.read(), name, lambda top: top not in ARRAY_MODULES)
    assert not problems, "gpu/ gets CuPy or cudasim from gpu/device.py's require_cupy() only:\n  " + "\n  ".join(
        problems)


def test_notebooks_never_import_jetmoe():
    folder = os.path.join(ROOT, "notebooks")
    notebooks = sorted(n for n in os.listdir(folder) if n.endswith(".ipynb"))
    assert notebooks, f"no notebooks in {folder}"
    problems = []
    for name in notebooks:
        for number, code in notebook_cells(os.path.join(folder, name)):
            where = f"notebooks/{name} cell {number}"
            try:
                problems += notebook_violations(code, where)
            except SyntaxError as e:
                problems.append(f"{where}: does not parse as Python ({e.msg}, line {e.lineno})")
    assert not problems, "notebooks must not import jetmoe (the command-line package):\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------------------------------------ the checker itself

SYNTHETIC = '''
import os
import numpy as np
from . import trace
from .kernels import kernel
import reference.rope
from safetensors.numpy import load_file
import torch
from transformers import AutoModel


def load(name):
    import cupy
    importlib.import_module("transformers.models.jetmoe")
    __import__("torch.nn")
    import_module(".norm", package="reference")
    return importlib.import_module(name)
'''


def test_checker_reports_forbidden_imports():
    # Line numbers in SYNTHETIC: 8 torch, 9 transformers, 13 cupy, 14 and 15 dynamic, 17 non-constant.
    assert package_violations("reference", SYNTHETIC, "reference/fake.py") == [
        "reference/fake.py:8: imports torch",
        "reference/fake.py:9: imports transformers",
        "reference/fake.py:13: imports cupy",
        "reference/fake.py:14: imports transformers.models.jetmoe",
        "reference/fake.py:15: imports torch.nn",
        f"reference/fake.py:17: imports {DYNAMIC}",
    ]
    # cudasim/ knows no JetMoE: reference (line 6) and the rest are refused
    assert package_violations("cudasim", SYNTHETIC, "cudasim/fake.py")[:2] == [
        "cudasim/fake.py:6: imports reference.rope", "cudasim/fake.py:7: imports safetensors.numpy"]
    # gpu/ may use cupy and reference, not safetensors
    assert package_violations("gpu", SYNTHETIC, "gpu/fake.py") == [
        "gpu/fake.py:7: imports safetensors.numpy",
        "gpu/fake.py:8: imports torch",
        "gpu/fake.py:9: imports transformers",
        "gpu/fake.py:14: imports transformers.models.jetmoe",
        "gpu/fake.py:15: imports torch.nn",
        f"gpu/fake.py:17: imports {DYNAMIC}",
    ]
    # control: what each package may import passes
    assert package_violations("reference", "import json\nimport ml_dtypes\nimport tokenizers\nfrom .config import X\n"
                              "import reference.norm\n", "reference/ok.py") == []
    assert package_violations("gpu", "import cupy\nfrom reference.io import trace\nfrom ..device import x\n",
                              "gpu/kernels/ok.py") == []


def test_notebook_checker_reports_jetmoe(tmp_path):
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["from jetmoe import cli  (prose, not code)"]},
        {"cell_type": "code", "source": ["%matplotlib inline\n", "!pip install x\n", "import reference\n"]},
        {"cell_type": "code", "source": "import numpy as np\nfrom jetmoe.debug import reference_trace\n"},
        {"cell_type": "code", "source": ["    %time x = 1\n", "mod = importlib.import_module('jetmoe')"]},
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(notebook))
    cells = notebook_cells(str(path))
    assert [number for number, _ in cells] == [1, 2, 3]
    assert [notebook_violations(code, f"cell {number}") for number, code in cells] == [
        [], ["cell 2:2: imports jetmoe.debug"], ["cell 3:2: imports jetmoe"]]


# ------------------------------------------------------------------------------------------- import cycles

PROJECT = ("reference", "gpu", "cudasim", "jetmoe")


def module_name(path):
    # reference/model.py -> reference.model, gpu/__init__.py -> gpu
    name = path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def module_imports(name, source, modules):
    """The project modules `name` imports: `from . import x` names the submodule x (not the package), and
    `from .m import f` the module m."""
    package = name if name in modules and any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return {m for m in found if m in modules and m != name}


def import_cycles(graph):
    """Every cycle of a {module: imported modules} graph, each as a list closed on its first module."""
    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycle = path[path.index(node):] + [node]
            if not any(set(cycle) == set(c) for c in cycles):
                cycles.append(cycle)
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return cycles


def project_graph():
    paths = {module_name(p): p for package in PROJECT for p in python_files(package)}
    graph = {}
    for name, path in paths.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            graph[name] = module_imports(name, f.read(), paths)
    return graph


def test_no_import_cycles():
    cycles = import_cycles(project_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_names_a_cycle():
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {m: module_imports(m, src, modules) for m, src in [
        ("pkg.a", "from . import b\n"), ("pkg.b", "def f():\n    from .c import g\n"), ("pkg.c", "from pkg import a\n"),
        ("pkg", "from .a import x\n")]}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
