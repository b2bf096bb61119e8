"""The graders of the notebooks' build-it-yourself cells.  Shapes: reference/__init__.py.

Each notebook's exercise cell holds a stub, `def my_<op>(...): ...`, and the next cell calls its grader here,
`check_<op>(my_<op>)`. A grader runs the learner's function on fresh random inputs, compares it with reference/,
prints one line per finding and returns True only when every case matches:

- an untouched stub returns None: the grader prints "not yet implemented" and returns False (it never raises, so
  `make test-notebooks` runs the committed notebooks with their stubs in place);
- a wrong answer gets a hint that names the likely mistake (a tie broken the other way, a softmax over all E, ...).

Solutions: notebooks/solutions/. tests/notebooks/test_exercises.py runs every solution through its grader (True)
and every stub in the notebooks (False).
"""

import dataclasses

import numpy as np

from reference.attention import additive_mask, attention_probs
from reference.counting import active_parameters, count_parameters, forward_flops, parameter_shapes
from reference.losses import causal_lm_loss
from reference.model import ExpertWeights
from reference.norm import rms_norm
from reference.rope import apply_rope, cos_sin
from reference.routing import plan_from_logits, top_k_gates_backward

NOT_IMPLEMENTED = "not yet implemented: write the body of {name} (it returns None), then run this cell again"


def _verdict(name, findings):
    # findings: hint lines, empty when every case matched -> True when passed; prints the outcome
    if findings:
        print(f"{name}: not right yet")
        for line in findings:
            print("  - " + line)
        return False
    print(f"{name}: correct on every case")
    return True


def _compare(got, want, what, rtol=1e-10, atol=1e-12):
    # -> None when got equals want to float64 round-off, else a line saying how it differs
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, expected {want.shape}"
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        return f"{what}: max |yours - reference| = {np.abs(got - want).max():.3g}"
    return None


def check_rms_norm(my_rms_norm):
    # my_rms_norm(x [..., D], weight [D], eps) -> [..., D]  (notebook 01)
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 5, 16))  # [B, T, D] float64
    x[0, 0] *= 1e-4  # a row whose mean square is comparable to eps: eps must sit inside the square root
    weight = rng.uniform(0.5, 2.0, 16)  # [D]
    eps = 1e-6
    got = my_rms_norm(x, weight, eps)
    if got is None:
        print(NOT_IMPLEMENTED.format(name="my_rms_norm"))
        return False
    findings = [f for f in [_compare(got, rms_norm(x, weight, eps), "rms_norm(x, weight, eps)")] if f]
    if findings:
        centred = x - x.mean(axis=-1, keepdims=True)
        if np.allclose(got, rms_norm(centred, weight, eps)):
            findings.append("you subtracted the mean: that is LayerNorm; RMSNorm divides by the root mean square")
        elif np.allclose(got, weight * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)):
            findings.append("eps belongs inside the square root: x / sqrt(mean(x^2) + eps)")
        elif np.allclose(got, rms_norm(x, np.ones_like(weight), eps)):
            findings.append("multiply by the weight [D] at the end")
    return _verdict("my_rms_norm", findings)


def check_rope(my_rope):
    # my_rope(x [heads, T, Dh], positions [T], theta) -> [heads, T, Dh], HF's rotate-half RoPE  (notebook 01)
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 6, 8))  # [heads, T, Dh] float64
    positions = rng.integers(0, 500, size=6)  # [T], any positions (a cache continues where it stopped)
    theta = 10000.0
    got = my_rope(x, positions, theta)
    if got is None:
        print(NOT_IMPLEMENTED.format(name="my_rope"))
        return False
    cos, sin = cos_sin(positions[None], 8, theta, x.dtype)  # [1, T, Dh]
    want = apply_rope(x[None], cos, sin)[0]  # [heads, T, Dh]
    findings = [f for f in [_compare(got, want, "rotated x")] if f]
    if findings and np.shape(got) == want.shape:
        half = x.shape[-1] // 2
        c, s = (np.repeat(t[0, :, :half], 2, axis=-1) for t in (cos, sin))  # [T, Dh]: frequency i on (2i, 2i+1)
        pairs = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
        if np.allclose(got, x * c + pairs * s):
            findings.append("that is GPT-J's interleaved RoPE, pairs (2i, 2i+1); HF pairs dimension i with i + Dh/2")
        elif np.allclose(got, x * cos[0] - np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin[0]):
            findings.append("the rotation turns the wrong way: y_i = x_i cos - x_{i+Dh/2} sin")
    return _verdict("my_rope", findings)


