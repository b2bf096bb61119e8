"""Generation on the GPU (greedy and sampling): reference/generation.py's loop (positions from the mask, pad after
eos, stop when every row is done) driving the GPU model, with its KV cache preallocated on the device for prompt +
new tokens. Each step copies the B greedy token ids (sampling: the [B, V] last logits) to the host once.
"""

from reference.generation import generate as reference_generate

from .device import require_cupy


def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, **sampling):
    # input_ids: [B, T] NumPy or CuPy -> [B, T + new] CuPy int64; sampling: temperature, top_k, top_p, seed, streamer
    cp = require_cupy()
    return cp.asarray(reference_generate(model, input_ids, attention_mask=attention_mask,
                                         max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling))
