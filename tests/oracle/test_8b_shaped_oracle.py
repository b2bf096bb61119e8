"""A 2-layer cut of the jetmoe-8b layout (scripts/make_8b_shaped.py: bf16, four shards, the hub's config.json
keys), loaded by HF transformers and by the reference with its matrices left in the file: the float32 logits and the
greedy tokens agree. HF float32 needs about 3 GB for this cut; the whole 8B would need 34 GB."""

import os
import subprocess
import sys

import numpy as np
import pytest

from paths import ROOT
from reference import JetMoeForCausalLM
from reference.io.mapped import MappedWeight

from oracle_env import require_oracle

torch, _ = require_oracle()
from jetmoe import hf_oracle  # noqa: E402

pytestmark = pytest.mark.oracle
CUT = os.path.join(ROOT, "build", "test-cache", "jetmoe-8b-shaped-2-layers")


@pytest.fixture(scope="module")
def cut():
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_8b_shaped.py"), "--layers", "2", "--out",
                    CUT], check=True, capture_output=True, timeout=900)
    return CUT


def test_mapped_reference_matches_hf_float32(cut, rng):
    ours = JetMoeForCausalLM.from_pretrained(cut, max_memory=64 << 20)  # matrices stay in the file
    assert isinstance(ours.model.layers[1].mlp.input_linear, MappedWeight)
    ids = rng.integers(3, ours.config.vocab_size, size=(2, 12))
    hf = hf_oracle.load_hf(cut, torch.float32)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
        hf_tokens = hf.generate(torch.from_numpy(ids[:1, :5]), max_new_tokens=8, do_sample=False,
                                pad_token_id=ours.config.eos_token_id).numpy()
    got = ours(input_ids=ids).logits
    # float32 on both sides, summed in another order over D=2048 and F=5632: 1e-4 of the largest logit
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    tokens = ours.generate(ids[:1, :5], max_new_tokens=8)
    np.testing.assert_array_equal(tokens, hf_tokens)
