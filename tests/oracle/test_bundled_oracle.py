"""The bundled model against Hugging Face transformers 4.56.2: greedy generate, the evaluate loss and sampling's
filtered probabilities (HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper).

Marked oracle: `make test-oracle` runs it (the oracle extra: CPU torch, transformers==4.56.2); without them it skips.
"""

import sys

import numpy as np
import pytest

from oracle_env import require_oracle

torch, transformers = require_oracle()

from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from jetmoe import hf_oracle  # noqa: E402

from reference import JetMoeForCausalLM  # noqa: E402
from reference.generation import sampling_probabilities  # noqa: E402
from reference.io.tokenizer import Tokenizer  # noqa: E402
from reference.losses import mean_loss, windows  # noqa: E402

from paths import TINY_MODEL as MODEL  # noqa: E402

pytestmark = pytest.mark.oracle

PROMPTS = ["ROMEO:", "O, what a noble mind is here o'erthrown!\nHAMLET:"]
PASSAGE = """JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
"""


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(MODEL)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_greedy_generate_equals_hf(tokenizer, dtype):
    """Batched, left-padded, 40 new tokens. float64 on both sides (HF with the float64 precision patch) must agree
    exactly; float32 too, on these fixed prompts (their greedy margins were checked to be clear when written)."""
    ids, mask = tokenizer.encode_batch(PROMPTS)
    ours = JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.dtype(dtype).type).generate(
        ids, attention_mask=mask, max_new_tokens=40)
    precision = hf_oracle.float64_precision() if dtype == "float64" else torch.no_grad()
    with precision, torch.no_grad():
        hf = hf_oracle.load_hf(MODEL, getattr(torch, dtype)).generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=40, do_sample=False)
    np.testing.assert_array_equal(ours, hf.numpy())


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 1e-5)])  # round-off of each dtype
def test_evaluate_loss_equals_hf(tokenizer, dtype, rtol):
    ids = np.asarray(tokenizer.encode(PASSAGE))
    context = 24  # several windows, the last one shorter
    loss, count = mean_loss(JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.dtype(dtype).type), ids, context)
    precision = hf_oracle.float64_precision() if dtype == "float64" else torch.no_grad()
    total = 0.0
    with precision, torch.no_grad():
        hf = hf_oracle.load_hf(MODEL, getattr(torch, dtype))
        for chunk in windows(ids, context):
            chunk = torch.from_numpy(chunk)[None]
            # hf_oracle.causal_lm_loss: HF's ForCausalLMLoss, in float64 without its `.float()` cast
            loss_of_chunk = hf_oracle.causal_lm_loss(hf(input_ids=chunk).logits, chunk, hf.config.vocab_size)
            total += float(loss_of_chunk) * (chunk.shape[1] - 1)
    assert count == len(ids) - len(windows(ids, context))
    assert loss == pytest.approx(total / count, rel=rtol)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.5),
                                                       (0.8, 50, 0.95), (1.0, 1, 1.0)])
def test_filtered_probabilities_equal_hf_warpers(tokenizer, seed, temperature, top_k, top_p):
    """On the bundled model's next-token logits for a batch of prompts (float32, as HF samples them) and on random
    logits: the probabilities we sample from equal softmax of HF's warpers' output."""
    ids, mask = tokenizer.encode_batch(PROMPTS)
    model_logits = JetMoeForCausalLM.from_pretrained(MODEL)(input_ids=ids, attention_mask=mask,
                                                            logits_to_keep=1).logits[:, -1]
    random_logits = np.random.default_rng(seed).normal(0, 4, size=(3, 300)).astype(np.float32)
    for logits in [model_logits, random_logits]:
        scores = torch.from_numpy(logits.copy())
        for warper in [TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
                       TopKLogitsWarper(top_k) if top_k else None, TopPLogitsWarper(top_p) if top_p < 1 else None]:
            if warper is not None:
                scores = warper(None, scores)
        want = torch.softmax(scores, dim=-1).numpy()
        got = sampling_probabilities(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(got > 0, want > 0)  # the same tokens survive the filters
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # float32 softmax, summation order differs


def debug_rows(capsys, *argv):
    """(status, rows) of `jetmoe debug compare ... --json`."""
    import json
    from jetmoe.command import main
    capsys.readouterr()
    status = main(["debug", "compare", MODEL, *map(str, argv), "--json"])
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_debugger_reference_agrees_with_hf(capsys, dtype):
    """`jetmoe debug compare MODEL hf`: every one of the 132 names (3 inputs, 129 tensors) maps to an HF tensor and
    agrees, for one forward and for generate's decode steps (float32 within 1e-4, float64 within 1e-9: the
    debugger's defaults)."""
    for steps in ("0", "3"):
        status, rows = debug_rows(capsys, "hf", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--dtype", dtype,
                                  "--max-new-tokens", steps)
        assert status == 0 and all(r["verdict"] == "ok" for r in rows), [r for r in rows if r["verdict"] != "ok"]
        assert len(rows) == 132 * max(int(steps), 1)


def test_debugger_finds_port_bugs_against_hf(tmp_path, capsys):
    """The ports of tests/tools/test_debug.py (tests/ports.py) compared with HF's hooked trace instead of the
    reference: a file against a live HF, on the file's inputs and decode tokens."""
    from ports import decode_cache_position_bug, port_trace, repeat_interleave_bug
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    status, rows = debug_rows(capsys, port, "hf")
    assert status == 1 and next(r for r in rows if r["verdict"] != "ok")["name"] == "layers.0.attention.probs"
    port = port_trace(tmp_path / "decode.safetensors", MODEL, decode_cache_position_bug(), max_new_tokens=3)
    status, rows = debug_rows(capsys, port, "hf")
    assert status == 1 and next(r for r in rows if r["verdict"] != "ok")["name"] == "step.1.layers.0.attention.probs"


def test_debugger_explains_every_hf_bf16_divergence(capsys):
    """HF's own bf16 (a real implementation nobody here wrote) against the float32 reference, op by op
    (--isolate): every row is within the bf16 tolerance (3e-2 relative, the debugger's bf16 default) or is a
    near-tie routing flip, on a prompt long enough to have some."""
    text = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
            "Arise, fair sun, and kill the envious moon")
    status, rows = debug_rows(capsys, "hf:bfloat16", "--prompt", text, "--prompt", PROMPTS[1], "--isolate",
                              "--max-new-tokens", "4")
    assert status == 0 and {r["verdict"] for r in rows} <= {"ok", "near-tie"}
    assert max(r["max_rel"] for r in rows if r["verdict"] == "ok" and not r["name"].endswith("indices")) > 1e-3
