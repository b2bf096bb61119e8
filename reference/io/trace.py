"""Trace points: every named intermediate of a forward pass, to observe, stop at, or replace.

The model code writes `x = trace.record("input_layernorm", x)`: record returns the value the forward goes on with.
With nothing active that is one context-variable lookup and the value comes back as it was, so tracing never
changes the code path. Names are built from nested `scope()`s, e.g. `layers.3` + `attention.router` +
`top_k_indices` -> `layers.3.attention.router.top_k_indices`; generate adds `step.{i}.` for each decoded token
(README.md "Trace names" lists them all).

What can be active, nested in any combination (each sees the value the one outside it passed on):
  capture()            keep a copy of every tensor, in forward order (a Trace)
  TraceWriter(path)    write every tensor to a safetensors file as the forward goes (memory: one tensor at a time)
  breakpoint(glob)     stop in pdb (or call a callback) in the frame that computed each matching tensor
  substitute({n: a})   make the forward go on with array a at trace point n
  steps(model, ...)    a generator of (name, value) in forward order; .send(array) replaces the value

Notebook: notebooks/07_debugging_a_port.ipynb.
"""

import bdb
import contextlib
import contextvars
import fnmatch
import math
import os
import pdb
import queue
import sys
import threading
from dataclasses import dataclass

import numpy as np

from .files import shown
from ..inputs import to_numpy
from .mapped import BF16, available_memory
from .safetensors import Writer, code_of, read_safetensors

_active = contextvars.ContextVar("jetmoe_trace", default=None)


class _Session:
    """The handlers in effect, outermost first, and the scope prefix they share."""

    def __init__(self, handlers, prefix):
        self.handlers, self.prefix = handlers, prefix


@contextlib.contextmanager
def handling(handler):
    """Make handler(full_name, value, frame) -> value see every trace point inside; the value it returns is the one
    the forward goes on with. The building block of everything below (and of `jetmoe debug compare --isolate`)."""
    outer = _active.get()
    token = _active.set(_Session((outer.handlers if outer else ()) + (handler,), outer.prefix if outer else []))
    try:
        yield
    finally:
        _active.reset(token)


def tracing():
    """True while any handler is active; lets callers skip building an intermediate that exists only for the trace."""
    return _active.get() is not None


@contextlib.contextmanager
def scope(name):
    """Prefix every name recorded inside with `name.` (None adds nothing)."""
    session = _active.get()
    if session is None or name is None:
        yield
        return
    session.prefix.append(str(name))
    try:
        yield
    finally:
        session.prefix.pop()


def step_scope(step):
    """generate's forward number `step`: the prefill (0) keeps the plain names, decode step i is `step.{i}.`."""
    return scope(f"step.{step}" if step else None)


def record(name, value):
    """The trace point `name` (under the current scope) for `value`; returns what the forward goes on with."""
    session = _active.get()
    if session is None:
        return value
    return _dispatch(session, name, value, sys._getframe(1))


def record_view(name, value, to_view, from_view):
    """A trace point for a tensor the forward keeps in another layout (the experts' rows grouped by expert): the
    handlers see to_view(value), and a replacement goes back through from_view. Nothing is built when inactive."""
    session = _active.get()
    if session is None:
        return value
    view = to_view(value)
    out = _dispatch(session, name, view, sys._getframe(1))
    return value if out is view else from_view(out)


def _dispatch(session, name, value, frame):
    full_name = ".".join(session.prefix + [name])
    for handler in session.handlers:
        value = handler(full_name, value, frame)
    return value


def like(replacement, value, name):
    """`replacement` as the forward's array type (NumPy or CuPy) and dtype, after checking its shape."""
    if tuple(np.shape(replacement)) != tuple(value.shape):
        raise ValueError(f"the replacement for trace point {name} has shape {tuple(np.shape(replacement))}, "
                         f"the forward's tensor {tuple(value.shape)}")
    if isinstance(value, np.ndarray):
        return np.array(to_numpy(replacement), dtype=value.dtype)
    # a CuPy array: its module is imported already (reference/ never imports cupy itself)
    xp = sys.modules[type(value).__module__.partition(".")[0]]
    return xp.array(replacement, dtype=value.dtype)


