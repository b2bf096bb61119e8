"""Where JetMoE's parameters, FLOPs and bytes go: formulas from the config, and instruments that watch a forward.

Notebook: notebooks/00_jetmoe_at_a_glance.ipynb.  Shapes: reference/__init__.py.

Every count is split into the same PARTS. Parameters are counted from tensor shapes (a checkpoint's, or the ones
a config implies); the active parameters and the FLOPs of a forward come from formulas written from the config.
The instruments measure the same quantities on a real forward without using those formulas: `watch` hands the
model parameters that report every use (which elements each product, sum or lookup read, and the matmul's
FLOPs), and `counted_flops` adds the two attention matmuls, which multiply activations, from the trace's shapes.
FLOPs count matmuls only (2 per multiply-add); norms, RoPE, softmax and SiLU are a rounding error beside them.
"""

import math
from dataclasses import dataclass

import numpy as np

from .io.checkpoint import base_parameter_shapes, head_parameter_shapes
from .io.trace import capture
from .names import tensor_of

PARTS = ("embedding and head", "routers", "kv_proj", "query experts", "attention", "output experts", "MLP experts",
         "norms and biases")


def part_of(name):
    """The PARTS entry an HF tensor name belongs to (any prefix: "model.", "transformer." or none), as
    reference/names.py's table gives it."""
    part = tensor_of(name).part
    if part is None:
        raise ValueError(f"tensor {name!r} belongs to no part of a causal LM: {', '.join(PARTS)}")
    return part


def parameter_shapes(config):
    """HF name -> shape of every tensor a JetMoeForCausalLM checkpoint holds (a tied lm_head is not stored)."""
    shapes = {"model." + name: shape for name, shape in base_parameter_shapes(config).items()}
    if not config.tie_word_embeddings:
        shapes.update(head_parameter_shapes(config, "causal_lm"))
    return shapes


def count_parameters(shapes):
    """HF name -> shape (a checkpoint's tensors, or parameter_shapes(config)) -> {part: parameters}."""
    counts = dict.fromkeys(PARTS, 0)
    for name, shape in shapes.items():
        counts[part_of(name)] += math.prod(shape)
    return counts


def active_parameters(config):
    """{part: parameters one token's forward reads}: its K experts of E in every MoA and MoE, all the rest."""
    D, E, K, H, Dh, F, V, L = (config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                               config.num_key_value_heads, config.kv_channels, config.intermediate_size,
                               config.vocab_size, config.num_hidden_layers)
    # The head multiplies by all V rows; the embedding lookup reads one row, which a tied head already holds.
    embedding = V * D if config.tie_word_embeddings else V * D + D
    return {"embedding and head": embedding, "routers": L * 2 * E * D, "kv_proj": L * 2 * H * Dh * D,
            "query experts": L * K * H * Dh * D, "attention": 0, "output experts": L * K * D * H * Dh,
            "MLP experts": L * K * (2 * F * D + D * F),
            "norms and biases": L * 4 * D + D}  # per block 2 norms + 2 biases, then the final norm


def forward_flops(config, tokens, keys, batch=1):
    """{part: matmul FLOPs} of one forward of `batch` sequences, each `tokens` new tokens attending over `keys`
    keys (cached + new), every logit kept. Prefill: tokens = keys = T. Decode: tokens = 1, keys = S.
    Attention scores every (query, key) pair, the masked ones too, as reference/attention.py does."""
    D, E, K, H, Dh, F, V, L = (config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                               config.num_key_value_heads, config.kv_channels, config.intermediate_size,
                               config.vocab_size, config.num_hidden_layers)
    per_token = {  # a matmul of an [out, in] weight costs 2*out*in per row; dropless: every token runs K experts
        "embedding and head": 2 * V * D, "routers": L * 2 * (2 * E * D), "kv_proj": L * 2 * (2 * H * Dh * D),
        "query experts": L * K * 2 * (H * Dh * D),
        "attention": L * 2 * (2 * K * H * Dh * keys),  # q k^T and probs v, for K*H query heads
        "output experts": L * K * 2 * (D * H * Dh), "MLP experts": L * K * 2 * (2 * F * D + D * F),
        "norms and biases": 0}
    return {part: batch * tokens * flops for part, flops in per_token.items()}


def kv_cache_bytes(config, tokens, itemsize):
    """Bytes of the KV cache for `tokens` tokens: keys and values of H heads of Dh in each of the L layers."""
    return tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.kv_channels * itemsize


def decode_bytes_read(config, keys, itemsize):
    """Bytes one decoded token (batch 1) reads: every active parameter once, and the cache of its `keys` keys.
    Decoding is memory-bound, so this over the memory bandwidth bounds tokens per second on any machine."""
    return sum(active_parameters(config).values()) * itemsize + kv_cache_bytes(config, keys, itemsize)


# ------------------------------------------------------------------------------------------------ capacity factor

