"""Gradient debugging (`jetmoe debug dump --backward`, `jetmoe debug compare --backward`, jetmoe/debug_backward.py):
the traced gradients are the loss's derivatives (against value_and_grad and central differences), and the
backward compare names each independent backward bug, with the residual sums judged as the math has them."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import reference.model
from jetmoe.command import main
from jetmoe.debug_backward import backward_order, labels_of
from reference import JetMoeForCausalLM, value_and_grad
from reference.generation import positions_from_mask
from reference.io.tokenizer import Tokenizer
from reference.io.trace import capture, substitute
from reference.io.trace_files import load_with_metadata

from paths import TINY_MODEL as MODEL
from ports import PROMPTS, patched


def dump(path, *flags, dtype="float64", patches=()):
    argv = ["debug", "dump", MODEL, "--out", str(path), "--dtype", dtype, "--backward", *flags]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    with patched(patches):
        assert main(argv) == 0
    return str(path)


def compare(capsys, *argv):
    """(status, rows) of `compare --backward ... --json`."""
    capsys.readouterr()
    status = main(["debug", "compare", MODEL, *map(str, argv), "--backward", "--json"])
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def named(rows, verdict):
    return [r["name"] for r in rows if r["verdict"] == verdict]


@pytest.fixture(scope="module")
def tiny():
    return JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.float64)


@pytest.fixture(scope="module")
def reference_dump(tmp_path_factory):
    return dump(tmp_path_factory.mktemp("ref") / "ref.safetensors")


def inputs():
    ids, mask = Tokenizer.from_pretrained(MODEL).encode_batch(PROMPTS)
    return ids, mask


def test_dump_records_every_gradient_and_the_loss(reference_dump, tiny):
    saved, metadata = load_with_metadata(reference_dump)
    ids, mask = inputs()
    with capture() as forward:
        tiny(input_ids=ids, attention_mask=mask, use_cache=False)
    differentiable = [n for n in forward if not n.endswith("top_k_indices")]
    assert [n for n in differentiable if "grad." + n not in saved] == []
    out, grads = value_and_grad(tiny, ids, labels_of(ids, mask), attention_mask=mask)
    assert sorted(n[len("grad.param."):] for n in saved if n.startswith("grad.param.")) == sorted(grads)
    for key, grad in grads.items():  # the same backward: equal up to the order of the threads' sums
        np.testing.assert_allclose(saved["grad.param." + key], grad, rtol=1e-12, atol=1e-14 * np.abs(grad).max())
    assert metadata["loss"] == "causal_lm" and float(metadata["loss_value"]) == pytest.approx(out.loss, rel=1e-12)
    assert saved["loss"][0] == pytest.approx(out.loss, rel=1e-12)
    assert np.array_equal(saved["inputs.labels"], np.where(mask == 1, ids, -100))  # HF shifts them in its loss


@pytest.mark.parametrize("name", ["embed_tokens", "layers.1.mlp.output", "layers.2.attention.probs",
                                  "layers.3.mlp.router.top_k_gates", "layers.4.attention.query_rope",
                                  "layers.0.post_attention_residual"])
def test_activation_gradients_are_the_loss_derivatives(reference_dump, tiny, name):
    """grad.<name> against a central difference of the loss along a random direction through that trace point, in
    the unpadded prompt's entries. (In the left-padded row, below the last layer, the hand-written backward, like
    autograd, and a finite difference part by up to 10%: not investigated here.)"""
    saved, _ = load_with_metadata(reference_dump)
    ids, mask = inputs()
    value, grad = saved[name], saved["grad." + name]
    direction = np.random.default_rng(0).standard_normal(value.shape)
    rows = np.arange(value.size).reshape(value.shape)
    direction *= np.isin(rows, token_entries(name, value.shape, unpadded=1))
    eps = 1e-6 * np.abs(value).max()

    def loss(shift):
        with substitute({name: value + shift * direction}):
            return tiny(input_ids=ids, attention_mask=mask, labels=labels_of(ids, mask), use_cache=False).loss
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    # float64 central difference: truncation eps^2 and round-off 1e-16 / eps, both far below 1e-6 of the slope
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-12)


def token_entries(name, shape, unpadded):
    # the flat indices of `shape`'s entries that belong to batch row `unpadded` (token-major [N, ...] for routers)
    index = np.arange(int(np.prod(shape))).reshape(shape)
    if ".router." in name:
        tokens = shape[0] // len(PROMPTS)
        return index[unpadded * tokens:(unpadded + 1) * tokens].ravel()
    return index[unpadded].ravel()


def test_backward_order_runs_from_the_loss_to_the_embeddings(reference_dump):
    saved, _ = load_with_metadata(reference_dump)
    order = backward_order(list(saved))
    assert order[:3] == ["loss", "grad.logits", "grad.norm"] and order[-1] == "grad.param.model.embed_tokens.weight"
    position = {n: i for i, n in enumerate(order)}
    assert position["grad.layers.5.output"] < position["grad.layers.5.mlp.output"] < \
        position["grad.param.model.layers.5.mlp.input_linear.weight"] < position["grad.layers.4.output"]
    assert len(order) == len([n for n in saved if n.startswith("grad.") or n == "loss"])


def branch_bug(layer, part, scale):
    """A backward-only bug: the gradient out of `layer`'s `part` (mlp or attention) branch scaled by `scale`."""
    name = {"mlp": "moe_backward", "attention": "moa_backward"}[part]
    original = getattr(reference.model, name)
    weights = []

    def buggy(d_y, saved, w, *args):
        d_x, grads = original(d_y, saved, w, *args)
        return (d_x * scale if w is weights[0] else d_x), grads

    def patches(model):
        weights.append(getattr(model.model.layers[layer], part))
        return [(reference.model, name, buggy)]
    return patches


