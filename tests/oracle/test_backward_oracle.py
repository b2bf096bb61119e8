"""The `hf` side of `jetmoe debug compare --backward`: torch autograd on HF's JetMoe, traced under the reference's
gradient names (jetmoe/hf_backward.py), agrees with the reference's hand-written backward at every gradient, and a
zoo port's backward bug is named against it."""

import json

import pytest

from oracle_env import require_oracle

torch, transformers = require_oracle()

from jetmoe.command import main  # noqa: E402
from notebooks import zoo  # noqa: E402
from reference import JetMoeForCausalLM  # noqa: E402

from paths import TINY_MODEL as MODEL  # noqa: E402

pytestmark = pytest.mark.oracle
PROMPTS = ["--prompt", zoo.PROMPTS[0], "--prompt", zoo.PROMPTS[1]]


def rows_of(capsys, *argv):
    capsys.readouterr()
    status = main(["debug", "compare", MODEL, *argv, "--backward", "--json"])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("aux", [[], ["--aux", "per_router"]])
def test_hf_autograd_equals_the_reference_backward(capsys, aux):
    # float64 on both sides (HF under the precision patch): summation order only, the default rtol 1e-9 of each
    # tensor's largest entry holds with room (measured ~1e-14)
    status, rows = rows_of(capsys, "hf", "ref", "--dtype", "float64", *PROMPTS, *aux)
    assert status == 0 and {r["verdict"] for r in rows} == {"ok"}
    names = [r["name"] for r in rows]
    assert names[:2] == ["loss", "grad.logits"] and "grad.layers.0.attention.probs" in names
    params = JetMoeForCausalLM.from_pretrained(MODEL).state_dict()  # the checkpoint's keys (a tied lm_head: none)
    assert sorted(n[len("grad.param."):] for n in names if n.startswith("grad.param.")) == sorted(params)
    assert sum(not n.startswith("grad.param.") for n in names) == 4 + 6 * 19  # loss, logits, norm, embed; 19 a layer


def test_a_backward_bug_is_named_against_hf(tmp_path, capsys):
    _, argv = zoo.dump("router_detached", tmp_path / "port.safetensors")
    status, rows = rows_of(capsys, argv[1], "hf")
    first = next(r for r in rows if r["verdict"] != "ok")
    assert status == 1 and first["name"] == "grad.layers.5.mlp.router.logits" and first["verdict"] == "introduced"
