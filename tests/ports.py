"""Ports with injected bugs, for the debugger tests (tests/tools/test_debug.py, and against HF in
tests/oracle/test_bundled_oracle.py): the reference with functions swapped for classic mistakes, its trace
written by `jetmoe debug dump` as a port in another language would write it under our names.

Each bug is a patch (module, attribute, replacement) applied while the port runs. Bugs that should hit one layer
only recognise it by the weights they are called with, as a port's bug might live in one code path.
"""

import math

import numpy as np

import reference.attention
import reference.experts
import reference.model
import reference.routing
import jetmoe.cli
from jetmoe.command import main
from notebooks.zoo import exercise, patched
from reference import JetMoeForCausalLM
from reference.routing import softmax

PROMPTS = ["ROMEO:", "What light through yonder window breaks?"]


def attention_probs_repeat_interleave(q, k, mask):
    """The classic MoA port bug: expanding the H kv heads to K*H with torch's repeat_interleave (kv head i // K for
    query head i) instead of HF's repeat (kv head i % H)."""
    batch, top_k, heads, tokens, head_dim = q.shape
    keys = np.repeat(k, top_k, axis=1)  # [B, K*H, S, Dh]: np.repeat is repeat_interleave
    scores = q.reshape(batch, top_k * heads, tokens, head_dim) @ np.swapaxes(keys, -1, -2) / math.sqrt(head_dim)
    return softmax(scores + mask)


def repeat_interleave_bug():
    return [(reference.attention, "attention_probs", attention_probs_repeat_interleave)]


def block_norm_eps_bug(eps):
    """The block norms given config.rms_norm_eps (HF hard-codes 1e-6 there)."""
    return [(reference.model, "BLOCK_NORM_EPS", eps)]


def gates_over_all_experts(logits, top_k_indices, gate_dtype):
    # logits: [N, E], top_k_indices: [N, K] -> [N, K]: softmax over all E, then the chosen k (HF: over the k only)
    return np.take_along_axis(softmax(logits, axis=1), top_k_indices, axis=1).astype(gate_dtype)


def gate_bug(model, layer):
    """The MoE router of `layer` normalises its gates over all E experts."""
    original = reference.experts.top_k_gating
    router = model.model.layers[layer].mlp.router

    def top_k_gating(x, router_weight, top_k):
        if router_weight is not router:
            return original(x, router_weight, top_k)
        with patched([(reference.routing, "top_k_gates_of", gates_over_all_experts)]):
            return original(x, router_weight, top_k)
    return [(reference.experts, "top_k_gating", top_k_gating)]


def apply_rope_interleaved(x, cos, sin):
    # x: [B, heads, T, Dh], cos/sin: [B, T, Dh] (HF's halves layout) -> [B, heads, T, Dh]: GPT-J's pairs
    # (x[2i], x[2i+1]) rotated by frequency i, where HF rotates (x[i], x[i + Dh/2])
    half = x.shape[-1] // 2
    cos, sin = (np.repeat(c[..., :half], 2, axis=-1)[:, None] for c in (cos, sin))  # [B, 1, T, Dh]
    rotated = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def interleaved_rope_bug(layer):
    """Interleaved (GPT-J) RoPE in one layer's attention."""
    original = reference.model.moa

    def moa(x, w, cos, sin, mask, cache, layer_idx, config, saved=None):
        if layer_idx != layer:
            return original(x, w, cos, sin, mask, cache, layer_idx, config, saved)
        with patched([(reference.attention, "apply_rope", apply_rope_interleaved)]):
            return original(x, w, cos, sin, mask, cache, layer_idx, config, saved)
    return [(reference.model, "moa", moa)]


def final_norm_eps_bug(model, eps):
    """The final norm with the wrong eps (the block norms keep theirs)."""
    original = reference.model.rms_norm

    def rms_norm(x, weight, norm_eps):
        return original(x, weight, eps if weight is model.model.norm else norm_eps)
    return [(reference.model, "rms_norm", rms_norm)]


def decode_cache_position_bug():
    """cache_position one short in decode steps only (the prefill is right): the newest key is masked out (the bug
    zoo's decode_position port)."""
    return exercise("decode_position").patches(None)


def port_trace(path, model_dir, patches=(), dtype="float32", max_new_tokens=0, prompts=PROMPTS):
    """Dump the trace of the reference with `patches` (a list, or a function of the loaded model that returns one)
    applied, as a port would write it; returns the path."""
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=np.dtype(dtype))
    patches = patches(model) if callable(patches) else patches
    argv = ["debug", "dump", str(model_dir), "--out", str(path), "--dtype", dtype,
            "--max-new-tokens", str(max_new_tokens)]
    for prompt in prompts:
        argv += ["--prompt", prompt]

    class Loaded:  # the dump must run the very model the weight-keyed patches know
        from_pretrained = staticmethod(lambda *args, **kwargs: model)

    with patched([*patches, (jetmoe.cli, "JetMoeForCausalLM", Loaded)]):
        assert main(argv) == 0
    return str(path)
