"""The KV cache on the GPU; the twin of reference/cache.py.  Kernels: gpu/kernels/attention.cu (kv_cache_*).

KVCache mirrors the reference: per layer, keys (after RoPE) and values as [B, H, capacity, Dh] device buffers,
float32 or bfloat16 (stored as raw uint16 bits, rounded to nearest even on write), allocated once and doubled
when a forward outgrows them, so decoding writes in place; update() returns views [B, H, S, Dh] of the buffers,
which gpu.attention.attention reads without a copy (it takes their strides). The write position is a host int,
so nothing syncs.

StaticKVCache is the fixed-capacity variant for CUDA graphs: one captured decode step must be replayable as is,
so nothing that changes between steps may live on the host. Its step boundaries live in a device int64 pair
`offsets` = [start, end]: this step writes positions start..end-1 and attends over the first `end` keys.
It is driven step by step as below, never through model(...), which refuses it (gpu.model.check_forward_cache);
gpu/graph.py's GraphDecoder drives it this way for generate.

    cache = StaticKVCache.for_config(config, batch, dtype, capacity)  # capacity >= prompt + new tokens
    mask = cupy.zeros((batch, capacity), cupy.int64); mask[:, :prompt] = prompt_mask   # caller-owned buffer
    # each forward pass (prefill eagerly; a decode step captured once and replayed):
    positions = cache.begin_step(tokens, attention_mask=mask)  # device: start = end, end += tokens;
                                                                # positions = start..end-1; mask[:, start:end] = 1
    for each layer i:
        k, v = cache.update(i, k_new, v_new)                    # written at the device start; full-capacity views
        context = gpu.attention.attention(q, k, v, positions, mask, top_k, num_keys=cache.num_keys)
    # capture (gpu/graph.py's CapturedStep): run the step eagerly first (it compiles the kernels and allocates the
    # `positions` buffer of that many tokens), record its allocations, capture it with those buffers, then per
    # step copy its inputs into the captured input buffers and launch the graph. Every replay advances offsets.

The device cannot raise: a step that runs past the capacity writes nothing beyond it and attention clamps the key
count to the capacity; get_seq_length() (a device read that syncs, so not for a forward pass) shows where it is.
"""

import numpy as np

from reference.cache import KVCacheBase
from reference.io.safetensors import BF16

from .device import require_cupy
from .kernels import kernel

__all__ = ["KVCache", "StaticKVCache", "storage_dtype"]

WRITE_THREADS = 256
WRITE_MAX_BLOCKS = 4096  # the write kernel loops over what a grid this size does not cover
ADVANCE_THREADS = 256
NULL = np.uint64(0)


def storage_dtype(dtype):
    """float32 -> float32; bfloat16 (reference.io.safetensors.BF16, 'bfloat16' or uint16 bits) -> uint16 holding bf16
    bits."""
    dt = BF16 if isinstance(dtype, str) and dtype == "bfloat16" else np.dtype(dtype)
    if dt == np.float32:
        return np.dtype(np.float32)
    if dt == BF16 or dt == np.uint16:
        return np.dtype(np.uint16)
    raise TypeError(f"the GPU KV cache holds float32 or bfloat16, got {dtype}")


