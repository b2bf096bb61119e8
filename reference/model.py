"""The JetMoE forward pass: JetMoeModel, JetMoeForCausalLM, JetMoeForSequenceClassification.

Shapes: the legend in reference/__init__.py. Walked through in notebooks/05_the_whole_model.ipynb.

  h = embed(ids)                                                       [B, T, D]
  per block:  h = h + MoA(rms_norm(h, eps=1e-6))                       (reference/attention.py)
              h = h + MoE(rms_norm(h, eps=1e-6))                       (reference/experts.py)
  h = rms_norm(h, eps=config.rms_norm_eps)                             (reference/norm.py: the eps quirk)
  logits = h @ lm_head^T                                               [B, T, V]
"""

from dataclasses import dataclass

import numpy as np

from .attention import additive_mask, moa, moa_backward
from .cache import KVCache
from .experts import moe, moe_backward
from .inputs import check_inputs, int_array, pooling_positions
from .io import trace
from .io.checkpoint import Pretrained, model_dtype
from .io.mapped import THREADS, map_threads
from .linear import embedding_backward, linear, linear_backward
from .losses import (IGNORE_INDEX, aux_mask, causal_lm_loss_backward, causal_lm_losses, check_aux_loss,
                     classification_loss, next_token_labels, router_aux_loss_backward)
from .norm import BLOCK_NORM_EPS, rms_norm, rms_norm_backward
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from .rope import cos_sin


def block(h, w, cos, sin, mask, cache, layer_idx, config, saved=None):
    # h: [B, T, D] -> h [B, T, D], attention probs [B, K*H, T, S], router logits (attention [N, E], mlp [N, E])
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


class JetMoeModel(Pretrained):
    def __init__(self, config, tensors, head_tensors=None):
        self.config = config
        self.tensors = tensors  # HF names without the "model." prefix
        self.dtype = model_dtype(tensors["embed_tokens.weight"].dtype)
        self.embed_tokens = tensors["embed_tokens.weight"]  # [V, D]
        self.norm = tensors["norm.weight"]  # [D]
        self.layers = [block_weights(tensors, i) for i in range(config.num_hidden_layers)]

    def state_dict(self):
        return dict(self.tensors)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=False, output_hidden_states=False,
                 output_router_logits=None, cache_position=None, saved=None):
        # saved: None, or a dict that receives what value_and_grad's backward needs
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        input_ids, inputs_embeds, attention_mask, position_ids, cache_position = check_inputs(
            config, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_key_values)
        h = self.embed_tokens[input_ids] if inputs_embeds is None else inputs_embeds.astype(self.dtype)  # [B, T, D]
        batch, tokens, _ = h.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache.for_config(config, batch, self.dtype, capacity=tokens)
        num_keys = tokens + (cache.get_seq_length() if cache is not None else 0)
        mask = additive_mask(attention_mask, cache_position, num_keys, self.dtype)  # [B|1, 1, T, S]
        cos, sin = cos_sin(position_ids, config.kv_channels, config.rope_theta, self.dtype)  # [B|1, T, Dh]
        h = trace.record("embed_tokens", h)
        hidden_states, attentions, router_logits = [], [], []
        if saved is not None:
            saved["blocks"] = [{} for _ in self.layers]
        # Each layer's input and attention probs are kept only when asked for: at a 512-token prefill of
        # jetmoe-8b the probs of 24 layers alone are 0.8 GB (24 x [1, 32, 512, 512] float32).
        for i, w in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            with trace.scope(f"layers.{i}"):
                h, probs, logits = block(h, w, cos, sin, mask, cache, i, config,
                                         None if saved is None else saved["blocks"][i])
            if output_attentions:
                attentions.append(probs)
            router_logits.extend(logits)
        if saved is not None:
            saved.update(input_ids=input_ids, attention_mask=attention_mask, final_norm_input=h)
        h = trace.record("norm", rms_norm(h, self.norm, config.rms_norm_eps))  # the only norm using rms_norm_eps
        if output_hidden_states:
            hidden_states.append(h)
        if saved is not None:
            saved["final_hidden"] = h
        return MoeModelOutputWithPast(
            last_hidden_state=h, past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            router_logits=tuple(router_logits) if output_router_logits else None)

    forward = __call__


