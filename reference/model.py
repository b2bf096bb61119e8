"""The JetMoE forward and backward, as the block diagram reads.

Shapes: the legend in reference/__init__.py. Walked through in notebooks/05_the_whole_model.ipynb.

  h = embed_tokens[ids]                                                [B, T, D]
  per block:  h = h + MoA(rms_norm(h, eps=1e-6))                       (reference/attention.py)
              h = h + MoE(rms_norm(h, eps=1e-6))                       (reference/experts.py)
  h = rms_norm(h, eps=config.rms_norm_eps)                             (reference/norm.py: the eps quirk)
  logits = h @ lm_head^T                                               [B, T, V]

`block` is one block; `forward` takes the embedded tokens through every block and the final norm; the head
(the last line, or a classifier's score) is applied by reference/hf_classes.py, whose HF-style classes
(JetMoeModel, JetMoeForCausalLM, ...: keywords, caches, outputs, from_pretrained, generate) call `forward`.
`block_backward` and `backward` run them in reverse, from d logits to each weight's gradient; value_and_grad
(reference/training.py) drives them.
"""

from dataclasses import dataclass

import numpy as np

from .attention import additive_mask, moa, moa_backward
from .experts import moe, moe_backward
from .io import trace
from .linear import embedding_backward, linear_backward
from .names import BLOCK_TENSORS
from .norm import BLOCK_NORM_EPS, rms_norm, rms_norm_backward
from .rope import cos_sin


# The parameters of a block, named as the forward uses them; reference/names.py's table says which HF tensor
# each field holds.

@dataclass
class ExpertWeights:
    router: np.ndarray  # [E, D]
    input_linear: np.ndarray  # MoA [E, H*Dh, D] / MoE [E, 2F, D]
    output_linear: np.ndarray  # MoA [E, D, H*Dh] / MoE [E, D, F]
    bias: np.ndarray  # [D]
    kv_proj: np.ndarray | None = None  # MoA only: [2*H*Dh, D]


@dataclass
class BlockWeights:
    input_layernorm: np.ndarray  # [D]
    attention: ExpertWeights
    post_attention_layernorm: np.ndarray  # [D]
    mlp: ExpertWeights


def block(h, w, cos, sin, mask, cache, layer_idx, config, saved=None):
    # h: [B, T, D], w: BlockWeights, cos/sin: [B|1, T, Dh], mask: [B|1, 1, T, S]
    # -> h [B, T, D], attention probs [B, K*H, T, S], router logits (attention [N, E], mlp [N, E])
    # Every trace point hands on the value the forward continues with (reference/io/trace.py).
    # saved: None, or a dict that receives what block_backward needs.
    keep = (lambda part: None) if saved is None else (lambda part: saved.setdefault(part, {}))
    x = trace.record("input_layernorm", rms_norm(h, w.input_layernorm, BLOCK_NORM_EPS))
    with trace.scope("attention"):
        attn_out, probs, attn_logits = moa(x, w.attention, cos, sin, mask, cache, layer_idx, config, keep("attention"))
    mid = trace.record("post_attention_residual", h + attn_out)
    x = trace.record("post_attention_layernorm", rms_norm(mid, w.post_attention_layernorm, BLOCK_NORM_EPS))
    with trace.scope("mlp"):
        mlp_out, mlp_logits = moe(x, w.mlp, config.num_experts_per_tok, keep("mlp"))
    if saved is not None:
        saved.update(input=h, post_attention_residual=mid)
    return trace.record("output", mid + mlp_out), probs, (attn_logits, mlp_logits)


def block_backward(d_out, saved, w, config, d_router_logits=(None, None)):
    # d_out: [B, T, D], saved: block's dict, d_router_logits: (attention [N, E], mlp [N, E]) from the aux loss
    # -> d_h [B, T, D], BlockWeights of gradients. Each residual passes its gradient through unchanged.
    # Traced as grad.<forward name> (reference/io/trace.py): a branch's output gradient is recorded apart from the
    # residual's, so a substituted branch gradient (jetmoe debug compare --backward --isolate) flows back through
    # that branch alone while the residual path carries the gradient of the sum.
    d_out = trace.record("output", d_out)
    with trace.scope("mlp"):
        d_x, mlp = moe_backward(d_out, saved["mlp"], w.mlp, d_router_logits[1])
    d_x = trace.record("post_attention_layernorm", d_x)
    d_mid, d_post_norm = rms_norm_backward(d_x, saved["post_attention_residual"], w.post_attention_layernorm,
                                           BLOCK_NORM_EPS)
    d_mid += d_out
    d_mid = trace.record("post_attention_residual", d_mid)
    with trace.scope("attention"):
        d_x, attention = moa_backward(d_mid, saved["attention"], w.attention, config, d_router_logits[0])
    d_x = trace.record("input_layernorm", d_x)
    d_h, d_input_norm = rms_norm_backward(d_x, saved["input"], w.input_layernorm, BLOCK_NORM_EPS)
    d_h += d_mid
    return d_h, BlockWeights(d_input_norm, ExpertWeights(**attention), d_post_norm, ExpertWeights(**mlp))


