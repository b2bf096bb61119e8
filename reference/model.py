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

from . import trace
from .attention import additive_mask, moa
from .cache import KVCache
from .checkpoint import Pretrained, model_dtype
from .experts import moe
from .inputs import check_inputs, int_array, pooling_positions
from .losses import causal_lm_losses, classification_loss
from .norm import BLOCK_NORM_EPS, rms_norm
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from .rope import cos_sin
from .weights import linear


def block(h, w, cos, sin, mask, cache, layer_idx, config):
    # h: [B, T, D] -> h [B, T, D], attention probs [B, K*H, T, S], router logits (attention [N, E], mlp [N, E])
    # Every trace point hands on the value the forward continues with (reference/trace.py).
    x = trace.record("input_layernorm", rms_norm(h, w.input_layernorm, BLOCK_NORM_EPS))
    with trace.scope("attention"):
        attn_out, probs, attn_logits = moa(x, w.attention, cos, sin, mask, cache, layer_idx, config)
    h = trace.record("post_attention_residual", h + attn_out)
    x = trace.record("post_attention_layernorm", rms_norm(h, w.post_attention_layernorm, BLOCK_NORM_EPS))
    with trace.scope("mlp"):
        mlp_out, mlp_logits = moe(x, w.mlp, config.num_experts_per_tok)
    h = trace.record("output", h + mlp_out)
    return h, probs, (attn_logits, mlp_logits)


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
                 output_router_logits=None, cache_position=None):
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
        for i, w in enumerate(self.layers):
            hidden_states.append(h)
            with trace.scope(f"layers.{i}"):
                h, probs, logits = block(h, w, cos, sin, mask, cache, i, config)
            attentions.append(probs)
            router_logits.extend(logits)
        h = trace.record("norm", rms_norm(h, self.norm, config.rms_norm_eps))  # the only norm using rms_norm_eps
        hidden_states.append(h)
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
                 output_hidden_states=False, output_router_logits=None, cache_position=None, logits_to_keep=0):
        config = self.config
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, cache_position=cache_position)
        h = out.last_hidden_state  # [B, T, D]
        if isinstance(logits_to_keep, (int, np.integer)):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h  # 0 keeps all, as HF's slice(-0, None)
        else:
            kept = h[:, int_array("logits_to_keep", logits_to_keep, 1)]
        logits = trace.record("logits", linear(kept, self.lm_head))  # [B, T_kept, V]
        loss, aux_loss = causal_lm_losses(config, logits, labels, out.router_logits, attention_mask, h.shape[:2])
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
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


def block_weights(tensors, i):
    # tensors: HF names without "model." -> BlockWeights of layer i
    p = f"layers.{i}."
    a, m = p + "self_attention.experts.", p + "mlp."
    return BlockWeights(
        input_layernorm=tensors[p + "input_layernorm.weight"],
        attention=ExpertWeights(tensors[a + "router.layer.weight"], tensors[a + "input_linear.weight"],
                                tensors[a + "output_linear.weight"], tensors[a + "bias"],
                                tensors[p + "self_attention.kv_proj.weight"]),
        post_attention_layernorm=tensors[p + "post_attention_layernorm.weight"],
        mlp=ExpertWeights(tensors[m + "router.layer.weight"], tensors[m + "input_linear.weight"],
                          tensors[m + "output_linear.weight"], tensors[m + "bias"]))
