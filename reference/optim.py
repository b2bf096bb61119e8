"""Training's update rule: AdamW, gradient clipping and the learning-rate schedule, as torch defines them.

Shapes: every state tensor has its parameter's shape (reference/__init__.py). Gradients come from
reference.training.value_and_grad. Notebook: notebooks/08_backpropagation_through_a_mixture_of_experts.ipynb.

AdamW (Loshchilov & Hutter; torch.optim.AdamW with its defaults: no amsgrad, maximize or capturable), step t:
  p <- p * (1 - lr * weight_decay)                     decoupled decay, before the Adam step
  m <- m + (1 - beta1) (g - m)                         torch's lerp form of beta1 m + (1 - beta1) g
  v <- beta2 v + (1 - beta2) g^2
  p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)    eps after the square root
"""

import math

import numpy as np


def owned_parameters(model):
    # -> {state_dict name: array}, with every tensor the model cannot update in place (a memory-mapped view of a
    # checkpoint file, a MappedWeight, a read-only array, a view of another array) replaced by an owned copy, which
    # the model then uses: an update never reaches a checkpoint file
    state = model.state_dict()
    owned = {name: t if isinstance(t, np.ndarray) and t.flags.writeable and t.flags.owndata
             else np.array(t, dtype=model.dtype, copy=True) for name, t in state.items()}
    if any(owned[name] is not t for name, t in state.items()):
        model.load_state_dict(owned)
    return owned


class AdamW:
    """opt = AdamW(model, lr=1e-3); opt.step(grads) updates model's parameters in place (torch.optim.AdamW).

    decay(name, array) -> bool says which parameters weight_decay applies to (default: all, as torch's
    AdamW(model.parameters())); the trainer leaves out norms and biases. lr may be changed between steps."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay=None):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW needs lr >= 0, eps >= 0, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.params = owned_parameters(model)
        self.decays = {n: decay is None or bool(decay(n, p)) for n, p in self.params.items()}
        self.exp_avg = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.steps = 0

    def step(self, grads):
        """One update of every parameter from grads ({state_dict name: array}, as value_and_grad returns)."""
        if set(grads) != set(self.params):
            missing, extra = sorted(set(self.params) - set(grads)), sorted(set(grads) - set(self.params))
            raise ValueError(f"grads must name every parameter: missing {missing[:4]}, unknown {extra[:4]}")
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.steps)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        for name, p in self.params.items():
            g = np.asarray(grads[name])
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] has shape {g.shape}, the parameter {p.shape}")
            g = g.astype(p.dtype, copy=False)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            if self.decays[name]:
                p *= p.dtype.type(1 - self.lr * self.weight_decay)
            m += (1 - beta1) * (g - m)
            v *= beta2
            v += (1 - beta2) * g * g
            denom = np.sqrt(v)
            denom /= bias_correction2_sqrt
            denom += self.eps
            p -= step_size * m / denom

    def state_dict(self):
        """{name: array} of the optimizer state (exp_avg.NAME, exp_avg_sq.NAME, step), for a training checkpoint."""
        state = {f"exp_avg.{n}": m for n, m in self.exp_avg.items()}
        state.update({f"exp_avg_sq.{n}": v for n, v in self.exp_avg_sq.items()})
        state["step"] = np.array(self.steps, np.int64)
        return state

    def load_state_dict(self, state):
        """Resume from state_dict()'s arrays (copied); every name, shape and dtype kind must match this optimizer's,
        and nothing changes unless all do."""
        expected = set(self.state_dict())  # step: one integer (a safetensors file may hold it as shape [1])
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"optimizer state does not match the model: missing {missing[:4]}, unknown {extra[:4]}")
        step = np.asarray(state["step"])
        if step.size != 1 or step.dtype.kind not in "iu" or int(step.reshape(())) < 0:
            raise ValueError(f"optimizer state step must be one integer >= 0, got {step.dtype} of shape {step.shape}")
        moments = {key: np.asarray(value) for key, value in state.items() if key != "step"}
        for key, value in moments.items():
            name = key.split(".", 1)[1]
            if value.shape != self.params[name].shape or value.dtype.kind != "f":
                raise ValueError(f"optimizer state {key} is {value.dtype} of shape {value.shape}, the parameter "
                                 f"floating point of shape {self.params[name].shape}")
        for key, value in moments.items():
            moment, name = key.split(".", 1)
            (self.exp_avg if moment == "exp_avg" else self.exp_avg_sq)[name][...] = value
        self.steps = int(step.reshape(()))


def clip_grad_norm(grads, max_norm):
    """Scale grads ({name: array}) in place so their global 2-norm is at most max_norm; returns the norm before
    clipping (torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1)."""
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for g in grads.values():
            g *= g.dtype.type(coefficient)
    return total


def cosine_lr(step, total_steps, peak_lr, warmup_steps=0, min_lr=0.0):
    """Learning rate of step (0-based): linear warm-up to peak_lr over warmup_steps (step 0 gets peak/warmup),
    then a cosine from peak_lr down to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))
