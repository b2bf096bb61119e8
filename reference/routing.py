"""Top-k gating and the dispatch plan shared by the MoA and the MoE.  Shapes: reference/__init__.py.

HF JetMoeTopKGating: logits = x @ Wr^T (float32 or better); take the top-k logits; softmax over only those k;
then group the N*K (token, choice) slots by expert. Slot s = n*K + k is token n's k-th choice.

Ties: among equal logits the lower expert id comes first (and -0 equals +0). This is our canonical rule, not HF's:
torch.topk leaves the order of equal values unspecified. The GPU kernel (gpu/kernels/routing.cu) follows it too,
except that CuPy compiles with -ftz=true, so there a subnormal logit equals 0 (tests/reference/test_routing.py).

Backward: the gates are a softmax of the chosen k logits, so d_logits is that softmax's backward scattered into
the chosen columns and zero elsewhere. The choice itself (argsort) is piecewise constant: it has no gradient, and
only the aux loss (reference/losses.py) reaches the logits of experts a token did not choose.

Notebook: notebooks/02_top_k_routing.ipynb.
"""

from dataclasses import dataclass

import numpy as np

from .io import trace
from .precision import compute_dtype


@dataclass
class RoutingPlan:
    logits: np.ndarray  # [N, E] router logits, float32 or better
    top_k_indices: np.ndarray  # [N, K] int64 expert ids, best first
    top_k_gates: np.ndarray  # [N, K] softmax over the chosen K logits, in the model dtype
    sorted_slots: np.ndarray  # [N*K] slot ids (n*K + k) grouped by expert (stable within an expert)
    expert_offsets: np.ndarray  # [E+1] slots of expert e are sorted_slots[offsets[e]:offsets[e+1]]

    @property
    def top_k(self):
        return self.top_k_indices.shape[1]

    @property
    def sorted_tokens(self):
        # [N*K] token id of each grouped slot
        return self.sorted_slots // self.top_k

    def expert_groups(self):
        """Yields (expert, slice into the grouped order) for each expert that received tokens."""
        for e in range(len(self.expert_offsets) - 1):
            start, end = self.expert_offsets[e], self.expert_offsets[e + 1]
            if end > start:
                yield e, slice(start, end)


def top_k_of(logits, k):
    # logits: [N, E] -> indices [N, K] int64, largest logit first, equal logits in expert id order (module docstring)
    # A stable sort of the negated logits is exactly that rule, and for E = 8 it is faster than argpartition
    # (docs/benchmarks.md).
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)


def softmax(x, axis=-1):
    # The same three steps as exp(x - max) / sum, in one buffer: attention probabilities are the largest
    # temporaries of a prefill, so not allocating two more of them matters for speed.
    out = x - np.max(x, axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= np.sum(out, axis=axis, keepdims=True)
    return out


def softmax_backward(d_probs, probs, axis=-1):
    # d_probs, probs: [..., C] -> d_x [..., C]: the Jacobian of softmax is diag(p) - p p^T, so
    # d_x = p * (d_p - sum(d_p * p)). Saves only the probabilities.
    dot = np.sum(d_probs * probs, axis=axis, keepdims=True)
    out = d_probs - dot
    out *= probs
    return out


def top_k_gating(x, router_weight, top_k):
    # x: [N, D], router_weight: [E, D] -> RoutingPlan
    logits = (x @ router_weight.T).astype(compute_dtype(x.dtype), copy=False)  # [N, E]
    return plan_from_logits(logits, top_k, x.dtype)


def top_k_gates_of(logits, top_k_indices, gate_dtype):
    # logits: [N, E], top_k_indices: [N, K] -> [N, K]: softmax over only the chosen k logits (HF JetMoeTopKGating)
    top_k_logits = np.take_along_axis(logits, top_k_indices, axis=1)  # [N, K]
    return softmax(top_k_logits, axis=1).astype(gate_dtype, copy=False)


def top_k_gates_backward(d_gates, plan):
    # d_gates: [N, K] -> d_logits [N, E]: gradient of the gates through the softmax over the chosen k; the other
    # E - K columns get none (HF's topk passes no gradient to values it did not select). Saves the plan.
    d_top = softmax_backward(d_gates, plan.top_k_gates, axis=1)  # [N, K]
    d_logits = np.zeros(plan.logits.shape, np.result_type(plan.logits.dtype, d_top.dtype))  # [N, E]
    np.put_along_axis(d_logits, plan.top_k_indices, d_top, axis=1)
    return d_logits


def top_k_gating_backward(d_logits, x, router_weight):
    # d_logits: [N, E], x: [N, D], router_weight: [E, D] -> d_x [N, D], d_router [E, D] (logits = x @ Wr^T)
    d_logits = d_logits.astype(x.dtype, copy=False)
    return d_logits @ router_weight, d_logits.T @ x


def plan_from_logits(logits, top_k, gate_dtype):
    # logits: [N, E] float32 or better -> RoutingPlan, gates cast to gate_dtype (HF: .type_as(hidden_states))
    # Each step reads the previous one's trace point, so a substituted choice carries on (jetmoe debug --isolate).
    num_experts = logits.shape[1]
    logits = trace.record("logits", logits)
    top_k_indices = trace.record("top_k_indices", top_k_of(logits, top_k))  # [N, K]
    top_k_gates = trace.record("top_k_gates", top_k_gates_of(logits, top_k_indices, gate_dtype))  # [N, K]
    flat_experts = top_k_indices.reshape(-1)  # [N*K]
    sorted_slots = np.argsort(flat_experts, kind="stable")  # [N*K]
    counts = np.bincount(flat_experts, minlength=num_experts)  # [E]
    expert_offsets = np.concatenate([[0], np.cumsum(counts)])  # [E+1]
    return RoutingPlan(logits, top_k_indices, top_k_gates, sorted_slots, expert_offsets)


def expert_load(router_logits, k, keep=None):
    # router_logits: 2L x [N, E] (HF's order: layer 0 attention, layer 0 MLP, ...), keep: [N] bool or None
    # -> [2L, E] share of the N*K top-k choices each expert received (uniform routing: 1/E everywhere)
    # The Switch aux loss pushes towards uniform; an expert at 0 is dead (it never trains, it never runs).
    loads = []
    for logits in router_logits:
        chosen = top_k_of(np.asarray(logits) if keep is None else np.asarray(logits)[keep], k)  # [N', K]
        counts = np.bincount(chosen.reshape(-1), minlength=logits.shape[-1])  # [E]
        loads.append(counts / max(chosen.size, 1))
    return np.stack(loads)


def format_expert_load(load, num_layers):
    # load: [2L, E] shares -> table text, one row per layer, attention (MoA) experts then MLP (MoE) experts
    experts = load.shape[1]
    width = max(4 * experts, len("attention experts"))
    lines = [f"expert load: % of each layer's top-k choices (uniform = {100 / experts:.1f}%)",
             f"layer  {'attention experts':<{width}}  mlp experts"]
    for layer in range(num_layers):
        attention, mlp = (" ".join(f"{100 * x:3.0f}" for x in load[2 * layer + j]) for j in (0, 1))
        lines.append(f"{layer:>5}  {attention:<{width}}  {mlp}")
    return "\n".join(lines)
