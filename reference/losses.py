"""Losses, as HF computes them, and their gradients.  Shapes: reference/__init__.py.

All run in float32 or better (HF upcasts logits with `.float()` before the loss).

The aux (load-balancing) loss comes in three variants, all built from the Switch loss E * sum_e f_e * P_e
(f_e: the share of top-k choices that went to expert e, a constant; P_e: the mean router probability, which
carries the gradient):
  "hf"          HF's load_balancing_loss_func over all 2L routers pooled into one set (the default). It balances
                the experts summed over layers, about K = 2 when balanced.
  "per_router"  HF's formula on each router on its own, summed over the 2L routers: each layer is balanced
                (scripts/train_tiny_torch.py's recipe, which trained the committed model).
  "jetmoe"      the original JetMoE code (github.com/myshell-ai/JetMoE, jetmoe/utils/gate.py,
                compute_aux_loss), exactly: for each router, E * sum_e (P_e / sum P) (c_e / sum c)
                + 0.1 * mean(logsumexp(logits)^2), summed over the 2L routers. Its Switch term is HF's divided by K
                (c_e counts all K choices): about 1 a router balanced, so about 2L = 48 for jetmoe-8b against HF's
                2, a 24x stronger push at equal coefficient.

"jetmoe" is the original's function, not HF's with the original's terms, so it departs from the other two:
  - Every one of the B*T positions counts, pads included, in the Switch term and in the z-loss. The original's gate
    never sees an attention mask, so the mask does not reach this variant either. For a padded batch use "hf" or
    "per_router", which leave pads out as HF's load_balancing_loss_func does.
  - c_e counts token n for expert e only where e's top-k gate (the softmax over the chosen K logits, in the logits'
    dtype) is > 0: a gate that underflows to 0 (float32: trailing the top logit by more than ~104) is not counted.
    The original rounds the gate to the activation dtype first (bf16 in a bf16 model); we test it in the logits'.
  - One guard the original lacks: its logsumexp is log(sum(exp(logits))), inf once a float32 logit passes ~88.7;
    ours subtracts each row's largest logit first. Where the original's value is finite the two agree to
    round-off. The original also divides by max(sum, 1e-12) (F.normalize), a guard that never acts here:
    sum P = N and sum c >= N.
tests/oracle/test_original_jetmoe.py holds value and gradient to the original, written in torch from its source;
docs/semantics.md lists the original's other departures from HF.

Notebooks: notebooks/05_the_whole_model.ipynb (the losses), 08_backpropagation_through_a_mixture_of_experts.ipynb
(their gradients, and what the aux loss does to a dead expert).
"""

import numpy as np

from .precision import compute_dtype
from .routing import softmax, softmax_backward, top_k_of

IGNORE_INDEX = -100
AUX_LOSSES = ("hf", "per_router", "jetmoe")
Z_LOSS_COEF = 0.1  # the original JetMoE's weight of the router z-loss beside its Switch loss


def log_softmax(x):
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def cross_entropy(logits, labels):
    # logits: [M, C], labels: [M] int (IGNORE_INDEX skipped) -> mean over kept rows (NaN if none, as torch)
    logits = logits.astype(compute_dtype(logits.dtype), copy=False)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"class labels must hold integers, got dtype {labels.dtype}")
    keep = labels != IGNORE_INDEX
    bad = keep & ((labels < 0) | (labels >= logits.shape[-1]))  # torch raises too ("Target ... is out of bounds")
    if bad.any():
        raise ValueError(f"labels holds {labels[bad][0]}, neither {IGNORE_INDEX} nor a class in "
                         f"[0, {logits.shape[-1]})")
    picked = log_softmax(logits[keep])[np.arange(int(keep.sum())), labels[keep]]
    with np.errstate(invalid="ignore"):
        return -np.sum(picked) / picked.dtype.type(keep.sum())


