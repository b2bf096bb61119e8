"""The op ladder with gradients: every backward of reference/ against central finite differences of its own forward.

Each check is a directional derivative: for a random direction d of an input x, (f(x + eps d) - f(x - eps d)) /
(2 eps) of the scalar sum(w * op(x)), w random, must equal sum(grad_x * d). In float64 with eps = 1e-6 the central
difference is off by about eps^2 |f'''| ~ 1e-12 plus rounding 1e-16 |f| / eps ~ 1e-10, so FD_RTOL = 1e-7 of the
Cauchy-Schwarz scale |grad| |d| has a 1000x margin and still catches a wrong term, which moves the result O(1).

Top-k choices are piecewise constant: random inputs keep their margins far above eps, so no choice flips.
Left padding is left to the HF oracle (tests/oracle/test_grad_oracle.py): a fully masked query row holds
finfo.min + score = finfo.min, so the computed function does not depend on those scores at all, while autograd
(HF's, and so ours) passes the softmax's gradient through the additive mask. Finite differences here use right
padding, where no row is fully masked.

Shape legend: reference/__init__.py.
"""

import numpy as np
import pytest
from helpers import MODEL_CONFIGS, assert_close, make_model, real_tokens

from reference import AdamW, JetMoeConfig, JetMoeForCausalLM, JetMoeModel, clip_grad_norm, cosine_lr, value_and_grad
from reference.attention import (additive_mask, attend, attend_backward, attention_probs, attention_probs_backward,
                                 moa, moa_backward)
from reference.experts import (combine, combine_backward, gather_backward, grouped_linear, grouped_linear_backward, moe,
                               moe_backward, swiglu, swiglu_backward)
from reference.linear import embedding_backward, linear, linear_backward
from reference.losses import (AUX_LOSSES, causal_lm_loss, causal_lm_loss_backward, load_balancing_loss,
                              load_balancing_loss_backward, router_aux_loss, router_aux_loss_backward, router_z_loss,
                              router_z_loss_backward)
from reference.norm import rms_norm, rms_norm_backward
from reference.rope import apply_rope, apply_rope_backward, cos_sin
from reference.routing import (plan_from_logits, softmax, softmax_backward, top_k_gates_backward, top_k_gates_of,
                               top_k_gating, top_k_gating_backward)
import reference.training as training

EPS = 1e-6
FD_RTOL = 1e-7  # see the module docstring


def directional(f, x, d):
    # central difference of the scalar f along d at x (x is changed and restored in place)
    saved = x.copy()
    x += EPS * d
    plus = f()
    x[...] = saved - EPS * d
    minus = f()
    x[...] = saved
    return (plus - minus) / (2 * EPS)


def check_grads(rng, f, inputs, grads, what, held=None):
    # f() -> scalar reading the arrays of `inputs` (changed in place); grads: the analytic gradient of each;
    # held: {name: index} of entries the direction leaves alone
    for name, x in inputs.items():
        d = rng.standard_normal(x.shape)
        if held and name in held:
            d[held[name]] = 0
        fd = directional(f, x, d)
        analytic = float(np.sum(grads[name] * d))
        # a gradient of exactly zero (a K=1 router without aux loss: its one gate is 1) must be zero by FD too
        scale = float(max(np.linalg.norm(grads[name]), 1.0) * np.linalg.norm(d))
        assert abs(fd - analytic) <= FD_RTOL * scale, (f"{what}: d/d{name}: finite differences {fd:.10g}, "
                                                       f"backward {analytic:.10g} (scale {scale:.3g})")


def weighted(rng, shape):
    # the random output weights w of sum(w * op(x))
    return rng.standard_normal(shape)


# ------------------------------------------------------------------------------------------------ single ops

