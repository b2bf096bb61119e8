"""Hugging Face's JetMoe backward by torch autograd, under the reference's gradient names: the `hf` side of
`jetmoe debug compare --backward` (jetmoe/debug_backward.py). Needs the oracle extra.

The forward is recorded by jetmoe/hf_trace.py's hooks, which also keep each traced tensor of autograd's graph
(retain_grad); after loss.backward() each one's .grad, laid out as the trace lays out the tensor, is
grad.<name>. The loss is hf_oracle.hf_loss: HF's causal-LM loss, plus the aux loss of the asked kind (HF's own
aux path crashes, transformers#31791). Every parameter's .grad is grad.param.<name>; HF's parameter names are
the checkpoint's keys (a tied lm_head is model.embed_tokens.weight).
"""

import contextlib

import numpy as np
import torch

from . import hf_oracle
from .hf_trace import _np, recording


def hf_backward_trace(model_dir, step, labels, dtype, aux):
    """{name: array} of HF on one forward's (input_ids [B, T], attention_mask [B, T], position_ids [B, T]) with
    `labels` [B, T]: the inputs, the forward's trace points, `loss` [1], grad.<name> (from the loss towards the
    embeddings) and grad.param.<key>. aux: None or an aux-loss kind (reference/losses.py)."""
    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype]
    model = hf_oracle.load_hf(model_dir, torch_dtype)
    precision = hf_oracle.float64_precision() if torch_dtype == torch.float64 else contextlib.nullcontext()
    sources = {}
    ids, mask, positions = (torch.as_tensor(np.asarray(a), dtype=torch.long) for a in step)
    with precision, recording(model, sources) as (trace, state):
        for name, value in zip(("input_ids", "attention_mask", "position_ids", "labels"), (*step, labels)):
            trace[f"inputs.{name}"] = np.asarray(value, dtype=np.int64)

        def logits(module, inputs, output):
            trace["logits"] = _np(output)
            output.retain_grad()
            sources["logits"] = (output, None)

        handle = model.lm_head.register_forward_hook(logits)
        model.config.output_attentions = True  # hf_loss's forward then returns (and the hooks see) the probs
        try:
            loss = hf_oracle.hf_loss(model, ids, torch.as_tensor(labels), mask, aux is not None, aux or "hf")
        finally:
            handle.remove()
        loss.backward()
    trace["loss"] = _np(loss).reshape(1)
    for name, (tensor, layout) in reversed(sources.items()):
        if tensor.grad is not None:
            trace["grad." + name] = _np(tensor.grad if layout is None else layout(tensor.grad))
    for name, parameter in model.named_parameters():
        trace["grad.param." + name] = _np(parameter.grad if parameter.grad is not None
                                          else torch.zeros_like(parameter))
    return trace
