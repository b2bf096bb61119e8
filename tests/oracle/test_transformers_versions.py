"""Where transformers 4.56.2 (our semantics) and the pinned newest 5.x differ around JetMoe, each difference
asserted on the installed version, so a release that changes one is noticed (docs/transformers.md has the table).

Runs under both oracles: `make test-oracle` (4.56.2) and `make test-oracle-latest` (5.x). The forward math itself
is checked on both by test_oracle.py and test_bundled_oracle.py.
"""

import importlib.metadata
import inspect
import json

import numpy as np
import pytest

from oracle_env import is_latest, require_oracle

torch, transformers = require_oracle()

from transformers.models.jetmoe import modeling_jetmoe as hf  # noqa: E402

from jetmoe import hf_oracle  # noqa: E402
from jetmoe.hf_compat import rope_theta  # noqa: E402
from reference import JetMoeConfig, JetMoeForCausalLM  # noqa: E402
from reference.generation import positions_from_mask  # noqa: E402
from reference.losses import router_aux_loss  # noqa: E402

pytestmark = pytest.mark.oracle

# float64 on both sides, HF's float32 islands promoted: only summation order differs (as tests/parity.py)
FLOAT64_RTOL = 1e-12


def config_dict(rng, **overrides):
    values = dict(vocab_size=int(rng.integers(20, 60)), hidden_size=16, num_hidden_layers=2, num_key_value_heads=2,
                  kv_channels=8, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, max_position_embeddings=64)
    values.update(overrides)
    return values


def hf_float64(model_dir, **kwargs):
    return hf_oracle.load_hf(model_dir, torch.float64, **kwargs)


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_theta_written_by_hf_gives_hf_logits(rng, seed, tmp_path):
    # The silent wrong answer this guards: 5.x writes θ only inside rope_parameters, and a reader that knows only
    # rope_theta uses 10000. A checkpoint HF itself saved, θ far from 1e4, must give HF's own logits.
    theta = float(rng.choice([37.0, 500.0, 3e5]))
    hf_oracle.save_checkpoint(config_dict(rng, rope_theta=theta), tmp_path, seed)
    written = json.loads((tmp_path / "config.json").read_text())
    if is_latest():
        assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == theta
    else:
        assert written["rope_theta"] == theta and "rope_parameters" not in written
    ids = rng.integers(0, written["vocab_size"], size=(2, 12))
    ours = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)
    assert ours.config.rope_theta == theta
    with hf_oracle.float64_precision(), torch.no_grad():
        want = hf_oracle.to_numpy(hf_float64(tmp_path)(input_ids=torch.from_numpy(ids)).logits)
    assert relative_error(ours(ids).logits, want) < FLOAT64_RTOL


def test_our_config_gives_hf_the_same_theta(rng, seed, tmp_path):
    # save_pretrained writes rope_theta (read by 4.56.2) and rope_parameters (read by 5.x), equal
    theta = float(rng.uniform(50.0, 5e5))
    model = JetMoeForCausalLM.from_random(JetMoeConfig(**config_dict(rng, rope_theta=theta)), seed=seed,
                                          dtype=np.float64)
    model.save_pretrained(tmp_path)
    assert rope_theta(hf, transformers.JetMoeConfig.from_pretrained(tmp_path)) == theta
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    with hf_oracle.float64_precision(), torch.no_grad():
        want = hf_oracle.to_numpy(hf_float64(tmp_path)(input_ids=torch.from_numpy(ids)).logits)
    assert relative_error(model(ids).logits, want) < FLOAT64_RTOL


def test_v5_config_read_by_each_version(rng, tmp_path):
    # A config.json as 5.x writes it, θ only in rope_parameters: 4.56.2 silently keeps its default 10000; 5.x and
    # the reference read the file's θ (the reference follows the value the file holds).
    theta = 321.0
    values = {**config_dict(rng), "rope_parameters": {"rope_type": "default", "rope_theta": theta},
              "model_type": "jetmoe"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    read = transformers.JetMoeConfig.from_pretrained(tmp_path)
    assert rope_theta(hf, read) == (theta if is_latest() else 10000.0)
    assert JetMoeConfig.from_pretrained(str(tmp_path)).rope_theta == theta


def test_causal_lm_aux_loss(rng, seed, tmp_path):
    # 4.56.2's JetMoeForCausalLM crashes when asked for router logits (transformers#31791); 5.25 returns an aux_loss
    # equal to HF's pooled load-balancing loss, the reference's "hf" kind (5.17-5.23 counted the attention router
    # twice). Both return two router-logit tensors per layer from JetMoeModel.
    config = config_dict(rng)
    hf_oracle.save_checkpoint(config, tmp_path, seed)
    ids = torch.from_numpy(rng.integers(0, config["vocab_size"], size=(2, 9)))
    model = hf_float64(tmp_path)
    with hf_oracle.float64_precision(), torch.no_grad():
        base = model.model(input_ids=ids, output_router_logits=True)
        assert len(base.router_logits) == 2 * config["num_hidden_layers"]
        if not is_latest():
            with pytest.raises(Exception):
                model(input_ids=ids, labels=ids, output_router_logits=True)
            return
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    ours = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)(ids.numpy(), output_router_logits=True)
    want = router_aux_loss("hf", ours.router_logits, config["num_local_experts"], config["num_experts_per_tok"])
    assert abs(float(out.aux_loss) - float(want)) <= 1e-12 * abs(float(want))


