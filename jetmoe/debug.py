"""The port debugger: which op of an implementation is wrong, tensor by tensor against the reference.

    jetmoe debug dump MODEL --prompt "ROMEO:" [--max-new-tokens 4] --out ref.safetensors
    jetmoe debug compare MODEL port.safetensors [ref] [--isolate] [--only GLOB] [--json] [--plot errors.png]
    jetmoe debug compare MODEL hf:bfloat16 --prompt "ROMEO:" --isolate      # HF's own bf16 against the reference
    jetmoe debug step MODEL --prompt "ROMEO:" --break "layers.1.mlp.*"     # pdb where each matching tensor is made
    jetmoe debug dump|compare ... --backward [--aux]   # the gradients too, from the loss back (debug_backward.py)
    jetmoe debug compare ... --html report.html         # one self-contained file to attach (jetmoe/report.py)

`compare MODEL A [B]` compares two implementations, B defaulting to `ref`. Each side is a trace file (.safetensors,
as `dump` writes it or a port writes it under the same names, docs/semantics.md "Trace names"), or one of `ref` (this
reference), `hf` (Hugging Face transformers, jetmoe/hf_trace.py; the oracle extra) and `gpu` (the CUDA twin);
`hf:bfloat16` and `gpu:bfloat16` run those in bf16. The inputs come from a trace file, so two files compare
offline, and a live side runs on the file's inputs: its prompt, positions and every decode step's token (teacher
forcing). --prompt is needed only when neither side is a file.

Each row is one named tensor, in forward order: shape, max abs and max rel error (rel = max |a-b| / max |B|),
the worst position and a verdict: ok, introduced, inherited, near-tie or input, as reference/io/compare.py
defines them (a live side runs on the file's inputs). With --isolate the reference recomputes every tensor from
the other side's upstream tensors (each earlier trace point substituted by that side's value, its routing
included), so each row is that op's own error and one run names every independent bug. The exit status is 1
when a row is introduced or inherited, else 0.
"""

import bdb
import dis
import fnmatch
import hashlib
import json
import math
import os
import pdb
import sys
from dataclasses import dataclass, field

import numpy as np

from reference import JetMoeConfig
from reference.generation import generate, positions_from_mask
from reference.inputs import to_numpy
from reference.io import files
from reference.io import trace as tracing
from reference.io.compare import VERDICTS, compare, first_divergence, format_rows
from reference.io.trace import capture, handling, like, substitute
from reference.io.trace_files import (TRACE_FLOATS, Trace, TraceWriter, check_trace_file, load_with_metadata,
                                      step_prefix)
from reference.losses import AUX_LOSSES

from . import cli, finite
from .generate import encode_prompts
from .report import write_html

LIVE = ("ref", "hf", "gpu")
INPUTS = ("input_ids", "attention_mask", "position_ids")
# Default relative tolerances, relative to the largest entry of B: what two correct implementations reach in
# each dtype. float64: round-off. float32: summation order and float32-vs-float64 router logits. bfloat16:
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) and HF rounds every op's output to it; against HF
# bf16 on the bundled model with --isolate, every op's own error stays below 2e-2 (tests/oracle/test_bundled_oracle.py).
DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2}
FORMAT = "jetmoe-trace-1"
DUMP_NAME = "trace.safetensors"  # the file `dump --out DIR` writes inside an existing directory


@dataclass
class Side:
    label: str  # as given: "ref", "hf:bfloat16", a path
    kind: str  # "ref", "hf", "gpu" or "file"
    dtype: str  # the dtype it computed in
    trace: Trace = None
    metadata: dict = field(default_factory=dict)


@dataclass
class Forwards:
    """What a trace ran on: the prefill's (input_ids [B, T], attention_mask [B, T], position_ids [B, T]), then each
    decode step's (token [B, 1], mask [B, T + i], positions [B, 1])."""
    steps: list
    source: str  # where they came from, for messages

    def names(self):
        return {f"{step_prefix(i)}inputs.{name}": value for i, step in enumerate(self.steps)
                for name, value in zip(INPUTS, step)}


def config_sha256(model_dir):
    """sha256 of the config.json bytes: a dump records which model it came from (`sha256sum config.json`)."""
    return hashlib.sha256(files.read_bytes(files.inside(model_dir, "config.json"), "config")).hexdigest()


