"""Gradient debugging: which backward op of a port is wrong, gradient by gradient against the reference.

    jetmoe debug dump MODEL --prompt "ROMEO:" --backward [--aux [KIND]] --out ref.safetensors
    jetmoe debug compare MODEL port.safetensors [ref] --backward [--isolate] [--json] [--plot FILE.png]

`dump --backward` runs the forward, then the reference's hand-written backward (reference.training.value_and_grad) of
the causal-LM loss with labels = input_ids (-100 at the pads), shifted inside the loss as HF shifts them; with
--aux [KIND] the load-balancing loss joins it (aux_loss_coef x that aux loss, reference/losses.py; default hf).
Besides the forward's trace it records
  loss                           the loss, [1]; the file's metadata says its kind ("loss") and value
  inputs.labels                  the labels, [B, T] int64
  grad.<name>                    d loss / d the trace point <name>, from grad.logits down to grad.embed_tokens
  grad.param.<checkpoint key>    d loss / d each parameter, e.g. grad.param.model.layers.0.mlp.input_linear.weight

`compare --backward` compares two such traces from the loss towards the embeddings (rows, verdicts and exit
status as the forward compare, jetmoe/debug.py) and names the first divergent gradient. A side is a trace file,
`ref`, or `hf` (torch autograd on HF's JetMoe, jetmoe/hf_backward.py; the oracle extra). With --isolate the
reference recomputes every gradient from the other side's upstream gradient (and its forward from the other side's
activations), so each backward op is judged alone. At a residual sum the
branch's gradient (grad.layers.i.mlp.output) flows back through that branch alone, while the residual path
carries the gradient of the sum (grad.layers.i.output), as the math does: a correct layer is never blamed for a
branch's bug. docs/porting.md shows how a port writes such a trace with torch hooks.
"""

import re

import numpy as np

from reference.io import trace as tracing
from reference.io.compare import compare, first_divergence
from reference.io.trace import capture, handling
from reference.io.trace_files import Trace, TraceWriter
from reference.losses import IGNORE_INDEX
from reference.names import tensor_of
from reference.training import value_and_grad

from . import cli, debug

GRAD, PARAM = "grad.", "grad.param."


def labels_of(input_ids, attention_mask):
    # input_ids, attention_mask: [B, T] -> labels [B, T]: the ids, IGNORE_INDEX where the mask is 0 (pads)
    return np.where(np.asarray(attention_mask) != 0, input_ids, IGNORE_INDEX).astype(np.int64)


def loss_kind(aux):
    """The loss a backward trace differentiates, as its metadata names it (aux: None or an aux-loss kind)."""
    return f"causal_lm+aux:{aux}" if aux else "causal_lm"


def aux_of(kind):
    # a loss kind -> the aux-loss kind it includes, or None
    return kind.partition("+aux:")[2] or None


def training_positions(input_ids):
    # input_ids: [B, T] -> position_ids [B, T]: 0..T-1 in every row, as a training forward without a cache
    # numbers them (HF's forward without position_ids, and value_and_grad)
    return np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).copy()


def traced_backward(model, ids, mask, aux):
    """Forward and backward of `model` on input_ids [B, T] and attention_mask [B, T] under whatever trace handlers
    are active: the inputs, every forward trace point, the loss, every grad.<name> and grad.param.<key>. Returns
    the loss (a float)."""
    ids = tracing.record("inputs.input_ids", ids)
    mask = tracing.record("inputs.attention_mask", mask)
    tracing.record("inputs.position_ids", training_positions(ids))
    labels = tracing.record("inputs.labels", labels_of(ids, mask))
    out, grads = value_and_grad(model, ids, labels, attention_mask=mask, output_router_logits=aux is not None,
                                aux_loss=aux or "hf")
    loss = float(tracing.record("loss", np.asarray([out.loss], dtype=model.dtype))[0])  # [1]
    for key, grad in grads.items():
        tracing.record(PARAM + key, grad)
    return loss