class Trace(dict):
    """name -> array, in the order the forward produced them (a dict keeps insertion order)."""

    def save(self, path, metadata=None):
        """Write the trace to safetensors so another runtime can be compared offline (see TraceWriter)."""
        with TraceWriter(path, metadata) as writer:
            for name, value in self.items():
                writer.add(name, value)

    @classmethod
    def load(cls, path):
        """A saved trace, in forward order when the file records it (a port's own file may not: then by name)."""
        return cls(load_with_metadata(path)[0])


def load_with_metadata(path):
    """(Trace, metadata {str: str}) of a safetensors trace file: untrusted input, read as a checkpoint is
    (reference/io/safetensors.py: a regular file, its header checked as strictly as the safetensors library does), its
    tensors memory-mapped and read-only, so a large file costs no memory until a tensor is used."""
    tensors, metadata = read_safetensors(os.fspath(path), with_metadata=True)
    order = metadata.get("order", "")
    names = [n for n in order.split(",") if n in tensors] if order else []
    known = set(names)
    return Trace([(n, tensors[n]) for n in names] + [(n, t) for n, t in tensors.items() if n not in known]), metadata


TRACE_FLOATS = ("bfloat16", "float32", "float64")  # the dtypes a trace is compared in
MAX_POSITION = 2**31 - 1


def check_trace_file(trace, metadata, config, label, itemsize=8, available=None):
    """ValueError, before any work, where a trace file (a Trace and its metadata) does not fit the model `config`:
    float tensors other than bfloat16/float32/float64, inputs.* that are not [B, T] integers of the right shapes,
    token ids outside the vocabulary, more tokens than max_position_embeddings, routing indices outside [0, E), or
    a forward whose activations, `itemsize` bytes a number, would not fit `available` bytes (default: the memory
    available now)."""
    dtype = metadata.get("dtype")
    if dtype is not None and dtype not in TRACE_FLOATS:
        raise ValueError(f"{label}: its metadata says dtype {shown(dtype)}; a trace is compared in "
                         f"{', '.join(TRACE_FLOATS)}")
    for name, value in trace.items():
        kind = np.dtype(value.dtype)
        if kind.kind == "f" or kind == BF16:
            if kind.name not in TRACE_FLOATS:
                raise ValueError(f"{label}: tensor {shown(name)} is {kind.name}; a trace holds "
                                 f"{', '.join(TRACE_FLOATS)} floats (cast it to float32)")
        elif kind.kind not in "iub":
            raise ValueError(f"{label}: tensor {shown(name)} has dtype {kind.name}, neither float nor integer")
        if name.endswith("router.top_k_indices"):
            _check_ids(label, name, value, config.num_local_experts, 2)
            if value.shape[1] != config.num_experts_per_tok:
                raise ValueError(f"{label}: {name} has shape {list(value.shape)}, the model chooses "
                                 f"K={config.num_experts_per_tok} experts per token")
    step, batch, tokens = 0, None, 0
    while (prefix := f"step.{step}." if step else "") + "inputs.input_ids" in trace:
        ids = _check_ids(label, prefix + "inputs.input_ids", trace[prefix + "inputs.input_ids"], config.vocab_size, 2)
        batch = ids.shape[0] if batch is None else batch
        expected = (batch, ids.shape[1] if step == 0 else 1)
        if ids.shape != expected:
            raise ValueError(f"{label}: {prefix}inputs.input_ids has shape {list(ids.shape)}, expected "
                             f"{list(expected)}")
        tokens += ids.shape[1]
        for name, high, shape in (("attention_mask", 2, (batch, tokens)), ("position_ids", MAX_POSITION,
                                                                           expected)):
            if prefix + "inputs." + name in trace:
                value = _check_ids(label, prefix + "inputs." + name, trace[prefix + "inputs." + name], high, 2)
                if value.shape != shape:
                    raise ValueError(f"{label}: {prefix}inputs.{name} has shape {list(value.shape)}, expected "
                                     f"{list(shape)}")
        step += 1
    if tokens > config.max_position_embeddings:
        raise ValueError(f"{label} runs on {tokens} tokens, more than max_position_embeddings="
                         f"{config.max_position_embeddings} of the model")
    needed = activation_bytes(config, batch or 0, tokens, itemsize)
    available = available if available is not None else available_memory()
    if available is not None and needed > available:
        raise ValueError(f"{label}: a trace of its {batch} x {tokens} tokens needs about {needed / 2**30:.1f} GiB of "
                         f"activations, more than the {available / 2**30:.1f} GiB available")


