"""Comparing two traces name by name: the one comparison, and the one table, of the library and `jetmoe debug`.

Each row is one named tensor: shape, max abs and max rel error (rel = max |a-b| / max |b|), where the worst error
sits, whether it is within the tolerance (`ok`) and a verdict:
  ok          within the tolerance
  introduced  the error starts here: this op is wrong
  inherited   it diverges because something upstream did (not given when each row was computed alone, isolated)
  near-tie    top-k choices differ only where the k-th and (k+1)-th router logits are within the tolerance
  input       the sides ran on different inputs here (inputs.*)
  missing     the name is in one trace only

Notebook: notebooks/07_debugging_a_port.ipynb.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..inputs import to_numpy

VERDICTS = ("ok", "introduced", "inherited", "near-tie", "input", "missing")  # each as the module docstring says


@dataclass
class Divergence:
    """One row of a comparison."""
    name: str
    shape: tuple  # or a string saying which trace lacks the name
    max_abs: float
    max_rel: float  # max |a-b| / max |b|: normwise, so entries near zero do not blow it up
    ok: bool
    worst: tuple = ()  # the index of the largest |a-b| (integer tensors: of the first mismatch)
    verdict: str = None  # default: "ok" or "introduced", as `ok` says
    note: str = ""

    def __post_init__(self):
        if self.verdict is None:
            self.verdict = "ok" if self.ok else "introduced"

    def where(self):
        """{axis name: index} of the worst error (axes_of)."""
        return dict(zip(axes_of(self.name, len(self.worst)), self.worst))

    def where_text(self):
        """Where the error is worst, e.g. "batch 1 head 3 query 7 key 0"; empty for a row that is ok."""
        return " ".join(f"{axis} {i}" for axis, i in self.where().items()) if self.verdict != "ok" else ""

    def as_json(self):
        def number(x):
            return x if math.isfinite(x) else None
        return {"name": self.name, "shape": list(self.shape) if isinstance(self.shape, tuple) else self.shape,
                "max_abs": number(self.max_abs), "max_rel": number(self.max_rel), "verdict": self.verdict,
                "worst": self.where(), "note": self.note}


def axes_of(name, ndim):
    """Axis names of a trace tensor, for saying where its worst error is (docs/semantics.md "Trace names")."""
    last = name.rsplit(".", 1)[-1]
    if name.startswith("grad.param."):  # a parameter's gradient: the parameter's own axes
        axes = ()
    elif ".inputs." in f".{name}":
        axes = ("batch", "token")
    elif ".router." in name:
        axes = ("token", "expert") if last == "logits" else ("token", "choice")
    elif last in ("expert_act", "expert_out"):
        axes = ("token", "choice", "feature")
    elif last in ("query", "context"):
        axes = ("batch", "token", "choice", "feature")
    elif last in ("key", "value", "key_rope"):
        axes = ("batch", "kv_head", "token", "dim")
    elif last == "query_rope":
        axes = ("batch", "head", "token", "dim")
    elif last == "probs":
        axes = ("batch", "head", "query", "key")
    elif last in ("logits", "pooled_logits"):
        axes = ("batch", "token", "vocab")[-ndim:] if last == "logits" else ("batch", "class")
    else:
        axes = ("batch", "token", "hidden")
    return axes if len(axes) == ndim else tuple(f"axis{i}" for i in range(ndim))


def compare_tensor(name, a, b, rtol, atol):
    """One row of a comparison; integer tensors (top-k indices) must match exactly. Shapes must agree: a caller
    comparing traces of different inputs is told so before it gets here (jetmoe/debug.py)."""
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        return Divergence(name, (a.shape, b.shape), float("inf"), float("inf"), False)
    if a.size == 0:
        return Divergence(name, a.shape, 0.0, 0.0, True)
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(b.dtype, np.integer) or a.dtype == np.bool_:
        differ = a != b
        mismatches = int(np.count_nonzero(differ))
        worst = tuple(int(i) for i in np.argwhere(differ)[0]) if mismatches else ()
        return Divergence(name, a.shape, float(mismatches), float(mismatches) / a.size, mismatches == 0, worst)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    if not finite.all():
        if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
            worst = tuple(int(i) for i in np.argwhere(np.isfinite(a64) != np.isfinite(b64))[0])
            return Divergence(name, a.shape, float("nan"), float("nan"), False, worst)
    diff = np.where(finite, np.abs(a64 - b64), 0.0)
    flat = int(np.argmax(diff))
    max_abs = float(diff.reshape(-1)[flat])
    scale = float(np.max(np.abs(np.where(finite, b64, 0.0))))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    worst = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if max_abs > 0 else ()
    return Divergence(name, a.shape, max_abs, max_rel, max_abs <= atol + rtol * scale, worst)


def near_tie_margin(ours_logits, theirs_logits, ours_idx, theirs_idx):
    """(tokens whose top-k differs, the largest logit margin among them): at each flipped token, the smallest gap
    between neighbours among the k+1 largest logits (the choice that flipped), the larger of the two sides'."""
    flipped = np.flatnonzero(np.any(ours_idx != theirs_idx, axis=1))
    k = ours_idx.shape[1]
    margins = []
    for logits in (ours_logits, theirs_logits):
        top = -np.sort(-np.asarray(logits, dtype=np.float64)[flipped], axis=1)[:, :k + 1]  # [F, K+1]
        margins.append(np.min(top[:, :-1] - top[:, 1:], axis=1) if top.shape[1] > 1 else np.zeros(len(flipped)))
    return flipped, float(np.max(np.maximum(*margins))) if len(flipped) else 0.0