def check_top_k_gates(my_top_k_gates):
    # my_top_k_gates(logits [N, E], k) -> (top_k_indices [N, K], top_k_gates [N, K])  (notebook 02)
    rng = np.random.default_rng()
    logits = rng.standard_normal((12, 8))  # [N, E]
    logits[0] = 1.5  # a row of equal logits: the lower expert id comes first
    logits[1, [2, 6]] = logits[1].max() + 1.0  # a tie for the best place, between experts 2 and 6
    findings = []
    for k in (1, 2, 3):
        result = my_top_k_gates(logits.copy(), k)
        if result is None:
            print(NOT_IMPLEMENTED.format(name="my_top_k_gates"))
            return False
        indices, gates = (np.asarray(part) for part in result)
        plan = plan_from_logits(logits.copy(), k, logits.dtype)
        if indices.shape != plan.top_k_indices.shape:
            findings.append(f"k={k}: top_k_indices has shape {indices.shape}, expected {plan.top_k_indices.shape}")
            continue
        if not np.array_equal(indices, plan.top_k_indices):
            row = int(np.flatnonzero((indices != plan.top_k_indices).any(axis=1))[0])
            line = (f"k={k}: top_k_indices row {row} is {indices[row]}, expected {plan.top_k_indices[row]} "
                    f"(logits {np.round(logits[row], 3)})")
            if np.array_equal(np.take_along_axis(logits, indices.astype(np.int64), axis=1),
                              np.take_along_axis(logits, plan.top_k_indices, axis=1)):
                line += ("; the same logits, other experts: equal logits go in expert id order, lower id first "
                         "(np.argsort(-logits, kind='stable'))")
            findings.append(line)
            continue
        difference = _compare(gates, plan.top_k_gates, f"k={k}: top_k_gates")
        if difference:
            everyone = np.exp(logits - logits.max(axis=1, keepdims=True))
            everyone /= everyone.sum(axis=1, keepdims=True)
            if np.allclose(gates, np.take_along_axis(everyone, plan.top_k_indices, axis=1)):
                difference += ("; that is a softmax over all E logits: take the softmax over the K chosen "
                               "logits only (the gates sum to 1)")
            findings.append(difference)
    return _verdict("my_top_k_gates", findings)


def random_moe_layer(rng, tokens=10, hidden=8, experts=4, ffn=5):
    # -> x [N, D], ExpertWeights (router, input_linear [E, 2F, D], output_linear [E, D, F], bias [D]), all random
    w = ExpertWeights(router=rng.standard_normal((experts, hidden)),
                      input_linear=rng.standard_normal((experts, 2 * ffn, hidden)) * 0.4,
                      output_linear=rng.standard_normal((experts, hidden, ffn)) * 0.4,
                      bias=rng.standard_normal(hidden))
    return rng.standard_normal((tokens, hidden)), w


def check_dispatch(my_dispatch):
    # my_dispatch(top_k_indices [N, K], num_experts) -> (sorted_slots [N*K], expert_offsets [E+1])  (notebook 03)
    rng = np.random.default_rng()
    findings = []
    for experts in (4, 16):  # 10 tokens x K=2 over 16 experts: some experts receive no slot
        x, w = random_moe_layer(rng, experts=experts)
        plan = plan_from_logits(x @ w.router.T, 2, x.dtype)
        result = my_dispatch(plan.top_k_indices.copy(), experts)
        if result is None:
            print(NOT_IMPLEMENTED.format(name="my_dispatch"))
            return False
        sorted_slots, offsets = (np.asarray(part) for part in result)
        if sorted_slots.shape != plan.sorted_slots.shape or not np.array_equal(sorted_slots, plan.sorted_slots):
            line = f"E={experts}: sorted_slots {sorted_slots.tolist()}, expected {plan.sorted_slots.tolist()}"
            flat = plan.top_k_indices.reshape(-1)
            if sorted_slots.shape == plan.sorted_slots.shape and np.array_equal(flat[sorted_slots],
                                                                              flat[plan.sorted_slots]):
                line += "; grouped by expert, but not in slot order inside a group: use a stable sort"
            findings.append(line)
        if offsets.shape != plan.expert_offsets.shape or not np.array_equal(offsets, plan.expert_offsets):
            findings.append(f"E={experts}: expert_offsets {offsets.tolist()}, expected "
                            f"{plan.expert_offsets.tolist()} (E+1 numbers: 0, then the running count of slots per "
                            "expert, an empty expert included: np.bincount(..., minlength=E))")
    return _verdict("my_dispatch", findings)


