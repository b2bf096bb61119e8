"""What the reference does where the original JetMoE code (github.com/myshell-ai/JetMoE) departs from HF.

docs/semantics.md ("The original JetMoE code against HF and us") lists the departures; the ones that need torch are
in tests/oracle/test_original_jetmoe.py.

config.json as the original writes it (jetmoe/configuration_jetmoe.py): its JetMoEConfig stores every __init__
argument under its own name. Three sizes are named differently from HF's (reference/config.py ORIGINAL_NAMES), two
architecture flags (bias, glu) HF does not have, and num_attention_heads is an input, which its attention asserts
equals num_key_value_heads * moe_top_k.
"""

import json

import numpy as np
import pytest
from helpers import assert_close, make_model, real_tokens

from reference import JetMoeConfig, JetMoeForCausalLM
from reference.config import ORIGINAL_NAMES


def original_config_json(**overrides):
    # the keys of the original JetMoEConfig.__init__, with sizes unlike both sides' defaults (so a default used in
    # place of a value shows), plus what PretrainedConfig.to_dict adds that matters here
    values = dict(vocab_size=37, hidden_size=12, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  kv_channels=4, ffn_hidden_size=10, max_position_embeddings=32, activation_function="silu",
                  glu=True, moe_num_experts=5, moe_top_k=3, use_cache=True, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, bias=True, rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.02,
                  model_type="jetmoe", architectures=["JetMoEForCausalLM"])
    values.update(overrides)
    return values


def write(tmp_path, values):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return str(tmp_path)


def test_the_original_names_are_read(tmp_path):
    config = JetMoeConfig.from_pretrained(write(tmp_path, original_config_json()))
    assert (config.num_local_experts, config.num_experts_per_tok, config.intermediate_size) == (5, 3, 10)
    assert config.num_attention_heads == 6
    assert (config.tie_word_embeddings, config.rope_theta, config.rms_norm_eps) == (False, 500.0, 1e-5)
    leftover = set(ORIGINAL_NAMES) | {"bias", "glu", "num_attention_heads"}
    assert not leftover & set(config.extra), config.extra  # read, not carried along as unknown keys
    # written back under HF's names only, and read back the same
    written = config.to_dict()
    assert not set(ORIGINAL_NAMES) & set(written)
    assert JetMoeConfig.from_dict(written).to_dict() == written


def test_a_model_with_an_original_config_is_the_same_model(seed, rng, tmp_path):
    # The tensor names are the same in both codes; only config.json differs. Rewriting an HF-format checkpoint's
    # config under the original's names must give the same model, bit for bit.
    hf_names = original_config_json()
    for original, ours in ORIGINAL_NAMES.items():
        hf_names[ours] = hf_names.pop(original)
    del hf_names["bias"], hf_names["glu"]
    model = JetMoeForCausalLM.from_random(JetMoeConfig.from_dict(hf_names), seed=seed, dtype=np.float64)
    model.save_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "original")
    write(tmp_path / "original", original_config_json())
    ids = rng.integers(0, 37, (2, 5))
    want = JetMoeForCausalLM.from_pretrained(tmp_path / "hf", dtype=np.float64)(input_ids=ids).logits
    got = JetMoeForCausalLM.from_pretrained(tmp_path / "original", dtype=np.float64)(input_ids=ids).logits
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("original, ours", list(ORIGINAL_NAMES.items()))
def test_both_names_must_agree(tmp_path, original, ours):
    values = original_config_json()
    values[ours] = values[original]  # both names, one value: accepted
    assert getattr(JetMoeConfig.from_pretrained(write(tmp_path, values)), ours) == values[original]
    values[ours] = values[original] - 1
    with pytest.raises(ValueError, match=rf"{original}={values[original]} and {ours}={values[ours]}: {original} is "
                                         rf"the original JetMoE's name for {ours}, and the two disagree"):
        JetMoeConfig.from_pretrained(write(tmp_path, values))


@pytest.mark.parametrize("flag", ["bias", "glu"])
@pytest.mark.parametrize("value", [False, "true", 1, None])
def test_a_flag_other_than_true_is_refused(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"original JetMoE's {flag}={value!r}: only {flag}=true \(.*\) is "
                                         r"implemented, as in HF's JetMoe"):
        JetMoeConfig.from_pretrained(write(tmp_path, original_config_json(**{flag: value})))


@pytest.mark.parametrize("names", ["original", "hf"])
def test_num_attention_heads_must_be_k_times_h(tmp_path, names):
    values = original_config_json(num_attention_heads=4)  # H=2, K=3: 6 query heads
    if names == "hf":
        values = JetMoeConfig.from_dict(original_config_json()).to_dict() | {"num_attention_heads": 4}
    with pytest.raises(ValueError, match=r"num_attention_heads=4, but JetMoE's query heads are "
                                         r"num_key_value_heads \* num_experts_per_tok = 6"):
        JetMoeConfig.from_pretrained(write(tmp_path, values))


def test_one_token_takes_the_same_path(rng):
    # The original's MoE and MoA switch to a separate single-token path when B*T == 1 (moe.py single_forward,
    # single_map, single_reduce: a loop over the K chosen experts). HF 4.56.2 and the reference have one path for
    # every size: a lone token, and B=1 decoding one token at a time, give the rows of one forward over the sequence.
    model = make_model(rng, "E4_K2_H2")
    ids = real_tokens(rng, model.config, (1, 6))  # [1, T]
    full = model(input_ids=ids).logits  # [1, T, V]
    assert_close(model(input_ids=ids[:, :1]).logits, full[:, :1], 1e-12, "a lone token")  # float64: sum order only
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert_close(np.concatenate(steps, axis=1), full, 1e-12, "B=1 decoding, one token per call")
