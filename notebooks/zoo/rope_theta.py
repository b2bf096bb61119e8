"""Exercise 2: RoPE's theta read from the wrong config key."""

import reference.model
from notebooks.zoo import copy_checkpoint

SYMPTOM = ("On a long-context checkpoint (rope_theta 500000) the port's text degrades after a few tokens; on "
           "checkpoints with the usual theta 10000 it is right.")
DUMP = []
COMPARE = ["--isolate"]
ANSWER = ("The port reads theta as config.get('rotary_emb_base', 10000.0), GPT-NeoX's key, so it falls back to "
          "10000 whatever config.json says (JetMoE's key is rope_theta). Every query_rope and key_rope is wrong; "
          "the query and key before RoPE are right.")
PLANTED = ["layers.0.attention.query_rope", "layers.0.attention.key_rope"]


def checkpoint(model_dir, out_dir):
    return copy_checkpoint(model_dir, out_dir, config={"rope_theta": 500000.0})


def patches(model):
    original = reference.model.cos_sin

    def cos_sin(position_ids, head_dim, theta, dtype):
        return original(position_ids, head_dim, 10000.0, dtype)  # the bug: the default of a key that is not there
    return [(reference.model, "cos_sin", cos_sin)]