def test_rms_norm_backward(rng):
    x, weight = rng.standard_normal((3, 5, 8)), rng.uniform(0.5, 1.5, 8)
    w = weighted(rng, x.shape)
    d_x, d_weight = rms_norm_backward(w, x, weight, 1e-3)
    check_grads(rng, lambda: np.sum(w * rms_norm(x, weight, 1e-3)), {"x": x, "weight": weight},
                {"x": d_x, "weight": d_weight}, "rms_norm")


def test_rope_backward(rng):
    x = rng.standard_normal((2, 3, 5, 8))
    cos, sin = cos_sin(rng.integers(0, 40, (2, 5)), 8, 100.0, np.float64)
    w = weighted(rng, x.shape)
    check_grads(rng, lambda: np.sum(w * apply_rope(x, cos, sin)), {"x": x}, {"x": apply_rope_backward(w, cos, sin)},
                "rope")


def test_linear_backward(rng):
    x, weight = rng.standard_normal((2, 4, 6)), rng.standard_normal((5, 6))
    w = weighted(rng, (2, 4, 5))
    d_x, d_weight = linear_backward(w, x, weight)
    check_grads(rng, lambda: np.sum(w * linear(x, weight)), {"x": x, "weight": weight},
                {"x": d_x, "weight": d_weight}, "linear")


def test_softmax_backward(rng):
    x = rng.standard_normal((4, 7)) * 2
    w = weighted(rng, x.shape)
    check_grads(rng, lambda: np.sum(w * softmax(x)), {"x": x}, {"x": softmax_backward(w, softmax(x))}, "softmax")


def test_top_k_gates_backward(rng):
    # the gates depend only on the chosen logits; the choice itself is held fixed (it has no gradient)
    logits = rng.standard_normal((6, 5)) * 3
    plan = plan_from_logits(logits, 2, np.float64)
    w = weighted(rng, (6, 2))
    d_logits = top_k_gates_backward(w, plan)
    check_grads(rng, lambda: np.sum(w * top_k_gates_of(logits, plan.top_k_indices, np.float64)), {"logits": logits},
                {"logits": d_logits}, "top_k_gates")
    unchosen = np.ones(logits.shape, bool)
    np.put_along_axis(unchosen, plan.top_k_indices, False, axis=1)
    assert np.all(d_logits[unchosen] == 0), "an expert a token did not choose got a gate gradient"


def test_router_backward(rng):
    x, router = rng.standard_normal((6, 4)), rng.standard_normal((3, 4))
    w = weighted(rng, (6, 3))
    d_x, d_router = top_k_gating_backward(w, x, router)
    check_grads(rng, lambda: np.sum(w * top_k_gating(x, router, 2).logits), {"x": x, "router": router},
                {"x": d_x, "router": d_router}, "router logits")


def test_dispatch_backward(rng):
    # gather, grouped matmul, ungroup and combine, each on its own; expert 3 of 4 gets no token
    tokens, experts, k = 7, 4, 2
    logits = rng.standard_normal((tokens, experts)) * 3
    logits[:, 3] = -50
    plan = plan_from_logits(logits, k, np.float64)
    x, weights = rng.standard_normal((tokens, 5)), rng.standard_normal((experts, 6, 5))
    w = weighted(rng, (tokens * k, 6))

    d_grouped, d_weights = grouped_linear_backward(w, x[plan.sorted_tokens], weights, plan)
    grouped_x = x[plan.sorted_tokens]
    check_grads(rng, lambda: np.sum(w * grouped_linear(grouped_x, weights, plan)),
                {"grouped_x": grouped_x, "weights": weights}, {"grouped_x": d_grouped, "weights": d_weights},
                "grouped_linear")
    assert np.all(d_weights[3] == 0), "the expert no token chose got a weight gradient"

    wx = weighted(rng, grouped_x.shape)
    check_grads(rng, lambda: np.sum(wx * x[plan.sorted_tokens]), {"x": x}, {"x": gather_backward(wx, plan)}, "gather")

    slot_y, gates, bias = rng.standard_normal((tokens, k, 6)), rng.uniform(0.1, 1, (tokens, k)), rng.standard_normal(6)
    wy = weighted(rng, (tokens, 6))
    d_slot_y, d_gates, d_bias = combine_backward(wy, slot_y, gates)
    check_grads(rng, lambda: np.sum(wy * combine(slot_y, gates, bias)),
                {"slot_y": slot_y, "gates": gates, "bias": bias},
                {"slot_y": d_slot_y, "gates": d_gates, "bias": d_bias}, "combine")