def read_by_nothing(name):
    """The trace points of a backward that no later op reads (the loss, a parameter's gradient): --isolate keeps
    the reference's value there and takes the other side's forward activations and upstream gradients."""
    return name == "loss" or name.startswith(PARAM)


def hf_side(side, model_dir, ids, mask, aux):
    """The trace of HF's backward by torch autograd (jetmoe/hf_backward.py), in the side's dtype."""
    try:
        from .hf_backward import hf_backward_trace
    except ImportError as error:
        raise ValueError(f"{side.label} needs torch and transformers (make setup-oracle): {error}") from None
    return Trace(hf_backward_trace(model_dir, (ids, mask, training_positions(ids)), labels_of(ids, mask),
                                   side.dtype, aux))


# ---------------------------------------------------------------------------------------- backward order

def param_anchor(key):
    """The gradient row after which the gradient of parameter `key` is computed (the op that consumes it)."""
    try:
        place = tensor_of(key).place[0]  # where the model holds it (reference/names.py)
    except ValueError:
        return None
    layer = re.match(r"model\.layers\.(\d+)\.", key)
    if layer is None:
        return {"lm_head": "grad.logits", "norm": "grad.norm", "embed_tokens": "grad.embed_tokens"}.get(place)
    return f"grad.layers.{layer[1]}." + {"mlp": "mlp.router.logits", "attention": "attention.router.logits",
                                         "input_layernorm": "input_layernorm",
                                         "post_attention_layernorm": "post_attention_residual"}[place]


def backward_order(names):
    """`loss`, then the grad.* names in backward order (as the trace recorded them), each parameter's gradient
    right after the activation gradient whose op computes it; parameters without an anchor go last."""
    activations = [n for n in names if n.startswith(GRAD) and not n.startswith(PARAM)]
    params = [n for n in names if n.startswith(PARAM)]
    anchored = {}
    for p in params:
        anchored.setdefault(param_anchor(p[len(PARAM):]), []).append(p)
    order = ["loss"] if "loss" in names else []
    for name in activations:
        order += [name] + anchored.pop(name, [])
    return order + [p for group in anchored.values() for p in group]


# ----------------------------------------------------------------------------------------------- the sides

def check_backward_file(side):
    """ValueError unless a trace file holds gradients of one forward; returns its loss kind."""
    if not any(n.startswith(GRAD) for n in side.trace):
        raise ValueError(f"{side.label} holds no gradients (grad.*): write it with `jetmoe debug dump --backward`, "
                         "or compare it without --backward")
    if any(n.startswith("step.") for n in side.trace):
        raise ValueError(f"{side.label} holds decode steps: --backward compares the gradients of one forward")
    return side.metadata.get("loss")


def check_same_backward(a, b, kinds):
    """ValueError naming what differs when two files differentiated different losses of different labels."""
    if kinds[a.label] and kinds[b.label] and kinds[a.label] != kinds[b.label]:
        raise ValueError(f"different losses: {a.label} differentiates {kinds[a.label]}, {b.label} "
                         f"{kinds[b.label]}; dump both with the same --aux")
    la, lb = a.trace.get("inputs.labels"), b.trace.get("inputs.labels")
    if la is not None and lb is not None and (la.shape != lb.shape or not np.array_equal(la, lb)):
        raise ValueError(f"different labels: inputs.labels differ between {a.label} and {b.label}; compare "
                         "traces of one input")