def activation_bytes(config, batch, tokens, itemsize):
    """A bound on the bytes a captured forward over [batch, tokens] keeps, `itemsize` bytes a number: per layer the
    attention probs [B, K*H, T, T], a dozen [B, T, D] tensors and the experts' [N, K, 3F]; then the logits [B, T, V]."""
    K, H, D, F = (config.num_experts_per_tok, config.num_key_value_heads, config.hidden_size,
                  config.intermediate_size)
    per_layer = batch * tokens * (K * H * tokens + 12 * D + 3 * K * F + 2 * config.num_local_experts)
    return itemsize * (config.num_hidden_layers * per_layer + batch * tokens * config.vocab_size)


def _check_ids(label, name, value, high, ndim):
    # value: an integer tensor of `ndim` dimensions, each entry in [0, high) -> value; ValueError naming it otherwise
    value = np.asarray(value)
    if value.ndim != ndim or not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise ValueError(f"{label}: {name} must be a {ndim}-D integer tensor, got shape {list(value.shape)} "
                         f"{value.dtype}")
    if value.size and (int(value.min()) < 0 or int(value.max()) >= high):
        bad = int(value.min()) if int(value.min()) < 0 else int(value.max())
        raise ValueError(f"{label}: {name} holds {bad}, outside [0, {high})")
    return value


@contextlib.contextmanager
def capture():
    """with capture() as trace: model(...)  ->  trace["layers.0.attention.probs"] ..."""
    trace = Trace()

    def keep(name, value, frame):
        trace[name] = value.copy()  # a copy: the forward may reuse its buffer (the KV cache, in-place softmax)
        return value

    with handling(keep):
        yield trace


class TraceWriter:
    """A handler that writes each traced tensor to a safetensors file as the forward produces it.

    A safetensors header (names, shapes, offsets) comes before the data and is known only at the end, so tensors
    go to a spool file beside `path` as they come; close() writes the file through reference/io/safetensors.py's
    Writer, each tensor read back from the spool. Memory holds one tensor at a time, whatever the model's size.
    The forward order goes into the header's metadata ("order": the names, comma-separated), beside the caller's
    `metadata`.

        with TraceWriter("trace.safetensors", {"dtype": "float32"}) as writer, handling(writer):
            model(...)
    """

    def __init__(self, path, metadata=None):
        self.path, self.metadata = os.fspath(path), dict(metadata or {})
        self._spool_path = self.path + ".part"
        self._spool = open(self._spool_path, "wb")  # OSError here names the unwritable path, before any work
        self._specs = {}  # name -> (dtype, shape), in forward order

    def add(self, name, value):
        if name in self._specs:
            raise ValueError(f"trace point {name} was recorded twice")
        array = np.ascontiguousarray(to_numpy(value))
        code_of(self.path, name, array.dtype)  # a dtype the format cannot hold is refused before it is spooled
        self._spool.write(array.reshape(-1).view(np.uint8))
        self._specs[name] = (array.dtype, array.shape)

    def __call__(self, name, value, frame):
        self.add(name, value)
        return value

    def __len__(self):
        return len(self._specs)

    def close(self):
        self._spool.close()
        spool = np.memmap(self._spool_path, np.uint8, mode="r") if os.path.getsize(self._spool_path) else None
        specs = [(name, dtype, shape) for name, (dtype, shape) in self._specs.items()]
        with Writer(self.path, specs, {**self.metadata, "order": ",".join(self._specs)}) as writer:
            offset = 0
            for name, dtype, shape in specs:  # each tensor a view of the spool: copied by the kernel, not in memory
                size = math.prod(shape) * dtype.itemsize
                writer.write(name, spool[offset:offset + size].view(dtype).reshape(shape) if size else
                             np.zeros(shape, dtype))
                offset += size
        del spool
        os.remove(self._spool_path)

    def discard(self):
        self._spool.close()
        os.remove(self._spool_path)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            self.close()
        else:
            self.discard()


