"""Exercise 1 (the sample port): the attention mask wrong at the pads."""

import numpy as np

import reference.model

SYMPTOM = ("Alone, each prompt generates what the reference generates; in a batch with a shorter prompt, the "
           "shorter prompt's text changes.")
DUMP = []
COMPARE = ["--isolate"]
ANSWER = ("The port builds only the causal mask and drops the attention_mask: real tokens of a left-padded row "
          "attend to its pad tokens. Every layer's attention probabilities are wrong; nothing before them is.")
PLANTED = ["layers.0.attention.probs", "layers.5.attention.probs"]


def patches(model):
    original = reference.model.additive_mask

    def additive_mask(attention_mask, cache_position, num_keys, dtype):
        # the bug: the padding columns are never masked
        return original(None if attention_mask is None else np.ones_like(attention_mask), cache_position, num_keys,
                        dtype)
    return [(reference.model, "additive_mask", additive_mask)]
