"""Hugging Face's JetMoe forward, recorded under the reference's trace names (docs/semantics.md "Trace names").

Used by `jetmoe debug compare MODEL hf`, the oracle tests and notebook 07; needs the oracle extra (CPU torch,
transformers 4.56.2 or the pinned newest 5.x). Forward hooks on HF's modules catch what each module returns; where HF
keeps a tensor in expert-sorted order (the expert projections see their inputs grouped by expert), it is put back
into the reference's slot order [N, K, ...] with HF's own index_sorted_experts. Two intermediates live inside
plain functions rather than modules: the RoPE outputs are caught by wrapping HF's apply_rotary_pos_emb while the
trace runs. Everything else of the reference's trace has an HF counterpart; none is recomputed here.
"""

import contextlib

import numpy as np
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.jetmoe import modeling_jetmoe as hf

from . import hf_oracle
from .hf_compat import cache_argument, first


def _np(tensor):
    return tensor.detach().to(torch.float64 if tensor.is_floating_point() else torch.int64).numpy()


def _routing(router_outputs, k):
    """HF JetMoeTopKGating outputs -> (index_sorted_experts [N*K], top_k_indices [N, K]).

    HF returns the routing grouped by expert: index_sorted_experts[j] is the slot (n*K + choice) at grouped
    position j, expert_size[e] how many slots expert e got, batch_gates[j] the gate of that slot (put in slot
    order by slot_order)."""
    index_sorted, _, _, expert_size, _ = router_outputs
    expert_of_position = torch.repeat_interleave(torch.arange(len(expert_size)), torch.tensor(expert_size))
    indices = torch.empty(index_sorted.numel(), dtype=torch.long)
    indices[index_sorted] = expert_of_position
    return index_sorted, indices.view(-1, k)


def _ungroup(grouped, index_sorted, shape):
    # grouped: [N*K, X] rows in expert order -> reshaped to `shape` in slot order (row s = token n's choice k)
    out = torch.empty_like(grouped)
    out[index_sorted] = grouped
    return out.reshape(shape)


def slot_order(index_sorted, shape):
    """_ungroup with this routing, as a function of the grouped tensor (or of its gradient)."""
    return lambda grouped: _ungroup(grouped, index_sorted, shape)