@contextlib.contextmanager
def substitute(replacements, strict=True):
    """with substitute({"layers.1.mlp.output": array}): model(...) goes on with `array` at that trace point.
    strict: a name that no trace point of the block recorded is an error when the block ends (it did nothing)."""
    unused = set(replacements)

    def replace(name, value, frame):
        if name not in replacements:
            return value
        unused.discard(name)
        return like(replacements[name], value, name)

    with handling(replace):
        yield
    if unused and strict:
        raise ValueError(f"substitute: no trace point named {', '.join(sorted(unused))} was recorded "
                         "(README.md 'Trace names')")


def pdb_at(name, value, frame):
    """The default breakpoint: pdb in the frame that computed `value` (`ll` shows its code, `up` its caller);
    `c` goes on to the next match, `q` stops the forward (bdb.BdbQuit)."""
    shape = getattr(value, "shape", None)
    print(f"\n> trace point {name} {tuple(shape) if shape is not None else ''} {value.dtype}, computed in "
          f"{frame.f_code.co_name}() at {frame.f_code.co_filename}:{frame.f_lineno}")
    debugger = pdb.Pdb()
    debugger.reset()
    debugger.interaction(frame, None)
    if debugger.quitting:
        raise bdb.BdbQuit


@contextlib.contextmanager
def breakpoint(pattern, callback=None):
    """with breakpoint("layers.3.mlp.*"): model(...) stops at every trace point whose name matches the glob:
    callback(name, value, frame) is called with the frame that computed the tensor (default: pdb there). A callback
    that returns an array replaces the value; None goes on with it."""
    callback = callback or pdb_at

    def stop(name, value, frame):
        if not fnmatch.fnmatchcase(name, pattern):
            return value
        replacement = callback(name, value, frame)
        return value if replacement is None else like(replacement, value, name)

    with handling(stop):
        yield


class _Abandoned(Exception):
    """Raised inside the forward when the consumer of steps() stops listening."""


def steps(model, **inputs):
    """for name, value in steps(model, input_ids=ids): ...  yields every trace point of model(**inputs) in forward
    order. `gen.send(array)` replaces the value before the forward goes on (and returns the next point); the
    generator's return value (StopIteration.value) is the model's output. The forward runs in a helper thread that
    waits at each trace point, so a notebook can step through it one cell at a time."""
    points, replies = queue.Queue(maxsize=1), queue.Queue(maxsize=1)

    def pause(name, value, frame):
        points.put(("point", name, value))
        reply = replies.get()
        if reply is _Abandoned:
            raise _Abandoned
        return value if reply is None else like(reply, value, name)

    def run():
        try:
            with handling(pause):
                points.put(("done", model(**inputs)))
        except _Abandoned:
            pass
        except BaseException as error:  # re-raised in the consumer's thread
            points.put(("error", error))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    thread.start()
    try:
        while True:
            kind, *payload = points.get()
            if kind == "done":
                return payload[0]
            if kind == "error":
                raise payload[0]
            replies.put((yield tuple(payload)))
    finally:
        if thread.is_alive():
            with contextlib.suppress(queue.Full):
                replies.put_nowait(_Abandoned)
            thread.join()


# ------------------------------------------------------------------------------------------ comparing traces

@dataclass
class Divergence:
    name: str
    shape: tuple  # or a string saying which trace lacks the name
    max_abs: float
    max_rel: float  # max |a-b| / max |b|: normwise, so entries near zero do not blow it up
    ok: bool
    worst: tuple = ()  # the index of the largest |a-b| (integer tensors: of the first mismatch)


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
    rows += [Divergence(n, "missing in trace_a", float("nan"), float("nan"), False)
             for n in trace_b if n not in trace_a]
    first = next((r for r in rows if not r.ok), None)
    return first, rows


def format_rows(rows, stop_at_first=False):
    """A plain-text table of compare() rows, the first failing row marked with '>>' and its worst index shown;
    stop_at_first ends the table there. (`jetmoe debug compare` prints a richer one, with verdicts.)"""
    lines = [f"   {'name':<52} {'shape':<22} {'max abs':>10} {'max rel':>10}"]
    marked = False
    for r in rows:
        mark = "  "
        if not r.ok and not marked:
            mark, marked = ">>", True
        lines.append(f"{mark} {r.name:<52} {str(r.shape):<22} {r.max_abs:>10.3e} {r.max_rel:>10.3e}"
                     f"{'' if r.ok else f'  DIVERGES, worst at {r.worst}'}")
        if marked and stop_at_first:
            break
    return "\n".join(lines)
