"""Generation on the GPU (greedy and sampling): reference/generation.py's loop (positions from the mask, pad after
eos, stop when every row is done) driving the GPU model.

By default (graph=True) the prompt runs eagerly into a gpu.cache.StaticKVCache sized for prompt + new tokens, and
every new token replays one CUDA graph of the whole decode step (gpu/graph.py). graph=False keeps the uncaptured
path: model(...) over a gpu.cache.KVCache, each step's ops launched from Python. Their logits are bitwise equal
while prompt + new tokens fit one decode key split (128 keys); beyond, the graph's split follows the capacity,
graph=False's the keys so far, and the logits may differ in their last float32 bits (gpu/graph.py says why). The
graph's own replays are bitwise reproducible. Each step copies the step's B token ids and positions
to the device and the B greedy token ids (sampling: the [B, V] last logits) back to the host.
"""

from reference.generation import cached_forward, generate as reference_generate

from .device import require_cupy
from .graph import graph_stepper


def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, graph=True, **sampling):
    # input_ids: [B, T] NumPy or CuPy -> [B, T + new] CuPy int64; sampling: temperature, top_k, top_p, seed, streamer
    cp = require_cupy()
    return cp.asarray(reference_generate(model, input_ids, attention_mask=attention_mask,
                                         max_new_tokens=max_new_tokens, do_sample=do_sample,
                                         stepper=graph_stepper if graph else cached_forward, **sampling))
