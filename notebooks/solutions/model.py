"""Notebook 05: the causal-LM loss, position t scored on token t+1."""

import numpy as np


def my_causal_lm_loss(logits, ids):
    # logits: [B, T, V], ids: [B, T] -> mean of -log p(ids[t+1] | ids[<=t]) over the B*(T-1) predictions
    scores = logits[:, :-1]  # [B, T-1, V]: the last position predicts nothing
    targets = ids[:, 1:]  # [B, T-1]
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # [B, T-1, V]
    return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())
