"""Aux loss "jetmoe" against the original JetMoE training code, written here in torch from its source.

The original: github.com/myshell-ai/JetMoE at 0a9bc5a. In jetmoe/utils/gate.py, `top_k_gating.forward` (training
branch) and `compute_aux_loss`. jetmoe/utils/moe.py hands the gate every one of the B*T positions
(`x.reshape(-1, emb_size)`), and the gate never sees an attention mask. JetMoEBlock adds the attention router's
loss to the MLP router's, and JetMoEModel sums the blocks. `original_router_loss` below follows the original line by
line. It uses torch only: it is not derived from reference/losses.py. Its one change is the dtype of the
counts. The original's `.float()` is a no-op on its float32 logits; here it follows the logits' dtype, so a
float64 oracle stays float64. The gradient comes from torch autograd.

Both sides run in float64 and compute the same sums in other orders, so they agree to round-off: ~1e-16 per op over
a few hundred terms. RTOL = 1e-12 leaves four orders of margin, and a masked count or a missing term moves the
value by 0.1% or more.

docs/semantics.md ("The original JetMoE code against HF and us") lists where the original departs from HF, and
where we follow it.
"""

import numpy as np
import pytest

from oracle_env import require_oracle

torch, transformers = require_oracle()

import torch.nn.functional as F  # noqa: E402

from jetmoe import hf_oracle  # noqa: E402

from reference.losses import router_aux_loss, router_aux_loss_backward  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-12  # see the module docstring


def original_router_loss(logits, num_experts, top_k):
    # logits: [N, E] one router's logits at every position -> scalar: gate.py, top_k_gating.forward (self.training)
    # then compute_aux_loss(probs, logits, gates), statement by statement
    top_k_logits, top_k_indices = logits.topk(top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1)  # .type_as(x): x is float64 here
    probs = torch.softmax(logits, dim=1)
    zeros = torch.zeros_like(probs)
    zeros = zeros.to(top_k_gates.dtype)
    gates = zeros.scatter(1, top_k_indices, top_k_gates)

    count = logits.size(0)
    probs = probs.sum(0)
    freq = (gates > 0).to(logits.dtype).sum(0)  # the original: .float(), its logits' dtype (module docstring)
    lsesq = (torch.log(torch.exp(logits).sum(dim=-1)) ** 2).sum()

    switchloss = num_experts * (F.normalize(probs, p=1, dim=0) * F.normalize(freq, p=1, dim=0)).sum()
    zloss = lsesq / count
    return switchloss + 0.1 * zloss


def original_aux_loss(router_logits, num_experts, top_k):
    # router_logits: 2L x [N, E] -> scalar: att_aux_loss + mlp_aux_loss per block, summed over the blocks
    return sum(original_router_loss(r, num_experts, top_k) for r in router_logits)


def padding_mask(rng, batch, tokens):
    # [B, T]: row 0 unpadded, then left- and right-padded rows in turn (at least one real token each)
    mask = np.ones((batch, tokens), np.int64)
    for b in range(1, batch):
        pad = int(rng.integers(1, tokens))
        if b % 2:
            mask[b, :pad] = 0
        else:
            mask[b, tokens - pad:] = 0
    return mask


