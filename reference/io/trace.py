"""Trace points: every named intermediate of a forward pass, to observe, stop at, or replace.

The model code writes `x = trace.record("input_layernorm", x)`: record returns the value the forward goes on with.
With nothing active that is one context-variable lookup and the value comes back as it was, so tracing never
changes the code path. Names are built from nested `scope()`s, e.g. `layers.3` + `attention.router` +
`top_k_indices` -> `layers.3.attention.router.top_k_indices`; generate adds `step.{i}.` for each decoded token
(docs/semantics.md "Trace names" lists them all).

What can be active, nested in any combination (each sees the value the one outside it passed on):
  capture()            keep a copy of every tensor, in forward order (a Trace)
  breakpoint(glob)     stop in pdb (or call a callback) in the frame that computed each matching tensor
  substitute({n: a})   make the forward go on with array a at trace point n
  steps(model, ...)    a generator of (name, value) in forward order; .send(array) replaces the value
  handling(handler)    any handler(name, value, frame) -> value, e.g. trace_files.TraceWriter(path), which writes
                       every tensor to a file as the forward goes

Trace files (save, load, the checks of a port's file): reference/io/trace_files.py. Comparing two traces:
reference/io/compare.py. Notebook: notebooks/07_debugging_a_port.ipynb.
"""

import bdb
import contextlib
import contextvars
import fnmatch
import pdb
import queue
import sys
import threading

import numpy as np

from ..inputs import to_numpy
from .trace_files import Trace, step_prefix

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
    return scope(step_prefix(step)[:-1] or None)


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


@contextlib.contextmanager
def capture():
    """with capture() as trace: model(...)  ->  trace["layers.0.attention.probs"] ..."""
    trace = Trace()

    def keep(name, value, frame):
        trace[name] = value.copy()  # a copy: the forward may reuse its buffer (the KV cache, in-place softmax)
        return value

    with handling(keep):
        yield trace


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
                         "(docs/semantics.md 'Trace names')")


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