def cross_entropy_backward(logits, labels, kept=None):
    # logits: [M, C], labels: [M] (IGNORE_INDEX skipped) -> d_logits [M, C] of the mean: (softmax - onehot) / kept,
    # zero on ignored rows. kept: the row count the mean is over (default: these rows' kept labels; a batch shard
    # passes the whole batch's, so a shard that predicts nothing gets zeros, not 0/0). Saves nothing: the softmax
    # is recomputed.
    logits = logits.astype(compute_dtype(logits.dtype), copy=False)
    keep = labels != IGNORE_INDEX
    kept = int(keep.sum()) if kept is None else kept
    d_logits = softmax(logits, axis=-1)  # [M, C]
    d_logits[np.flatnonzero(keep), labels[keep]] -= 1
    d_logits[~keep] = 0
    with np.errstate(invalid="ignore", divide="ignore"):  # kept = 0: NaN, as torch's mean over no rows
        d_logits /= d_logits.dtype.type(kept)
    return d_logits


def next_token_labels(labels):
    # labels: [B, T] -> [B*T]: HF ForCausalLMLoss, position t predicts labels[t+1]; the last position predicts nothing
    shifted = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)
    return shifted.reshape(-1)


def causal_lm_loss(logits, labels):
    # logits: [B, T, V], labels: [B, T] -> scalar
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), next_token_labels(labels))


def causal_lm_loss_backward(logits, labels, kept=None):
    # logits: [B, T, V], labels: [B, T], kept: as cross_entropy_backward -> d_logits [B, T, V]
    return cross_entropy_backward(logits.reshape(-1, logits.shape[-1]), next_token_labels(labels),
                                  kept).reshape(logits.shape)


def _switch_terms(router_logits, num_experts, top_k, attention_mask):
    # router_logits: R x [N, E], attention_mask: [B, T] or None -> probs [R*N, E], keep [R*N] (0/1 weights,
    # divided by their sum), tokens_per_expert [K, E]: HF's load_balancing_loss_func up to its last line
    logits = np.concatenate(router_logits, axis=0)  # [R*N, E]
    probs = softmax(logits, axis=-1)  # [R*N, E]
    chosen = top_k_of(probs, top_k)  # [R*N, K]
    expert_mask = (chosen[..., None] == np.arange(num_experts)).astype(probs.dtype)  # [R*N, K, E]
    if attention_mask is None:
        keep = np.full(len(probs), 1 / len(probs), probs.dtype)  # [R*N]: the plain mean
    else:
        keep = np.tile(attention_mask.reshape(-1), len(router_logits)).astype(probs.dtype)  # [R*N]
        keep /= np.sum(keep)
    tokens_per_expert = np.einsum("nke,n->ke", expert_mask, keep)  # [K, E], the counts: constants
    return probs, keep, tokens_per_expert


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    # router_logits: 2L x [N, E] (N = B*T), attention_mask: [B, T] or None -> scalar
    # Switch Transformer eqs. (4)-(6), as HF's load_balancing_loss_func: E * sum_e f_e * P_e, where f_e is the
    # fraction of (token, choice) slots routed to e (kept per choice k) and P_e the mean router probability.
    probs, keep, tokens_per_expert = _switch_terms(router_logits, num_experts, top_k, attention_mask)
    router_prob_per_expert = keep @ probs  # [E]
    return np.sum(tokens_per_expert * router_prob_per_expert[None]) * num_experts


def load_balancing_loss_backward(router_logits, num_experts, top_k, attention_mask=None):
    # -> 2L x [N, E]: d loss / d router logits. Only P_e carries a gradient: d P_e / d p[n, e] = keep[n], so
    # d p[n, e] = E * sum_k f[k, e] * keep[n], then back through each row's softmax.
    probs, keep, tokens_per_expert = _switch_terms(router_logits, num_experts, top_k, attention_mask)
    d_probs = num_experts * keep[:, None] * tokens_per_expert.sum(axis=0)[None]  # [R*N, E]
    return np.split(softmax_backward(d_probs, probs), len(router_logits))


def router_z_loss(logits):
    # logits: [N, E] -> scalar: mean over all N positions of logsumexp(logits)^2 (ST-MoE's z-loss: it keeps router
    # logits small, so the softmax stays out of float32's rounding)
    lse = _logsumexp(logits)
    return np.mean(lse * lse)


def router_z_loss_backward(logits):
    # -> d_logits [N, E] = 2 * lse * softmax(logits) / N
    lse = _logsumexp(logits)
    return softmax(logits, axis=-1) * (2 * lse / len(logits))[:, None]