def run_compare_backward(args):
    a, b = debug.parse_side(args.a, args.dtype), debug.parse_side(args.b, args.dtype)
    for side in (a, b):
        if side.kind == "gpu":
            raise ValueError(f"{side.label}: --backward compares trace files, ref and hf (the GPU twin has no "
                             "backward)")
    debug.check_outputs(args, a, b, "gradient")
    debug.check_files(args, (a, b))
    notes, forwards, kinds = [], None, {}
    files = [s for s in (a, b) if s.kind == "file"]
    for side in files:
        kinds[side.label] = check_backward_file(side)
        notes += debug.config_notes(side, args.model)
        found = debug.forwards_of(side, notes)
        if found is None:
            raise ValueError(f"{side.label} holds no inputs.input_ids: add the token ids it ran on")
        ids, _, positions = found.steps[0]
        if not np.array_equal(positions, training_positions(ids)):
            raise ValueError(f"{side.label}: inputs.position_ids are not 0..T-1 in every row, as a training forward "
                             "numbers them (HF's forward without position_ids)")
        if forwards is not None:
            debug.check_same_forwards(forwards, found)
        forwards = forwards or found
    if len(files) == 2:
        check_same_backward(a, b, kinds)
    given = [(label, kind) for label, kind in kinds.items() if kind]
    aux = aux_of(given[0][1]) if given else args.aux
    if given and args.aux is not None and args.aux != aux:
        notes.append(f"--aux {args.aux} ignored: {given[0][0]} differentiates {given[0][1]}, and so does the "
                     "reference")
    model = None
    if any(s.kind == "ref" for s in (a, b)) or forwards is None:
        model, tokenizer = cli.load(args.model, args.dtype)
        if forwards is None:
            cli.check_prompts(args.prompt)
            ids, mask = tokenizer.encode_batch(args.prompt)
            forwards = debug.Forwards([(ids, mask, training_positions(ids))], "--prompt")
    subject, reference_side = debug.roles(a, b)
    ids, mask, _ = forwards.steps[0]
    for side in (a, b):
        if side.kind == "hf":
            side.trace = hf_side(side, args.model, ids, mask, aux)
        elif side.kind == "ref" and not (args.isolate and side is reference_side):
            with capture() as side.trace:
                traced_backward(model, ids, mask, aux)
    if args.isolate:
        reference_side.trace = Trace()
        with handling(debug.isolating(subject.trace, reference_side.trace, read_by_nothing)):
            traced_backward(model, ids, mask, aux)
    rtol = debug.tolerance(args, a, b)
    shared = debug.shared_names(a, b, reference_side)
    if not args.isolate:
        forward = compare(a.trace, b.trace, rtol, args.atol, [n for n in shared if not n.startswith(GRAD) and
                                                             n != "loss"])[1]
        first = getattr(first_divergence(forward), "name", None)
        if first:
            notes.append(f"the forwards already differ at {first}: every gradient inherits it (compare without "
                         "--backward, or use --isolate)")
    names = debug.matching(backward_order(shared), args.only)
    if not names:
        raise ValueError(f"{a.label} and {b.label} share no gradients{' matching --only' if args.only else ''}")
    rows = compare(a.trace, b.trace, rtol, args.atol, names, args.isolate)[1]
    title = (f"{debug.side_title(a)} vs {debug.side_title(b)}, gradients of {loss_kind(aux)}"
             f"{' (--isolate)' if args.isolate else ''}")
    return debug.report(args, a, b, rows, forwards, notes, rtol, title, "gradient")


def run_dump_backward(args):
    if args.max_new_tokens > 1:
        raise ValueError("--backward differentiates one forward: drop --max-new-tokens")
    debug.writable(args.out, "trace")
    model, tokenizer = cli.load(args.model, args.dtype)
    cli.check_prompts(args.prompt)
    ids, mask = tokenizer.encode_batch(args.prompt)
    metadata = {"format": debug.FORMAT, "dtype": args.dtype, "config_sha256": debug.config_sha256(args.model),
                "loss": loss_kind(args.aux)}
    with TraceWriter(args.out, metadata) as writer, handling(writer):
        loss = traced_backward(model, ids, mask, args.aux)
        writer.metadata["loss_value"] = repr(loss)
    print(f"wrote {len(writer)} tensors of input_ids {ids.shape}, {loss_kind(args.aux)} loss {loss:.6f} and its "
          f"gradients to {args.out}")
    return 0
