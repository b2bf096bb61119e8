"""The port debugger: find the first intermediate tensor where the reference and another implementation part.

Both run on the same input.

    jetmoe debug compare weights/jetmoe-tiny-shakespeare --prompt "ROMEO:" --against hf
    jetmoe debug compare MODEL --prompt "ROMEO:" --against gpu          # the CuPy twin
    jetmoe debug compare MODEL --against my_port_trace.safetensors      # a trace your port wrote
    jetmoe debug dump MODEL --prompt "ROMEO:" --out reference_trace.safetensors

`compare` prints one row per named intermediate (README.md "Trace names"), in forward order: name, shape, max abs
and max rel error (rel = max |a-b| / max |reference|), and for routing choices whether the top-k experts agree.
It stops at the first divergence (--all prints every row, the first divergence marked) and exits with status 1
when there is one. `dump` writes the reference trace to safetensors, together with the inputs it ran on
(`inputs.input_ids`, `inputs.attention_mask`): a port in another language reads those, runs them, writes its own
tensors under the same names, and `compare --against` that file needs no --prompt.

The other implementation is one of:
- `hf`: Hugging Face transformers (jetmoe/hf_trace.py: forward hooks mapped to our names; the oracle extra);
- `gpu`: the GPU twin (needs CuPy and a CUDA GPU);
- a path to a .safetensors trace.
torch, transformers and CuPy are imported only when `--against hf` or `--against gpu` asks for them.
"""

import os

import numpy as np

from reference.generation import positions_from_mask
from reference.trace import Trace, capture, compare, format_rows

from . import cli

INPUT_NAMES = ("inputs.input_ids", "inputs.attention_mask")
# Default tolerances: what two correct implementations reach in each dtype (float32: summation order and
# float32-vs-float64 routing logits; float64: round-off), relative to the largest reference entry.
DEFAULT_RTOL = {"float32": 1e-4, "float64": 1e-9}


def reference_trace(model, input_ids, attention_mask):
    # input_ids, attention_mask: [B, T] -> Trace of the reference forward (positions from the mask, as generate)
    with capture() as trace:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
              use_cache=False)
    return trace


def other_trace(against, model_dir, input_ids, attention_mask, dtype):
    """{name: array} of HF (against="hf") or the GPU twin (against="gpu") on the same input."""
    if against == "hf":
        try:
            from .hf_trace import hf_trace
        except ImportError as error:
            raise ValueError(f"--against hf needs torch and transformers==4.56.2 (make setup-oracle): {error}") \
                from None
        return hf_trace(model_dir, input_ids, attention_mask, dtype)
    import gpu
    try:
        model = gpu.JetMoeForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except gpu.GpuUnavailable as error:
        raise ValueError(f"--against gpu: {error}") from None
    return reference_trace(model, input_ids, attention_mask)


def load_trace_file(path):
    """A trace another implementation saved: {name: array}, maybe with the inputs it ran on."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--against {path!r} is neither hf, gpu nor an existing .safetensors trace file")
    try:
        return Trace.load(path)
    except Exception as error:  # safetensors raises its own error types for a corrupt file
        raise ValueError(f"{path} is not a readable safetensors trace: {error}") from None


def agreement(name, a, b):
    """Top-k column: '' for float tensors; for routing choices 'yes', or how many tokens chose other experts."""
    if not name.endswith("top_k_indices") or np.shape(a) != np.shape(b):
        return ""
    differing = int(np.any(np.asarray(a) != np.asarray(b), axis=-1).sum())
    return "yes" if differing == 0 else f"NO ({differing}/{len(a)} tokens)"


def comparison_rows(ours, theirs, rtol, atol):
    """[(Divergence, top-k agreement)] for every name both traces hold, in the reference's forward order."""
    shared = Trace((name, ours[name]) for name in ours if name in theirs)
    _, rows = compare(shared, {name: theirs[name] for name in shared}, rtol=rtol, atol=atol)
    return [(row, agreement(row.name, ours[row.name], theirs[row.name])) for row in rows]


