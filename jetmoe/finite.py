"""Non-finite numbers are never a silent result: the tools check what they print and, when a NaN or an inf got
there, name the trace point where the first one appeared.

Loading already refuses weights that hold NaN or inf (reference.io.checkpoint.check_finite), except the big matrices
a large checkpoint leaves in its file (MappedWeight): those, and a finite model that overflows, are caught here, at
the logits of generate, the loss of evaluate and the reference's own trace in debug compare. docs/security.md.
"""

import numpy as np

from reference.generation import cached_forward, positions_from_mask
from reference.io.checkpoint import first_non_finite
from reference.io.trace import handling
from reference.losses import windows


class NonFinite(ValueError):
    """A tool's result would hold NaN or inf: the message says where the first non-finite value appeared."""


def first_bad_point(forward):
    """forward() runs the model once -> 'trace point NAME at index (i, ...)' of its first tensor holding NaN or inf,
    or None where every one is finite (the forward stops at that point: nothing after it is computed)."""
    found = []

    class Found(Exception):
        pass

    def check(name, value, frame):
        value_np = np.asarray(value)
        if np.issubdtype(value_np.dtype, np.floating) and (where := first_non_finite(value_np)) is not None:
            found.append(f"trace point {name} at index {where} ({value_np[where]})")
            raise Found
        return value

    try:
        with handling(check):
            forward()
    except Found:
        pass
    return found[0] if found else None


def explain(model, ids, mask):
    # ids, mask: [B, S] -> where a full forward (no cache) on them first holds a non-finite value, in words
    where = first_bad_point(lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                                          use_cache=False))
    return f"the first non-finite value appears at {where}" if where else "a forward without the cache is finite"


def checked_stepper(model, batch, capacity):
    """reference.generation's cached_forward, with each step's logits [B, V] checked (a pass over B*V numbers):
    NonFinite naming the step and, from a forward over every token so far, the first non-finite trace point."""
    step = cached_forward(model, batch, capacity)
    history = []  # each step's ids [B, t]; the last mask covers them all

    def checked(step_ids, mask, positions):
        history.append(np.asarray(step_ids))
        logits = step(step_ids, mask, positions)
        if first_non_finite(np.asarray(logits)) is not None:
            raise NonFinite(f"the logits of generate's forward {len(history) - 1} (0: the prompt) hold NaN or inf: "
                            f"{explain(model, np.concatenate(history, axis=1), np.asarray(mask))}")
        return logits

    return checked


def check_loss(loss, model, ids, context):
    """NonFinite when evaluate's loss is NaN or inf, naming the first window whose forward holds a non-finite
    value and the trace point where it appears."""
    if np.isfinite(loss):
        return
    for i, window in enumerate(windows(np.asarray(ids, dtype=np.int64), context)):
        where = first_bad_point(lambda: model(input_ids=window[None], use_cache=False))
        if where:
            raise NonFinite(f"the loss is {loss}: window {i} (tokens {i * context}..{i * context + len(window) - 1}) "
                            f"holds a non-finite value first at {where}")
    raise NonFinite(f"the loss is {loss}, though every window's forward is finite")


def check_trace(trace, label):
    """NonFinite naming the first tensor of a live side's trace (in forward order) that holds NaN or inf."""
    for name, value in trace.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and (where := first_non_finite(value)) is not None:
            raise NonFinite(f"{label}'s trace holds NaN or inf, first at trace point {name} at index {where} "
                            f"({value[where]}): a non-finite result cannot be compared")