def test_swiglu_backward(rng):
    h = rng.standard_normal((5, 8)) * 3
    h[0, 0] = -800.0  # exp(800) overflows to inf: silu and its slope reach their limit 0 without a NaN
    w = weighted(rng, (5, 4))
    d_h = swiglu_backward(w, h)
    assert np.all(np.isfinite(d_h))
    check_grads(rng, lambda: np.sum(w * swiglu(h)), {"h": h}, {"h": d_h}, "swiglu")


def test_attention_backward(rng):
    # scores, softmax, the causal and right-padding mask, and repeat tiling of the kv heads over K experts
    batch, top_k, heads, tokens, head_dim = 2, 3, 2, 5, 4
    q = rng.standard_normal((batch, top_k, heads, tokens, head_dim))
    k, v = (rng.standard_normal((batch, heads, tokens, head_dim)) for _ in range(2))
    attention_mask = np.ones((batch, tokens), np.int64)
    attention_mask[1, -2:] = 0
    mask = additive_mask(attention_mask, np.arange(tokens), tokens, np.float64)
    w = weighted(rng, (batch, top_k * heads, tokens, tokens))
    probs = attention_probs(q, k, mask)
    d_q, d_k = attention_probs_backward(w, probs, q, k)
    check_grads(rng, lambda: np.sum(w * attention_probs(q, k, mask)), {"q": q, "k": k}, {"q": d_q, "k": d_k},
                "attention_probs")
    wo = weighted(rng, (batch, tokens, top_k, heads * head_dim))
    d_probs, d_v = attend_backward(wo, probs, v, top_k)
    check_grads(rng, lambda: np.sum(wo * attend(probs, v, top_k)), {"probs": probs, "v": v},
                {"probs": d_probs, "v": d_v}, "attend")


def layer_config(**overrides):
    return JetMoeConfig(**{**dict(vocab_size=11, hidden_size=8, num_hidden_layers=1, intermediate_size=6,
                                  num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, kv_channels=4,
                                  max_position_embeddings=64), **overrides})


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_moa_backward(rng, name):
    model = make_model(rng, name)
    config, w = model.config, model.model.layers[0].attention
    batch, tokens = 2, 6
    x = rng.standard_normal((batch, tokens, config.hidden_size))
    attention_mask = np.ones((batch, tokens), np.int64)
    attention_mask[0, -2:] = 0
    mask = additive_mask(attention_mask, np.arange(tokens), tokens, np.float64)
    cos, sin = cos_sin(np.arange(tokens)[None], config.kv_channels, config.rope_theta, np.float64)
    out_w, logits_w = weighted(rng, x.shape), weighted(rng, (batch * tokens, config.num_local_experts))

    def f():
        y, _, logits = moa(x, w, cos, sin, mask, None, 0, config)
        return np.sum(out_w * y) + np.sum(logits_w * logits)  # the logits term stands in for the aux loss

    saved = {}
    moa(x, w, cos, sin, mask, None, 0, config, saved)
    d_x, grads = moa_backward(out_w, saved, w, config, logits_w)
    inputs = {"x": x, "router": w.router, "input_linear": w.input_linear, "output_linear": w.output_linear,
              "bias": w.bias, "kv_proj": w.kv_proj}
    check_grads(rng, f, inputs, {"x": d_x, **grads}, f"moa {name}")


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_moe_backward(rng, name):
    model = make_model(rng, name)
    config, w = model.config, model.model.layers[0].mlp
    x = rng.standard_normal((2, 5, config.hidden_size))
    out_w, logits_w = weighted(rng, x.shape), weighted(rng, (10, config.num_local_experts))

    def f():
        y, logits = moe(x, w, config.num_experts_per_tok)
        return np.sum(out_w * y) + np.sum(logits_w * logits)

    saved = {}
    moe(x, w, config.num_experts_per_tok, saved)
    d_x, grads = moe_backward(out_w, saved, w, logits_w)
    inputs = {"x": x, "router": w.router, "input_linear": w.input_linear, "output_linear": w.output_linear,
              "bias": w.bias}
    check_grads(rng, f, inputs, {"x": d_x, **grads}, f"moe {name}")