@contextlib.contextmanager
def recording(model, sources=None):
    """with recording(hf_causal_lm) as (trace, state): hf_causal_lm(...)  ->  {reference trace name: float64/int64
    array}; set state["prefix"] = "step.{i}." before a decode step's forward. sources: None, or a dict that
    receives {name: (the tensor in autograd's graph, the map of its gradient to the trace's layout)} for every
    traced tensor with a gradient (jetmoe/hf_backward.py reads each one's .grad after backward)."""
    trace = {}
    state = {"prefix": ""}  # the step, the layer being run and the routing of its routers (to ungroup expert tensors)
    config = model.config
    k, heads, head_dim = config.num_experts_per_tok, config.num_key_value_heads, config.kv_channels
    handles = []

    def hook(module, name_of, kind="output"):
        def on_output(_, inputs, output):
            name_of(inputs, output)

        def on_input(_, inputs):
            name_of(inputs, None)

        register = module.register_forward_hook if kind == "output" else module.register_forward_pre_hook
        handles.append(register(on_output if kind == "output" else on_input))

    def record(name, value, layout=None):
        # value: a tensor of HF's forward; layout: None or how the trace lays it out (the same map for its gradient)
        full_name = state["prefix"] + (f"layers.{state['layer']}.{name}" if name[0] != "/" else name[1:])
        trace[full_name] = _np(value if layout is None else layout(value))
        if sources is not None and value.requires_grad:
            value.retain_grad()
            sources[full_name] = (value, layout)

    hook(model.model.embed_tokens, lambda i, o: record("/embed_tokens", o))
    for index, layer in enumerate(model.model.layers):
        attention, moa, mlp = layer.self_attention, layer.self_attention.experts, layer.mlp

        def start(i, o, index=index):
            state["layer"] = index
        hook(layer, start, kind="input")
        hook(layer.input_layernorm, lambda i, o: record("input_layernorm", o))

        def router(prefix):
            def on_router(i, o):
                state[prefix], indices = _routing(o, k)
                record(f"{prefix}.router.logits", o[4])
                record(f"{prefix}.router.top_k_indices", indices)
                record(f"{prefix}.router.top_k_gates", o[2], slot_order(state[prefix], (-1, k)))
            return on_router
        hook(moa.router, router("attention"))
        hook(mlp.router, router("mlp"))

        def query(i, o):  # [N*K, H*Dh] grouped -> [B, T, K, H*Dh]
            shape = trace[f"{state['prefix']}layers.{state['layer']}.input_layernorm"].shape[:2] + (k, heads * head_dim)
            record("attention.query", o, slot_order(state["attention"], shape))
        hook(moa.input_linear, query)

        def key_value(i, o):  # [B, T, 2*H*Dh] -> key, value [B, H, T, Dh] (HF: chunk, view, transpose)
            b, t, _ = o.shape
            for j, name in enumerate(["key", "value"]):
                record(f"attention.{name}", o,
                       lambda x, j=j: x.chunk(2, dim=-1)[j].view(b, t, heads, head_dim).transpose(1, 2))
        hook(attention.kv_proj, key_value)

        def context(i, o):  # output_linear's input: [N*K, H*Dh] grouped -> [B, T, K, H*Dh]
            shape = trace[f"{state['prefix']}layers.{state['layer']}.input_layernorm"].shape[:2] + (k, heads * head_dim)
            record("attention.context", i[0], slot_order(state["attention"], shape))
        hook(moa.output_linear, context, kind="input")

        def attention_out(i, o):  # (attn_output, attn_weights or None, router_logits)
            if o[1] is not None:
                record("attention.probs", o[1])
            record("attention.output", o[0])
        hook(attention, attention_out)
        hook(layer.post_attention_layernorm, lambda i, o: record("post_attention_residual", i[0]), kind="input")
        hook(layer.post_attention_layernorm, lambda i, o: record("post_attention_layernorm", o))

        def expert_act(i, o):  # [N*K, F] grouped -> [N, K, F]
            record("mlp.expert_act", i[0], slot_order(state["mlp"], (-1, k, i[0].shape[-1])))
        hook(mlp.output_linear, expert_act, kind="input")

        def expert_out(i, o):  # [N*K, D] grouped, before gating -> [N, K, D]
            record("mlp.expert_out", o, slot_order(state["mlp"], (-1, k, o.shape[-1])))
        hook(mlp.output_linear, expert_out)
        hook(mlp, lambda i, o: record("mlp.output", first(o)))
        hook(layer, lambda i, o: record("output", first(o)))
    hook(model.model.norm, lambda i, o: record("/norm", o))

    original_rope = hf.apply_rotary_pos_emb

    def rope(q, k_, cos, sin, *args, **kwargs):
        q_rope, k_rope = original_rope(q, k_, cos, sin, *args, **kwargs)
        record("attention.query_rope", q_rope)
        record("attention.key_rope", k_rope)
        return q_rope, k_rope

    hf.apply_rotary_pos_emb = rope
    try:
        yield trace, state
    finally:
        hf.apply_rotary_pos_emb = original_rope
        for handle in handles:
            handle.remove()


def hf_trace(model_dir, forwards, dtype=np.float32, model=None):
    """{name: array} of HF on `forwards`, in the reference's forward order: [(input_ids [B, T], attention_mask
    [B, S], position_ids [B, T])], one forward (use_cache=False, every logit) or generate's prefill and decode steps
    (one DynamicCache, logits_to_keep=1 as generate, decode step i's names prefixed `step.{i}.`). Eager attention,
    output_attentions=True; float64 runs under hf_oracle.float64_precision(), as the goldens do; bfloat16 is HF's
    own bf16 (a real port nobody here wrote)."""
    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype]
    model = model if model is not None else hf_oracle.load_hf(model_dir, torch_dtype)
    precision = hf_oracle.float64_precision() if torch_dtype == torch.float64 else contextlib.nullcontext()
    decoding = len(forwards) > 1
    cache = DynamicCache() if decoding else None
    with precision, torch.no_grad(), recording(model) as (trace, state):
        for step, arrays in enumerate(forwards):
            state["prefix"] = f"step.{step}." if step else ""
            ids, mask, positions = (torch.as_tensor(np.asarray(a), dtype=torch.long) for a in arrays)
            for name, value in zip(("input_ids", "attention_mask", "position_ids"), (ids, mask, positions)):
                trace[f"{state['prefix']}inputs.{name}"] = _np(value)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True,
                        **{cache_argument(hf): cache}, use_cache=decoding, logits_to_keep=1 if decoding else 0)
            trace[f"{state['prefix']}logits"] = _np(out.logits)
    return trace
