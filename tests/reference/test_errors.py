"""Rung 11 of the ladder (tests/reference/helpers.py lists them): errors.

Bad inputs fail loudly: the right exception type, and a message naming the argument, its shape or value.

Every case draws fresh random weights and token ids (the seed is printed, so a failure can be replayed), and
each rejection has a nearby accepted input as a control, so a check that rejects everything would fail too.
"""

import dataclasses
import json
import re
import warnings

import numpy as np
import pytest

from reference import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel

from paths import ROOT

V, D, MAX_POS = 48, 16, 12


def small_config(**overrides):
    values = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4,
                  intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=MAX_POS)
    values.update(overrides)
    return JetMoeConfig(**values)


@pytest.fixture
def model(seed):
    return JetMoeForCausalLM.from_random(small_config(), seed=seed, dtype=np.float64)


def random_ids(rng, batch, tokens):
    return rng.integers(0, V, size=(batch, tokens))


def shape_text(shape):
    return re.escape(str(tuple(shape)))


# ---------------------------------------------------------------- input_ids / inputs_embeds


@pytest.mark.parametrize("kind", ["negative", "too_large"])
@pytest.mark.parametrize("entry", ["forward", "base_model", "generate"])
def test_input_ids_outside_vocabulary(model, rng, kind, entry):
    ids = random_ids(rng, 2, 5)
    bad = int(-rng.integers(1, 10)) if kind == "negative" else int(V + rng.integers(0, 10))
    ids[rng.integers(2), rng.integers(5)] = bad
    call = {"forward": lambda: model(ids), "base_model": lambda: model.model(ids),
            "generate": lambda: model.generate(ids, max_new_tokens=2)}[entry]
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad}, outside the vocabulary \[0, {V}\)"):
        call()
    ids[ids == bad] = V - 1  # control: the largest valid id is accepted
    assert np.all(np.isfinite(model(ids).logits))


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)], ids=["1d", "3d"])
def test_input_ids_wrong_rank(model, rng, shape):
    ids = rng.integers(0, V, size=shape)
    with pytest.raises(ValueError, match=r"input_ids must have 2 dimensions, got shape " + shape_text(shape)):
        model(ids)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\], got " + shape_text(shape)):
        model.generate(ids, max_new_tokens=1)


def test_float_input_ids(model, rng):
    ids = random_ids(rng, 2, 4).astype(np.float64)  # integral values: still rejected, as torch's embedding does
    with pytest.raises(TypeError, match=r"input_ids must hold integers, got dtype float64"):
        model(ids)
    with pytest.raises(TypeError, match=r"input_ids must hold integers, got dtype float64"):
        model.generate(ids + 0.5, max_new_tokens=1)  # would otherwise be truncated to other token ids


def test_int_inputs_embeds(model, rng):
    embeds = rng.integers(1, 5, size=(2, 3, D))
    with pytest.raises(TypeError, match=r"inputs_embeds must be floating point, got dtype int64"):
        model(inputs_embeds=embeds)
    assert np.all(np.isfinite(model(inputs_embeds=embeds.astype(np.float64)).logits))  # control


@pytest.mark.parametrize("shape", [(2, 3, D + 1), (2, 3), (1, 2, 3, D)], ids=["hidden", "2d", "4d"])
def test_inputs_embeds_wrong_shape(model, rng, shape):
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \[B, T, D={D}\], got " + shape_text(shape)):
        model(inputs_embeds=rng.standard_normal(shape))


def test_both_or_neither_of_input_ids_and_inputs_embeds(model, rng):
    ids = random_ids(rng, 1, 3)
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=rng.standard_normal((1, 3, D)))
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds"):
        model.model()


def test_no_tokens(model):
    with pytest.raises(ValueError, match=r"no tokens \(T=0\)"):
        model(np.zeros((2, 0), np.int64))


# ---------------------------------------------------------------- attention_mask


@pytest.mark.parametrize("mask_shape", [(2, 4), (2, 6), (3, 5), (1, 5)], ids=["short", "long", "batch", "batch1"])
def test_attention_mask_shape_mismatch(model, rng, mask_shape):
    ids = random_ids(rng, 2, 5)
    mask = np.ones(mask_shape, np.int64)
    with pytest.raises(ValueError, match=r"attention_mask has shape " + shape_text(mask_shape) + r".*"
                       + re.escape("(2, 5)")):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape " + shape_text(mask_shape)):
        model.generate(ids, attention_mask=mask, max_new_tokens=1)


