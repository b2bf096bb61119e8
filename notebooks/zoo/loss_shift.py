"""Exercise 6: the loss shifted twice."""

import numpy as np

import reference.hf_classes
from reference.losses import IGNORE_INDEX
import reference.training

SYMPTOM = ("Fine-tuning with the port, the loss falls more slowly than with the reference and the model learns "
           "to predict the token after next; generation (no labels) is right.")
DUMP = ["--backward"]
COMPARE = ["--backward", "--isolate"]
ANSWER = ("The port shifts the labels (labels[:, 1:]) and then calls a loss that shifts them again, as HF's "
          "JetMoe did before transformers PR #37830: each position is trained on the token two ahead. The loss and "
          "its gradient at the logits are wrong; every other backward op is right.")
PLANTED = ["loss", "grad.logits"]


def shifted(labels):
    # labels: [B, T] -> [B, T]: the bug, a shift before the loss's own shift
    labels = np.asarray(labels)
    return np.concatenate([labels[:, 1:], np.full((len(labels), 1), IGNORE_INDEX, labels.dtype)], axis=1)


def patches(model):
    losses, backward = reference.training.causal_lm_losses, reference.training.causal_lm_loss_backward

    def causal_lm_losses(config, logits, labels, *args, **kwargs):
        return losses(config, logits, None if labels is None else shifted(labels), *args, **kwargs)

    def causal_lm_loss_backward(logits, labels, kept=None):
        return backward(logits, shifted(labels))  # the mean over the labels the port keeps
    return [(reference.training, "causal_lm_losses", causal_lm_losses),
            (reference.hf_classes, "causal_lm_losses", causal_lm_losses),
            (reference.training, "causal_lm_loss_backward", causal_lm_loss_backward)]