CASES = [  # (routers 2L, batch B, tokens T, experts E, top-k K): E=1, K=1, K=E and jetmoe-8b's 48 routers
    (2, 3, 7, 4, 2), (4, 2, 9, 8, 1), (2, 3, 5, 3, 3), (2, 2, 4, 1, 1), (48, 3, 6, 8, 2)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("routers, batch, tokens, experts, top_k", CASES)
def test_jetmoe_aux_loss_is_the_originals(rng, padded, routers, batch, tokens, experts, top_k):
    router_logits = [rng.standard_normal((batch * tokens, experts)) * 2 for _ in range(routers)]  # [N, E] each
    mask = padding_mask(rng, batch, tokens) if padded else None
    # The model hands the mask to every aux loss (reference/losses.py causal_lm_losses); "jetmoe" must not use it
    value = router_aux_loss("jetmoe", router_logits, experts, top_k, mask)
    grads = router_aux_loss_backward("jetmoe", router_logits, experts, top_k, mask)

    leaves = [torch.tensor(r, requires_grad=True) for r in router_logits]
    want = original_aux_loss(leaves, experts, top_k)
    want.backward()
    want = float(want.detach())
    assert abs(float(value) - want) <= RTOL * abs(want), (float(value), want)
    scale = max(float(leaf.grad.abs().max()) for leaf in leaves)
    for i, (g, leaf) in enumerate(zip(grads, leaves)):
        err = np.abs(g - leaf.grad.numpy()).max()
        assert err <= RTOL * scale, f"router {i}: max gradient error {err:.3e}, largest gradient {scale:.3e}"


def test_hf_oracle_twin_is_the_originals(rng):
    # jetmoe/hf_oracle.py's jetmoe_router_loss (what tests/oracle/test_grad_oracle.py holds value_and_grad to, on
    # padded batches too) is the same function: same value, same autograd gradient
    batch, tokens, experts, top_k = 3, 6, 5, 2
    router_logits = [torch.tensor(rng.standard_normal((batch * tokens, experts)) * 2, requires_grad=True)
                     for _ in range(4)]
    twin = hf_oracle.jetmoe_router_loss(router_logits, experts, top_k)
    twin_grads = torch.autograd.grad(twin, router_logits)
    want = original_aux_loss(router_logits, experts, top_k)
    want_grads = torch.autograd.grad(want, router_logits)
    twin, want = float(twin.detach()), float(want.detach())
    assert abs(twin - want) <= RTOL * abs(want), (twin, want)
    scale = max(float(g.abs().max()) for g in want_grads)
    for g, w in zip(twin_grads, want_grads):
        assert float((g - w).abs().max()) <= RTOL * scale


def test_an_underflowed_gate_is_not_counted(rng):
    # The original counts expert e for a token where its top-k gate is > 0. In float32 a second gate underflows to
    # exactly 0 once its logit trails the first by more than ~104 (exp(-104) is below float32's smallest
    # subnormal). HF's load_balancing_loss_func counts all K choices; "jetmoe" follows the original.
    logits = (rng.standard_normal((6, 4)) * 2).astype(np.float32)
    logits[:3, 0] = 0.0  # tokens 0-2: expert 0 far ahead, so their second gate is 0
    logits[:3, 1:] = rng.uniform(-120, -110, (3, 3)).astype(np.float32)
    gates = torch.softmax(torch.tensor(logits).topk(2, dim=1).values, dim=1)
    assert bool((gates[:3, 1] == 0).all()) and bool((gates[3:, 1] > 0).all())  # the case is what it claims
    want = original_router_loss(torch.tensor(logits), 4, 2)
    value = router_aux_loss("jetmoe", [logits], 4, 2)
    # float32 on both sides: ~1e-7 per op, over a few dozen terms
    assert abs(float(value) - float(want)) <= 1e-5 * abs(float(want)), (float(value), float(want))
    counted = original_router_loss(torch.tensor(logits.astype(np.float64)), 4, 2)  # float64: no gate underflows
    assert abs(float(counted) - float(want)) > 1e-3 * abs(float(want))  # so the count matters to the value


def test_the_originals_logsumexp_overflows_where_ours_does_not(rng):
    # The original's z-loss computes log(sum(exp(logits))) unshifted: in float32 (its logits' dtype) exp overflows
    # past log(float32 max) = 88.72, and the loss is inf. Ours shifts by the row's largest logit first: finite, and
    # equal (to float32 round-off) to the float64 value, where exp(89) does not overflow.
    logits = (rng.standard_normal((5, 4))).astype(np.float32)
    logits[2, 1] = 89.0
    assert torch.isinf(original_router_loss(torch.tensor(logits), 4, 2))
    value = float(router_aux_loss("jetmoe", [logits], 4, 2))
    exact = float(original_router_loss(torch.tensor(logits.astype(np.float64)), 4, 2))
    assert np.isfinite(value) and abs(value - exact) <= 1e-6 * exact  # float32: ~1e-7 per op, a few dozen ops


def test_torch_topk_does_not_put_the_lower_expert_first():
    # The original (and HF) route with torch.topk, whose order among equal values is unspecified. On this torch
    # (2.13.0, CPU) eight equal logits give experts 6 and 5, not ours: reference/routing.py takes the lowest ids
    # first (tests/reference/test_routing.py test_equal_logits_go_to_the_lower_expert). If torch changes its order,
    # this fails and docs/semantics.md's sentence on it is due for a rewrite.
    chosen = torch.zeros(3, 8).topk(2, dim=1).indices
    assert not bool((chosen == torch.tensor([0, 1])).all(dim=1).any()), chosen.tolist()


def test_hf_config_reads_the_original_names_as_its_defaults():
    # A config.json of the original names its sizes moe_num_experts, moe_top_k and ffn_hidden_size. HF's
    # JetMoeConfig keeps them as unknown attributes and builds its defaults (8, 2, 5632) instead; reference/config.py
    # maps them (tests/reference/test_original_code.py).
    from reference import JetMoeConfig
    original = dict(moe_num_experts=4, moe_top_k=1, ffn_hidden_size=24, num_key_value_heads=2, num_attention_heads=2)
    hf = transformers.JetMoeConfig.from_dict(original)
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size) == (8, 2, 5632)
    ours = JetMoeConfig.from_dict(original)
    assert (ours.num_local_experts, ours.num_experts_per_tok, ours.intermediate_size) == (4, 1, 24)


