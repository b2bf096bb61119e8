"""reference/counting.py: the parameter, FLOP and byte counts against what a checkpoint holds and a forward does.

- total parameters: count_parameters against the sizes of the tensors a saved checkpoint really holds, and each part
  against its closed form written here from the config;
- active parameters: the formula against an instrumented one-token forward (the elements of every parameter the
  forward read: which expert slices, which embedding row);
- FLOPs: forward_flops against the instrumented count of the same forward (every weight matmul as it ran, the two
  attention matmuls from the traced shapes), prefill and decode, for random configs and for jetmoe-8b's shape
  (a 1-layer cut, counted and then scaled by layer);
- bytes: kv_cache_bytes against a filled KVCache, decode_bytes_read against the instrumented decode step;
- the capacity factor: capacity_drops against a first-come-first-served loop.

Counts are integers and must be equal: no tolerance anywhere. Every test draws a fresh config, fresh weights and
fresh tokens from `rng` (tests/conftest.py prints the seed).
"""

import dataclasses
import math

import numpy as np
import pytest

from reference import JetMoeConfig, JetMoeForCausalLM
from reference.counting import (PARTS, active_parameters, capacity_drops, count_parameters, counted_flops,
                                decode_bytes_read, expert_capacity, forward_flops, kv_cache_bytes, parameter_shapes,
                                part_of, touched_parameters, watch)
from reference.io.checkpoint import base_parameter_shapes, read_checkpoint_tensors

# jetmoe-8b's config.json (huggingface.co/jetmoe/jetmoe-8b); JetMoeConfig's defaults are the same but for the layers
JETMOE_8B = JetMoeConfig(hidden_size=2048, num_hidden_layers=24, num_local_experts=8, num_experts_per_tok=2,
                         num_key_value_heads=16, kv_channels=128, intermediate_size=5632, vocab_size=32000,
                         tie_word_embeddings=True)


def random_config(rng, tied):
    # every size drawn, K <= E, Dh even (RoPE)
    experts = int(rng.integers(1, 7))
    return JetMoeConfig(vocab_size=int(rng.integers(8, 64)), hidden_size=int(rng.integers(4, 25)),
                        num_hidden_layers=int(rng.integers(1, 4)), num_local_experts=experts,
                        num_experts_per_tok=int(rng.integers(1, experts + 1)),
                        num_key_value_heads=int(rng.integers(1, 4)), kv_channels=2 * int(rng.integers(1, 5)),
                        intermediate_size=int(rng.integers(2, 21)), max_position_embeddings=64,
                        tie_word_embeddings=tied)


def random_model(rng, config):
    # std=0.3: routers with clear preferences, so different tokens pick different experts
    return JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), std=0.3, dtype=np.float64)


def random_ids(rng, config, batch, tokens):
    return rng.integers(0, config.vocab_size, size=(batch, tokens))  # [B, T]


def decode_step(rng, model, batch, prefix):
    # -> (a cache holding `prefix` tokens of each of `batch` sequences, the next tokens [B, 1])
    cache = model(input_ids=random_ids(rng, model.config, batch, prefix), use_cache=True).past_key_values
    return cache, random_ids(rng, model.config, batch, 1)


def touched_by_one_token(rng, model, prefix):
    # -> {part: parameters read} by a watched decode step of one token after `prefix` cached ones (none: a lone
    # token's forward)
    cache, ids = decode_step(rng, model, 1, prefix) if prefix else (None, random_ids(rng, model.config, 1, 1))
    watched, uses = watch(model)
    watched(input_ids=ids, past_key_values=cache)
    return touched_parameters(uses)


# ------------------------------------------------------------------------------------------------ parameters

TIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


