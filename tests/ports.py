"""Ports with an injected bug, for the debugger tests (tests/tools/test_debug.py, and against HF in
tests/oracle/test_bundled_oracle.py): the reference with one function swapped for a classic mistake, its trace
saved with its inputs as a port in another language would save it.
"""

import math

import numpy as np

import reference.attention
import reference.model
from jetmoe.debug import INPUT_NAMES, reference_trace
from reference import JetMoeForCausalLM
from reference.routing import softmax
from reference.tokenizer import Tokenizer

PROMPTS = ["ROMEO:", "What light through yonder window breaks?"]


def attention_probs_repeat_interleave(q, k, mask):
    """The classic MoA port bug: expanding the H kv heads to K*H with torch's repeat_interleave (kv head i // K for
    query head i) instead of HF's repeat (kv head i % H)."""
    batch, top_k, heads, tokens, head_dim = q.shape
    keys = np.repeat(k, top_k, axis=1)  # [B, K*H, S, Dh]: np.repeat is repeat_interleave
    scores = q.reshape(batch, top_k * heads, tokens, head_dim) @ np.swapaxes(keys, -1, -2) / math.sqrt(head_dim)
    return softmax(scores + mask)


def port_trace(path, model_dir, dtype=np.float32, **bugs):
    """Save the trace of the reference with `bugs` ({attribute of reference.attention / reference.model: value})
    patched in, plus its inputs, as a port in another language would write it."""
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ids, mask = Tokenizer.from_pretrained(model_dir).encode_batch(PROMPTS)
    saved = {}
    for name, value in bugs.items():
        module = reference.attention if hasattr(reference.attention, name) else reference.model
        saved[name] = (module, getattr(module, name))
        setattr(module, name, value)
    try:
        trace = reference_trace(model, ids, mask)
    finally:
        for name, (module, value) in saved.items():
            setattr(module, name, value)
    trace[INPUT_NAMES[0]], trace[INPUT_NAMES[1]] = ids, mask
    trace.save(str(path))
    return str(path)
