"""Exercise 3: the router's softmax in bf16."""

import numpy as np

from reference.io.safetensors import BF16
import reference.routing
from reference.routing import softmax

SYMPTOM = ("A float32 port whose outputs drift from the reference by about 1e-3 relative, more than float32 "
           "round-off, in every layer; the expert choices all agree.")
DUMP = []
COMPARE = ["--isolate"]
ANSWER = ("The port computes the router's softmax over the chosen k logits in bf16 (a mixed-precision autocast "
          "region around the router), where HF computes it in float32 and then casts. Every router's top_k_gates "
          "is off by bf16 rounding; the logits and top-k choices are right.")
PLANTED = ["layers.0.attention.router.top_k_gates", "layers.0.mlp.router.top_k_gates"]


def top_k_gates_bf16(logits, top_k_indices, gate_dtype):
    # logits: [N, E], top_k_indices: [N, K] -> [N, K]; the bug: the softmax's input and output rounded to bf16
    top = np.take_along_axis(logits, top_k_indices, axis=1).astype(BF16).astype(np.float32)
    return softmax(top, axis=1).astype(BF16).astype(gate_dtype)


def patches(model):
    return [(reference.routing, "top_k_gates_of", top_k_gates_bf16)]