def test_isolate_names_each_backward_bug_and_blames_no_residual(tmp_path, tiny, capsys):
    mlp_bug, attention_bug = branch_bug(4, "mlp", 1.5), branch_bug(1, "attention", 0.5)
    patches = mlp_bug(tiny) + attention_bug(tiny)
    loaded = type("Loaded", (), {"from_pretrained": staticmethod(lambda *a, **k: tiny)})
    import jetmoe.cli
    port = dump(tmp_path / "port.safetensors", patches=[*patches, (jetmoe.cli, "JetMoeForCausalLM", loaded)])
    status, rows = compare(capsys, port, "ref", "--isolate")
    assert status == 1
    introduced = named(rows, "introduced")
    # each bug is introduced where its branch's gradient leaves the branch: the norm's input gradient
    assert introduced[:2] == ["grad.layers.4.post_attention_layernorm", "grad.layers.1.input_layernorm"]
    assert set(introduced) == {"grad.layers.4.post_attention_layernorm", "grad.layers.1.input_layernorm"}
    # without --isolate the first is named and every gradient after it inherits it (the residual included)
    status, rows = compare(capsys, port, "ref")
    assert named(rows, "introduced") == ["grad.layers.4.post_attention_layernorm"]
    assert "grad.layers.4.post_attention_residual" in named(rows, "inherited")
    assert all(r["verdict"] == "ok" for r in rows[:rows.index(next(r for r in rows if r["verdict"] != "ok"))])


def test_ref_against_its_own_dump_agrees(reference_dump, capsys):
    status, rows = compare(capsys, reference_dump, "ref", "--dtype", "float64")
    assert status == 0 and rows[0]["name"] == "loss" and {r["verdict"] for r in rows} == {"ok"}
    assert rows[1]["name"] == "grad.logits" and rows[-1]["name"] == "grad.param.model.embed_tokens.weight"


def test_bad_inputs_are_one_error_line(reference_dump, tmp_path, capsys):
    forward_only = tmp_path / "forward.safetensors"
    assert main(["debug", "dump", MODEL, "--out", str(forward_only), *sum((["--prompt", p] for p in PROMPTS), [])]) == 0
    with_aux = dump(tmp_path / "aux.safetensors", "--aux")
    other_input = tmp_path / "other.safetensors"
    assert main(["debug", "dump", MODEL, "--out", str(other_input), "--backward", "--prompt", "ROMEO:"]) == 0
    saved, metadata = load_with_metadata(reference_dump)  # generate's positions, from the mask: not a training forward
    saved["inputs.position_ids"] = positions_from_mask(saved["inputs.attention_mask"])
    save_file(dict(saved), str(tmp_path / "positions.safetensors"), metadata=metadata)
    saved, metadata = load_with_metadata(reference_dump)  # an untrusted file is checked as the forward compare does
    saved["grad.logits"] = saved["grad.logits"].astype(np.float16)
    save_file(dict(saved), str(tmp_path / "half.safetensors"), metadata=metadata)
    for argv, message in (([forward_only, reference_dump], "holds no gradients (grad.*)"),
                          ([tmp_path / "half.safetensors", "ref"], "tensor 'grad.logits' is float16"),
                          ([tmp_path / "positions.safetensors", "ref"], "inputs.position_ids are not 0..T-1"),
                          ([reference_dump, with_aux], "different losses: "),
                          ([reference_dump, other_input], "different inputs: inputs.input_ids")):
        capsys.readouterr()
        assert main(["debug", "compare", MODEL, *map(str, argv), "--backward"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