def check_attention_probs(my_attention_probs):
    # my_attention_probs(q [K*H, T, Dh], k [H, T, Dh]) -> causal softmax probabilities [K*H, T, T]  (notebook 04)
    rng = np.random.default_rng()
    findings = []
    for top_k, heads in ((2, 4), (3, 2)):
        tokens, head_dim = 7, 8
        q = rng.standard_normal((top_k * heads, tokens, head_dim))  # [K*H, T, Dh]
        k = rng.standard_normal((heads, tokens, head_dim))  # [H, T, Dh]
        got = my_attention_probs(q, k)
        if got is None:
            print(NOT_IMPLEMENTED.format(name="my_attention_probs"))
            return False
        mask = additive_mask(None, np.arange(tokens), tokens, q.dtype)  # [1, 1, T, S]
        want = attention_probs(q.reshape(1, top_k, heads, tokens, head_dim), k[None], mask)[0]  # [K*H, T, S]
        difference = _compare(got, want, f"K={top_k}, H={heads}: probabilities")
        if difference:
            interleaved = np.repeat(k, top_k, axis=0)  # kv head qh // K: repeat_interleave
            scores = q @ np.swapaxes(interleaved, -1, -2) / np.sqrt(head_dim) + mask[0]
            wrong = np.exp(scores - scores.max(axis=-1, keepdims=True))
            wrong /= wrong.sum(axis=-1, keepdims=True)
            if np.shape(got) == want.shape and np.allclose(got, wrong):
                difference += "; query head qh reads kv head qh % H (repeat), not qh // K (repeat_interleave)"
            elif np.shape(got) == want.shape and np.abs(np.triu(np.asarray(got), 1)).max() > 0:
                difference += "; a query must not see later keys: mask the scores above the diagonal"
            findings.append(difference)
    return _verdict("my_attention_probs", findings)


def check_causal_lm_loss(my_causal_lm_loss):
    # my_causal_lm_loss(logits [B, T, V], ids [B, T]) -> the mean next-token cross-entropy, a float  (notebook 05)
    rng = np.random.default_rng()
    logits = rng.standard_normal((2, 9, 11)) * 3  # [B, T, V]
    ids = rng.integers(0, 11, size=(2, 9))  # [B, T]
    got = my_causal_lm_loss(logits, ids)
    if got is None:
        print(NOT_IMPLEMENTED.format(name="my_causal_lm_loss"))
        return False
    want = float(causal_lm_loss(logits, ids))
    findings = []
    if not np.isclose(float(got), want, rtol=1e-10):
        findings.append(f"yours {float(got):.6f}, the reference's {want:.6f}")
        unshifted = float(causal_lm_loss(np.concatenate([logits, logits[:, :1]], axis=1),
                                         np.concatenate([ids[:, :1], ids], axis=1)))
        if np.isclose(float(got), unshifted):
            findings.append("position t predicts token t+1: score logits[:, :-1] against ids[:, 1:]")
    return _verdict("my_causal_lm_loss", findings)


def check_top_k_gates_backward(my_top_k_gates_backward):
    # my_top_k_gates_backward(d_gates [N, K], top_k_gates [N, K], top_k_indices [N, K], num_experts) -> d_logits
    # [N, E]  (notebook 08)
    rng = np.random.default_rng()
    logits = rng.standard_normal((9, 6))  # [N, E]
    plan = plan_from_logits(logits, 2, logits.dtype)
    d_gates = rng.standard_normal((9, 2))  # [N, K]
    got = my_top_k_gates_backward(d_gates, plan.top_k_gates, plan.top_k_indices, 6)
    if got is None:
        print(NOT_IMPLEMENTED.format(name="my_top_k_gates_backward"))
        return False
    want = top_k_gates_backward(d_gates, plan)
    findings = [f for f in [_compare(got, want, "d_logits")] if f]
    if findings and np.shape(got) == want.shape:
        unchosen = np.ones(want.shape, bool)
        np.put_along_axis(unchosen, plan.top_k_indices, False, axis=1)
        if np.abs(np.asarray(got)[unchosen]).max() > 0:
            findings.append("an expert a token did not choose gets no gradient from its gates: zero there")
        else:
            findings.append("the softmax backward is g * (d_g - sum_k(g * d_g)), per token")
    return _verdict("my_top_k_gates_backward", findings)


def cost_ratios(base, change):
    # base: JetMoeConfig, change: {field: value} -> {quantity: new / old} (the "what it costs" notebook)
    after = dataclasses.replace(base, **change)
    measures = {"total parameters": lambda c: sum(count_parameters(parameter_shapes(c)).values()),
                "active parameters": lambda c: sum(active_parameters(c).values()),
                "decode FLOPs per token": lambda c: sum(forward_flops(c, 1, c.max_position_embeddings).values())}
    return {quantity: measure(after) / measure(base) for quantity, measure in measures.items()}


def check_predictions(base, change, predicted):
    # predicted: {quantity: your ratio new / old, or None} -> True when every prediction is within 2%.
    # A quantity left at None shows no answer: the committed notebook must not print what it asks you to predict.
    ratios = cost_ratios(base, change)
    print(f"with {change}:")
    right = True
    for quantity, ratio in ratios.items():
        guess = predicted[quantity]
        if guess is None:
            print(f"  {quantity:<24} not yet predicted: write your ratio new / old into `predicted`")
            right = False
        elif abs(guess / ratio - 1) < 0.02:
            print(f"  {quantity:<24} x {ratio:.3f}: your {guess} is right (within 2%)")
        else:
            print(f"  {quantity:<24} x {ratio:.3f}: your {guess} is off")
            right = False
    return right