class JetMoeForCausalLM(Pretrained):
    head = "causal_lm"

    def __init__(self, config, tensors, head_tensors):
        self.config = config
        self.model = JetMoeModel(config, tensors)
        self.dtype = self.model.dtype
        self.lm_head = head_tensors["lm_head.weight"]  # [V, D]; the embedding itself when tied

    def state_dict(self):
        out = {"model." + n: t for n, t in self.model.state_dict().items()}
        if not self.config.tie_word_embeddings:  # HF omits a tied lm_head from the file
            out["lm_head.weight"] = self.lm_head
        return out

    def new_cache(self, batch, capacity):
        """An empty KV cache for `batch` sequences of up to `capacity` tokens (used by generate)."""
        return KVCache.for_config(self.config, batch, self.dtype, capacity=capacity)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, **kwargs):
        """Prompt plus new tokens, [B, T + new] int64; greedy equals HF's generate; do_sample=True samples with
        temperature / top_k / top_p and a seed. See reference/generation.py."""
        from .generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, **kwargs)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                 output_hidden_states=False, output_router_logits=None, cache_position=None, logits_to_keep=0,
                 aux_loss="hf", saved=None):
        # aux_loss: which load-balancing loss joins .loss (reference/losses.py: "hf", "per_router", "jetmoe")
        # saved: None, or a dict that receives what value_and_grad's backward needs
        config = self.config
        check_aux_loss(aux_loss)
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, cache_position=cache_position, saved=saved)
        h = out.last_hidden_state  # [B, T, D]
        if isinstance(logits_to_keep, (int, np.integer)):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h  # 0 keeps all, as HF's slice(-0, None)
        else:
            kept = h[:, int_array("logits_to_keep", logits_to_keep, 1)]
        logits = trace.record("logits", linear(kept, self.lm_head))  # [B, T_kept, V]
        loss, aux = causal_lm_losses(config, logits, labels, out.router_logits, attention_mask, h.shape[:2], aux_loss)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits,
                                         past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                                         attentions=out.attentions, router_logits=out.router_logits)

    forward = __call__


class JetMoeForSequenceClassification(Pretrained):
    head = "sequence_classification"

    def __init__(self, config, tensors, head_tensors):
        self.config = config
        self.model = JetMoeModel(config, tensors)
        self.dtype = self.model.dtype
        self.score = head_tensors["score.weight"]  # [num_labels, D]

    def state_dict(self):
        out = {"model." + n: t for n, t in self.model.state_dict().items()}
        out["score.weight"] = self.score
        return out

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                 output_hidden_states=False, cache_position=None):
        config = self.config
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         cache_position=cache_position, output_router_logits=False)
        logits = linear(out.last_hidden_state, self.score)  # [B, T, C]
        batch = logits.shape[0]
        pooled = logits[np.arange(batch), pooling_positions(config, input_ids, batch)]  # [B, C]
        pooled = trace.record("pooled_logits", pooled)
        loss = None if labels is None else classification_loss(config, pooled, labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states, attentions=out.attentions)

    forward = __call__


# The weights, named as the forward uses them (HF's tensor names are in block_weights).

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


def block_names(i):
    # -> BlockWeights of layer i's HF tensor names (without "model.")
    p = f"layers.{i}."
    a, m = p + "self_attention.experts.", p + "mlp."
    return BlockWeights(
        input_layernorm=p + "input_layernorm.weight",
        attention=ExpertWeights(a + "router.layer.weight", a + "input_linear.weight", a + "output_linear.weight",
                                a + "bias", p + "self_attention.kv_proj.weight"),
        post_attention_layernorm=p + "post_attention_layernorm.weight",
        mlp=ExpertWeights(m + "router.layer.weight", m + "input_linear.weight", m + "output_linear.weight",
                          m + "bias"))


