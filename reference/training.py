"""Training: the loss and the gradient of every parameter of a JetMoeForCausalLM, by the hand-written backward.

Shapes: the legend in reference/__init__.py. Notebook: notebooks/08_backpropagation_through_a_mixture_of_experts.ipynb.

value_and_grad runs the forward keeping what each op's backward needs, then reference/model.py's `backward`, and
names each gradient as model.state_dict() names its tensor. The batch is cut into shards of rows, each run on its
own thread (reference.io.mapped.map_threads); optim.py holds what uses the gradients (AdamW, clip_grad_norm).
"""

import numpy as np

from .hf_classes import JetMoeForCausalLM, MoeCausalLMOutputWithPast
from .inputs import int_array
from .io import trace
from .io.mapped import THREADS, map_threads
from .losses import (IGNORE_INDEX, aux_mask, causal_lm_loss_backward, causal_lm_losses, check_aux_loss,
                     next_token_labels, router_aux_loss_backward)
from .model import backward, block_leaves
from .names import BLOCK_TENSORS


def value_and_grad(model, input_ids, labels, attention_mask=None, output_router_logits=False, aux_loss="hf"):
    # input_ids: [B, T], labels: [B, T], attention_mask: [B, T] or None -> (MoeCausalLMOutputWithPast, {name: grad})
    """(out, grads) of a JetMoeForCausalLM: out is the forward's output, as model(input_ids=..., labels=...,
    attention_mask=..., use_cache=False, output_router_logits=..., aux_loss=...) returns it (out.loss adds
    aux_loss_coef * the aux loss when output_router_logits); grads maps every name of model.state_dict() to
    d out.loss / d that tensor, in its shape and dtype. A tied lm_head's gradient is added into
    model.embed_tokens.weight, as autograd does for the one shared parameter. Equal to torch autograd on HF's
    JetMoe (tests/oracle/test_grad_oracle.py).

    The forward keeps what each op's backward needs (`saved`); the backward runs the ops in reverse: the loss,
    lm_head, final norm, each block (reference/attention.py, experts.py), the embedding. Positions and the causal
    mask come from attention_mask as in the forward; no cache is used.

    Data parallel, exactly: the batch is cut into up to reference.io.mapped.THREADS shards of rows, each run on its
    own thread (NumPy releases the GIL, so the elementwise work uses every core). Shards cannot change the result,
    as the losses are taken over the whole batch: the Switch loss's expert counts are global, so its gradient is
    computed on all router logits and then split.
    """
    if not isinstance(model, JetMoeForCausalLM):
        raise TypeError(f"value_and_grad needs a JetMoeForCausalLM, got {type(model).__name__}")
    if labels is None:
        raise ValueError("value_and_grad needs labels: the gradient is that of the causal-LM loss")
    config = model.config
    check_aux_loss(aux_loss)
    input_ids = int_array("input_ids", input_ids, 2)
    labels = np.asarray(labels)
    shards = batch_shards(input_ids.shape[0], 1 if trace.tracing() else THREADS)
    rows = lambda a, s: None if a is None else np.asarray(a)[s]  # noqa: E731
    saves = [{} for _ in shards]
    parts = map_threads(lambda i: model(input_ids=input_ids[shards[i]], attention_mask=rows(attention_mask, shards[i]),
                                        use_cache=False, output_router_logits=output_router_logits, saved=saves[i]),
                        range(len(shards)))
    logits = np.concatenate([p.logits for p in parts])  # [B, T, V]
    router_logits = (tuple(np.concatenate(r) for r in zip(*(p.router_logits for p in parts)))
                     if output_router_logits else None)  # 2L x [N, E]
    loss, aux = causal_lm_losses(config, logits, labels, router_logits, attention_mask, input_ids.shape, aux_loss)
    d_router_logits = [None] * (2 * config.num_hidden_layers)
    if output_router_logits and config.aux_loss_coef != 0:
        d_router_logits = [config.aux_loss_coef * d for d in router_aux_loss_backward(
            aux_loss, router_logits, config.num_local_experts, config.num_experts_per_tok,
            aux_mask(attention_mask, input_ids.shape))]
    kept = np.count_nonzero(next_token_labels(labels) != IGNORE_INDEX)
    if kept == 0:
        raise ValueError("labels predict no token (every next-token label is -100): the loss is NaN, no gradient")
    tokens = input_ids.shape[1]

    def shard_backward(i):
        s = shards[i]
        d_logits = causal_lm_loss_backward(parts[i].logits, labels[s], kept)  # [b, T, V]: of the whole batch's mean
        token_rows = slice(s.start * tokens, s.stop * tokens)  # this shard's rows of each [N, E]
        return named_grads(model, saves[i], d_logits.astype(model.dtype, copy=False),
                           [None if d is None else d[token_rows] for d in d_router_logits])

    grads = map_threads(shard_backward, range(len(shards)))
    total = grads[0]  # the shards' sum, accumulated in place into the first shard's arrays (no extra copy)
    for shard_grads in grads[1:]:
        for name, g in shard_grads.items():
            total[name] += g
    out = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, router_logits=router_logits)
    return out, {name: total[name].astype(t.dtype, copy=False) for name, t in model.state_dict().items()}


def batch_shards(batch, count):
    # -> up to `count` slices of consecutive rows covering range(batch), as even as they can be
    bounds = np.linspace(0, batch, min(count, batch) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def named_grads(model, saved, d_logits, d_router_logits):
    # d_logits: [B, T, V], d_router_logits: 2L x ([N, E] or None), saved: the forward's dict
    # -> {state_dict name: gradient} of a JetMoeForCausalLM
    base, config = model.model, model.config
    d_embed, d_layers, d_norm, d_lm_head = backward(d_logits, d_router_logits, saved, base.layers, base.norm,
                                                    model.lm_head, config)
    grads = {"model.norm.weight": d_norm, "model.embed_tokens.weight": d_embed}
    for i, d_layer in enumerate(d_layers):
        grads.update(("model." + t.name(i), g) for t, g in zip(BLOCK_TENSORS, block_leaves(d_layer)))
    if config.tie_word_embeddings:
        d_embed += d_lm_head  # one shared parameter: autograd sums its two uses
    else:
        grads["lm_head.weight"] = d_lm_head
    return grads
