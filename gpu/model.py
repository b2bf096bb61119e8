"""The JetMoE forward on the GPU; the twin of reference/model.py, in classes derived from reference/hf_classes.py's
(same keywords, outputs, trace names).

Shapes: reference/__init__.py.

The three classes derive from reference/hf_classes.py's, which hold the keyword handling, outputs and losses; this
file supplies what differs on the device: the upload of the weights, CuPy as the array module, the embedding
lookup and weight product (gpu/linear.py), the device KV cache (gpu/cache.py), the decoder (every block and the
final norm, which gpu/graph.py also captures), from_pretrained's dtype and generate.

Weights live on the device as float32, or (dtype="bfloat16") the big matrices as bf16 bits (uint16) with float32
norms, biases and routers, so routing decisions are made in float32 as in the reference. Activations and
accumulation are float32. Inputs may be NumPy or CuPy; they are validated on the host by reference's own
check_inputs (one small copy), then everything runs on the device. Outputs are CuPy arrays.
"""

import numpy as np

from reference import hf_classes
from reference.config import JetMoeConfig
from reference.io import trace
from reference.io.checkpoint import check_finite, read_checkpoint_tensors, select_tensors
from reference.io.safetensors import BF16
from reference.model import block_weights
from reference.names import BASE_TENSORS, BLOCK_TENSORS
from reference.norm import BLOCK_NORM_EPS

from .attention import moa
from .cache import KVCache, StaticKVCache
from .device import require_cupy
from .experts import moe
from .generation import generate
from .linear import embed, linear
from .norm import rms_norm

WEIGHT_DTYPES = ("float32", "bfloat16")
# Name endings of the tensors kept float32 in bf16 mode (reference/names.py): small, and routers decide which
# experts run.
FLOAT32_ALWAYS = tuple(t.suffix for t in (*BASE_TENSORS, *BLOCK_TENSORS) if t.float32)


def weight_dtype(dtype):
    """np.dtype float32 or bfloat16 from np.float32, "float32", a bfloat16 dtype (reference.io.safetensors.BF16) or
    "bfloat16"."""
    name = "bfloat16" if isinstance(dtype, str) and dtype == "bfloat16" else np.dtype(dtype).name
    if name not in WEIGHT_DTYPES:
        raise TypeError(f"dtype={dtype!r} is not supported by the GPU twin: use np.float32 (parity) or 'bfloat16'")
    return BF16 if name == "bfloat16" else np.dtype(np.float32)


def upload(name, tensor, dtype):
    """One host tensor to the device: float32, or bf16 bits for the big matrices in bf16 mode.

    A CuPy array already in the right form (float32, or uint16 bf16 bits) is used as it is: the GPU benchmark
    makes its 8B-shaped weights directly on the device.
    """
    cp = require_cupy()
    if isinstance(tensor, cp.ndarray):
        wanted = cp.uint16 if dtype.name == "bfloat16" and not name.endswith(FLOAT32_ALWAYS) else cp.float32
        if tensor.dtype != wanted:
            raise TypeError(f"device tensor {name!r} is {tensor.dtype}, the {dtype.name} model needs {wanted}")
        return tensor
    if dtype.name == "bfloat16" and not name.endswith(FLOAT32_ALWAYS):
        return cp.asarray(np.ascontiguousarray(tensor).astype(BF16).view(np.uint16))
    return cp.asarray(np.ascontiguousarray(tensor, dtype=np.float32))


def upload_all(tensors, dtype):
    """Every tensor of a checkpoint, with a clear message when the device runs out of memory."""
    cp = require_cupy()
    try:
        return {name: upload(name, t, dtype) for name, t in tensors.items()}
    except cp.cuda.memory.OutOfMemoryError:
        itemsize = 2 if dtype.name == "bfloat16" else 4
        needed = sum(t.size for t in tensors.values()) * itemsize
        free, total = cp.cuda.runtime.memGetInfo()
        raise MemoryError(f"the model needs about {needed / 2**30:.2f} GiB of GPU memory in {dtype.name}; the "
                          f"device has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB") from None


def check_forward_cache(cache):
    """past_key_values of a model(...) call: None or a gpu.cache.KVCache. Host-side, before any device work.

    A StaticKVCache is refused: its write position and key count live on the device and move only through
    begin_step, which model(...) never calls, so every forward would overwrite positions 0..T-1 and attend over
    the whole capacity (check_inputs lets it through: it is a KVCache subclass)."""
    if isinstance(cache, StaticKVCache):
        raise TypeError("past_key_values is a gpu.cache.StaticKVCache, which is for captured decode steps driven "
                        "by cache.begin_step(...) and attention(num_keys=cache.num_keys), not for model(...) "
                        "calls: pass a gpu.cache.KVCache (e.g. model.new_cache(batch, capacity)) or None")


def rows_linear(x, w):
    # x: [..., Kin], w: [Nout, Kin] -> [..., Nout]: gpu/linear.py's product, which takes rows [M, Kin]
    return linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])


