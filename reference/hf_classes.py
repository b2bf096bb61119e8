"""HF's classes around the math: JetMoeModel, JetMoeForCausalLM, JetMoeForSequenceClassification, their outputs.

Shapes: the legend in reference/__init__.py. Walked through in notebooks/05_the_whole_model.ipynb.

They take transformers' keywords (use_cache and output_router_logits from the config, logits_to_keep, labels,
inputs_embeds, ...), check them on the host (reference/inputs.py), run reference/model.py's `forward`, and return
HF's output dataclasses, field for field (transformers.modeling_outputs). from_pretrained, from_random and
save_pretrained come from reference.io.checkpoint.Pretrained.

The GPU twin's classes (gpu/model.py) derive from these and supply only what differs: `xp` (the array module),
`embed`, `linear`, `decoder` (every block and the final norm), `cache_type`, and the upload of the weights. Inputs
may then be device arrays; `to_numpy` makes host copies for the checks and the losses (a no-op on NumPy arrays).
"""

from dataclasses import dataclass

import numpy as np

from . import generation
from .cache import KVCache
from .inputs import check_inputs, int_array, pooling_positions, to_numpy
from .io import trace
from .io.checkpoint import Pretrained, model_dtype
from .linear import linear
from .losses import causal_lm_losses, check_aux_loss, classification_loss
from .model import block_weights, forward


@dataclass
class MoeModelOutputWithPast:
    last_hidden_state: np.ndarray  # [B, T, D]
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None  # L+1 x [B, T, D]; the last one is after the final norm, as HF
    attentions: tuple | None = None  # L x [B, K*H, T, S]
    router_logits: tuple | None = None  # 2L x [N, E]: layer i's attention router, then its MLP router


@dataclass
class MoeCausalLMOutputWithPast:
    loss: np.ndarray | None = None
    aux_loss: np.ndarray | None = None
    logits: np.ndarray | None = None  # [B, T_kept, V]
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None


@dataclass
class SequenceClassifierOutputWithPast:
    loss: np.ndarray | None = None
    logits: np.ndarray | None = None  # [B, num_labels], pooled at the last non-pad token
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


class JetMoeModel(Pretrained):
    xp = np  # the array module the weights and activations live in
    cache_type = KVCache
    linear = staticmethod(linear)

    def __init__(self, config, tensors, head_tensors=None):
        self.config = config
        self.tensors = tensors  # HF names without the "model." prefix
        self.dtype = model_dtype(tensors["embed_tokens.weight"].dtype)
        self.embed_tokens = tensors["embed_tokens.weight"]  # [V, D]
        self.norm = tensors["norm.weight"]  # [D]
        self.layers = [block_weights(tensors, i) for i in range(config.num_hidden_layers)]

    def state_dict(self):
        return dict(self.tensors)

    def checked_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache):
        # -> host (input_ids [B, T] or None, inputs_embeds [B, T, D] or None, attention_mask [B, S] or None,
        #    position_ids [B|1, T], cache_position [T]), as reference.inputs.check_inputs returns them
        return check_inputs(self.config, to_numpy(input_ids), to_numpy(inputs_embeds), to_numpy(attention_mask),
                            to_numpy(position_ids), to_numpy(cache_position), cache, cache_type=self.cache_type)

    def embed(self, input_ids, inputs_embeds):
        # host input_ids [B, T] (or inputs_embeds [B, T, D] instead) -> h [B, T, D]
        return self.embed_tokens[input_ids] if inputs_embeds is None else inputs_embeds.astype(self.dtype)

    def decoder(self, h, position_ids, cache_position, attention_mask, cache, output_hidden_states=False,
                output_attentions=False, saved=None):
        # h: [B, T, D] -> h after the final norm, hidden states, attention probs, router logits (model.forward)
        return forward(h, self.layers, self.norm, position_ids, cache_position, attention_mask, cache, self.config,
                       output_hidden_states, output_attentions, saved)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=False, output_hidden_states=False,
                 output_router_logits=None, cache_position=None, saved=None):
        # input_ids: [B, T] (or inputs_embeds [B, T, D]), attention_mask: [B, S], position_ids: [B|1, T],
        # cache_position: [T] -> MoeModelOutputWithPast (last_hidden_state [B, T, D])
        # saved: None, or a dict that receives what model.backward needs (reference/training.py)
        input_ids, inputs_embeds, attention_mask, position_ids, cache_position = self.checked_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_key_values)
        config, xp = self.config, self.xp
        use_cache = config.use_cache if use_cache is None else use_cache
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        h = self.embed(input_ids, inputs_embeds)  # [B, T, D]
        batch, tokens, _ = h.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = self.cache_type.for_config(config, batch, self.dtype, capacity=tokens)
        if saved is not None:
            saved["input_ids"] = input_ids
        h, hidden_states, attentions, router_logits = self.decoder(
            h, xp.asarray(position_ids), xp.asarray(cache_position),
            None if attention_mask is None else xp.asarray(attention_mask), cache, output_hidden_states,
            output_attentions, saved)
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
        return self.model.cache_type.for_config(self.config, batch, self.dtype, capacity=capacity)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, **kwargs):
        """Prompt plus new tokens, [B, T + new] int64; greedy equals HF's generate; do_sample=True samples with
        temperature / top_k / top_p and a seed. See reference/generation.py."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, **kwargs)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                 output_hidden_states=False, output_router_logits=None, cache_position=None, logits_to_keep=0,
                 aux_loss="hf", saved=None):
        # input_ids: [B, T], labels: [B, T], the rest as JetMoeModel's -> MoeCausalLMOutputWithPast (logits
        # [B, T_kept, V]); aux_loss: which load-balancing loss joins .loss (reference/losses.py: "hf",
        # "per_router", "jetmoe")
        # saved: None, or a dict that receives what model.backward needs (reference/training.py)
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
            kept = h[:, self.model.xp.asarray(int_array("logits_to_keep", to_numpy(logits_to_keep), 1))]
        logits = trace.record("logits", self.model.linear(kept, self.lm_head))  # [B, T_kept, V]
        loss = aux = None
        if labels is not None or output_router_logits:  # a few scalars, on host copies of the logits
            router_logits = None if out.router_logits is None else tuple(map(to_numpy, out.router_logits))
            loss, aux = causal_lm_losses(config, to_numpy(logits), to_numpy(labels), router_logits,
                                         to_numpy(attention_mask), h.shape[:2], aux_loss)
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
        # input_ids: [B, T], labels: [B] (or [B, C] multi-label), the rest as JetMoeModel's
        # -> SequenceClassifierOutputWithPast (logits [B, C], pooled at each row's last non-pad token)
        config, xp = self.config, self.model.xp
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         cache_position=cache_position, output_router_logits=False)
        h = out.last_hidden_state  # [B, T, D]
        batch = h.shape[0]
        rows = xp.asarray(pooling_positions(config, to_numpy(input_ids), batch))  # [B]
        pooled = self.model.linear(h[xp.arange(batch), rows], self.score)  # [B, C]: only the pooled rows need it
        pooled = trace.record("pooled_logits", pooled)
        loss = None if labels is None else classification_loss(config, to_numpy(pooled), to_numpy(labels))
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states, attentions=out.attentions)

    forward = __call__
