"""config.json as transformers 4.56.2 and 5.x write it: where RoPE's base stands, head_dim, and what both versions
read back from our save_pretrained (docs/transformers.md). Live HF loading of these files is in
tests/oracle/test_transformers_versions.py."""

import json

import numpy as np
import pytest

from reference import JetMoeConfig, JetMoeForCausalLM

SIZES = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
             intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)


def v5_dict(theta):
    """A config.json as transformers 5 writes it: no top-level rope_theta, the base inside rope_parameters."""
    return {**SIZES, "model_type": "jetmoe", "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
            "transformers_version": "5.25.0", "dtype": "float32"}


def test_v5_rope_parameters_give_theta(rng, tmp_path):
    theta = float(rng.uniform(1e2, 1e6))
    (tmp_path / "config.json").write_text(json.dumps(v5_dict(theta)))
    config = JetMoeConfig.from_pretrained(str(tmp_path))
    assert config.rope_theta == theta and "rope_parameters" not in config.extra
    # and it reaches the math: the same weights (same seed) with the default base give other logits
    seed = int(rng.integers(2**31))
    ids = rng.integers(0, SIZES["vocab_size"], size=(1, 9))
    ours = JetMoeForCausalLM.from_random(config, seed=seed, dtype=np.float64)(ids).logits
    default = JetMoeForCausalLM.from_random(JetMoeConfig(**SIZES), seed=seed, dtype=np.float64)(ids).logits
    assert not np.allclose(ours, default, rtol=1e-6, atol=0)


@pytest.mark.parametrize("where", ["rope_theta", "rope_parameters", "rope_scaling"])
def test_theta_read_from_each_place(rng, where):
    theta = float(rng.uniform(1e2, 1e6))
    values = dict(SIZES)
    if where == "rope_theta":
        values["rope_theta"] = theta
    else:
        values[where] = {"rope_type": "default", "rope_theta": theta}
    assert JetMoeConfig.from_dict(values).rope_theta == theta


@pytest.mark.parametrize("second", ["rope_parameters", "rope_scaling"])
def test_disagreeing_thetas_are_refused_naming_both(rng, second):
    theta = float(rng.uniform(1e2, 1e6))
    values = {**SIZES, "rope_theta": theta, second: {"rope_type": "default", "rope_theta": 2 * theta}}
    with pytest.raises(ValueError, match=rf"rope_theta={theta!r}.*{second}.rope_theta={2 * theta!r}"):
        JetMoeConfig.from_dict(values)
    values[second]["rope_theta"] = theta  # agreeing: read
    assert JetMoeConfig.from_dict(values).rope_theta == theta
    values.update(rope_theta=500, **{second: {"rope_type": "default", "rope_theta": 500.0}})  # an int and a float
    assert JetMoeConfig.from_dict(values).rope_theta == 500


@pytest.mark.parametrize("block, message", [
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, r"rope_parameters=.*'linear'.* is not supported"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, r"rope_parameters=.*partial_rotary_factor.* is not"),
    ("default", r"rope_parameters must be None or a dict, got 'default'"),
])
def test_unsupported_rope_parameters_are_refused(block, message):
    with pytest.raises(ValueError, match=message):
        JetMoeConfig.from_dict({**SIZES, "rope_parameters": block})


def test_partial_rotary_factor_is_refused():
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5 is not supported"):
        JetMoeConfig.from_dict({**SIZES, "partial_rotary_factor": 0.5})
    assert JetMoeConfig.from_dict({**SIZES, "partial_rotary_factor": 1.0}).kv_channels == SIZES["kv_channels"]


def test_head_dim_is_kv_channels():
    values = {k: v for k, v in SIZES.items() if k != "kv_channels"}
    assert JetMoeConfig.from_dict({**values, "head_dim": 6}).kv_channels == 6  # 5.x's attribute_map alias
    assert JetMoeConfig.from_dict({**SIZES, "head_dim": SIZES["kv_channels"]}).kv_channels == SIZES["kv_channels"]
    with pytest.raises(ValueError, match=r"kv_channels=8 and head_dim=6"):
        JetMoeConfig.from_dict({**SIZES, "head_dim": 6})


def test_save_pretrained_writes_theta_for_both_versions(rng, tmp_path):
    theta = float(rng.uniform(1e2, 1e6))
    JetMoeConfig(**SIZES, rope_theta=theta).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == theta  # what 4.56.2 reads
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": theta}  # what 5.x reads
    assert JetMoeConfig.from_pretrained(str(tmp_path)).to_dict() == written
