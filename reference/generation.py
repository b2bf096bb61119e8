"""Greedy generation with a preallocated KV cache, following HF GenerationMixin's greedy search.

Shape legend: reference/config.py.
- position_ids come from the attention mask: cumsum(mask) - 1, with 1 at padded positions (HF
  prepare_inputs_for_generation), so a left-padded prompt sees the positions it would see unpadded.
- A sequence that has produced an eos keeps receiving pad tokens (pad_token_id, else the first eos) until
  every sequence is done or max_new_tokens is reached.
"""

import numpy as np

from .trace import to_numpy


def default_attention_mask(input_ids, config):
    # input_ids: [B, T] -> [B, T]. HF infers padding only when pad_token_id is set, present and not an eos.
    pad = config.pad_token_id
    if pad is not None and pad not in config.eos_token_ids and (input_ids == pad).any():
        return (input_ids != pad).astype(np.int64)
    return np.ones_like(input_ids)


def positions_from_mask(attention_mask):
    # attention_mask: [B, S] -> [B, S]
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions)


def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False):
    # input_ids: [B, T] -> [B, T + new] int64 NumPy, new <= max_new_tokens
    # model: anything with .config, .new_cache(batch, capacity) and HF's forward keywords (reference or gpu/)
    if do_sample:
        raise NotImplementedError("do_sample=True: sampling is not implemented yet; use greedy (do_sample=False)")
    config = model.config
    input_ids = to_numpy(input_ids)  # NumPy or CuPy: the GPU twin runs this same loop
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {input_ids.shape}")
    if input_ids.size and not np.issubdtype(input_ids.dtype, np.integer):  # astype below would truncate floats
        raise TypeError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    tokens = input_ids.astype(np.int64)
    mask = default_attention_mask(tokens, config) if attention_mask is None else to_numpy(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids has shape {tokens.shape}")
    mask = mask.astype(np.int64)
    eos = np.array(config.eos_token_ids, dtype=np.int64)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos.size else 0)
    batch, prompt_len = tokens.shape
    cache = model.new_cache(batch, capacity=prompt_len + max_new_tokens)
    unfinished = np.ones(batch, dtype=bool)
    step_ids = tokens
    for _ in range(max_new_tokens):
        positions = positions_from_mask(mask)[:, -step_ids.shape[1]:]  # [B, T_step]
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        next_tokens = to_numpy(out.logits[:, -1].argmax(axis=-1))  # [B]
        next_tokens = np.where(unfinished, next_tokens, pad)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        unfinished &= ~np.isin(next_tokens, eos)
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
    return tokens