def inputs_for(args, tokenizer, saved):
    """(input_ids [B, T], attention_mask [B, T]): a saved trace's inputs, else the --prompt texts, left-padded."""
    if saved is not None and INPUT_NAMES[0] in saved:
        ids = np.asarray(saved[INPUT_NAMES[0]], dtype=np.int64)
        mask = np.asarray(saved.get(INPUT_NAMES[1], np.ones_like(ids)), dtype=np.int64)
        return ids, mask
    if saved is not None and not args.prompt:
        raise ValueError("give --prompt (the trace file holds no inputs.input_ids to run on)")
    cli.check_prompts(args.prompt)
    return tokenizer.encode_batch(args.prompt)


def run_compare(args):
    model, tokenizer = cli.load(args.model, args.dtype)
    saved = None if args.against in ("hf", "gpu") else load_trace_file(args.against)
    ids, mask = inputs_for(args, tokenizer, saved)
    ours = reference_trace(model, ids, mask)
    if saved is None:
        theirs = other_trace(args.against, args.model, ids, mask, cli.DTYPES[args.dtype])
    else:
        theirs = {name: value for name, value in saved.items() if name not in INPUT_NAMES}
    rtol = DEFAULT_RTOL[args.dtype] if args.rtol is None else args.rtol
    rows = comparison_rows(ours, theirs, rtol, args.atol)
    if not rows:
        raise ValueError(f"the reference trace and {args.against} share no tensor names (see README.md "
                         "'Trace names')")
    first = next((row for row, _ in rows if not row.ok), None)
    print(f"reference ({args.dtype}) vs {args.against} on input_ids {ids.shape}, rtol {rtol:g}, atol {args.atol:g}")
    print(format_rows([row for row, _ in rows], notes=[agrees for _, agrees in rows], stop_at_first=not args.all))
    only_ours = [name for name in ours if name not in theirs]
    if only_ours:
        print(f"\n{len(only_ours)} reference tensors have no counterpart in {args.against} (not compared), "
              f"e.g. {', '.join(only_ours[:3])}")
    if first is None:
        print(f"\nno divergence: all {len(rows)} shared tensors agree")
        return 0
    print(f"\nfirst divergence: {first.name} (max abs {first.max_abs:.3e}, max rel {first.max_rel:.3e}); "
          f"{sum(not row.ok for row, _ in rows)} of {len(rows)} tensors diverge"
          f"{'' if args.all else ' (--all lists them all)'}")
    return 1


def run_dump(args):
    model, tokenizer = cli.load(args.model, args.dtype)
    ids, mask = inputs_for(args, tokenizer, None)
    trace = reference_trace(model, ids, mask)
    trace[INPUT_NAMES[0]], trace[INPUT_NAMES[1]] = ids, mask
    trace.save(args.out)
    print(f"wrote {len(trace) - 2} tensors and the inputs {ids.shape} to {args.out}")
    return 0


def add_arguments(parser):
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text, run in [("compare", "compare every intermediate with another implementation", run_compare),
                            ("dump", "write the reference trace (and its inputs) to safetensors", run_dump)]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("model", help="a Hugging Face JetMoE directory (config.json, weights, tokenizer.json)")
        sub.add_argument("--prompt", action="append", help="input text; repeat for a left-padded batch")
        sub.add_argument("--dtype", choices=sorted(cli.DTYPES), default="float32", help="default float32")
        if name == "compare":
            sub.add_argument("--against", default="hf", help="hf (default), gpu, or a .safetensors trace file")
            sub.add_argument("--rtol", type=cli.non_negative_float, default=None,
                             help=f"relative tolerance (default {DEFAULT_RTOL['float32']:g} in float32, "
                                  f"{DEFAULT_RTOL['float64']:g} in float64)")
            sub.add_argument("--atol", type=cli.non_negative_float, default=0.0, help="absolute tolerance")
            sub.add_argument("--all", action="store_true", help="print every row, not just up to the first "
                                                                "divergence")
        else:
            sub.add_argument("--out", required=True, help="the .safetensors file to write")
        sub.set_defaults(run=run)