def test_moe_gradient_reaches_only_chosen_experts(rng):
    # Expert 0's router logit is about -100 * (x_0 + 5) with x_0 ~ N(0, 1), so no token chooses it: its weights get
    # exactly zero gradient, and so does its router row unless the aux loss (which sees every probability) adds one.
    model = make_model(rng, "E4_K2_H2")
    config, w = model.config, model.model.layers[0].mlp
    w.router[0] = 0
    w.router[0, 0] = -100
    x = rng.standard_normal((2, 5, config.hidden_size))
    x[..., 0] += 5
    saved = {}
    moe(x, w, config.num_experts_per_tok, saved)
    assert 0 not in saved["plan"].top_k_indices
    _, grads = moe_backward(rng.standard_normal(x.shape), saved, w)
    assert np.all(grads["input_linear"][0] == 0) and np.all(grads["output_linear"][0] == 0)
    assert np.all(grads["router"][0] == 0), "the top-k choice passed a gradient to an unchosen expert's router row"
    chosen = np.unique(saved["plan"].top_k_indices)  # 10 tokens x K=2 over experts 1-3: one may go unchosen
    assert np.all(grads["input_linear"][chosen].any(axis=(1, 2))), "a chosen expert got no gradient"


def test_k1_router_learns_only_from_the_aux_loss(rng):
    # K = 1: the gate is a softmax over one logit, always 1, so the LM loss gives the router no gradient at all
    model, ids, labels, mask = model_case(rng, "E3_K1_H3_untied")
    router = "model.layers.0.mlp.router.layer.weight"
    assert not np.any(value_and_grad(model, ids, labels)[1][router])
    assert np.any(value_and_grad(model, ids, labels, output_router_logits=True)[1][router])


def test_cross_entropy_backward(rng):
    logits = rng.standard_normal((2, 5, 7))
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 2] = labels[1, 4] = -100
    check_grads(rng, lambda: causal_lm_loss(logits, labels), {"logits": logits},
                {"logits": causal_lm_loss_backward(logits, labels)}, "causal_lm_loss")


def router_logits_set(rng, routers=3, tokens=12, experts=5):
    return [rng.standard_normal((tokens, experts)) * 2 for _ in range(routers)]


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_backward(rng, masked):
    # The Switch loss's expert counts are constants: its gradient flows through the router probabilities only.
    router_logits = router_logits_set(rng)
    mask = None
    if masked:
        mask = np.ones((2, 6), np.int64)
        mask[1, :2] = 0
    inputs = {f"router{i}": r for i, r in enumerate(router_logits)}
    grads = load_balancing_loss_backward(router_logits, 5, 2, mask)
    check_grads(rng, lambda: load_balancing_loss(router_logits, 5, 2, mask), inputs,
                {f"router{i}": g for i, g in enumerate(grads)}, "load_balancing_loss")
    check_grads(rng, lambda: router_z_loss(router_logits[0]), {"router0": router_logits[0]},
                {"router0": router_z_loss_backward(router_logits[0])}, "router_z_loss")
    for kind in AUX_LOSSES:
        grads = router_aux_loss_backward(kind, router_logits, 5, 2, mask)
        check_grads(rng, lambda: router_aux_loss(kind, router_logits, 5, 2, mask), inputs,
                    {f"router{i}": g for i, g in enumerate(grads)}, f"aux loss {kind}")
        if masked:  # HF's formula leaves the pads (tokens 6, 7) out; the original JetMoE's counts every position
            assert np.all(grads[0][6:8] == 0) == (kind != "jetmoe"), f"{kind}: a pad's router logits' gradient"
            unmasked = router_aux_loss(kind, router_logits, 5, 2)
            assert (router_aux_loss(kind, router_logits, 5, 2, mask) == unmasked) == (kind == "jetmoe"), kind