def block_leaves(b):
    # BlockWeights -> its tensors (or names, or gradients) as a flat list, in one fixed order
    experts = [(e.router, e.input_linear, e.output_linear, e.bias) + (() if e.kv_proj is None else (e.kv_proj,))
               for e in (b.attention, b.mlp)]
    return [b.input_layernorm, *experts[0], b.post_attention_layernorm, *experts[1]]


def block_weights(tensors, i):
    # tensors: HF names without "model." -> BlockWeights of layer i
    n = block_names(i)
    t = tensors.__getitem__
    return BlockWeights(
        input_layernorm=t(n.input_layernorm),
        attention=ExpertWeights(t(n.attention.router), t(n.attention.input_linear), t(n.attention.output_linear),
                                t(n.attention.bias), t(n.attention.kv_proj)),
        post_attention_layernorm=t(n.post_attention_layernorm),
        mlp=ExpertWeights(t(n.mlp.router), t(n.mlp.input_linear), t(n.mlp.output_linear), t(n.mlp.bias)))


# Training: the loss and the gradient of every parameter, by a hand-written backward (notebook 08).

def value_and_grad(model, input_ids, labels, attention_mask=None, output_router_logits=False, aux_loss="hf"):
    """(out, grads) of a JetMoeForCausalLM: out is the forward's output, as model(input_ids=..., labels=...,
    attention_mask=..., use_cache=False, output_router_logits=..., aux_loss=...) returns it (out.loss adds
    aux_loss_coef * the aux loss when output_router_logits); grads maps every name of model.state_dict() to
    d out.loss / d that tensor, in its shape and dtype. A tied lm_head's gradient is added into
    model.embed_tokens.weight, as autograd does for the one shared parameter. Equal to torch autograd on HF's
    JetMoe (tests/oracle/test_grad_oracle.py).

    The forward keeps what each op's backward needs (`saved`); the backward runs the ops in reverse: the loss,
    lm_head, final norm, each block (reference/attention.py, experts.py), the embedding. Positions and the causal
    mask come from attention_mask as in the forward; no cache is used.

    Data parallel, exactly: the batch is cut into up to weights.THREADS shards of rows, each run on its own thread
    (NumPy releases the GIL, so the elementwise work uses both cores: 2.7 s against 5.0 s a 16x256 step of the
    bundled model here). Shards cannot change the result, as the losses are taken over the whole batch: the
    Switch loss's expert counts are global, so its gradient is computed on all router logits and then split.
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
        return backward(model, saves[i], d_logits.astype(model.dtype, copy=False),
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


def backward(model, saved, d_logits, d_router_logits):
    # d_logits: [B, T, V], d_router_logits: 2L x ([N, E] or None), saved: the forward's dict
    # -> {state_dict name: gradient} of a JetMoeForCausalLM
    # Each gradient of a trace point is itself a trace point, grad.<forward name>, from the loss towards the
    # embeddings (jetmoe debug dump --backward).
    config, base = model.config, model.model
    with trace.scope("grad"):
        d_logits = trace.record("logits", d_logits)
        d_hidden, d_lm_head = linear_backward(d_logits, saved["final_hidden"], model.lm_head)
        d_hidden = trace.record("norm", d_hidden)
        d_h, d_norm = rms_norm_backward(d_hidden, saved["final_norm_input"], base.norm, config.rms_norm_eps)
        grads = {"norm.weight": d_norm}
        for i in reversed(range(config.num_hidden_layers)):
            with trace.scope(f"layers.{i}"):
                d_h, block_grads = block_backward(d_h, saved["blocks"][i], base.layers[i], config,
                                                  d_router_logits[2 * i: 2 * i + 2])
            grads.update(zip(block_leaves(block_names(i)), block_leaves(block_grads)))
        d_h = trace.record("embed_tokens", d_h)
    grads["embed_tokens.weight"] = embedding_backward(d_h, saved["input_ids"], config.vocab_size, config.pad_token_id)
    grads = {"model." + name: g for name, g in grads.items()}
    if config.tie_word_embeddings:
        grads["model.embed_tokens.weight"] += d_lm_head
    else:
        grads["lm_head.weight"] = d_lm_head
    return grads