def config_notes(side, model_dir):
    """[a note] when a trace file records that it was made from another config.json than model_dir's, else []."""
    digest = side.metadata.get("config_sha256")
    if not digest or digest == config_sha256(model_dir):
        return []
    return [f"{side.label} was made from another config.json (sha256 {digest[:12]}..., {model_dir}'s is "
            f"{config_sha256(model_dir)[:12]}...)"]


# ----------------------------------------------------------------------------------------------- the sides

def parse_side(spec, ref_dtype):
    """A Side from the command line: ref, hf[:dtype], gpu[:dtype] or a trace file."""
    kind, _, dtype = spec.partition(":")
    if kind in LIVE:
        dtype = dtype or ref_dtype
        allowed = {"ref": ("float32", "float64"), "hf": TRACE_FLOATS, "gpu": ("bfloat16", "float32")}[kind]
        if dtype not in allowed:
            raise ValueError(f"{spec!r}: the dtype must be one of {', '.join(allowed)}")
        return Side(spec, kind, dtype)
    if not os.path.lexists(spec):
        raise FileNotFoundError(f"{spec!r} is neither ref, hf, gpu nor an existing .safetensors trace file")
    try:
        saved, metadata = load_with_metadata(spec)
    except ValueError as error:  # reference/io/safetensors.py's SafetensorsError
        raise ValueError(f"{spec} is not a readable safetensors trace: {error}") from None
    return Side(spec, "file", metadata.get("dtype") or file_dtype(saved), saved, metadata)


