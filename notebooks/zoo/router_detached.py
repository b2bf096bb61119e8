"""Exercise 8: a gradient bug seen only backward, the MoE router detached."""

import numpy as np

import reference.experts

SYMPTOM = ("The port's forward matches the reference to float32 round-off, and training runs, but the MLP "
           "routers never change: the expert load of every layer stays as initialised.")
DUMP = ["--backward"]
COMPARE = ["--backward", "--isolate"]
ANSWER = ("The port computes the MLP gates from detached router logits (topk_gates.detach(), or the gates taken "
          "under no_grad), so no gradient reaches the MLP routers through the gates. The forward is exact; in the "
          "backward every MLP router's logit gradient is zero (without --isolate its weight's gradient inherits that).")
PLANTED = ["grad.layers.5.mlp.router.logits", "grad.layers.0.mlp.router.logits"]


def detached(d_gates, plan):
    # d_gates: [N, K] -> d_logits [N, E]; the bug: nothing flows back through the gates
    return np.zeros(plan.logits.shape, np.result_type(plan.logits.dtype, d_gates.dtype))


def patches(model):
    return [(reference.experts, "top_k_gates_backward", detached)]