def test_attention_mask_wrong_rank_and_dtype(model, rng):
    ids = random_ids(rng, 2, 5)
    with pytest.raises(ValueError, match=r"attention_mask must have 2 dimensions, got shape \(5,\)"):
        model(ids, attention_mask=np.ones(5, np.int64))
    with pytest.raises(TypeError, match=r"attention_mask must hold integers, got dtype float64"):
        model(ids, attention_mask=np.ones((2, 5)))


def test_attention_mask_must_cover_the_cache(model, rng):
    ids = random_ids(rng, 2, 6)
    cache = model(ids[:, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\), expected \(B, cached \+ new tokens\) "
                       r"= \(2, 6\)"):
        model(ids[:, 4:], past_key_values=cache, attention_mask=np.ones((2, 2), np.int64))


# ---------------------------------------------------------------- labels


def test_labels_shape_mismatch(model, rng):
    ids = random_ids(rng, 2, 5)
    for shape in [(2, 6), (2, 4), (1, 5), (10,)]:
        with pytest.raises(ValueError, match=r"labels has shape " + shape_text(shape) + r", expected \(2, 5\)"):
            model(ids, labels=rng.integers(0, V, size=shape))


@pytest.mark.parametrize("kind", ["negative", "too_large"])
def test_labels_out_of_range(model, rng, kind):
    ids = random_ids(rng, 2, 5)
    labels = random_ids(rng, 2, 5)
    bad = int(-rng.integers(1, 99)) if kind == "negative" else int(V + rng.integers(0, 10))  # never -100
    labels[rng.integers(2), rng.integers(1, 5)] = bad
    with pytest.raises(ValueError, match=rf"labels holds {bad}, neither -100 nor a class in \[0, {V}\)"):
        model(ids, labels=labels)
    labels[labels == bad] = -100  # control: the ignore index is accepted
    assert np.isfinite(model(ids, labels=labels).loss)


def test_float_labels(model, rng):
    ids = random_ids(rng, 2, 5)
    with pytest.raises(TypeError, match=r"labels must hold integers, got dtype float64"):
        model(ids, labels=ids.astype(np.float64))


def test_sequence_classification_labels(seed, rng):
    config = small_config(pad_token_id=0, num_labels=3)
    model = JetMoeForSequenceClassification.from_random(config, seed=seed, dtype=np.float64)
    ids = rng.integers(1, V, size=(2, 5))
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected a first dimension of B=2"):
        model(ids, labels=np.array([0, 1, 2]))
    for bad in [3, int(rng.integers(4, 50)), -1]:
        with pytest.raises(ValueError, match=rf"labels holds {bad}, neither -100 nor a class in \[0, 3\)"):
            model(ids, labels=np.array([bad, 0]))
    assert np.isfinite(model(ids, labels=np.array([2, 0])).loss)  # control
    config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match=r"multi-label labels have shape \(2,\), expected \[B, num_labels\] "
                       r"= \(2, 3\)"):
        model(ids, labels=np.array([1.0, 0.0]))
    assert np.isfinite(model(ids, labels=rng.integers(0, 2, size=(2, 3)).astype(np.float64)).loss)  # control


# ---------------------------------------------------------------- cache