@TIED
def test_parameter_counts_equal_the_checkpoint_tensors(rng, tmp_path, tied):
    config = random_config(rng, tied)
    random_model(rng, config).save_pretrained(tmp_path)
    tensors = read_checkpoint_tensors(str(tmp_path))
    counts = count_parameters({name: t.shape for name, t in tensors.items()})
    assert sum(counts.values()) == sum(t.size for t in tensors.values())
    assert count_parameters(parameter_shapes(config)) == counts  # the config's shapes are the file's
    D, E, H, Dh, F, V, L = (config.hidden_size, config.num_local_experts, config.num_key_value_heads,
                            config.kv_channels, config.intermediate_size, config.vocab_size, config.num_hidden_layers)
    assert counts == {  # each part's closed form: the tensor shapes of reference/model.py's ExpertWeights
        "embedding and head": V * D * (1 if config.tie_word_embeddings else 2), "routers": L * 2 * E * D,
        "kv_proj": L * 2 * H * Dh * D, "query experts": L * E * H * Dh * D, "attention": 0,
        "output experts": L * E * D * H * Dh, "MLP experts": L * E * 3 * F * D, "norms and biases": L * 4 * D + D}


def test_part_of_names_every_tensor_and_refuses_others():
    assert {part_of(name) for name in parameter_shapes(dataclasses.replace(JETMOE_8B, tie_word_embeddings=False))} \
        == set(PARTS) - {"attention"}  # attention's two matmuls multiply activations: no parameters
    assert part_of("transformer.layers.0.mlp.bias") == "norms and biases"  # the other base prefix
    with pytest.raises(ValueError, match="score.weight"):
        part_of("score.weight")  # the classification head is no part of a causal LM


def test_jetmoe_8b_parameters_from_its_shapes():
    total = sum(count_parameters(parameter_shapes(JETMOE_8B)).values())
    # jetmoe-8b's model card: 8.5B parameters, rounded to 0.1B
    assert abs(total - 8.5e9) < 0.05e9, total
    # its checkpoint's layers are 24 copies of one layer's tensors
    one_layer = dataclasses.replace(JETMOE_8B, num_hidden_layers=1)
    per_layer = sum(math.prod(s) for n, s in base_parameter_shapes(one_layer).items() if n.startswith("layers."))
    rest = sum(math.prod(s) for n, s in base_parameter_shapes(one_layer).items() if not n.startswith("layers."))
    assert total == rest + JETMOE_8B.num_hidden_layers * per_layer


@TIED
@pytest.mark.parametrize("prefix", [0, 5], ids=["lone token", "decode step"])
def test_active_parameters_equal_what_a_token_reads(rng, prefix, tied):
    config = random_config(rng, tied)
    assert touched_by_one_token(rng, random_model(rng, config), prefix) == active_parameters(config)


def test_a_prefill_reads_more_experts_than_one_token(rng):
    # control: the instrument sees the routing. 40 different tokens through random routers (std=1) do not all pick
    # the same one of 4 experts, so together they read more than one token's expert.
    config = JetMoeConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_local_experts=4,
                          num_experts_per_tok=1, num_key_value_heads=1, kv_channels=4, intermediate_size=6)
    model = JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), std=1.0, dtype=np.float64)
    watched, uses = watch(model)
    watched(input_ids=np.arange(40)[None])
    assert touched_parameters(uses)["MLP experts"] > active_parameters(config)["MLP experts"]


# ------------------------------------------------------------------------------------------------ FLOPs

@TIED
def test_forward_flops_equal_the_instrumented_count(rng, tied):
    config = random_config(rng, tied)
    model = random_model(rng, config)
    batch, tokens = int(rng.integers(1, 4)), int(rng.integers(1, 20))  # past 16 rows linear() takes its prefill path
    assert counted_flops(model, random_ids(rng, config, batch, tokens)) == forward_flops(config, tokens, tokens, batch)
    cache, ids = decode_step(rng, model, batch, tokens)
    assert counted_flops(model, ids, cache) == forward_flops(config, 1, tokens + 1, batch)


def random_8b_cut(rng):
    # jetmoe-8b's shape with one layer (0.42B parameters, 1.7 GB in float32). from_random draws float64 normals,
    # 26 s for this cut; float32 uniforms on [-0.5, 0.5) take a few seconds and are random all the same (the counts
    # depend on the values only through the routing, and dropless FLOPs not even on that).
    config = dataclasses.replace(JETMOE_8B, num_hidden_layers=1)
    base = {}
    for name, shape in base_parameter_shapes(config).items():
        base[name] = rng.random(shape, dtype=np.float32)
        base[name] -= np.float32(0.5)
    return JetMoeForCausalLM(config, base, {"lm_head.weight": base["embed_tokens.weight"]})