def _element_strides(array):
    return tuple(np.int64(s // array.itemsize) for s in array.strides)


class KVCache(KVCacheBase):
    """Device buffers per layer; views, get_seq_length and growth come from reference.cache.KVCacheBase."""

    def __init__(self, num_layers, batch, heads, head_dim, dtype=np.float32, capacity=0):
        cp = require_cupy()
        self.storage_dtype = storage_dtype(dtype)  # float32, or uint16 bf16 bits
        shape = (batch, heads, capacity, head_dim)
        self._keys = [cp.zeros(shape, self.storage_dtype) for _ in range(num_layers)]
        self._values = [cp.zeros(shape, self.storage_dtype) for _ in range(num_layers)]
        self._lengths = [0] * num_layers

    @property
    def num_keys(self):
        """None: update() returns views of exactly the keys in use (StaticKVCache: a device count instead)."""
        return None

    @property
    def is_bf16(self):
        return self.storage_dtype == np.uint16

    def _allocate(self, shape, dtype):
        return require_cupy().zeros(shape, dtype)

    def _check_new(self, layer_idx, k, v):
        cp = require_cupy()
        buf = self._keys[layer_idx]
        if k.ndim != 4:
            raise ValueError(f"KVCache.update: k must be [B, H, T, Dh], got shape {k.shape}")
        expected = (buf.shape[0], buf.shape[1], k.shape[2], buf.shape[3])
        if k.shape != expected or v.shape != expected:
            raise ValueError(f"KVCache.update: k {k.shape} and v {v.shape} must be [B, H, T, Dh] = {expected}")
        if k.dtype != cp.float32 or v.dtype != cp.float32:
            raise TypeError(f"KVCache.update: k and v must be float32, got {k.dtype}, {v.dtype}")
        if (k.shape[3] > 1 and (k.strides[3] != 4 or v.strides[3] != 4)) or min(k.strides + v.strides) < 0:
            k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
        return k, v

    def _write(self, layer_idx, k, v, start, start_dev):
        # k, v: [B, H, T, Dh] float32 -> cache positions start..start+T-1 (start_dev: device [1] int64 instead)
        batch, heads, tokens, head_dim = k.shape
        total = batch * heads * tokens * head_dim
        if total == 0:
            return
        suffix = "bf16" if self.is_bf16 else "f32"
        blocks = min(-(-total // WRITE_THREADS), WRITE_MAX_BLOCKS)
        kernel("attention", f"kv_cache_write_{suffix}")(
            (blocks,), (WRITE_THREADS,),
            (k, *_element_strides(k)[:3], v, *_element_strides(v)[:3], self._keys[layer_idx],
             self._values[layer_idx], np.int64(self.capacity_of(layer_idx)), np.int64(start), start_dev,
             np.int64(batch), np.int64(heads), np.int64(tokens), np.int64(head_dim)))

    def capacity_of(self, layer_idx):
        return self._keys[layer_idx].shape[2]

    def update(self, layer_idx, k, v):
        # k, v: [B, H, T, Dh] float32 new entries -> all keys and values so far, [B, H, S, Dh] (views, no copy)
        k, v = self._check_new(layer_idx, k, v)
        start = self._lengths[layer_idx]
        end = start + k.shape[2]
        if end > self._keys[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self._write(layer_idx, k, v, start, NULL)
        self._lengths[layer_idx] = end
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]


class StaticKVCache(KVCache):
    """Fixed capacity, step offsets on the device (CUDA-graph replayable); see the module docstring."""

    def __init__(self, num_layers, batch, heads, head_dim, dtype=np.float32, capacity=0):
        if capacity <= 0:
            raise ValueError(f"StaticKVCache needs a capacity > 0 (prompt + new tokens), got {capacity}")
        super().__init__(num_layers, batch, heads, head_dim, dtype, capacity)
        cp = require_cupy()
        self.offsets = cp.zeros(2, cp.int64)  # [start, end] of the current step
        self._positions = {}  # tokens -> the [tokens] int64 buffer begin_step fills (reused: capture-safe)

    @property
    def num_keys(self):
        """Device int64 [1]: keys in use this step (end); pass as gpu.attention.attention(num_keys=...)."""
        return self.offsets[1:2]

    def begin_step(self, tokens, attention_mask=None):
        """Starts a forward of `tokens` tokens on the device: start = end, end += tokens. Returns the device
        cache_position [tokens] (start..end-1); marks those columns present in attention_mask [B, capacity] int64."""
        cp = require_cupy()
        tokens = int(tokens)
        if tokens not in self._positions:
            self._positions[tokens] = cp.empty(tokens, cp.int64)
        positions = self._positions[tokens]
        if attention_mask is None:
            mask, mask_sb, width = NULL, np.int64(0), np.int64(0)
        else:
            if attention_mask.dtype != cp.int64 or attention_mask.ndim != 2 \
                    or attention_mask.shape[0] != self.batch_size or attention_mask.strides[1] != 8:
                raise ValueError("begin_step: attention_mask must be an int64 [B, capacity] buffer (last dim "
                                 f"contiguous), got {attention_mask.dtype} {attention_mask.shape}")
            mask, mask_sb = attention_mask, _element_strides(attention_mask)[0]
            width = np.int64(attention_mask.shape[1])
        kernel("attention", "kv_cache_advance")(
            (1,), (ADVANCE_THREADS,),
            (self.offsets, np.int64(tokens), positions, mask, mask_sb, np.int64(self.batch_size), width))
        return positions

    def update(self, layer_idx, k, v):
        # k, v: [B, H, T, Dh] float32 -> the whole buffers [B, H, capacity, Dh]: written at the device start;
        # attention uses the first `num_keys` keys
        k, v = self._check_new(layer_idx, k, v)
        self._write(layer_idx, k, v, 0, self.offsets[0:1])
        return self._keys[layer_idx], self._values[layer_idx]

    def get_seq_length(self, layer_idx=0):
        """Tokens cached so far: a device read (syncs), not for a forward pass."""
        return min(int(self.offsets[1]), self.capacity)

    @property
    def key_cache(self):
        n = self.get_seq_length()
        return [k[:, :, :n] for k in self._keys]

    @property
    def value_cache(self):
        n = self.get_seq_length()
        return [v[:, :, :n] for v in self._values]

    def reset(self):
        """Empties the cache (device-side; the buffers keep their contents but are no longer attended)."""
        self.offsets.fill(0)

    def _grow(self, layer_idx, needed):
        raise RuntimeError("StaticKVCache has a fixed capacity")