def _logsumexp(logits):
    # [N, E] -> [N], shifted by each row's largest logit (the original's unshifted form overflows; module docstring)
    top = np.max(logits, axis=-1)
    return top + np.log(np.sum(np.exp(logits - top[:, None]), axis=-1))


def _jetmoe_switch_terms(logits, num_experts, top_k):
    # logits: [N, E] one router, every position -> probs [N, E], sum_probs [E] (sum P), share [E] (c_e / sum c):
    # gate.py's top_k_gating.forward and compute_aux_loss up to their normalisation
    probs = softmax(logits, axis=-1)  # [N, E]
    chosen = top_k_of(logits, top_k)  # [N, K]
    gates = softmax(np.take_along_axis(logits, chosen, axis=-1), axis=-1)  # [N, K]: the top-k gates
    counts = np.bincount(chosen[gates > 0], minlength=num_experts).astype(probs.dtype)  # [E]: constants
    return probs, np.sum(probs, axis=0), counts / np.sum(counts)


def jetmoe_switch_loss(logits, num_experts, top_k):
    # logits: [N, E] -> scalar: E * sum_e (P_e / sum P) * (c_e / sum c), the original's switchloss
    _, sum_probs, share = _jetmoe_switch_terms(logits, num_experts, top_k)
    return num_experts * np.sum(sum_probs / np.sum(sum_probs) * share)


def jetmoe_switch_loss_backward(logits, num_experts, top_k):
    # -> d_logits [N, E]. d loss / d p[n, e] = E * share[e] / sum P, the same for every position n; the
    # normalisation's own term, -E * (sum_e P_e share_e) / (sum P)^2, is the same for every expert e, and a softmax
    # backward maps a constant to 0, so it is left out.
    probs, sum_probs, share = _jetmoe_switch_terms(logits, num_experts, top_k)
    d_probs = np.broadcast_to(num_experts * share / np.sum(sum_probs), probs.shape)  # [N, E]
    return softmax_backward(d_probs, probs)


def jetmoe_router_loss(logits, num_experts, top_k):
    # logits: [N, E] one router at every position -> scalar: the original's compute_aux_loss
    return jetmoe_switch_loss(logits, num_experts, top_k) + Z_LOSS_COEF * router_z_loss(logits)


def jetmoe_router_loss_backward(logits, num_experts, top_k):
    # -> d_logits [N, E]
    return (jetmoe_switch_loss_backward(logits, num_experts, top_k)
            + Z_LOSS_COEF * router_z_loss_backward(logits))


def router_aux_loss(kind, router_logits, num_experts, top_k, attention_mask=None):
    # kind: one of AUX_LOSSES (module docstring), router_logits: 2L x [N, E], attention_mask: [B, T] or None
    # (left unused by "jetmoe", whose original never sees one) -> scalar
    if kind == "hf":
        return load_balancing_loss(router_logits, num_experts, top_k, attention_mask)
    if kind == "per_router":
        return sum(load_balancing_loss([r], num_experts, top_k, attention_mask) for r in router_logits)
    return sum(jetmoe_router_loss(r, num_experts, top_k) for r in router_logits)


def router_aux_loss_backward(kind, router_logits, num_experts, top_k, attention_mask=None):
    # -> 2L x [N, E]: d router_aux_loss(kind, ...) / d router logits
    if kind == "hf":
        return load_balancing_loss_backward(router_logits, num_experts, top_k, attention_mask)
    if kind == "per_router":
        return [load_balancing_loss_backward([r], num_experts, top_k, attention_mask)[0] for r in router_logits]
    return [jetmoe_router_loss_backward(r, num_experts, top_k) for r in router_logits]


def check_aux_loss(kind):
    if kind not in AUX_LOSSES:
        raise ValueError(f"aux_loss must be one of {', '.join(AUX_LOSSES)}, got {kind!r}")