def block(h, w, positions, cache_position, attention_mask, cache, layer_idx, config, output_attentions):
    # h: [B, T, D] -> h, attention probs (or None), (attention logits [N, E], mlp logits [N, E])
    x = trace.record("input_layernorm", rms_norm(h, w.input_layernorm, BLOCK_NORM_EPS))
    with trace.scope("attention"):
        attn_out, probs, attn_logits = moa(x, w.attention, positions, cache_position, attention_mask, cache,
                                           layer_idx, config, output_probs=output_attentions)
    h = trace.record("post_attention_residual", h + attn_out)
    x = trace.record("post_attention_layernorm", rms_norm(h, w.post_attention_layernorm, BLOCK_NORM_EPS))
    with trace.scope("mlp"):
        mlp_out, mlp_logits = moe(x, w.mlp, config.num_experts_per_tok)
    h = trace.record("output", h + mlp_out)
    return h, probs, (attn_logits, mlp_logits)


class _Pretrained:
    """The GPU's loaders: the weights read on the host in float32, then uploaded in the model's dtype."""

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, finite=True):
        # finite: refuse weights holding NaN or inf, as the reference's from_pretrained does (checked on the host)
        config = JetMoeConfig.from_pretrained(path)
        base, head = select_tensors(read_checkpoint_tensors(path), config, cls.head, np.float32)
        if finite:
            check_finite({**base, **head})
        return cls(config, base, head, dtype=dtype)

    @classmethod
    def from_reference(cls, model, dtype=np.float32):
        """The same weights as a reference model (tests compare the two)."""
        base, head = select_tensors(model.state_dict(), model.config, cls.head, model.dtype)  # views, not copies
        return cls(model.config, base, head, dtype=dtype)

    # The reference's savers would meet device arrays (bf16 ones as raw bits): refused with a way out instead.
    def save_pretrained(self, path):
        raise TypeError("the GPU twin does not write checkpoints: save the reference model it was made from")

    def load_state_dict(self, state):
        raise TypeError("the GPU twin does not load state dicts: load them into a reference model, then "
                        "gpu.<class>.from_reference(model, dtype=...)")


class JetMoeModel(_Pretrained, hf_classes.JetMoeModel):
    cache_type = KVCache
    linear = staticmethod(rows_linear)

    def __init__(self, config, tensors, head_tensors=None, dtype=np.float32):
        self.config = config
        self.dtype = weight_dtype(dtype)  # of the big matrices; activations are float32
        self.tensors = upload_all(tensors, self.dtype)
        self.embed_tokens = self.tensors["embed_tokens.weight"]  # [V, D]
        self.norm = self.tensors["norm.weight"]  # [D]
        self.layers = [block_weights(self.tensors, i) for i in range(config.num_hidden_layers)]

    @property
    def xp(self):
        return require_cupy()

    def checked_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache):
        check_forward_cache(cache)  # before any device work
        return super().checked_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache)

    def embed(self, input_ids, inputs_embeds):
        # host input_ids [B, T] (or inputs_embeds [B, T, D] instead) -> h [B, T, D] float32 on the device
        cp = require_cupy()
        if inputs_embeds is None:
            return embed(self.embed_tokens, cp.asarray(input_ids))
        return cp.asarray(inputs_embeds, dtype=cp.float32)

    def decoder(self, h, positions, cache_position, attention_mask, cache, output_hidden_states=False,
                output_attentions=False, saved=None):
        """Every block and the final norm, on device arrays only: no checks and no host copies, so gpu/graph.py
        captures it in a CUDA graph. model(...) validates its inputs, then calls this.

        h: [B, T, D] embeddings, positions: [B|1, T], cache_position: [T], attention_mask: [B, S] or None (device
        int64) -> (normed h [B, T, D], hidden states, attention probs, router logits) as lists; the first two
        only when asked for."""
        if saved is not None:
            raise TypeError("the GPU twin has no backward: value_and_grad runs on the reference model")
        h = trace.record("embed_tokens", h)
        hidden_states, attentions, router_logits = [], [], []
        for i, w in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            with trace.scope(f"layers.{i}"):
                h, probs, logits = block(h, w, positions, cache_position, attention_mask, cache, i, self.config,
                                         output_attentions)
            if output_attentions:
                attentions.append(probs)
            router_logits.extend(logits)
        h = trace.record("norm", rms_norm(h, self.norm, self.config.rms_norm_eps))  # the only norm with rms_norm_eps
        if output_hidden_states:
            hidden_states.append(h)
        return h, hidden_states, attentions, router_logits


class JetMoeForCausalLM(_Pretrained, hf_classes.JetMoeForCausalLM):
    def __init__(self, config, tensors, head_tensors, dtype=np.float32):
        self.config = config
        self.model = JetMoeModel(config, tensors, dtype=dtype)
        self.dtype = self.model.dtype
        self.lm_head = (self.model.embed_tokens if config.tie_word_embeddings else
                        upload("lm_head.weight", head_tensors["lm_head.weight"], self.dtype))  # [V, D]

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, **kwargs):
        """Prompt plus new tokens as a CuPy int64 array; greedy or sampling, the KV cache on the device, each
        decode step one replayed CUDA graph (graph=False: launched op by op). See gpu/generation.py."""
        return generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, **kwargs)


class JetMoeForSequenceClassification(_Pretrained, hf_classes.JetMoeForSequenceClassification):
    def __init__(self, config, tensors, head_tensors, dtype=np.float32):
        self.config = config
        self.model = JetMoeModel(config, tensors, dtype=dtype)
        self.dtype = self.model.dtype
        self.score = upload("score.weight", head_tensors["score.weight"], np.dtype(np.float32))  # [num_labels, D], tiny
