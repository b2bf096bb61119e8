"""Exercise 7: the aux loss pooled over all routers instead of per router."""

import reference.losses
import reference.training

SYMPTOM = ("Training with the load-balancing loss on, the port's experts balance worse in some layers than the "
           "reference's; the language-model loss alone trains the same.")
DUMP = ["--backward", "--aux", "per_router"]
COMPARE = ["--backward", "--isolate"]
ANSWER = ("The training recipe asks for one Switch loss per router, summed (the original JetMoE's; aux kind "
          "per_router). The port concatenates the 2L routers' logits and takes one Switch loss of the pool, as HF's "
          "load_balancing_loss_func does: the expert fractions are averaged over layers, so a router can be "
          "unbalanced while the pool is balanced. The loss and every router's logit gradient are wrong; the "
          "gradient at the logits is right.")
PLANTED = ["loss", "grad.layers.5.mlp.router.logits", "grad.layers.0.attention.router.logits"]


def patches(model):
    loss, backward = reference.losses.router_aux_loss, reference.training.router_aux_loss_backward

    def pooled(kind):
        return "hf" if kind == "per_router" else kind  # the bug: the pool's loss for the per-router one

    return [(reference.losses, "router_aux_loss", lambda kind, *args, **kwargs: loss(pooled(kind), *args, **kwargs)),
            (reference.training, "router_aux_loss_backward",
             lambda kind, *args, **kwargs: backward(pooled(kind), *args, **kwargs))]