def causal_lm_losses(config, logits, labels, router_logits, attention_mask, input_shape, aux_kind="hf"):
    # logits: [B, T_kept, V], labels: [B, T] or None, router_logits: 2L x [N, E] or None -> (loss, aux_loss)
    # Host arrays; shared with the GPU twin, which hands over host copies. aux_kind: one of AUX_LOSSES.
    loss = aux_loss = None
    if labels is not None:
        labels = np.asarray(labels)  # dtype and range: checked by cross_entropy
        if labels.shape != tuple(input_shape):
            raise ValueError(f"labels has shape {labels.shape}, expected {tuple(input_shape)}")
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(f"labels cover {labels.shape[1]} tokens but logits_to_keep kept "
                             f"{logits.shape[1]}: use logits_to_keep=0 to compute a loss")
        loss = causal_lm_loss(logits, labels)
    if router_logits is not None:
        # The intended behaviour of HF's JetMoeForCausalLM (which crashes here, transformers#31791): the
        # Switch loss over all 2L router-logit sets, masked by the current tokens' attention_mask ("hf" and
        # "per_router"; "jetmoe" counts every position, as the original does).
        aux_loss = router_aux_loss(aux_kind, router_logits, config.num_local_experts, config.num_experts_per_tok,
                                   aux_mask(attention_mask, input_shape))
        if loss is not None:
            loss = loss + config.aux_loss_coef * aux_loss
    return loss, aux_loss


def aux_mask(attention_mask, input_shape):
    # attention_mask: [B, S] or None -> [B, T]: the current tokens' columns (S = cached + T)
    return None if attention_mask is None else np.asarray(attention_mask)[:, -input_shape[1]:]


def classification_loss(config, pooled, labels):
    # pooled: [B, C] host logits, labels: [B] or [B, C] -> scalar
    labels = np.asarray(labels)
    if labels.shape[0] != pooled.shape[0]:
        raise ValueError(f"labels has shape {labels.shape}, expected a first dimension of B={pooled.shape[0]}")
    return sequence_classification_loss(pooled, labels, config.num_labels, config.problem_type)


def sequence_classification_loss(pooled_logits, labels, num_labels, problem_type):
    # pooled_logits: [B, C], labels: [B] or [B, C] -> scalar. HF ForSequenceClassificationLoss.
    logits = pooled_logits.astype(compute_dtype(pooled_logits.dtype), copy=False)
    if problem_type is None:  # HF infers it from num_labels and the labels' dtype
        if num_labels == 1:
            problem_type = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if np.issubdtype(labels.dtype, np.floating):  # torch promotes: float64 labels give a float64 loss
        logits = logits.astype(np.result_type(logits.dtype, labels.dtype), copy=False)
    if problem_type == "regression":
        if num_labels == 1:
            return np.mean((np.squeeze(logits) - np.squeeze(labels).astype(logits.dtype)) ** 2)
        return np.mean((logits - labels.astype(logits.dtype)) ** 2)
    # multi_label_classification: BCEWithLogits, mean; log(1+exp(-|x|)) form for stability as torch
    if labels.shape != logits.shape:  # torch raises too ("Target size ... must be the same as input size")
        raise ValueError(f"multi-label labels have shape {labels.shape}, expected [B, num_labels] = {logits.shape}")
    y = labels.astype(logits.dtype)
    return np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits))))


def windows(ids, context):
    # ids: [N] -> list of [<= context] arrays, consecutive, non-overlapping; a last window of one token predicts
    # nothing and is dropped
    chunks = [ids[start: start + context] for start in range(0, len(ids), context)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


def mean_loss(model, ids, context, batch=8):
    """(mean cross-entropy in nats over every predicted token, predicted token count) of ids [N], scored in
    consecutive windows of `context` tokens (the evaluate tool and notebook 05 use it)."""
    chunks = windows(np.asarray(ids, dtype=np.int64), context)
    if not chunks:
        raise ValueError(f"the text is {len(ids)} token(s): at least 2 are needed to predict one")
    total, count = 0.0, 0
    full = [c for c in chunks if len(c) == len(chunks[0])]  # every window but maybe the last has `context` tokens
    groups = [np.stack(full[i: i + batch]) for i in range(0, len(full), batch)]
    groups += [c[None] for c in chunks[len(full):]]
    for group in groups:  # [b, t]
        # HF's causal-LM loss is the mean over the b*(t-1) shifted labels; weight it back to a sum
        # output_router_logits=False: a config asking for router logits would add aux_loss_coef * aux to .loss
        loss = model(input_ids=group, labels=group, use_cache=False, output_router_logits=False).loss
        predicted = group.shape[0] * (group.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    return total / count, count
