"""Rung 9 of the op ladder (tests/reference/helpers.py lists them): the trace.

capture() records every intermediate under its name, in forward order, without changing anything, and compare()
names the first tensor where two traces diverge.
"""

import numpy as np
import pytest

import reference
from reference import JetMoeConfig, JetMoeForCausalLM
from reference.generation import positions_from_mask
from reference.io.compare import format_rows

from helpers import BASE, MODEL_CONFIGS, make_model, real_tokens


# ------------------------------------------------------------------------------------------------ 9. trace

def test_trace_names_and_capture_is_transparent(rng):
    model = make_model(rng, "E4_K2_H2")
    config = model.config
    ids = real_tokens(rng, config, (2, 5))  # [B, T]
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                  output_attentions=True, output_hidden_states=True, output_router_logits=True)
    plain = model(**kwargs)
    with reference.capture() as trace:
        traced = model(**kwargs)
    names = list(trace)
    for name in ["embed_tokens", "layers.0.attention.router.top_k_indices", "layers.0.attention.probs",
                 "layers.1.mlp.expert_out", "layers.1.output", "norm", "logits"]:
        assert name in trace, f"trace lacks {name}; has {names}"
    assert names[0] == "embed_tokens" and names[-2:] == ["norm", "logits"]
    assert names.index("layers.0.output") < names.index("layers.1.input_layernorm")
    assert trace["layers.0.attention.router.top_k_indices"].shape == (ids.size, config.num_experts_per_tok)
    assert trace["layers.1.mlp.expert_out"].shape == (ids.size, config.num_experts_per_tok, config.hidden_size)
    # Capturing changes nothing, bitwise.
    np.testing.assert_array_equal(traced.logits, plain.logits)
    for a, b in zip(traced.hidden_states + traced.attentions + traced.router_logits,
                    plain.hidden_states + plain.attentions + plain.router_logits):
        np.testing.assert_array_equal(a, b)
    # The recorded tensors are the real ones.
    np.testing.assert_array_equal(trace["embed_tokens"], model.model.embed_tokens[ids])
    np.testing.assert_array_equal(trace["norm"], plain.hidden_states[-1])
    np.testing.assert_array_equal(trace["logits"], plain.logits)
    np.testing.assert_array_equal(trace["layers.0.attention.probs"], plain.attentions[0])


def test_trace_compare_finds_first_divergence(rng):
    seed = int(rng.integers(2**32))
    config = JetMoeConfig(**{**BASE, **MODEL_CONFIGS["E4_K2_H2"]})
    model_a = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float64)
    model_b = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float64)
    ids = real_tokens(rng, config, (2, 6))  # [B, T]
    with reference.capture() as trace_a:
        model_a(input_ids=ids)
    with reference.capture() as trace_a2:
        model_a(input_ids=ids)
    first, rows = reference.compare(trace_a, trace_a2)
    assert first is None and len(rows) == len(trace_a) and all(r.ok and r.max_abs == 0 for r in rows)

    # Perturb one weight of layer 1's MLP: output_linear[e, d, f] of an expert that token 0 uses, at the
    # feature f where that token's activation is largest, so the change is certain to show.
    e = int(trace_a["layers.1.mlp.router.top_k_indices"][0, 0])
    f = int(np.argmax(np.abs(trace_a["layers.1.mlp.expert_act"][0, 0])))
    d = int(rng.integers(config.hidden_size))
    mlp = model_b.model.layers[1].mlp
    mlp.output_linear = mlp.output_linear.copy()
    mlp.output_linear[e, d, f] += 1.0
    with reference.capture() as trace_b:
        model_b(input_ids=ids)
    first, rows = reference.compare(trace_a, trace_b)
    assert first is not None and not first.ok
    assert first.name.startswith("layers.1.mlp."), f"first divergence {first.name}, expected in layers.1.mlp"
    assert first.name == "layers.1.mlp.expert_out"  # the router and the activations come before this weight
    before = rows[:[r.name for r in rows].index(first.name)]
    assert before and all(r.ok for r in before)
    a, b = trace_a[first.name], trace_b[first.name]
    max_abs = float(np.max(np.abs(a - b)))
    assert max_abs > 0 and first.max_abs == max_abs
    assert first.max_rel == pytest.approx(max_abs / float(np.max(np.abs(b))), rel=1e-12)  # one division
    assert not next(r for r in rows if r.name == "logits").ok  # and it propagates to the logits
    # Verdicts: the first divergence introduces the error, every later row that diverges inherits it; judged as
    # isolated (each row computed from the other side's inputs) none inherits.
    assert first.verdict == "introduced"
    after = rows[[r.name for r in rows].index(first.name) + 1:]
    assert "inherited" in {r.verdict for r in after} and {r.verdict for r in after if not r.ok} <= {
        "inherited", "near-tie"}  # a later router may flip at a near-tie of its logits
    assert all(r.verdict == "ok" for r in rows if r.ok)
    _, isolated = reference.compare(trace_a, trace_b, isolated=True)
    assert "inherited" not in {r.verdict for r in isolated} and [r.verdict for r in isolated if not r.ok][0] == \
        "introduced"


def test_compare_names_missing_tensors_and_the_table_stops_at_the_first(rng):
    config = JetMoeConfig(**{**BASE, **MODEL_CONFIGS["E4_K2_H2"]})
    model = JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), dtype=np.float64)
    with reference.capture() as trace_a:
        model(input_ids=real_tokens(rng, config, (1, 4)))
    trace_b = reference.Trace(trace_a)
    gone = str(rng.choice(list(trace_a)))
    del trace_b[gone]
    trace_b["extra"] = np.zeros(3)
    first, rows = reference.compare(trace_a, trace_b)
    assert first.name == gone and first.verdict == "missing" and first.shape == "missing in trace_b"
    assert rows[-1].name == "extra" and rows[-1].verdict == "missing" and rows[-1].shape == "missing in trace_a"
    assert [r.name for r in rows if not r.ok] == [gone, "extra"]
    table = format_rows(rows, stop_at_first=True).splitlines()
    assert table[-1].startswith(f">> {gone} ") and "missing" in table[-1]
    assert len(table) == 1 + [r.name for r in rows].index(gone) + 1  # the header, the rows up to the first
    assert len(format_rows(rows).splitlines()) == 1 + len(rows)


def test_inputs_that_differ_are_not_the_first_divergence(rng):
    config = JetMoeConfig(**{**BASE, **MODEL_CONFIGS["E4_K2_H2"]})
    model = JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), dtype=np.float64)
    with reference.capture() as captured:
        model(input_ids=real_tokens(rng, config, (1, 4)))
    trace_a = reference.Trace({"inputs.position_ids": np.arange(4)[None], **captured})  # as the debugger records
    trace_b = reference.Trace({**trace_a, "inputs.position_ids": np.arange(1, 5)[None]})  # a port's other choice
    floats = [n for n in captured if np.issubdtype(captured[n].dtype, np.floating) and np.any(captured[n])]
    bad = floats[int(rng.integers(len(floats)))]
    trace_b[bad] = trace_a[bad] * (1 + 1e-3)
    first, rows = reference.compare(trace_a, trace_b)
    assert first.name == bad and [r.verdict for r in rows if r.verdict != "ok"][:2] == ["input", "introduced"]
    table = format_rows(rows, show_all=False).splitlines()
    assert [line.split()[1] for line in table if line.startswith(">>")] == [bad]
    assert any(line.split()[0] == "inputs.position_ids" for line in table)  # shown, not marked