class OriginalRotaryEmbedding(torch.nn.Module):
    # modeling_jetmoe.py JetMoERotaryEmbedding at 0a9bc5a, as written (less its device arguments)
    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(seq_len=max_position_embeddings, dtype=torch.get_default_dtype())

    def _set_cos_sin_cache(self, seq_len, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, dtype=torch.int64).type_as(self.inv_freq)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def test_the_originals_rope_past_max_position_embeddings_in_bfloat16():
    # The original builds its cos/sin table for max_position_embeddings positions when the model is made, in float32.
    # A longer sequence rebuilds it with positions t.type_as(inv_freq): once the model is cast to bfloat16
    # (Module.to casts the inv_freq buffer too), positions and angles are bfloat16, where the angles of positions
    # in the hundreds are rounded by whole units. Ours (like HF 4.56.2) computes every position's angle in float32
    # and rounds only cos and sin to bfloat16, so it matches the original within the table and not past it.
    import ml_dtypes

    from reference.rope import cos_sin
    dim, max_positions, seq_len = 8, 64, 600
    rotary = OriginalRotaryEmbedding(dim, max_positions).to(torch.bfloat16)
    inside, _ = rotary(torch.zeros(1, dtype=torch.bfloat16), seq_len=max_positions)  # the table built at init
    past, _ = rotary(torch.zeros(1, dtype=torch.bfloat16), seq_len=seq_len)  # rebuilt in bfloat16
    ours, _ = cos_sin(np.arange(seq_len)[None], dim, 10000.0, ml_dtypes.bfloat16)  # [1, T, Dh]
    ours = ours[0].astype(np.float64)
    bf16_ulp = 2.0**-8  # cos in [-1, 1]: one bfloat16 step, for a float32 inv_freq an ulp apart on the two sides
    assert np.abs(inside.double().numpy() - ours[:max_positions]).max() <= bf16_ulp
    assert np.abs(past.double().numpy()[max_positions:] - ours[max_positions:]).max() > 0.5
