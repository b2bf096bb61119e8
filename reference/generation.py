"""Generation (greedy search and sampling) with a preallocated KV cache, following HF GenerationMixin.

Shapes: reference/__init__.py.
- position_ids come from the attention mask: cumsum(mask) - 1, with 1 at padded positions (HF
  prepare_inputs_for_generation), so a left-padded prompt sees the positions it would see unpadded.
- A sequence that has produced an eos keeps receiving pad tokens (pad_token_id, else the first eos) until
  every sequence is done or max_new_tokens is reached.
- Sampling (do_sample=True) applies HF's logits warpers in HF's order, TemperatureLogitsWarper, TopKLogitsWarper,
  TopPLogitsWarper (sampling_probabilities), to float32-or-better logits (HF: `.to(torch.float32)`), then draws
  one token per row from a seeded NumPy Generator: the same seed gives the same tokens. The draws differ from
  torch.multinomial's, so sampled text equals HF's in distribution, not token for token.

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import numpy as np

from .inputs import to_numpy
from .io import trace
from .precision import compute_dtype
from .routing import softmax


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


def check_sampling(temperature, top_k, top_p):
    """ValueError naming the first bad sampling setting (HF's GenerationConfig checks the same ranges)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < np.inf:
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r} (greedy "
                         "decoding is do_sample=False)")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")


def sampling_probabilities(logits, temperature=1.0, top_k=50, top_p=1.0):
    # logits: [B, V] -> [B, V] probabilities of the tokens sampling may draw (0 for filtered-out tokens)
    check_sampling(temperature, top_k, top_p)
    # TemperatureLogitsWarper divides by the temperature. Subtracting each row's max first, in float64, changes no
    # probability (softmax, top-k and top-p are shift-invariant) and keeps every temperature > 0 well defined: as it
    # goes to 0 the best token stays at 0 and the others go to -inf, which is greedy.
    wide = logits.astype(np.float64)  # [B, V]
    with np.errstate(over="ignore"):
        scores = ((wide - wide.max(axis=-1, keepdims=True)) / temperature).astype(compute_dtype(logits.dtype))
    if 0 < top_k < scores.shape[-1]:
        # TopKLogitsWarper: drop every score below the k-th largest (ties with it are kept)
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k, None]  # [B, 1]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1:
        # TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, but
        # always keep the most likely one (min_tokens_to_keep=1)
        order = np.argsort(scores, axis=-1, kind="stable")  # [B, V]
        cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    return softmax(scores)


def sample(probabilities, rng):
    # probabilities: [B, V] -> [B] token ids, one inverse-CDF draw per row from rng (np.random.Generator)
    cumulative = np.cumsum(probabilities, axis=-1)  # [B, V]
    draws = rng.random(probabilities.shape[0]) * cumulative[:, -1]  # [B], scaled so rounding never overshoots
    # the first token whose cumulative probability exceeds the draw: a token of probability 0 never is
    return np.minimum((cumulative <= draws[:, None]).sum(axis=-1), probabilities.shape[-1] - 1)


def cached_forward(model, batch, capacity):
    """generate's default step: the model's forward over a KV cache preallocated for `capacity` tokens.

    Returns step(step_ids [B, T], mask [B, S], positions [B, T]) -> logits of each row's last token [B, V]."""
    cache = model.new_cache(batch, capacity=capacity)

    def step(step_ids, mask, positions):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    return step


def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50,
             top_p=1.0, seed=None, streamer=None, stepper=cached_forward):
    # input_ids: [B, T] -> [B, T + new] int64 NumPy, new <= max_new_tokens
    # model: anything with .config, .new_cache(batch, capacity) and HF's forward keywords (reference or gpu/)
    # seed: int, None or np.random.Generator (do_sample only); streamer: called with each step's new tokens [B]
    # stepper(model, B, capacity) -> step as cached_forward's: the GPU's captured decode (gpu/graph.py) plugs in here
    if do_sample:
        check_sampling(temperature, top_k, top_p)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
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
    if max_new_tokens == 0:  # nothing to run: no cache (a captured stepper's needs a capacity > 0) and no forward
        return tokens
    batch, prompt_len = tokens.shape
    forward_step = stepper(model, batch, prompt_len + max_new_tokens)
    unfinished = np.ones(batch, dtype=bool)
    step_ids = tokens
    for step in range(max_new_tokens):
        with trace.step_scope(step):  # traced: the prefill's names, then step.{i}. for decoded token i
            step_ids, mask = trace.record("inputs.input_ids", step_ids), trace.record("inputs.attention_mask", mask)
            positions = trace.record("inputs.position_ids", positions_from_mask(mask)[:, -step_ids.shape[1]:])
            last_logits = forward_step(step_ids, mask, positions)  # [B, V]
        if do_sample:  # on the host: the GPU twin copies [B, V] logits here, greedy only [B] ids
            probabilities = sampling_probabilities(to_numpy(last_logits), temperature, top_k, top_p)
            next_tokens = sample(probabilities, rng)  # [B]
        else:
            next_tokens = to_numpy(last_logits.argmax(axis=-1))  # [B]
        next_tokens = np.where(unfinished, next_tokens, pad)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        if streamer is not None:
            streamer(next_tokens)
        unfinished &= ~np.isin(next_tokens, eos)
        if not unfinished.any():
            break
        step_ids = next_tokens[:, None]
    return tokens
