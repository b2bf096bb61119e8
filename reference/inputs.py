"""A forward's inputs, checked and normalized on the host before any math: shared with the GPU twin.

Shapes: the legend in reference/__init__.py. Every error names the argument, its shape or its value.

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import warnings

import numpy as np

from .cache import KVCache


def to_numpy(value):
    """Host copy of a NumPy or CuPy array (the GPU twin hands its device arrays here); None and ints pass."""
    if value is None or isinstance(value, (int, np.integer)):
        return value
    return value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else np.asarray(value)


def int_array(name, value, ndim):
    """value as int64 with `ndim` dimensions, or an error naming `name`."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def check_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, cache,
                 cache_type=KVCache):
    """Validate and normalize a forward's inputs (host NumPy arrays).

    Returns (input_ids [B, T] int64 or None, inputs_embeds [B, T, D] or None, attention_mask [B, S] int64 or None,
    position_ids [B|1, T] int64, cache_position [T] int64).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_ids = int_array("input_ids", input_ids, 2)
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)][0]
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
        batch, tokens = input_ids.shape
    else:
        inputs_embeds = np.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape [B, T, D={config.hidden_size}], "
                             f"got {inputs_embeds.shape}")
        if not np.issubdtype(inputs_embeds.dtype, np.floating):
            raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        batch, tokens = inputs_embeds.shape[:2]
    if tokens == 0:
        raise ValueError("the input has no tokens (T=0)")
    past = 0
    if cache is not None:
        if not isinstance(cache, cache_type):
            raise TypeError(f"past_key_values must be a {cache_type.__module__.split('.')[0]}.{cache_type.__name__} "
                            f"(from a previous call), got {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"past_key_values holds batch {cache.batch_size}, the input has batch {batch}")
        past = cache.get_seq_length()
    if attention_mask is not None:
        attention_mask = int_array("attention_mask", attention_mask, 2)
        if attention_mask.shape != (batch, past + tokens):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected (B, cached + new "
                             f"tokens) = {(batch, past + tokens)}")
    cache_position = (np.arange(past, past + tokens) if cache_position is None
                      else int_array("cache_position", cache_position, 1))
    if cache_position.shape != (tokens,):
        raise ValueError(f"cache_position has shape {cache_position.shape}, expected ({tokens},)")
    position_ids = (cache_position[None] if position_ids is None
                    else int_array("position_ids", position_ids, 2))
    if position_ids.shape[1] != tokens or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids has shape {position_ids.shape}, expected ({batch} or 1, {tokens})")
    if position_ids.size and position_ids.max() >= config.max_position_embeddings:
        warnings.warn(f"position {position_ids.max()} is beyond max_position_embeddings="
                      f"{config.max_position_embeddings}: computed anyway (as HF does), but the model never "
                      "saw such positions in training", stacklevel=3)
    return input_ids, inputs_embeds, attention_mask, position_ids, cache_position


def pooling_positions(config, input_ids, batch):
    # input_ids: [B, T] host ints or None -> [B] index of the token each row is classified at
    # HF GenericForSequenceClassification: the rightmost token that is not pad (left or right padding).
    if config.pad_token_id is None and batch != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id)")
    if config.pad_token_id is None or input_ids is None:
        if config.pad_token_id is not None:
            warnings.warn("JetMoeForSequenceClassification cannot detect padding in inputs_embeds: "
                          "pooling at the last position", stacklevel=3)
        return np.full(batch, -1)
    ids = np.asarray(input_ids)
    return np.argmax(np.arange(ids.shape[1]) * (ids != config.pad_token_id), axis=-1)
