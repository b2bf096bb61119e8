"""The JetMoE forward pass: JetMoeModel, JetMoeForCausalLM, JetMoeForSequenceClassification.

Shape legend: B batch, T tokens, S cached+new keys, D hidden, E experts, K top-k, H kv heads, Dh head dim,
F intermediate, V vocab, L layers, N = B*T.

  h = embed(ids)                                                       [B, T, D]
  per block:  h = h + MoA(rms_norm(h, eps=1e-6))                       (reference/attention.py)
              h = h + MoE(rms_norm(h, eps=1e-6))                       (reference/experts.py)
  h = rms_norm(h, eps=config.rms_norm_eps)                             (reference/norm.py: the eps quirk)
  logits = h @ lm_head^T                                               [B, T, V]
"""

import warnings
from dataclasses import dataclass

import numpy as np

from . import trace
from .attention import moa
from .cache import KVCache
from .checkpoint import (model_dtype, random_parameters, read_checkpoint_tensors, select_tensors,
                         write_checkpoint)
from .config import JetMoeConfig
from .experts import moe
from .losses import causal_lm_loss, load_balancing_loss, sequence_classification_loss
from .norm import BLOCK_NORM_EPS, rms_norm
from .rope import cos_sin


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


def block(h, w, cos, sin, mask, cache, layer_idx, config):
    # h: [B, T, D] -> h [B, T, D], attention probs [B, K*H, T, S], router logits (attention [N, E], mlp [N, E])
    x = rms_norm(h, w.input_layernorm, BLOCK_NORM_EPS)
    trace.record("input_layernorm", x)
    with trace.scope("attention"):
        attn_out, probs, attn_logits = moa(x, w.attention, cos, sin, mask, cache, layer_idx, config)
    h = h + attn_out
    trace.record("post_attention_residual", h)
    x = rms_norm(h, w.post_attention_layernorm, BLOCK_NORM_EPS)
    trace.record("post_attention_layernorm", x)
    with trace.scope("mlp"):
        mlp_out, mlp_logits = moe(x, w.mlp, config.num_experts_per_tok)
    h = h + mlp_out
    trace.record("output", h)
    return h, probs, (attn_logits, mlp_logits)


def additive_mask(attention_mask, cache_position, num_keys, dtype):
    # attention_mask: [B, S] or None, cache_position: [T] -> [B|1, 1, T, S] with 0 (attend) or finfo.min
    # HF _prepare_4d_causal_attention_mask_with_cache_position: key s is hidden from query t when
    # s > cache_position[t] or attention_mask[b, s] == 0. A fully hidden row (a left-pad query) then holds
    # only finfo.min and softmax makes it uniform: finite in float32 and float64 alike.
    dtype = np.dtype(dtype)
    allowed = np.arange(num_keys)[None, :] <= cache_position[:, None]  # [T, S]
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] != 0)  # [B, 1, T, S]
    return np.where(allowed, dtype.type(0), np.finfo(dtype).min).astype(dtype)