def expert_capacity(tokens, top_k, num_experts, capacity_factor):
    """Slots one expert may take under a capacity factor (Switch, GShard): factor x its even share of the
    tokens*top_k slots, rounded up."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_drops(top_k_indices, num_experts, capacity_factor):
    # top_k_indices: [N, K] -> [N, K] bool, True where the slot would be dropped (JetMoE drops none)
    # Each expert takes slots first come, first served; as in GShard every first choice queues before any second.
    tokens, top_k = top_k_indices.shape
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor)
    queue = top_k_indices.T.reshape(-1)  # [K*N]: the first choices in token order, then the second choices...
    arrivals = np.cumsum(queue[:, None] == np.arange(num_experts), axis=0)  # [K*N, E] slots each expert has so far
    place = arrivals[np.arange(queue.size), queue] - 1  # [K*N] the slot's place in its expert's queue
    return (place >= capacity).reshape(top_k, tokens).T  # [N, K]


# ------------------------------------------------------------------------------------------------ instruments

@dataclass
class Use:
    """One use of a parameter: the flat elements [start, stop) it read, and the FLOPs when it was a matmul."""
    name: str
    start: int
    stop: int
    flops: int


def _byte_span(view):
    # -> (first, one past the last) byte address of the memory a view with non-negative strides reads
    first = view.__array_interface__["data"][0]
    return first, first + sum((size - 1) * stride for size, stride in zip(view.shape, view.strides)) + view.itemsize


class _Watched(np.ndarray):
    """A parameter, or a view of one, that logs a Use each time an operation reads it. Slices and transposes stay
    watched; whatever an operation returns is a plain ndarray, so activations never are."""

    def __array_finalize__(self, parent):
        self.name, self.uses, self.origin = (getattr(parent, "name", None), getattr(parent, "uses", None),
                                             getattr(parent, "origin", None))

    def _elements(self):
        # -> [start, stop) of the flat parameter this view covers; views the forward takes (an expert, a block of
        # rows, a transpose) cover one contiguous run, and any other would be miscounted, so it is refused
        low, high = _byte_span(self)
        if high - low != self.size * self.itemsize:
            raise ValueError(f"a use of {self.name} reads a strided view that the instrument cannot count")
        return (low - self.origin) // self.itemsize, (high - self.origin) // self.itemsize

    def __getitem__(self, key):
        if isinstance(key, np.ndarray) and np.issubdtype(key.dtype, np.integer):  # an embedding lookup
            row = math.prod(self.shape[1:])
            start = self._elements()[0]
            self.uses.extend(Use(self.name, start + i * row, start + (i + 1) * row, 0) for i in np.unique(key).tolist())
            return self.view(np.ndarray)[key]
        return super().__getitem__(key)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [x.view(np.ndarray) if isinstance(x, _Watched) else x for x in inputs]
        if ufunc is np.matmul:  # x [..., in] @ W^T [in, out]: 2 FLOPs per multiply-add
            rows = math.prod(np.broadcast_shapes(plain[0].shape[:-2], plain[1].shape[:-2])) * plain[0].shape[-2]
            flops = 2 * rows * plain[0].shape[-1] * plain[1].shape[-1]
        else:
            flops = 0
        for x in inputs:
            if isinstance(x, _Watched):
                x.uses.append(Use(x.name, *x._elements(), flops))
        return getattr(ufunc, method)(*plain, **kwargs)


def _watched(tensor, name, uses):
    # tensor: [...] -> the same memory, logging its uses as `name` into `uses`
    watched = np.asarray(tensor).view(_Watched)
    watched.name, watched.uses, watched.origin = name, uses, watched.__array_interface__["data"][0]
    return watched


def watch(model):
    """JetMoeForCausalLM -> (the same model on the same memory whose parameters log every use, the list of Uses)."""
    uses = []
    base = {name: _watched(t, "model." + name, uses) for name, t in model.model.tensors.items()}
    head = (base["embed_tokens.weight"] if model.config.tie_word_embeddings
            else _watched(model.lm_head, "lm_head.weight", uses))
    return type(model)(model.config, base, {"lm_head.weight": head}), uses


def touched_parameters(uses):
    """{part: parameter elements read at least once} over the uses: the union of each tensor's read ranges."""
    spans = {}
    for use in uses:
        spans.setdefault(use.name, []).append((use.start, use.stop))
    counts = dict.fromkeys(PARTS, 0)
    for name, ranges in spans.items():
        end = 0
        for start, stop in sorted(ranges):
            counts[part_of(name)] += max(0, stop - max(start, end))
            end = max(end, stop)
    return counts


def counted_flops(model, input_ids, past_key_values=None):
    """{part: matmul FLOPs} of model(input_ids, past_key_values), counted while it runs: the weight matmuls by
    the watched parameters (the rows each expert really received), the two attention matmuls from the traced
    probs [B, K*H, T, S] (each a dot over Dh) and context [B, T, K, H*Dh] (each a dot over S)."""
    watched, uses = watch(model)
    with capture() as trace:
        watched(input_ids=input_ids, past_key_values=past_key_values)
    counts = dict.fromkeys(PARTS, 0)
    for use in uses:
        counts[part_of(use.name)] += use.flops
    for i in range(model.config.num_hidden_layers):
        probs = trace[f"layers.{i}.attention.probs"]  # [B, K*H, T, S]
        head_dim = trace[f"layers.{i}.attention.query_rope"].shape[-1]
        context = trace[f"layers.{i}.attention.context"]  # [B, T, K, H*Dh]
        counts["attention"] += 2 * probs.size * head_dim + 2 * context.size * probs.shape[-1]
    return counts
