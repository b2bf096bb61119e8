"""Losses, as HF computes them.  Shapes: reference/__init__.py.

All run in float32 or better (HF upcasts logits with `.float()` before the loss).

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import numpy as np

from .precision import compute_dtype
from .routing import softmax, top_k_of

IGNORE_INDEX = -100


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


def causal_lm_loss(logits, labels):
    # logits: [B, T, V], labels: [B, T] -> scalar. HF ForCausalLMLoss: position t predicts labels[t+1]
    shifted = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    # router_logits: 2L x [N, E] (N = B*T), attention_mask: [B, T] or None -> scalar
    # Switch Transformer eqs. (4)-(6), as HF's load_balancing_loss_func: E * sum_e f_e * P_e, where f_e is the
    # fraction of (token, choice) slots routed to e (kept per choice k) and P_e the mean router probability.
    logits = np.concatenate(router_logits, axis=0)  # [2L*N, E]
    probs = softmax(logits, axis=-1)  # [2L*N, E]
    chosen = top_k_of(probs, top_k)  # [2L*N, K]
    expert_mask = (chosen[..., None] == np.arange(num_experts)).astype(probs.dtype)  # [2L*N, K, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(axis=0)  # [K, E]
        router_prob_per_expert = probs.mean(axis=0)  # [E]
    else:
        sets = len(router_logits)
        keep = np.tile(attention_mask.reshape(-1), sets).astype(probs.dtype)  # [2L*N]
        tokens_per_expert = np.sum(expert_mask * keep[:, None, None], axis=0) / np.sum(keep)  # [K, E]
        router_prob_per_expert = np.sum(probs * keep[:, None], axis=0) / np.sum(keep)  # [E]
    return np.sum(tokens_per_expert * router_prob_per_expert[None]) * num_experts


def causal_lm_losses(config, logits, labels, router_logits, attention_mask, input_shape):
    # logits: [B, T_kept, V], labels: [B, T] or None, router_logits: 2L x [N, E] or None -> (loss, aux_loss)
    # Host arrays; shared with the GPU twin, which hands over host copies.
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
        # Switch loss over all 2L router-logit sets, masked by the current tokens' attention_mask.
        mask = None if attention_mask is None else np.asarray(attention_mask)[:, -input_shape[1]:]
        aux_loss = load_balancing_loss(router_logits, config.num_local_experts, config.num_experts_per_tok, mask)
        if loss is not None:
            loss = loss + config.aux_loss_coef * aux_loss
    return loss, aux_loss


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