def judge_routing(row, ours, theirs, rtol, atol):
    """A top_k_indices row that differs: near-tie where every flipped choice is within the tolerance of the router
    logits (both traces' `...router.logits`), else introduced; the note says by how much."""
    name, logits_name = row.name, row.name[:-len("top_k_indices")] + "logits"
    ours_idx, theirs_idx = to_numpy(ours[name]), to_numpy(theirs[name])
    if logits_name in ours and logits_name in theirs:
        flipped, margin = near_tie_margin(to_numpy(ours[logits_name]), to_numpy(theirs[logits_name]), ours_idx,
                                          theirs_idx)
    else:
        flipped, margin = np.flatnonzero(np.any(ours_idx != theirs_idx, axis=1)), math.inf
    if not len(flipped):
        return
    scale = float(np.max(np.abs(np.asarray(to_numpy(theirs.get(logits_name, 0.0)), dtype=np.float64))))
    tie = margin <= atol + rtol * scale
    row.note = (f"top-k differs at {len(flipped)}/{len(ours_idx)} tokens, logit margin {margin:.2e} "
                f"{'<=' if tie else '>'} tolerance {atol + rtol * scale:.2e}")
    row.verdict = "near-tie" if tie else "introduced"


def compare(trace_a, trace_b, rtol=1e-5, atol=0.0, names=None, isolated=False):
    """Compare two traces name by name: (the first divergence (first_divergence), or None; the rows).

    names: the names to compare, in order, each in both traces. Default: trace_a's order, and a name in only one
    trace is a row with ok=False (verdict "missing"), so a missing intermediate is never silently skipped.
    Verdicts as the module says; isolated: each row was computed from the other side's upstream tensors
    (`jetmoe debug compare --isolate`), so none is "inherited".
    """
    rows, upstream_bad = [], False
    for name in trace_a if names is None else names:
        if name not in trace_b:
            rows.append(Divergence(name, "missing in trace_b", float("nan"), float("nan"), False, (), "missing"))
            continue
        row = compare_tensor(name, trace_a[name], trace_b[name], rtol, atol)
        if name.endswith("top_k_indices") and not row.ok and row.shape == np.shape(trace_a[name]):
            judge_routing(row, trace_a, trace_b, rtol, atol)
        if ".inputs." in f".{name}" and row.verdict != "ok":
            row.verdict = "input"
        elif row.verdict == "introduced" and upstream_bad and not isolated:
            row.verdict = "inherited"
        upstream_bad |= row.verdict not in ("ok", "input")
        rows.append(row)
    if names is None:
        rows += [Divergence(n, "missing in trace_a", float("nan"), float("nan"), False, (), "missing")
                 for n in trace_b if n not in trace_a]
    return first_divergence(rows), rows


def first_divergence(rows):
    """The first row that diverges: neither ok nor an input (inputs that differ are the port's choice, reported as
    "input" and not followed), or None."""
    return next((r for r in rows if r.verdict not in ("ok", "input")), None)


def format_rows(rows, stop_at_first=False, show_all=True):
    """The table of compare() rows: the first divergence (first_divergence) marked '>>', where each row's error is
    worst and any note. stop_at_first: the table ends there; show_all=False: after it, only the rows that are not ok
    or inherited (`jetmoe debug compare` without --all)."""
    lines = [f"   {'name':<46} {'shape':<20} {'max abs':>9} {'max rel':>9}  {'verdict':<10} worst / note"]
    first = first_divergence(rows)
    seen_divergence = False
    for row in rows:
        if not show_all and seen_divergence and row.verdict in ("ok", "inherited"):
            continue
        seen_divergence |= row is first
        where = row.where_text()
        lines.append(f"{'>>' if row is first else '  '} {row.name:<46} {str(row.shape):<20} {row.max_abs:>9.2e} "
                     f"{row.max_rel:>9.2e}  {row.verdict:<10} {where}{'; ' if where and row.note else ''}"
                     f"{row.note}".rstrip())
        if stop_at_first and seen_divergence:
            break
    return "\n".join(lines)