def _int_array(name, value, ndim):
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def check_inputs(cfg, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache,
             cache_type=KVCache):
    """Validate and normalize a forward's inputs (host NumPy arrays); shared with the GPU twin.

    Returns (input_ids [B, T] int64 or None, inputs_embeds [B, T, D] or None, attention_mask [B, S] int64 or None,
    position_ids [B|1, T] int64, cache_position [T] int64). Every error names the argument, shape or value.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_ids = _int_array("input_ids", input_ids, 2)
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0]
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {cfg.vocab_size})")
        batch, tokens = input_ids.shape
    else:
        inputs_embeds = np.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must have shape [B, T, D={cfg.hidden_size}], "
                             f"got {inputs_embeds.shape}")
        if not np.issubdtype(inputs_embeds.dtype, np.floating):
            raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        batch, tokens = inputs_embeds.shape[:2]
    if tokens == 0:
        raise ValueError("the input has no tokens (T=0)")
    past = 0
    if cache is not None:
        if not isinstance(cache, cache_type):
            raise TypeError(f"past_key_values must be a {cache_type.__module__.split('.')[0]}.{cache_type.__name__} (from a "
                            f"previous call), got {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"past_key_values holds batch {cache.batch_size}, the input has batch {batch}")
        past = cache.get_seq_length()
    if attention_mask is not None:
        attention_mask = _int_array("attention_mask", attention_mask, 2)
        if attention_mask.shape != (batch, past + tokens):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected (B, cached + new "
                             f"tokens) = {(batch, past + tokens)}")
    cache_position = (np.arange(past, past + tokens) if cache_position is None
                      else _int_array("cache_position", cache_position, 1))
    if cache_position.shape != (tokens,):
        raise ValueError(f"cache_position has shape {cache_position.shape}, expected ({tokens},)")
    position_ids = (cache_position[None] if position_ids is None
                    else _int_array("position_ids", position_ids, 2))
    if position_ids.shape[1] != tokens or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids has shape {position_ids.shape}, expected ({batch} or 1, {tokens})")
    if position_ids.size and position_ids.max() >= cfg.max_position_embeddings:
        warnings.warn(f"position {position_ids.max()} is beyond max_position_embeddings="
                      f"{cfg.max_position_embeddings}: computed anyway (as HF does), but the model never "
                      "saw such positions in training", stacklevel=3)
    return input_ids, inputs_embeds, attention_mask, position_ids, cache_position


class _Pretrained:
    """from_pretrained / save_pretrained shared by the three model classes."""

    head = "base"

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32):
        config = JetMoeConfig.from_pretrained(path)
        base, head = select_tensors(read_checkpoint_tensors(path), config, cls.head, dtype)
        return cls(config, base, head)

    @classmethod
    def from_random(cls, config, seed=0, std=0.1, dtype=np.float32):
        """A model with every parameter random (biases and norm weights too): for tests, notebooks, benches."""
        tensors = random_parameters(config, cls.head, np.random.default_rng(seed), std, model_dtype(dtype))
        base, head = select_tensors(tensors, config, cls.head, dtype)
        return cls(config, base, head)

    def save_pretrained(self, path):
        write_checkpoint(path, self.config, self.state_dict())


class JetMoeModel(_Pretrained):
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
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        input_ids, inputs_embeds, attention_mask, position_ids, cache_position = check_inputs(
            cfg, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_key_values)
        h = self.embed_tokens[input_ids] if inputs_embeds is None else inputs_embeds.astype(self.dtype)  # [B, T, D]
        batch, tokens, _ = h.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache.for_config(cfg, batch, self.dtype, capacity=tokens)
        num_keys = tokens + (cache.get_seq_length() if cache is not None else 0)
        mask = additive_mask(attention_mask, cache_position, num_keys, self.dtype)  # [B|1, 1, T, S]
        cos, sin = cos_sin(position_ids, cfg.kv_channels, cfg.rope_theta, self.dtype)  # [B|1, T, Dh]
        trace.record("embed_tokens", h)
        hidden_states, attentions, router_logits = [], [], []
        for i, w in enumerate(self.layers):
            hidden_states.append(h)
            with trace.scope(f"layers.{i}"):
                h, probs, logits = block(h, w, cos, sin, mask, cache, i, cfg)
            attentions.append(probs)
            router_logits.extend(logits)
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)  # the only norm that uses config.rms_norm_eps
        trace.record("norm", h)
        hidden_states.append(h)
        return MoeModelOutputWithPast(
            last_hidden_state=h, past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            router_logits=tuple(router_logits) if output_router_logits else None)

    forward = __call__


def causal_lm_losses(cfg, logits, labels, router_logits, attention_mask, input_shape):
    # logits: [B, T_kept, V], labels: [B, T] or None, router_logits: 2L x [N, E] or None -> (loss, aux_loss)
    # Host arrays; shared with the GPU twin, which hands over host copies.
    loss = aux_loss = None
    if labels is not None:
        labels = np.asarray(labels)  # dtype and range: checked by cross_entropy
        if labels.shape != tuple(input_shape):
            raise ValueError(f"labels has shape {labels.shape}, expected {tuple(input_shape)}")
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(f"labels cover {labels.shape[1]} tokens but logits_to_keep kept "
                             f"{logits.shape[1]}: use logits_to_keep=0 to compute a loss")
        loss = causal_lm_loss(logits, labels)
    if router_logits is not None:
        # The intended behaviour of HF's JetMoeForCausalLM (which crashes here, transformers#31791): the
        # Switch loss over all 2L router-logit sets, masked by the current tokens' attention_mask.
        mask = None if attention_mask is None else np.asarray(attention_mask)[:, -input_shape[1]:]
        aux_loss = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok, mask)
        if loss is not None:
            loss = loss + cfg.aux_loss_coef * aux_loss
    return loss, aux_loss


class JetMoeForCausalLM(_Pretrained):
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

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=False,
                 output_hidden_states=False, output_router_logits=None, cache_position=None, logits_to_keep=0):
        cfg = self.config
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, cache_position=cache_position)
        h = out.last_hidden_state  # [B, T, D]
        if isinstance(logits_to_keep, (int, np.integer)):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h  # 0 keeps all, as HF's slice(-0, None)
        else:
            kept = h[:, _int_array("logits_to_keep", logits_to_keep, 1)]
        logits = kept @ self.lm_head.T  # [B, T_kept, V]
        trace.record("logits", logits)
        loss, aux_loss = causal_lm_losses(cfg, logits, labels, out.router_logits, attention_mask, h.shape[:2])
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                                         attentions=out.attentions, router_logits=out.router_logits)

    forward = __call__

    def new_cache(self, batch, capacity):
        """An empty KV cache for `batch` sequences of up to `capacity` tokens (used by generate)."""
        return KVCache.for_config(self.config, batch, self.dtype, capacity=capacity)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, **kwargs):
        """Prompt plus new tokens, [B, T + new] int64; greedy equals HF's generate; do_sample=True samples with
        temperature / top_k / top_p and a seed. See reference/generation.py."""
        from .generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, **kwargs)


def pooling_positions(cfg, input_ids, batch):
    # input_ids: [B, T] host ints or None -> [B] index of the token each row is classified at
    # HF GenericForSequenceClassification: the rightmost token that is not pad (left or right padding).
    if cfg.pad_token_id is None and batch != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id)")
    if cfg.pad_token_id is None or input_ids is None:
        if cfg.pad_token_id is not None:
            warnings.warn("JetMoeForSequenceClassification cannot detect padding in inputs_embeds: "
                          "pooling at the last position", stacklevel=3)
        return np.full(batch, -1)
    ids = np.asarray(input_ids)
    return np.argmax(np.arange(ids.shape[1]) * (ids != cfg.pad_token_id), axis=-1)


def classification_loss(cfg, pooled, labels):
    # pooled: [B, C] host logits, labels: [B] or [B, C] -> scalar
    labels = np.asarray(labels)
    if labels.shape[0] != pooled.shape[0]:
        raise ValueError(f"labels has shape {labels.shape}, expected a first dimension of B={pooled.shape[0]}")
    return sequence_classification_loss(pooled, labels, cfg.num_labels, cfg.problem_type)


class JetMoeForSequenceClassification(_Pretrained):
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
        cfg = self.config
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         cache_position=cache_position, output_router_logits=False)
        logits = out.last_hidden_state @ self.score.T  # [B, T, C]
        pooled = logits[np.arange(logits.shape[0]), pooling_positions(cfg, input_ids, logits.shape[0])]  # [B, C]
        trace.record("pooled_logits", pooled)
        loss = None if labels is None else classification_loss(cfg, pooled, labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states, attentions=out.attentions)

    forward = __call__