def test_jetmoe_8b_flops_from_a_one_layer_cut(rng):
    # One-token forwards: at these widths linear() multiplies a short x block by block of weight rows, so the count
    # sees every block. (Not a few tokens: there OpenBLAS's threads inside linear()'s two threads make each forward
    # take seconds.)
    cut = random_8b_cut(rng)
    prefill = counted_flops(cut, random_ids(rng, cut.config, 1, 1))
    assert prefill == forward_flops(cut.config, 1, 1)
    cache, ids = decode_step(rng, cut, 1, 1)
    decode = counted_flops(cut, ids, cache)
    assert decode == forward_flops(cut.config, 1, 2)
    # every part but the embedding and head lies in the layers, and 24 layers do 24 times one layer's work
    layers = JETMOE_8B.num_hidden_layers
    for counted, keys in ((prefill, 1), (decode, 2)):
        scaled = {part: flops * (1 if part == "embedding and head" else layers) for part, flops in counted.items()}
        assert scaled == forward_flops(JETMOE_8B, 1, keys)
    cache, ids = decode_step(rng, cut, 1, 1)
    watched, uses = watch(cut)
    watched(input_ids=ids, past_key_values=cache)
    assert touched_parameters(uses) == active_parameters(cut.config)


# ------------------------------------------------------------------------------------------------ bytes

def cache_bytes(cache):
    return sum(k.nbytes + v.nbytes for k, v in zip(cache.key_cache, cache.value_cache))


def test_kv_cache_and_decode_bytes(rng):
    config = random_config(rng, tied=True)
    model = random_model(rng, config)
    prefix = int(rng.integers(1, 12))
    cache, ids = decode_step(rng, model, 1, prefix)
    assert kv_cache_bytes(config, prefix, model.dtype.itemsize) == cache_bytes(cache)
    watched, uses = watch(model)
    watched(input_ids=ids, past_key_values=cache)  # the step attends over the prefix and its own token
    read = sum(touched_parameters(uses).values()) * model.dtype.itemsize + cache_bytes(cache)
    assert decode_bytes_read(config, prefix + 1, model.dtype.itemsize) == read


# ------------------------------------------------------------------------------------------------ capacity factor

def dropped_by_loop(top_k_indices, num_experts, capacity):
    # first come, first served per expert, every first choice (in token order) before any second choice
    tokens, top_k = top_k_indices.shape
    taken, dropped = [0] * num_experts, np.zeros((tokens, top_k), dtype=bool)
    for k in range(top_k):
        for n in range(tokens):
            expert = top_k_indices[n, k]
            dropped[n, k] = taken[expert] >= capacity
            taken[expert] += 1
    return dropped


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 2.0])
def test_capacity_drops_match_a_loop(rng, capacity_factor):
    tokens, num_experts = int(rng.integers(1, 60)), int(rng.integers(1, 9))
    top_k = int(rng.integers(1, num_experts + 1))
    # skewed routing (expert e drawn with weight e + 1), K distinct experts per token as top-k gives
    weights = np.arange(1, num_experts + 1) / np.arange(1, num_experts + 1).sum()
    chosen = np.stack([rng.choice(num_experts, top_k, replace=False, p=weights) for _ in range(tokens)])  # [N, K]
    capacity = math.ceil(capacity_factor * tokens * top_k / num_experts)
    assert expert_capacity(tokens, top_k, num_experts, capacity_factor) == capacity
    assert np.array_equal(capacity_drops(chosen, num_experts, capacity_factor),
                          dropped_by_loop(chosen, num_experts, capacity))


def test_balanced_routing_drops_nothing_at_capacity_factor_one(rng):
    num_experts, top_k, rounds = 8, 2, 2 * int(rng.integers(1, 5))  # even: half a round is whole slots
    # every expert gets exactly its share: token n picks experts 2n and 2n+1 mod E
    chosen = (np.arange(rounds * num_experts // top_k)[:, None] * top_k + np.arange(top_k)) % num_experts  # [N, K]
    assert not capacity_drops(chosen, num_experts, 1.0).any()
    assert capacity_drops(chosen, num_experts, 0.5).sum() == chosen.size // 2  # half the share: half the slots