def test_cache_batch_mismatch(model, rng):
    cache = model(random_ids(rng, 2, 3), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past_key_values holds batch 2, the input has batch 3"):
        model(random_ids(rng, 3, 1), past_key_values=cache)
    with pytest.raises(ValueError, match=r"past_key_values holds batch 2, the input has batch 1"):
        model(random_ids(rng, 1, 1), past_key_values=cache)
    assert np.all(np.isfinite(model(random_ids(rng, 2, 1), past_key_values=cache).logits))  # control


def test_cache_of_another_type(model, rng):
    legacy = model(random_ids(rng, 1, 3), use_cache=True).past_key_values.key_cache  # a list, not a KVCache
    with pytest.raises(TypeError, match=r"past_key_values must be a reference.KVCache .*got list"):
        model(random_ids(rng, 1, 1), past_key_values=legacy)


# ---------------------------------------------------------------- config

BAD_CONFIGS = [
    (dict(num_experts_per_tok=5), r"num_experts_per_tok \(top-k K=5\) must be <= num_local_experts \(E=4\)"),
    (dict(num_experts_per_tok=3, num_local_experts=2), r"top-k K=3.*num_local_experts \(E=2\)"),
    (dict(kv_channels=5), r"kv_channels \(Dh=5\) must be even"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (dict(vocab_size=-3), r"vocab_size must be a positive integer, got -3"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    (dict(num_key_value_heads=-1), r"num_key_value_heads must be a positive integer, got -1"),
    (dict(intermediate_size=8.0), r"intermediate_size must be a positive integer, got 8.0"),
    (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer, got 0"),
    (dict(num_local_experts=0), r"num_local_experts must be a positive integer, got 0"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok must be a positive integer, got 0"),
    (dict(activation_function="gelu"), r"activation_function='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"rope_scaling=\{'rope_type': 'linear', 'factor': 2.0\} is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling=\{'type': 'dynamic'.* is not supported"),
    (dict(rope_scaling="linear"), r"rope_scaling must be None or a dict, got 'linear'"),
    (dict(pad_token_id=V), rf"pad_token_id={V} is outside \[0, {V}\)"),
    (dict(pad_token_id=-1), rf"pad_token_id=-1 is outside \[0, {V}\)"),
    (dict(pad_token_id=1.5), r"pad_token_id must be None or an integer, got 1.5"),
    (dict(rms_norm_eps=0.0), r"rms_norm_eps must be > 0, got 0.0"),
    (dict(rope_theta=-1.0), r"rope_theta must be > 0, got -1.0"),
    (dict(num_labels=0), r"num_labels must be a positive integer, got 0"),
    (dict(rms_norm_eps=float("inf")), r"rms_norm_eps must be a finite number, got inf"),
    (dict(rope_theta=float("nan")), r"rope_theta must be a finite number, got nan"),
    (dict(tie_word_embeddings="false"), r"tie_word_embeddings must be true or false \(a JSON boolean\), got 'false'"),
    (dict(use_cache=0), r"use_cache must be true or false"),
    (dict(bos_token_id=-1), rf"bos_token_id=-1 is outside \[0, {V}\)"),
    (dict(eos_token_id=2**40), rf"eos_token_id=1099511627776 is outside \[0, {V}\)"),
    (dict(eos_token_id=[1, V]), rf"eos_token_id={V} is outside \[0, {V}\)"),
    (dict(vocab_size=2**40), r"vocab_size must be a positive integer, got 1099511627776 \(at most 2147483647\)"),
    (dict(num_hidden_layers=10**9), r"num_hidden_layers=1000000000 is over 65536"),
    (dict(hidden_size="16"), r"hidden_size must be a positive integer, got '16'"),
    (dict(problem_type="ranking"), r"problem_type='ranking' is not one of HF's problem types"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                                 for o, _ in BAD_CONFIGS])
def test_bad_config(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=r"JetMoeConfig\..*" + message):
        small_config(**overrides)
    # the same check runs when the value comes from a config.json
    values = small_config().to_dict()
    values.pop("rope_parameters")  # a 4.56.2-style file: rope_theta alone states the base
    values.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        JetMoeConfig.from_pretrained(str(tmp_path))


def test_config_controls():
    # the accepted neighbours of the rejected values above
    for overrides in [dict(num_experts_per_tok=4), dict(kv_channels=6), dict(rope_scaling={"rope_type": "default"}),
                      dict(pad_token_id=V - 1), dict(pad_token_id=0), dict(num_labels=1)]:
        config = small_config(**overrides)
        assert all(getattr(config, k) == v for k, v in overrides.items())


def test_config_json_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        JetMoeConfig.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------- dtypes, sampling


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_unsupported_model_dtype(seed, tmp_path, dtype):
    JetMoeForCausalLM.from_random(small_config(), seed=seed, dtype=np.float64).save_pretrained(tmp_path)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"dtype={name} is not supported.*np.float32.*np.float64"):
        JetMoeForCausalLM.from_pretrained(str(tmp_path), dtype=dtype)
    with pytest.raises(TypeError, match=rf"dtype={name} is not supported"):
        JetMoeModel.from_random(small_config(), seed=seed, dtype=dtype)
    assert JetMoeForCausalLM.from_pretrained(str(tmp_path), dtype=np.float32).dtype == np.float32  # control


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"temperature must be a finite number > 0 when sampling, got 0.0 \(greedy decoding is"),
    (dict(temperature=-1.0), r"temperature must be a finite number > 0 when sampling, got -1.0"),
    (dict(top_k=-1), r"top_k must be an integer >= 0 \(0 keeps every token\), got -1"),
    (dict(top_k=2.5), r"top_k must be an integer >= 0 .*got 2.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] \(1 keeps every token\), got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] .*got 1.5"),
])
def test_bad_sampling_settings(model, rng, kwargs, message):
    ids = random_ids(rng, 1, 3)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, do_sample=True, max_new_tokens=2, **kwargs)
    assert model.generate(ids, do_sample=True, max_new_tokens=2, seed=0).shape[1] >= 4  # control: defaults work


# ---------------------------------------------------------------- max_position_embeddings


def test_beyond_max_position_embeddings_warns(seed, rng):
    short = JetMoeForCausalLM.from_random(small_config(), seed=seed, dtype=np.float64)
    ids = random_ids(rng, 2, MAX_POS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # control: exactly max_position_embeddings tokens do not warn
        short(ids)
    longer = np.concatenate([ids, random_ids(rng, 2, 3)], axis=1)
    with pytest.warns(UserWarning, match=rf"position {MAX_POS + 2} is beyond max_position_embeddings={MAX_POS}"):
        logits = short(longer).logits
    assert np.all(np.isfinite(logits))
    # "computed anyway", as HF: the same as a model whose limit is large enough. Same weights and same operations,
    # so the logits are bit-identical (tolerance 0).
    roomy = JetMoeForCausalLM.from_random(small_config(max_position_embeddings=4 * MAX_POS), seed=seed,
                                          dtype=np.float64)
    np.testing.assert_array_equal(logits, roomy(longer).logits)


def test_beyond_max_position_embeddings_with_cache_warns(model, rng):
    ids = random_ids(rng, 1, MAX_POS + 1)
    cache = model(ids[:, :MAX_POS], use_cache=True).past_key_values
    with pytest.warns(UserWarning, match=rf"position {MAX_POS} is beyond max_position_embeddings={MAX_POS}"):
        logits = model(ids[:, MAX_POS:], past_key_values=cache).logits
    assert np.all(np.isfinite(logits))


# ---------------------------------------------------------------- sequence classification padding


def test_sequence_classification_batch_without_pad_token(seed, rng):
    config = small_config()
    assert config.pad_token_id is None
    model = JetMoeForSequenceClassification.from_random(config, seed=seed, dtype=np.float64)
    ids = random_ids(rng, 2, 4)
    with pytest.raises(ValueError, match=r"batch sizes > 1 if no padding token is defined \(config.pad_token_id\)"):
        model(ids)
    assert model(ids[:1]).logits.shape == (1, config.num_labels)  # control: batch 1 needs no pad token
    padded = JetMoeForSequenceClassification(dataclasses.replace(config, pad_token_id=0), model.model.tensors,
                                             {"score.weight": model.score})
    assert np.all(np.isfinite(padded(ids).logits))  # control: with a pad token, batch 2 works


def test_import_reference_needs_no_torch_transformers_or_cupy():
    # reference/ defines the semantics on its own: importing and running it, and the jetmoe tools over it (only
    # `debug --against` reaches out, when asked), must not pull the oracle or the GPU.
    import subprocess
    import sys
    code = ("import sys, numpy as np, reference, jetmoe.generate, jetmoe.evaluate, jetmoe.debug\n"
            "config = reference.JetMoeConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_key_value_heads=1,"
            " kv_channels=4, intermediate_size=8, num_local_experts=2, num_experts_per_tok=1)\n"
            "reference.JetMoeForCausalLM.from_random(config)(input_ids=np.array([[1, 2, 3]]))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'cupy', 'gpu', 'jetmoe.hf_trace') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
