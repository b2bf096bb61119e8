"""Named intermediates: capture every tensor of a forward pass under a stable dotted name, and compare two traces.

The model code always calls `record(name, value)`; with no active `capture()` that is one context-variable
lookup, so tracing never changes the code path. Names are built from nested `scope()`s, e.g.
`layers.3` + `attention.router` + `top_k_indices` -> `layers.3.attention.router.top_k_indices`.
The full naming scheme is listed in README.md ("Trace names").

Notebook: notebooks/07_debugging_a_port.ipynb.
"""

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np

from .inputs import to_numpy

_active = contextvars.ContextVar("jetmoe_trace", default=None)


class Trace(dict):
    """name -> array, in the order the forward produced them (a dict keeps insertion order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefix = []

    def save(self, path):
        """Write the trace to safetensors so another runtime can be compared offline. safetensors files keep no
        order, so the forward order goes into the header's metadata ("order": the names, comma-separated)."""
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(to_numpy(v)) for k, v in self.items()}, path,
                  metadata={"order": ",".join(self)})

    @classmethod
    def load(cls, path):
        """A saved trace, in forward order when the file records it (a port's own file may not: then by name)."""
        from safetensors import safe_open
        from safetensors.numpy import load_file
        tensors = load_file(path)
        with safe_open(path, framework="numpy") as f:
            order = (f.metadata() or {}).get("order", "")
        names = [n for n in order.split(",") if n in tensors] if order else []
        return cls([(n, tensors[n]) for n in names] + [(n, t) for n, t in tensors.items() if n not in set(names)])


@contextlib.contextmanager
def capture():
    """with capture() as trace: model(...)  ->  trace["layers.0.attention.probs"] ..."""
    trace = Trace()
    token = _active.set(trace)
    try:
        yield trace
    finally:
        _active.reset(token)


def tracing():
    """True inside capture(); lets callers skip building an intermediate that exists only for the trace."""
    return _active.get() is not None


@contextlib.contextmanager
def scope(name):
    """Prefix every name recorded inside with `name.`."""
    trace = _active.get()
    if trace is None:
        yield
        return
    trace._prefix.append(str(name))
    try:
        yield
    finally:
        trace._prefix.pop()


def record(name, value):
    """Store `value` (an array, or a zero-argument callable that builds it) under the current scope."""
    trace = _active.get()
    if trace is None:
        return
    full_name = ".".join(trace._prefix + [name])
    trace[full_name] = value() if callable(value) else value.copy()


@dataclass
class Divergence:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |a-b| / max |b|: normwise, so entries near zero do not blow it up
    ok: bool


def compare_tensor(name, a, b, rtol, atol):
    """One row of a comparison; integer tensors (top-k indices) must match exactly."""
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        return Divergence(name, (a.shape, b.shape), float("inf"), float("inf"), False)
    if a.size == 0:
        return Divergence(name, a.shape, 0.0, 0.0, True)
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(b.dtype, np.integer):
        mismatches = int(np.count_nonzero(a != b))
        return Divergence(name, a.shape, float(mismatches), float(mismatches) / a.size, mismatches == 0)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        same_nonfinite = np.array_equal(np.isfinite(a64), np.isfinite(b64))
        finite = np.isfinite(a64) & np.isfinite(b64)
        if not same_nonfinite:
            return Divergence(name, a.shape, float("nan"), float("nan"), False)
        a64, b64 = a64[finite], b64[finite]
    max_abs = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
    scale = float(np.max(np.abs(b64))) if b64.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Divergence(name, a.shape, max_abs, max_rel, max_abs <= atol + rtol * scale)


def compare(trace_a, trace_b, rtol=1e-5, atol=0.0):
    """Compare two traces name by name, in trace_a's order.

    Returns (first_divergence_or_None, rows): rows hold every shared name; names present in only one
    trace are reported as rows with ok=False so a missing intermediate is never silently skipped.
    """
    rows = []
    for name in trace_a:
        if name not in trace_b:
            rows.append(Divergence(name, "missing in trace_b", float("nan"), float("nan"), False))
            continue
        rows.append(compare_tensor(name, trace_a[name], trace_b[name], rtol, atol))
    rows += [Divergence(n, "missing in trace_a", float("nan"), float("nan"), False) for n in trace_b if n not in trace_a]
    first = next((r for r in rows if not r.ok), None)
    return first, rows


def format_rows(rows, notes=None, stop_at_first=False):
    """A plain-text table of compare() rows, the first failing row marked with '>>'. `notes` adds a last column
    (one string per row: the debugger's top-k agreement); stop_at_first ends the table at the first failing row."""
    lines = [f"   {'name':<52} {'shape':<22} {'max abs':>10} {'max rel':>10}" + ("  top-k" if notes else "")]
    marked = False
    for i, r in enumerate(rows):
        mark = "  "
        if not r.ok and not marked:
            mark, marked = ">>", True
        note = f"  {notes[i]}" if notes else ""
        lines.append(f"{mark} {r.name:<52} {str(r.shape):<22} {r.max_abs:>10.3e} {r.max_rel:>10.3e}{note}"
                     f"{'' if r.ok else '  DIVERGES'}")
        if marked and stop_at_first:
            break
    return "\n".join(lines)
