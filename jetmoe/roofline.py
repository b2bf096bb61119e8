"""`jetmoe generate --stats`: the decode roofline on the CPU, token by token.

A decoded token reads every weight it uses once: its routed experts (K of E in each MoA and MoE, the distinct ones
of the whole batch) and the rest (routers, kv_proj, norms, biases, the lm_head, the embedding rows of its tokens).
Those bytes over the step's time are the read bandwidth the step reached; beside the machine's copy bandwidth
(measured once with a NumPy copy, cached in build/copy_bandwidth.json) they show how close decoding is to being
memory-bound: the arithmetic per byte is tiny, so the bytes set the pace. Notebook 05 plots it.
"""

import json
import os
import platform
import time

import numpy as np

from reference.io import trace

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "copy_bandwidth.json")
COPY_BYTES = 128 << 20  # per array: well past every cache level of a CPU, so the copy streams from memory
COPY_REPEATS = 5  # the best of 5 (the first also faults the pages in)
EXPERT_TENSORS = ("self_attention.experts.input_linear.weight", "self_attention.experts.output_linear.weight",
                  "mlp.input_linear.weight", "mlp.output_linear.weight")


def machine():
    """What the cached bandwidth belongs to: a bandwidth measured on another machine is measured again."""
    return f"{platform.node()} {platform.machine()} {platform.processor()} {os.cpu_count()} cpus"


def measure_copy_bandwidth(nbytes=COPY_BYTES, repeats=COPY_REPEATS):
    """Bytes per second of np.copyto between two nbytes arrays, counting what is read and written (STREAM's copy
    convention), the best of `repeats`."""
    source, target = np.ones(nbytes // 8), np.empty(nbytes // 8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def copy_bandwidth(cache=None):
    """The machine's copy bandwidth in bytes/s: from the cache (default CACHE) when it holds this machine's, else
    measured and cached. Returns (bandwidth, whether it was measured now)."""
    cache = cache or CACHE
    try:
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("machine") == machine() and float(saved["bytes_per_second"]) > 0:
            return float(saved["bytes_per_second"]), False
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or an unreadable one: measure
    bandwidth = measure_copy_bandwidth()
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        json.dump({"machine": machine(), "bytes_per_second": bandwidth, "bytes": COPY_BYTES,
                   "method": "numpy.copyto, read + write bytes, best of 5"}, f)
    return bandwidth, True


class StepRecorder:
    """A trace handler keeping, for each forward of generate, its router choices; and the time each token came
    (call .token as generate's streamer)."""

    def __init__(self):
        self.routing = {}  # step -> {router name without the step prefix: top_k_indices [N, K]}
        self.token_ids = {}  # step -> the forward's input_ids [B, T]
        self.times = [time.perf_counter()]

    def __call__(self, name, value, frame):
        step, rest = 0, name
        if name.startswith("step."):
            _, number, rest = name.split(".", 2)
            step = int(number)
        if rest.endswith("router.top_k_indices"):
            self.routing.setdefault(step, {})[rest] = np.asarray(value)
        elif rest == "inputs.input_ids":
            self.token_ids[step] = np.asarray(value)
        return value

    def token(self, new_tokens):
        self.times.append(time.perf_counter())

    def recording(self):
        return trace.handling(self)


def bytes_read(model, routing, input_ids):
    """(routed expert bytes, the rest's bytes) of distinct weights one forward reads: routing {"layers.i.attention
    .router.top_k_indices" or "layers.i.mlp.router.top_k_indices": [N, K]}, input_ids [B, T]."""
    config, routed, rest = model.config, 0, 0
    for name, tensor in model.state_dict().items():
        size = tensor.nbytes
        expert = next((suffix for suffix in EXPERT_TENSORS if name.endswith(suffix)), None)
        if expert is not None:
            layer = name.split(".")[2]  # model.layers.{i}.
            part = "attention" if expert.startswith("self_attention") else "mlp"
            chosen = np.unique(routing[f"layers.{layer}.{part}.router.top_k_indices"])
            routed += size // config.num_local_experts * len(chosen)
        elif name.endswith("embed_tokens.weight") and not config.tie_word_embeddings:
            rest += size // config.vocab_size * len(np.unique(input_ids))  # the looked-up rows only
        else:
            rest += size  # routers, kv_proj, norms, biases, the lm_head (the embedding itself when tied)
    return routed, rest


def token_stats(model, recorder):
    """One dict per generated token: its forward's bytes of routed experts and the rest, and its seconds."""
    rows = []
    for step in range(len(recorder.times) - 1):
        routed, rest = bytes_read(model, recorder.routing[step], recorder.token_ids[step])
        rows.append({"token": step, "routed_bytes": routed, "rest_bytes": rest,
                     "seconds": recorder.times[step + 1] - recorder.times[step]})
    return rows


def format_stats(rows, bandwidth, measured):
    """The per-token table: MiB of routed experts and of the rest, ms, the read rate and its share of the copy
    bandwidth (token 0 is the prefill, whose compute over the whole prompt is no roofline point)."""
    mib = 1 << 20
    lines = [f"copy bandwidth {bandwidth / 1e9:.2f} GB/s ({'measured now' if measured else 'cached'}, {CACHE}; "
             "read + write bytes of a NumPy copy)",
             f"{'token':>5} {'routed MiB':>11} {'rest MiB':>9} {'ms':>8} {'GB/s read':>10} {'% of copy bw':>13}"]
    for row in rows:
        total = row["routed_bytes"] + row["rest_bytes"]
        rate = total / row["seconds"] if row["seconds"] > 0 else float("inf")
        lines.append(f"{row['token']:>5} {row['routed_bytes'] / mib:>11.2f} {row['rest_bytes'] / mib:>9.2f} "
                     f"{1e3 * row['seconds']:>8.2f} {rate / 1e9:>10.2f} {100 * rate / bandwidth:>12.1f}%"
                     f"{'  (prefill)' if row['token'] == 0 else ''}")
    return "\n".join(lines)