def forward(h, layers, norm, position_ids, cache_position, attention_mask, cache, config,
            output_hidden_states=False, output_attentions=False, saved=None):
    # h: [B, T, D] the embedded tokens, layers: L x BlockWeights, norm: [D], position_ids: [B|1, T],
    # cache_position: [T], attention_mask: [B, S] or None, cache: KVCache or None
    # -> h [B, T, D] after the final norm, hidden states L+1 x [B, T, D], attention probs L x [B, K*H, T, S],
    #    router logits 2L x [N, E]. Each layer's input and probs are kept only when asked for: at a 512-token
    #    prefill of jetmoe-8b the probs of 24 layers alone are 0.8 GB (24 x [1, 32, 512, 512] float32).
    # saved: None, or a dict that receives what `backward` needs.
    num_keys = h.shape[1] + (cache.get_seq_length() if cache is not None else 0)
    mask = additive_mask(attention_mask, cache_position, num_keys, h.dtype)  # [B|1, 1, T, S]
    cos, sin = cos_sin(position_ids, config.kv_channels, config.rope_theta, h.dtype)  # [B|1, T, Dh]
    blocks = [None] * len(layers) if saved is None else saved.setdefault("blocks", [{} for _ in layers])
    h = trace.record("embed_tokens", h)
    hidden_states, attentions, router_logits = [], [], []
    for i, w in enumerate(layers):
        if output_hidden_states:
            hidden_states.append(h)
        with trace.scope(f"layers.{i}"):
            h, probs, logits = block(h, w, cos, sin, mask, cache, i, config, blocks[i])
        if output_attentions:
            attentions.append(probs)
        router_logits.extend(logits)
    if saved is not None:
        saved["final_norm_input"] = h
    h = trace.record("norm", rms_norm(h, norm, config.rms_norm_eps))  # the only norm using rms_norm_eps
    if output_hidden_states:
        hidden_states.append(h)
    if saved is not None:
        saved["final_hidden"] = h
    return h, hidden_states, attentions, router_logits


def backward(d_logits, d_router_logits, saved, layers, norm, lm_head, config):
    # d_logits: [B, T, V], d_router_logits: 2L x ([N, E] or None), saved: forward's dict plus "input_ids" [B, T]
    # -> d_embed_tokens [V, D], L x BlockWeights, d_norm [D], d_lm_head [V, D]
    # Each gradient of a trace point is itself a trace point, grad.<forward name>, from the loss towards the
    # embeddings (jetmoe debug dump --backward).
    d_layers = [None] * len(layers)
    with trace.scope("grad"):
        d_logits = trace.record("logits", d_logits)
        d_hidden, d_lm_head = linear_backward(d_logits, saved["final_hidden"], lm_head)
        d_hidden = trace.record("norm", d_hidden)
        d_h, d_norm = rms_norm_backward(d_hidden, saved["final_norm_input"], norm, config.rms_norm_eps)
        for i in reversed(range(len(layers))):
            with trace.scope(f"layers.{i}"):
                d_h, d_layers[i] = block_backward(d_h, saved["blocks"][i], layers[i], config,
                                                  d_router_logits[2 * i: 2 * i + 2])
        d_h = trace.record("embed_tokens", d_h)
    d_embed = embedding_backward(d_h, saved["input_ids"], config.vocab_size, config.pad_token_id)
    return d_embed, d_layers, d_norm, d_lm_head


def block_leaves(b):
    # BlockWeights -> its tensors (or names, or gradients) as a flat list, in reference/names.py's order
    leaves = []
    for t in BLOCK_TENSORS:
        leaf = b
        for field in t.place:
            leaf = getattr(leaf, field)
        leaves.append(leaf)
    return leaves


def block_from_leaves(leaves):
    # a flat list in reference/names.py's order -> BlockWeights (block_leaves' inverse)
    fields = {"attention": {}, "mlp": {}, "block": {}}
    for t, leaf in zip(BLOCK_TENSORS, leaves, strict=True):
        part, field = t.place if len(t.place) == 2 else ("block", t.place[0])
        fields[part][field] = leaf
    return BlockWeights(attention=ExpertWeights(**fields["attention"]), mlp=ExpertWeights(**fields["mlp"]),
                        **fields["block"])


def block_weights(tensors, i):
    # tensors: HF names without "model." -> BlockWeights of layer i
    return block_from_leaves([tensors[t.name(i)] for t in BLOCK_TENSORS])
