"""Preallocated key/value cache.  Shapes: reference/__init__.py.

Like HF's DynamicCache it stores keys after RoPE, per layer, as [B, H, S, Dh]; unlike it, the storage is
allocated once (and doubled when a forward outgrows it) so decoding writes in place instead of concatenating.

Notebook: notebooks/04_mixture_of_attention_heads.ipynb.
"""

import numpy as np


class KVCacheBase:
    """What the NumPy and GPU caches share: per-layer `_keys`/`_values` [B, H, capacity, Dh] filled up to
    `_lengths`, read HF-style, grown by doubling. Subclasses own the storage (`__init__`, `_allocate`, `update`)."""

    @classmethod
    def for_config(cls, config, batch, dtype, capacity=0):
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.kv_channels, dtype, capacity)

    @property
    def batch_size(self):
        return self._keys[0].shape[0]

    @property
    def capacity(self):
        return self._keys[0].shape[2]

    def get_seq_length(self, layer_idx=0):
        """Tokens cached so far (HF's name)."""
        return self._lengths[layer_idx]

    def _grow(self, layer_idx, needed):
        """Reallocate one layer with max(needed, 2 x capacity) slots (amortized O(1) per token), keeping its keys."""
        old_k, old_v = self._keys[layer_idx], self._values[layer_idx]
        capacity = max(needed, 2 * old_k.shape[2])
        length = self._lengths[layer_idx]
        new_shape = old_k.shape[:2] + (capacity,) + old_k.shape[3:]
        self._keys[layer_idx] = self._allocate(new_shape, old_k.dtype)
        self._values[layer_idx] = self._allocate(new_shape, old_v.dtype)
        self._keys[layer_idx][:, :, :length] = old_k[:, :, :length]
        self._values[layer_idx][:, :, :length] = old_v[:, :, :length]

    @property
    def key_cache(self):
        # L x [B, H, S, Dh]
        return [k[:, :, :n] for k, n in zip(self._keys, self._lengths)]

    @property
    def value_cache(self):
        # L x [B, H, S, Dh]
        return [v[:, :, :n] for v, n in zip(self._values, self._lengths)]

    def __len__(self):
        return len(self._keys)

    def __getitem__(self, layer_idx):
        """(keys, values) of one layer, like indexing HF's legacy cache tuple."""
        return self.key_cache[layer_idx], self.value_cache[layer_idx]


class KVCache(KVCacheBase):
    def __init__(self, num_layers, batch, heads, head_dim, dtype, capacity=0):
        self._keys = [np.empty((batch, heads, capacity, head_dim), dtype) for _ in range(num_layers)]
        self._values = [np.empty((batch, heads, capacity, head_dim), dtype) for _ in range(num_layers)]
        self._lengths = [0] * num_layers

    def _allocate(self, shape, dtype):
        return np.empty(shape, dtype)

    def update(self, layer_idx, k, v):
        # k, v: [B, H, T, Dh] new entries -> all keys and values so far, [B, H, S, Dh] (views, no copy)
        start = self._lengths[layer_idx]
        end = start + k.shape[2]
        if end > self._keys[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self._keys[layer_idx][:, :, start:end] = k
        self._values[layer_idx][:, :, start:end] = v
        self._lengths[layer_idx] = end
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]