def test_aux_loss_variants_balanced_values():
    # Perfectly balanced routers (every logit equal, the choices spread by hand) give HF's pooled loss K, the
    # per-router sum 2L * K and the original JetMoE's 2L * (1 + 0.1 * log(E)^2): the "2 against 48" of notebook 08.
    experts, k, routers = 8, 2, 48
    logits = [np.zeros((experts * 4, experts))] * routers
    hf = load_balancing_loss(logits, experts, k)
    assert hf == pytest.approx(k)  # all probabilities 1/E; ties go to the lowest ids, but P_e = 1/E whatever f is
    assert router_aux_loss("per_router", logits, experts, k) == pytest.approx(routers * k)
    assert router_aux_loss("jetmoe", logits, experts, k) == pytest.approx(routers * (1 + 0.1 * np.log(experts) ** 2))


def test_embedding_backward_skips_the_pad_row(rng):
    # HF's nn.Embedding(padding_idx=pad_token_id) gives the pad row no gradient from lookups
    ids = np.array([[0, 3, 3, 2], [1, 0, 2, 3]])
    d_h = rng.standard_normal((2, 4, 5))
    d_embed = embedding_backward(d_h, ids, 6, padding_idx=0)
    assert np.all(d_embed[0] == 0) and np.all(d_embed[4:] == 0)
    assert_close(d_embed[3], d_h[0, 1] + d_h[0, 2] + d_h[1, 3], 1e-15, "row 3: the sum of its three lookups")
    assert_close(embedding_backward(d_h, ids, 6, None)[0], d_h[0, 0] + d_h[1, 1], 1e-15, "no pad id: row 0")


# ------------------------------------------------------------------------------------------------ the model

def model_case(rng, name, tied=None):
    overrides = {} if tied is None else {"tie_word_embeddings": tied}
    model = make_model(rng, name, aux_loss_coef=0.3, **overrides)
    config = model.config
    ids = real_tokens(rng, config, (3, 6))
    ids[2, 1] = config.pad_token_id  # a pad token in the input: its embedding row gets no lookup gradient
    labels = ids.copy()
    labels[0, 3] = -100
    mask = np.ones_like(ids)
    mask[1, -2:] = 0  # right padding (see the module docstring)
    return model, ids, labels, mask


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@pytest.mark.parametrize("aux", [None, *AUX_LOSSES])
def test_value_and_grad_matches_finite_differences(rng, name, aux):
    model, ids, labels, mask = model_case(rng, name)
    kwargs = dict(attention_mask=mask, output_router_logits=aux is not None, aux_loss=aux or "hf")
    out, grads = value_and_grad(model, ids, labels, **kwargs)
    forward = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
    assert_close(out.loss, forward.loss, 1e-13, "value_and_grad's loss is the forward's (float64 sum order)")
    state = model.state_dict()
    assert list(grads) == list(state)
    for n, g in grads.items():
        assert g.shape == state[n].shape and g.dtype == state[n].dtype, n
    # HF's embedding gives the pad row no lookup gradient though the loss depends on it (ids holds a pad token), so
    # finite differences leave that row alone (test_embedding_backward_skips_the_pad_row checks it is zero)
    held = {"model.embed_tokens.weight": model.config.pad_token_id}
    check_grads(rng, lambda: float(model(input_ids=ids, labels=labels, use_cache=False, **kwargs).loss), state, grads,
                f"value_and_grad {name} aux={aux}", held)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_gradient_is_added_into_the_embedding(rng, tied):
    model, ids, labels, mask = model_case(rng, "E4_K2_H2", tied=tied)
    _, grads = value_and_grad(model, ids, labels, attention_mask=mask)
    assert ("lm_head.weight" in grads) is not tied
    pad = model.config.pad_token_id
    # the pad row still learns as an output class through the (tied) head, never through its lookups
    assert bool(np.any(grads["model.embed_tokens.weight"][pad] != 0)) is tied