def test_restarting_position_ids(rng, seed, tmp_path):
    # position_ids that restart inside a row, no mask, no cache (use_cache=False: by default 5.x makes a cache,
    # and then does not pack): 5.x reads packed sequences (block-diagonal attention); 4.56.2 and the reference
    # attend causally across the restart, with the positions as given.
    config = config_dict(rng)
    hf_oracle.save_checkpoint(config, tmp_path, seed)
    first, second = 5, 6
    ids = rng.integers(3, config["vocab_size"], size=(1, first + second))
    positions = np.concatenate([np.arange(first), np.arange(second)])[None]
    with hf_oracle.float64_precision(), torch.no_grad():
        model = hf_float64(tmp_path)
        packed = hf_oracle.to_numpy(model(input_ids=torch.from_numpy(ids),
                                          position_ids=torch.from_numpy(positions),
                                          use_cache=False).logits)
        alone = hf_oracle.to_numpy(model(input_ids=torch.from_numpy(ids[:, first:])).logits)
    ours = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float64)(ids, position_ids=positions).logits
    segment_equal = relative_error(packed[:, first:], alone) < FLOAT64_RTOL
    assert segment_equal == is_latest()
    assert (relative_error(ours, packed) < FLOAT64_RTOL) == (not is_latest())


def test_generate_gives_pads_position(rng, seed, tmp_path):
    # generate() derives position_ids from a left-padded mask as cumsum - 1; pads get 1 in 4.56.2 (and in the
    # reference's positions_from_mask), 0 in 5.x. Real tokens' positions agree; a prompt ending in a pad differs.
    config = config_dict(rng)
    hf_oracle.save_checkpoint(config, tmp_path, seed)
    model = hf_float64(tmp_path)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = np.where(mask == 1, rng.integers(3, config["vocab_size"], size=mask.shape), config["pad_token_id"])
    seen = []
    rotary = next(m for m in model.modules() if isinstance(m, hf.JetMoeRotaryEmbedding))  # [B|1, T] positions
    hook = rotary.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    with torch.no_grad():
        model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=1,
                       do_sample=False)
    hook.remove()
    positions = seen[0].expand(2, -1).numpy()
    pad_position = 0 if is_latest() else 1
    assert (positions[mask == 0] == pad_position).all()
    ours = positions_from_mask(mask)
    assert (ours[mask == 1] == positions[mask == 1]).all() and (ours[mask == 0] == 1).all()


def test_default_dtype_of_a_bf16_checkpoint(rng, seed, tmp_path):
    # from_pretrained without a dtype: float32 in 4.56.2, the checkpoint's own bf16 in 5.x ("auto")
    config = config_dict(rng)
    hf_oracle.save_checkpoint(config, tmp_path / "f64", seed)
    hf.JetMoeForCausalLM.from_pretrained(tmp_path / "f64").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = hf.JetMoeForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(loaded.parameters()).dtype == (torch.bfloat16 if is_latest() else torch.float32)


def test_base_model_from_a_causal_lm_checkpoint(rng, seed, tmp_path):
    # JetMoeModel.from_pretrained on a JetMoeForCausalLM checkpoint: 4.56.2 leaves the weights random (its prefix
    # handling misses them), 5.x loads them.
    config = config_dict(rng)
    hf_oracle.save_checkpoint(config, tmp_path, seed)
    full = hf_float64(tmp_path)
    base = hf.JetMoeModel.from_pretrained(tmp_path, dtype=torch.float64)
    same = torch.equal(base.embed_tokens.weight, full.model.embed_tokens.weight)
    assert same == is_latest()


def test_forward_signature():
    # cache_position is gone in 5.x; 5.25 takes the KV cache as `cache` (past_key_values deprecated)
    parameters = inspect.signature(hf.JetMoeForCausalLM.forward).parameters
    assert ("cache_position" in parameters) == (not is_latest())
    assert ("cache" in parameters) == is_latest() and ("past_key_values" in parameters) == (not is_latest())


def test_kernels_is_a_requirement():
    # 5.25 needs the `kernels` package (an unconditional requirement); the oracle-latest extra pins it
    unconditional = [r for r in importlib.metadata.requires("transformers") if r.startswith("kernels")
                     and "extra ==" not in r]
    assert bool(unconditional) == is_latest()
