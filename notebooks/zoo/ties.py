"""Exercise 4: top-k ties broken the other way."""

import numpy as np

import reference.routing
from notebooks.zoo import copy_checkpoint

LAYER, EXPERT = 2, 4
SYMPTOM = ("On a freshly upcycled checkpoint, whose experts 4 and 5 of layer 2 share one router row, the port's "
           "logits differ from layer 2 on; on the trained checkpoint the port agrees with the reference.")
DUMP = []
COMPARE = ["--isolate"]
ANSWER = ("The port's top-k takes the higher expert id first among equal logits (a descending sort of the ids), "
          "where HF's torch.topk, and the reference, take the lower. Only exact ties show it: the debugger calls "
          "the row a near-tie, as it would for a float32 rounding flip, and every op is otherwise right. A "
          "near-tie is not an error of the port unless, as here, the logits are equal: check the margin.")
PLANTED = [f"layers.{LAYER}.mlp.router.top_k_indices"]


def checkpoint(model_dir, out_dir):
    def tie(router):  # [E, D]: expert EXPERT + 1 gets expert EXPERT's router row
        router = router.copy()
        router[EXPERT + 1] = router[EXPERT]
        return router
    return copy_checkpoint(model_dir, out_dir, tensors={f"model.layers.{LAYER}.mlp.router.layer.weight": tie})


def top_k_of_reversed(logits, k):
    # logits: [N, E] -> [N, K]; the bug: equal logits in descending expert id order
    experts = logits.shape[1]
    return (experts - 1 - np.argsort(-logits[:, ::-1], axis=1, kind="stable")[:, :k]).astype(np.int64)


def patches(model):
    return [(reference.routing, "top_k_of", top_k_of_reversed)]