def test_shards_do_not_change_the_gradient(rng, monkeypatch):
    model, ids, labels, mask = model_case(rng, "E4_K2_H2")
    kwargs = dict(attention_mask=mask, output_router_logits=True, aux_loss="per_router")
    monkeypatch.setattr(training, "THREADS", 3)  # one sequence per shard
    out3, grads3 = value_and_grad(model, ids, labels, **kwargs)
    monkeypatch.setattr(training, "THREADS", 1)
    out1, grads1 = value_and_grad(model, ids, labels, **kwargs)
    # float64: shards change only summation order
    assert_close(out3.loss, out1.loss, 1e-13, "loss")
    for name in grads1:
        assert_close(grads3[name], grads1[name], 1e-12, name)


def test_a_shard_that_predicts_nothing(rng, monkeypatch):
    # Row 1's labels are -100 after the shift, so its shard holds no predicted token: its loss gradient is zero (it
    # divides by the whole batch's count), not 0/0 (found by the HF gradient oracle)
    model, ids, labels, _ = model_case(rng, "E4_K2_H2")
    labels[1, 1:] = -100
    monkeypatch.setattr(training, "THREADS", 3)
    _, sharded = value_and_grad(model, ids, labels)
    monkeypatch.setattr(training, "THREADS", 1)
    _, whole = value_and_grad(model, ids, labels)
    for name in whole:
        assert_close(sharded[name], whole[name], 1e-12, name)


def test_float32_gradient_within_tolerance_of_float64(rng):
    seed = int(rng.integers(2**32))
    config = JetMoeConfig(**{**dict(vocab_size=61, hidden_size=24, num_hidden_layers=2, intermediate_size=20,
                                    pad_token_id=0), **MODEL_CONFIGS["E4_K2_H2"]})
    m64 = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float64)
    m32 = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float32)
    ids = real_tokens(rng, config, (2, 8))
    out64, g64 = value_and_grad(m64, ids, ids, output_router_logits=True)
    out32, g32 = value_and_grad(m32, ids, ids, output_router_logits=True)
    routing = [np.array_equal(np.argsort(-a, 1)[:, :2], np.argsort(-b, 1)[:, :2])
               for a, b in zip(out64.router_logits, out32.router_logits)]
    if not all(routing):
        pytest.skip("float32 rounding flipped a top-k choice of this draw (a near-tie): gradients are not comparable")
    # float32 rounds each op at ~6e-8 relative; two layers and the backward's longer chains (through softmax
    # Jacobians and norms) amplify that to ~1e-5 normwise here: 1e-4 leaves 10x margin.
    for name in g64:
        assert g32[name].dtype == np.float32
        assert_close(g32[name], g64[name], 1e-4, f"float32 gradient of {name}")


def test_value_and_grad_errors(rng):
    model, ids, labels, mask = model_case(rng, "E4_K2_H2")
    with pytest.raises(TypeError, match="JetMoeForCausalLM"):
        value_and_grad(JetMoeModel(model.config, model.model.tensors), ids, labels)
    with pytest.raises(ValueError, match="needs labels"):
        value_and_grad(model, ids, None)
    with pytest.raises(ValueError, match="predict no token"):
        value_and_grad(model, ids, np.full_like(ids, -100))
    with pytest.raises(ValueError, match="aux_loss must be one of"):
        value_and_grad(model, ids, labels, output_router_logits=True, aux_loss="switch")