def file_dtype(saved):
    """A port's file without a `dtype` in its metadata: the dtype of its floating-point tensors."""
    floats = {str(v.dtype) for v in saved.values() if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"}
    return min(floats, key=TRACE_FLOATS.index) if floats <= set(TRACE_FLOATS) and floats else "float32"


def forwards_of(side, notes):
    """The Forwards a trace file records; messages say what a port's file should add."""
    saved, steps = side.trace, []
    if "inputs.input_ids" not in saved:
        return None
    while f"{step_prefix(len(steps))}inputs.input_ids" in saved:
        p = step_prefix(len(steps))
        ids = np.asarray(saved[p + "inputs.input_ids"], dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"{side.label}: {p}inputs.input_ids must be [B, T] token ids, got shape {ids.shape}")
        if p + "inputs.attention_mask" in saved:
            mask = np.asarray(saved[p + "inputs.attention_mask"], dtype=np.int64)
        elif steps:
            mask = np.concatenate([steps[-1][1], np.ones((ids.shape[0], 1), np.int64)], axis=1)
        else:
            notes.append(f"{side.label} has no inputs.attention_mask: assumed all ones (add it, [B, T] int64)")
            mask = np.ones_like(ids)
        if p + "inputs.position_ids" in saved:
            positions = np.asarray(saved[p + "inputs.position_ids"], dtype=np.int64)
        else:
            notes.append(f"{side.label} has no {p}inputs.position_ids: assumed positions from the attention mask, "
                         "cumsum - 1 as generate (add them, [B, T] int64, to be sure)")
            positions = positions_from_mask(mask)[:, -ids.shape[1]:]
        steps.append((ids, mask, positions))
    return Forwards(steps, side.label)


def check_same_forwards(a, b):
    """ValueError when two files ran on different inputs: their tensors cannot be compared."""
    if len(a.steps) != len(b.steps):
        raise ValueError(f"different inputs: {a.source} holds {len(a.steps) - 1} decode steps, {b.source} "
                         f"{len(b.steps) - 1}")
    for (name, x), y in zip(a.names().items(), b.names().values()):
        if x.shape != y.shape or not np.array_equal(x, y):
            raise ValueError(f"different inputs: {name} is {x.shape} in {a.source} and {y.shape} in {b.source}"
                             f"{'' if x.shape != y.shape else ' with other values'}; compare traces of one input")


def run_forwards(model, forwards):
    """Run `forwards` on a NumPy or GPU model under whatever trace handlers are active: one forward with every
    logit, or generate's prefill and decode steps with every input forced to the recorded one."""
    (ids, mask, positions), *decode = forwards.steps
    if not decode:
        ids, mask = tracing.record("inputs.input_ids", ids), tracing.record("inputs.attention_mask", mask)
        positions = tracing.record("inputs.position_ids", positions)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return
    forced = {name: value for name, value in forwards.names().items() if name.startswith("step.")}
    forced["inputs.position_ids"] = positions  # the prefill's positions are the caller's, not generate's
    with substitute(forced, strict=False):  # generate stops early if every row of ours meets an eos
        generate(model, ids, attention_mask=mask, max_new_tokens=len(forwards.steps))


def live_trace(side, model, model_dir, forwards):
    """The trace of a live side (ref, hf, gpu) on `forwards`."""
    if side.kind == "hf":
        try:
            from .hf_trace import hf_trace
        except ImportError as error:
            raise ValueError(f"{side.label} needs torch and transformers==4.56.2 (make setup-oracle): {error}") \
                from None
        return Trace(hf_trace(model_dir, forwards.steps, side.dtype))
    if side.kind == "gpu":
        import gpu
        try:
            model = gpu.JetMoeForCausalLM.from_pretrained(model_dir, dtype=side.dtype)
        except gpu.GpuUnavailable as error:
            raise ValueError(f"{side.label}: {error}") from None
    elif side.dtype != model.dtype.name:
        model = cli.load(model_dir, side.dtype)[0]
    with capture() as trace:
        run_forwards(model, forwards)
    if side.kind == "gpu":  # the twin records device arrays; the comparison runs on the host
        for name in list(trace):
            trace[name] = to_numpy(trace[name])
    return trace


def isolating(other, trace, keeps_own=lambda name: False):
    """A handler recording the reference's value of each trace point into `trace`, then going on with `other`'s
    value where it has one of the same shape, so each later op reads the other side's inputs. The inputs (inputs.*)
    and the names keeps_own(name) accepts keep the reference's value."""
    def isolate(name, value, frame):
        trace[name] = np.array(value, copy=True)
        theirs = other.get(name)
        if theirs is None or np.shape(theirs) != np.shape(value) or ".inputs." in f".{name}" or keeps_own(name):
            return value
        return like(theirs, value, name)
    return isolate


def isolated_trace(model, forwards, other):
    """The reference's trace where every trace point's input is the other side's: each tensor is recorded as the
    reference computes it, then replaced by the other side's value (same shape) before the forward goes on."""
    trace = Trace()
    with handling(isolating(other, trace)):
        run_forwards(model, forwards)
    return trace


# ---------------------------------------------------------------------------------------------- the report

def plot(rows, trace_a, trace_b, path, title, rtol):
    """error_figure(...) written to path as a PNG."""
    import matplotlib.pyplot as plt
    fig = error_figure(rows, trace_a, trace_b, title, rtol)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def error_figure(rows, trace_a, trace_b, title, rtol):
    """Max rel error per named tensor along the forward (log axis, the tolerance as a line, errors of exactly 0 on
    a marked floor below it, introduced rows named, near-ties marked), and a layer x token map of routing
    agreement: the share of each token's top-k choices the two sides share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    routers = [r.name for r in rows if r.name.endswith("top_k_indices")]
    fig, (errors, routing) = plt.subplots(2, 1, figsize=(12, 8), height_ratios=(3, 2), constrained_layout=True)
    rel = np.array([r.max_rel if math.isfinite(r.max_rel) else np.nan for r in rows])
    floor = min([rtol] + list(rel[rel > 0])) / 10 if rtol > 0 or np.any(rel > 0) else 1e-18  # below every error
    shown = np.maximum(np.nan_to_num(rel, nan=floor), floor)
    errors.semilogy(shown, lw=0.8, color="0.4")
    exact = np.flatnonzero(rel == 0)
    errors.scatter(exact, shown[exact], s=10, marker="v", color="tab:blue", zorder=3,
                   label="error exactly 0 (drawn at the floor)")
    errors.axhline(floor, color="tab:blue", lw=0.6, ls=":")
    if rtol > 0:
        errors.axhline(rtol, color="black", lw=0.8, ls="--", label=f"tolerance: rtol {rtol:g}")
    for verdict, color in (("introduced", "red"), ("near-tie", "orange"), ("inherited", "0.7")):
        at = [i for i, r in enumerate(rows) if r.verdict == verdict]
        if at:
            errors.scatter(at, shown[at], s=18, color=color, label=verdict, zorder=3)
    for i, row in enumerate(rows):
        if row.verdict == "introduced":
            errors.annotate(row.name, (i, shown[i]), xytext=(3, 4), textcoords="offset points", fontsize=8,
                            rotation=30, color="red")
    errors.set(title=title, xlabel="trace point, in forward order", ylabel="max rel error",
               ylim=(floor / 3, max(np.max(shown), rtol) * 300))  # room above for the names
    errors.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if routers:
        agree = [np.mean(np.sort(np.asarray(trace_a[n]), axis=1) == np.sort(np.asarray(trace_b[n]), axis=1), axis=1)
                 if np.shape(trace_a[n]) == np.shape(trace_b[n]) else np.zeros(len(trace_b[n])) for n in routers]
        width = max(len(a) for a in agree)
        grid = np.full((len(routers), width), np.nan)
        for i, a in enumerate(agree):
            grid[i, :len(a)] = a
        image = routing.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
        every = max(1, len(routers) // 24)  # at most 24 labels, each readable
        labels = [n.replace(".router.top_k_indices", "").replace("layers.", "layer ").replace(".", " ")
                  for n in routers]
        routing.set_yticks(range(0, len(routers), every), labels[::every], fontsize=8)
        routing.xaxis.set_major_locator(MaxNLocator(integer=True))
        routing.set(xlabel="token (N = B*T)", title="routing agreement (share of top-k choices shared)")
        fig.colorbar(image, ax=routing)
    return fig


def side_title(side):
    """A side as a plot title names it: a file by its name, not its (often temporary) directory."""
    return os.path.basename(side.label) if side.kind == "file" else side.label


# ------------------------------------------------------------------------------------------- the commands

def prompt_forwards(args, tokenizer, model):
    """Forwards from --prompt: one forward, or (--max-new-tokens N) generate's N forwards with greedy tokens."""
    ids, mask = encode_prompts(tokenizer, args.prompt, args.max_new_tokens, model.config, args.model)
    if args.max_new_tokens <= 1:  # one forward (generate's single prefill would keep only the last logits)
        return Forwards([(ids, mask, positions_from_mask(mask))], "--prompt")
    with capture() as trace:
        generate(model, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens)
    return forwards_of(Side("--prompt", "file", args.dtype, trace), [])


def writable(path, what):
    """OSError on a path the user gave -> ValueError naming it (one `error:` line, not a traceback)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ValueError(f"cannot write the {what} {path}: {directory} is not a writable directory")


def check_files(args, sides):
    """A trace file is untrusted input: each one is checked against the model before any work."""
    config = JetMoeConfig.from_pretrained(args.model)
    for side in sides:
        if side.kind == "file":
            check_trace_file(side.trace, side.metadata, config, side.label, np.dtype(cli.DTYPES[args.dtype]).itemsize)


def check_outputs(args, a, b, what):
    """ValueError, before any work, for --isolate without a ref side and for a --plot or --html path that cannot be
    written."""
    if args.isolate and "ref" not in (a.kind, b.kind):
        raise ValueError(f"--isolate recomputes each {what} with the reference: make one side ref")
    for path, kind in ((args.plot, "plot"), (args.html, "report")):
        if path:
            writable(path, kind)


def file_forwards(args, sides, notes):
    """The Forwards the trace files among `sides` ran on (one and the same in every file), or None where no file
    holds its inputs and --prompt gives them; `notes` gets what a port's file should add."""
    forwards = None
    for side in sides:
        if side.kind != "file":
            continue
        found = forwards_of(side, notes)
        if found is not None and args.prompt is not None:
            raise ValueError(f"--prompt: {side.label} holds the inputs it ran on, and a live side runs on those; "
                             "leave out --prompt (it is for a file without inputs.input_ids, or two live sides)")
        if found is None and args.prompt is None:
            raise ValueError(f"{side.label} holds no inputs.input_ids: add the token ids it ran on "
                             "(inputs.input_ids [B, T] int64, inputs.attention_mask, inputs.position_ids; "
                             "`jetmoe debug dump` writes them), or give --prompt")
        if found is not None and forwards is not None:
            check_same_forwards(forwards, found)
        forwards = forwards or found
        notes += config_notes(side, args.model)
    return forwards


def roles(a, b):
    """(the subject, the reference side): B, unless A is ref and B is not."""
    return (a, b) if b.kind == "ref" or a.kind != "ref" else (b, a)


def tolerance(args, a, b):
    """--rtol, or the default of the less precise side's dtype."""
    dtype = min((a.dtype, b.dtype), key=TRACE_FLOATS.index)
    return DEFAULT_RTOL[dtype] if args.rtol is None else args.rtol


def shared_names(a, b, reference_side):
    """The names both traces hold, in the forward's order (the reference's, when it is one side)."""
    order = reference_side.trace if reference_side.kind == "ref" else a.trace
    return [n for n in order if n in a.trace and n in b.trace]


def matching(names, only):
    """The names matching the --only glob (all without one)."""
    return [n for n in names if only is None or fnmatch.fnmatchcase(n, only)]


def run_compare(args):
    cli.check_model_directory(args.model)
    a, b = parse_side(args.a, args.dtype), parse_side(args.b, args.dtype)
    check_files(args, (a, b))
    check_outputs(args, a, b, "tensor")
    notes, model = [], None
    forwards = file_forwards(args, (a, b), notes)
    if any(s.kind != "file" for s in (a, b)) or forwards is None:
        model, tokenizer = cli.load(args.model, args.dtype)
        forwards = forwards or prompt_forwards(args, tokenizer, model)
    subject, reference_side = roles(a, b)
    for side in (a, b):
        if side.kind != "file" and not (args.isolate and side is reference_side):
            side.trace = live_trace(side, model, args.model, forwards)
            finite.check_trace(side.trace, side.label)
    if args.isolate:
        reference_side.trace = isolated_trace(model, forwards, subject.trace)
    names = matching(shared_names(a, b, reference_side), args.only)
    if not names:
        raise ValueError(f"{a.label} and {b.label} share no tensor names{' matching --only' if args.only else ''} "
                         "(see docs/semantics.md 'Trace names')")
    rtol = tolerance(args, a, b)
    rows = compare(a.trace, b.trace, rtol, args.atol, names, args.isolate)[1]
    return report(args, a, b, rows, forwards, notes, rtol,
                  f"{side_title(a)} vs {side_title(b)}{' (--isolate)' if args.isolate else ''}", "tensor")


def report(args, a, b, rows, forwards, notes, rtol, title, what):
    """Print the rows (or --json), draw --plot, write --html; the exit status: 1 when a row is introduced or
    inherited."""
    if args.plot:
        plot(rows, a.trace, b.trace, args.plot, title, rtol)
    if args.html:
        write_html(args.html, rows, a.trace, b.trace, title, rtol, args.atol, notes,
                   f"{what}, in {'backward' if what == 'gradient' else 'forward'} order")
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    failed = counts["introduced"] + counts["inherited"] > 0
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return int(failed)
    steps = len(forwards.steps) - 1
    print(f"{a.label} ({a.dtype}) vs {b.label} ({b.dtype}) on input_ids {forwards.steps[0][0].shape}"
          f"{f' and {steps} decode steps' if steps else ''}, rtol {rtol:g}, atol {args.atol:g}"
          f"{', isolated' if args.isolate else ''}")
    for note in notes:
        print(f"note: {note}")
    print(format_rows(rows, show_all=args.all))
    unmatched = [n for n in list(a.trace) + list(b.trace) if n not in a.trace or n not in b.trace]
    if unmatched:
        print(f"\n{len(unmatched)} tensors are in only one trace (not compared), e.g. {', '.join(unmatched[:3])}")
    print("\n" + ", ".join(f"{v} {n}" for v, n in counts.items() if n) + f" (of {len(rows)} tensors)")
    for path in (args.plot, args.html):
        if path:
            print(f"wrote {path}")
    first = first_divergence(rows)
    if first is None:
        print(f"no divergence: all {len(rows)} shared {what}s agree")
        return 0
    introduced = [r.name for r in rows if r.verdict == "introduced"]
    print(f"first divergence: {first.name} (max abs {first.max_abs:.3e}, max rel {first.max_rel:.3e})")
    if introduced:
        print(f"introduced here: {', '.join(introduced[:12])}{' ...' if len(introduced) > 12 else ''}")
    if counts["inherited"] and "ref" in (a.kind, b.kind):
        print("rows after the first divergence inherit its error: --isolate checks each op on its own")
    elif counts["inherited"]:  # --isolate needs a live reference side
        print(f"rows after the first divergence inherit its error: `jetmoe debug compare {args.model} {a.label} "
              "ref --isolate` checks each op of one file on its own")
    return int(failed)


def dump_path(out):
    """--out as given, or DUMP_NAME inside it where it is an existing directory."""
    return os.path.join(out, DUMP_NAME) if os.path.isdir(out) else out


def run_dump(args):
    out = dump_path(args.out)
    writable(out, "trace")
    model, tokenizer = cli.load(args.model, args.dtype, args.device, finite=False)  # a NaN is written, and said
    ids, mask = encode_prompts(tokenizer, args.prompt, args.max_new_tokens, model.config, args.model)
    metadata = {"format": FORMAT, "dtype": args.dtype, "config_sha256": config_sha256(args.model)}
    non_finite = []

    def note_non_finite(name, value, frame):
        if not non_finite and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            non_finite.append(name)
        return value

    with TraceWriter(out, metadata) as writer, handling(writer), handling(note_non_finite):
        if args.max_new_tokens > 1:  # 1: the prefill alone, written as one forward with every logit
            generate(model, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens)
        else:
            run_forwards(model, Forwards([(ids, mask, positions_from_mask(mask))], "--prompt"))
    steps = max(args.max_new_tokens - 1, 0)
    print(f"wrote {len(writer)} tensors of input_ids {ids.shape}{f' and {steps} decode steps' if steps else ''}"
          f" to {out}")
    if non_finite:
        print(f"warning: the trace holds NaN or inf, written as computed; the first is at trace point "
              f"{non_finite[0]}", file=sys.stderr)
        return 2
    return 0


def assigned_name(frame):
    """The local that the line running in `frame` assigns its call's result to (`x` in `x = trace.record(...)`),
    or None: the instruction after the call in progress (frame.f_lasti) is then a store."""
    instructions = list(dis.get_instructions(frame.f_code))
    after = [i for i in instructions if i.offset > frame.f_lasti and i.opname not in ("CACHE", "EXTENDED_ARG")]
    stores = ("STORE_FAST", "STORE_NAME", "STORE_DEREF", "STORE_GLOBAL")
    return after[0].argval if after and after[0].opname in stores else None


class StopPdb(pdb.Pdb):
    """pdb in the frame that computed a traced tensor, where `value` (and the local the line assigns, which Python
    binds only when the call returns) hold this stop's tensor, and `name` its trace name."""

    def __init__(self, frame, bound):
        super().__init__()
        self.stop_frame, self.bound = frame, bound

    def setup(self, frame, traceback):
        super().setup(frame, traceback)
        self._bind()

    def _select_frame(self, number):  # `up` and `down` reread the frame's locals: bind again
        super()._select_frame(number)
        self._bind()

    def _bind(self):  # a copy: reading frame.f_locals again would reset the locals the call has not bound yet
        if self.curframe is self.stop_frame:
            self.curframe_locals = {**self.curframe.f_locals, **self.bound}


def pdb_stop(name, value, frame):
    """`debug step`'s stop: tracing.pdb_at's pdb, with this stop's values bound (StopPdb)."""
    target = assigned_name(frame)
    bound = {"value": value, "name": name, **({target: value} if target else {})}
    print(f"\n> trace point {name} {tuple(value.shape)} {value.dtype}, computed in {frame.f_code.co_name}() at "
          f"{frame.f_code.co_filename}:{frame.f_lineno}\n  `value`{f' and `{target}`' if target else ''} hold it, "
          "`name` its name; c: next stop, q: quit")
    debugger = StopPdb(frame, bound)
    debugger.reset()
    debugger.interaction(frame, None)
    if debugger.quitting:
        raise bdb.BdbQuit


def run_step(args):
    model, tokenizer = cli.load(args.model, args.dtype, args.device)
    ids, mask = encode_prompts(tokenizer, args.prompt, args.max_new_tokens, model.config, args.model)
    matched = []

    def stop(name, value, frame):
        matched.append(name)
        return pdb_stop(name, value, frame)

    try:
        with tracing.breakpoint(args.break_at, callback=stop):
            if args.max_new_tokens:
                generate(model, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens)
            else:
                run_forwards(model, Forwards([(ids, mask, positions_from_mask(mask))], "--prompt"))
    except bdb.BdbQuit:
        print(f"quit at {matched[-1]}")
        return 0
    if not matched:
        raise ValueError(f"no trace point matched --break {args.break_at!r} (docs/semantics.md 'Trace names')")
    print(f"done: stopped at {len(matched)} trace points")
    return 0


def add_arguments(parser):
    commands = parser.add_subparsers(dest="command", required=True)
    texts = {"compare": "compare every named tensor of two implementations (trace files, ref, hf, gpu)",
             "dump": "write the reference trace, with its inputs, to safetensors (layer by layer)",
             "step": "stop in pdb at each trace point matching --break: `value` (and the local its line assigns) "
                     "holds the tensor, `name` its trace name"}
    for name, run in (("compare", run_compare), ("dump", run_dump), ("step", run_step)):
        sub = commands.add_parser(name, help=texts[name], description=texts[name])
        sub.add_argument("model", help="a Hugging Face JetMoE directory (config.json, weights, tokenizer.json)")
        if name == "compare":
            sub.add_argument("a", metavar="A", help="a .safetensors trace file, or ref, hf[:bfloat16], gpu[:bfloat16]")
            sub.add_argument("b", metavar="B", nargs="?", default="ref", help="the same kinds (default ref)")
        sub.add_argument("--prompt", action="append", help="input text; repeat for a left-padded batch")
        sub.add_argument("--dtype", choices=sorted(cli.DTYPES), default="float32",
                         help="the reference's dtype (default float32)")
        if name != "compare":
            sub.add_argument("--max-new-tokens", type=cli.non_negative_int, default=0,
                             help="run generate: the prefill, then step.{i}. names for each decode step")
        else:
            sub.add_argument("--max-new-tokens", type=cli.non_negative_int, default=0,
                             help="without a file: compare generate's decode steps too")
            sub.add_argument("--isolate", action="store_true",
                             help="recompute each tensor from the other side's upstream tensors: each op's own error")
            sub.add_argument("--only", metavar="GLOB", help="compare only the names matching GLOB")
            sub.add_argument("--rtol", type=cli.non_negative_float, default=None,
                             help="relative tolerance (default: " + ", ".join(
                                 f"{v:g} in {k}" for k, v in DEFAULT_RTOL.items()) + "; the less precise side's)")
            sub.add_argument("--atol", type=cli.non_negative_float, default=0.0, help="absolute tolerance")
            sub.add_argument("--all", action="store_true", help="print every row")
            sub.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
            sub.add_argument("--plot", metavar="FILE.png", help="draw the errors and the routing agreement")
            sub.add_argument("--html", metavar="FILE.html", help="write a self-contained report (jetmoe/report.py)")
        if name != "compare":  # compare names its sides (ref, gpu, ...) instead
            sub.add_argument("--device", choices=cli.DEVICES, default="cpu",
                             help="cpu: the NumPy reference (default); gpu: the CuPy twin (JETMOE_GPU=emulate: on "
                                  "the CPU emulator)")
        if name != "step":
            sub.add_argument("--backward", action="store_true",
                             help="the gradients of the causal-LM loss too, grad.<name> (jetmoe/debug_backward.py)")
            sub.add_argument("--aux", nargs="?", const="hf", choices=AUX_LOSSES, default=None, metavar="KIND",
                             help="with --backward: the aux loss joins the loss (KIND: " + ", ".join(AUX_LOSSES) +
                             "; default hf)")
        if name == "dump":
            sub.add_argument("--out", required=True,
                             help=f"the .safetensors file to write (an existing directory: {DUMP_NAME} inside it)")
        if name == "step":
            sub.add_argument("--break", dest="break_at", required=True, metavar="GLOB",
                             help="trace names to stop at, e.g. 'layers.1.mlp.*'")
        sub.set_defaults(run=run)
