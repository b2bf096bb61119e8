"""Exercise 5: the KV cache's position off by one in decode."""

import reference.hf_classes

SYMPTOM = ("The prompt's next token is right, then the generated text goes wrong from the second new token on; "
           "a forward over the whole text (no cache) is right.")
DUMP = ["--max-new-tokens", "3"]
COMPARE = ["--isolate"]
ANSWER = ("In decode steps the port passes cache_position one short (the length of the cache minus one), so the "
          "newest key is masked out of the attention; the prefill is right. The debugger names the first decode "
          "step's attention probabilities, with the worst error at the newest key.")
PLANTED = ["step.1.layers.0.attention.probs"]


def patches(model):
    original = reference.hf_classes.check_inputs

    def check_inputs(config, *args, **kwargs):
        checked = original(config, *args, **kwargs)
        cache = args[-1] if args else kwargs.get("cache")
        if cache is None or cache.get_seq_length() == 0:
            return checked
        return (*checked[:4], checked[4] - 1)  # the bug: cache_position - 1 in decode
    return [(reference.hf_classes, "check_inputs", check_inputs)]