# ------------------------------------------------------------------------------------------------ the optimizer

def adamw_transcription(p, grads_per_step, lr, betas, eps, weight_decay):
    # Loshchilov & Hutter's AdamW written as the paper's equations (not torch's lerp form): the independent oracle
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads_per_step, start=1):
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_the_equations(rng):
    model = make_model(rng, "E4_K2_H2")
    before = {n: np.array(t) for n, t in model.state_dict().items()}
    opt = AdamW(model, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                decay=lambda name, p: p.ndim >= 2)
    steps = [{n: rng.standard_normal(t.shape) for n, t in before.items()} for _ in range(3)]
    for grads in steps:
        opt.step(grads)
    after = model.state_dict()
    for name, p in before.items():
        decay = 0.1 if p.ndim >= 2 else 0.0
        want = adamw_transcription(p, [g[name] for g in steps], 0.01, (0.9, 0.95), 1e-8, decay)
        assert_close(after[name], want, 1e-13, f"AdamW {name} (float64: the two forms round differently)")


def test_adamw_never_writes_into_the_checkpoint(rng, tmp_path):
    # A float32 checkpoint loaded in float32 is memory-mapped: AdamW must train owned copies, leaving the file as is.
    make_model(rng, "E4_K2_H2", dtype=np.float32).save_pretrained(tmp_path)
    file_bytes = (tmp_path / "model.safetensors").read_bytes()
    model = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float32)
    assert not model.model.embed_tokens.flags.writeable  # the premise: a read-only view of the file
    ids = real_tokens(rng, model.config, (2, 5))
    opt = AdamW(model, lr=0.01)
    for _ in range(2):
        _, grads = value_and_grad(model, ids, ids)
        opt.step(grads)
    assert (tmp_path / "model.safetensors").read_bytes() == file_bytes
    reloaded = JetMoeForCausalLM.from_pretrained(tmp_path, dtype=np.float32)
    assert not np.array_equal(model.model.embed_tokens, reloaded.model.embed_tokens), "the model did not train"
    assert model.lm_head is model.model.embed_tokens, "the tied head lost its tie"


def test_adamw_state_round_trip(rng):
    model, ids, labels, _ = model_case(rng, "E4_K2_H2")
    opt = AdamW(model, lr=0.01)
    opt.step(value_and_grad(model, ids, labels)[1])
    state = {n: np.array(v) for n, v in opt.state_dict().items()}
    resumed = AdamW(JetMoeForCausalLM(model.config, dict(model.model.tensors), {"lm_head.weight": model.lm_head}))
    resumed.load_state_dict(state)
    assert resumed.steps == 1
    for name in opt.exp_avg:
        assert np.array_equal(resumed.exp_avg[name], opt.exp_avg[name])
    with pytest.raises(ValueError, match="does not match the model"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "step"})


def test_clip_grad_norm(rng):
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    norm = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
    original = {n: g.copy() for n, g in grads.items()}
    assert clip_grad_norm(grads, 10 * norm) == pytest.approx(norm, rel=1e-15)
    assert all(np.array_equal(grads[n], original[n]) for n in grads), "a norm below max_norm must not scale"
    assert clip_grad_norm(grads, norm / 4) == pytest.approx(norm, rel=1e-15)
    for n in grads:  # torch's coefficient: max_norm / (norm + 1e-6)
        assert_close(grads[n], original[n] * (norm / 4) / (norm + 1e-6), 1e-15, n)


def test_cosine_lr():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10, min_lr=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up, step 0 = peak / warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "the cosine decays monotonically"
    assert lrs[55] == pytest.approx(0.55)  # halfway: the mean of peak and min
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
