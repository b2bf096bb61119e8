"""The port debugger (`jetmoe debug`): trace points that observe, stop and replace, and compare with verdicts.

A "port" is the reference with functions swapped for classic mistakes (tests/ports.py); its trace is dumped as a
port would write it, and the debugger must name exactly the ops the mistakes live in.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import reference
from jetmoe.command import main
from jetmoe.debug import Forwards, run_forwards
from reference import JetMoeForCausalLM
from reference.generation import positions_from_mask
from reference.io import trace
from reference.io.compare import compare, format_rows
from reference.io.tokenizer import Tokenizer
from reference.io.trace_files import TraceWriter, load_with_metadata

from paths import ROOT, TINY_MODEL as MODEL
from ports import (PROMPTS, block_norm_eps_bug, decode_cache_position_bug, final_norm_eps_bug, gate_bug,
                   interleaved_rope_bug, port_trace, repeat_interleave_bug)


def debug(capsys, *argv):
    capsys.readouterr()  # drop what came before (a port's dump)
    status = main(["debug", *map(str, argv)])
    return status, capsys.readouterr().out


def rows_of(capsys, *argv):
    """(status, rows) of `compare ... --json`: one object per row."""
    status, out = debug(capsys, "compare", *argv, "--json")
    return status, [json.loads(line) for line in out.splitlines()]


def verdicts(rows, verdict):
    return [r["name"] for r in rows if r["verdict"] == verdict]


@pytest.fixture(scope="module")
def tiny():
    return JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.float64)


def inputs(model):
    ids, mask = Tokenizer.from_pretrained(MODEL).encode_batch(PROMPTS)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))


# ----------------------------------------------------------------------------------- trace points (API)

def test_breakpoint_callback_sees_the_computing_frame(tiny):
    seen = []

    def callback(name, value, frame):
        seen.append((name, frame.f_code.co_name, dict(frame.f_locals)))

    with reference.capture() as captured, trace.breakpoint("layers.1.mlp.*", callback):
        tiny(**inputs(tiny))
    names = [name for name, _, _ in seen]
    assert names == [n for n in captured if n.startswith("layers.1.mlp.")]
    name, function, local = next(s for s in seen if s[0] == "layers.1.mlp.expert_out")
    assert function == "moe" and {"x2d", "plan", "act", "w"} <= set(local)  # reference/experts.py moe()'s locals
    np.testing.assert_array_equal(local["plan"].top_k_indices, captured["layers.1.mlp.router.top_k_indices"])


def test_breakpoint_callback_can_replace(tiny):
    with reference.capture() as plain:
        tiny(**inputs(tiny))
    with trace.breakpoint("norm", lambda name, value, frame: 2 * value), reference.capture() as replaced:
        tiny(**inputs(tiny))
    np.testing.assert_array_equal(replaced["norm"], 2 * plain["norm"])  # capture is inside: it sees the new value
    assert not np.allclose(replaced["logits"], plain["logits"])


def test_substituting_own_values_is_a_bitwise_no_op(tiny):
    with reference.capture() as plain:
        out = tiny(**inputs(tiny))
    with reference.capture() as again, trace.substitute(dict(plain)):
        out_again = tiny(**inputs(tiny))
    np.testing.assert_array_equal(out_again.logits, out.logits)
    assert all(np.array_equal(again[n], plain[n]) for n in plain)


def test_substituting_a_perturbed_value_changes_only_downstream(tiny, rng):
    with reference.capture() as plain:
        tiny(**inputs(tiny))
    name = "layers.2.post_attention_layernorm"
    perturbed = plain[name] + rng.normal(0, 0.1, plain[name].shape)
    with trace.substitute({name: perturbed}), reference.capture() as changed:  # capture inside: sees the new value
        tiny(**inputs(tiny))
    names = list(plain)
    at = names.index(name)
    assert list(changed) == names
    assert all(np.array_equal(changed[n], plain[n]) for n in names[:at])  # upstream: bitwise the same
    np.testing.assert_array_equal(changed[name], perturbed)
    downstream = [n for n in names[at + 1:] if not np.array_equal(changed[n], plain[n])]
    assert "layers.2.mlp.router.logits" in downstream and "logits" in downstream


def test_substitute_names_an_unknown_trace_point(tiny):
    with pytest.raises(ValueError, match="no trace point named layers.9.output"):
        with trace.substitute({"layers.9.output": np.zeros(3)}):
            tiny(**inputs(tiny))
    with pytest.raises(ValueError, match="has shape \\(3,\\)"):
        with trace.substitute({"norm": np.zeros(3)}):
            tiny(**inputs(tiny))


def test_steps_yields_forward_order_and_send_replaces(tiny):
    with reference.capture() as plain:
        expected = tiny(**inputs(tiny))
    walk = trace.steps(tiny, **inputs(tiny))
    names = []
    name, value = next(walk)
    try:
        while True:
            names.append(name)
            np.testing.assert_array_equal(value, plain[name])
            name, value = walk.send(None)
    except StopIteration as stop:
        np.testing.assert_array_equal(stop.value.logits, expected.logits)
    assert names == list(plain)

    walk = trace.steps(tiny, **inputs(tiny))
    for name, value in walk:
        if name == "norm":
            break
    name, value = walk.send(np.zeros_like(value))  # the forward goes on with zeros: logits = 0 @ lm_head
    assert name == "logits" and not value.any()
    walk.close()  # abandoning the walk ends its forward thread


def test_generate_records_every_decode_step(tiny):
    with reference.capture() as captured:
        tokens = tiny.generate(**{k: v for k, v in inputs(tiny).items() if k != "position_ids"}, max_new_tokens=3)
    for step in ("", "step.1.", "step.2."):
        assert f"{step}inputs.input_ids" in captured and f"{step}layers.5.attention.probs" in captured
    assert "step.3.logits" not in captured  # 3 new tokens: the prefill and 2 decode steps
    np.testing.assert_array_equal(captured["step.1.inputs.input_ids"], tokens[:, -3:-2])
    np.testing.assert_array_equal(captured["step.2.inputs.position_ids"], captured["step.1.inputs.position_ids"] + 1)
    np.testing.assert_array_equal(captured["step.1.inputs.position_ids"][:, 0],
                                  captured["inputs.position_ids"][:, -1] + 1)
    assert captured["step.2.layers.0.attention.probs"].shape[-1] == captured["inputs.input_ids"].shape[1] + 2


def test_trace_writer_writes_as_the_forward_goes(tiny, tmp_path):
    path = tmp_path / "trace.safetensors"
    sizes = []

    def at_norm(name, value, frame):  # by the final norm, every earlier tensor is on disk already
        sizes.append(os.path.getsize(str(path) + ".part"))

    with reference.capture() as captured:
        tiny(**inputs(tiny))
    with TraceWriter(path, {"dtype": "float64"}) as writer, trace.handling(writer), \
            trace.breakpoint("norm", at_norm):
        tiny(**inputs(tiny))
    before_norm = list(captured)[:list(captured).index("norm")]
    assert sizes == [sum(captured[n].nbytes for n in before_norm) + captured["norm"].nbytes]
    loaded, metadata = load_with_metadata(str(path))
    assert list(loaded) == list(captured) and metadata["dtype"] == "float64" and not os.path.exists(f"{path}.part")
    assert all(np.array_equal(loaded[n], captured[n]) for n in captured)


def test_trace_writer_leaves_nothing_when_the_forward_fails(tiny, tmp_path):
    path = tmp_path / "trace.safetensors"

    def fail(name, value, frame):
        raise RuntimeError("the port crashed")

    with pytest.raises(RuntimeError, match="the port crashed"), TraceWriter(path) as writer, \
            trace.handling(writer), trace.breakpoint("norm", fail):
        tiny(**inputs(tiny))
    assert os.listdir(tmp_path) == []  # neither the trace nor its spool


# ----------------------------------------------------------------------------------------------- compare

def test_dump_then_compare_the_file(tmp_path, capsys):
    path = tmp_path / "trace.safetensors"
    status, out = debug(capsys, "dump", MODEL, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", path)
    assert status == 0 and "wrote 132 tensors" in out  # 3 inputs, embed, 21 per layer x 6, norm, logits
    status, out = debug(capsys, "compare", MODEL, path)
    assert status == 0 and "no divergence: all 132 shared tensors agree" in out
    saved, metadata = load_with_metadata(str(path))
    assert list(saved)[:4] == ["inputs.input_ids", "inputs.attention_mask", "inputs.position_ids", "embed_tokens"]
    assert list(saved)[-2:] == ["norm", "logits"]  # forward order survives the file (sorted it would not)
    assert metadata["dtype"] == "float32" and len(metadata["config_sha256"]) == 64
    for new_tokens, tensors in (("1", 132), ("3", 3 * 132)):  # 1 new token: the prefill alone, every logit kept
        status, out = debug(capsys, "dump", MODEL, "--prompt", PROMPTS[0], "--max-new-tokens", new_tokens, "--out",
                            path)
        assert status == 0 and f"wrote {tensors} tensors" in out
        assert debug(capsys, "compare", MODEL, path)[0] == 0


def test_three_independent_bugs_in_one_isolated_run(tmp_path, capsys):
    def bugs(model):  # three ops, three layers: the gates of layer 1's MoE, layer 2's RoPE, the final norm's eps
        return gate_bug(model, 1) + interleaved_rope_bug(2) + final_norm_eps_bug(model, 1e-5)
    port = port_trace(tmp_path / "port.safetensors", MODEL, bugs, dtype="float64")
    # float64 (rtol 1e-9): the eps bug changes the final norm by ~1e-7 relative, below float32's tolerance
    status, rows = rows_of(capsys, MODEL, port, "--isolate", "--dtype", "float64")
    assert status == 1
    assert verdicts(rows, "introduced") == ["layers.1.mlp.router.top_k_gates", "layers.2.attention.query_rope",
                                            "layers.2.attention.key_rope", "norm"]
    assert all(r["verdict"] == "ok" for r in rows if r["name"] not in verdicts(rows, "introduced"))
    # without --isolate the first bug hides the others: everything after it inherits
    status, rows = rows_of(capsys, MODEL, port, "--dtype", "float64")
    assert status == 1 and verdicts(rows, "introduced") == ["layers.1.mlp.router.top_k_gates"]
    assert "norm" in verdicts(rows, "inherited")


def test_decode_step_bug_is_named_at_its_step(tmp_path, capsys):
    port = port_trace(tmp_path / "port.safetensors", MODEL, decode_cache_position_bug(), max_new_tokens=3)
    for flags in ([], ["--isolate"]):
        status, rows = rows_of(capsys, MODEL, port, *flags)
        first = next(r for r in rows if r["verdict"] != "ok")
        assert status == 1 and first["name"] == "step.1.layers.0.attention.probs", flags
        assert all(r["verdict"] == "ok" for r in rows if not r["name"].startswith("step."))  # the prefill is right
        assert first["worst"]["key"] == first["shape"][-1] - 1  # the newest key, which the bug masks out
    status, out = debug(capsys, "compare", MODEL, port)
    assert ">> step.1.layers.0.attention.probs" in out


def test_repeat_interleave_bug_and_the_table(tmp_path, capsys):
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    status, out = debug(capsys, "compare", MODEL, port)
    assert status == 1 and "first divergence: layers.0.attention.probs" in out
    (marked,) = [line for line in out.splitlines() if line.startswith(">>")]
    assert marked.split()[1] == "layers.0.attention.probs" and "introduced" in marked and "head" in marked
    assert "   layers.0.attention.key_rope" in out  # everything before it is shown agreeing
    assert "layers.0.attention.context" not in out  # inherited rows are left out of the table ...
    status, out = debug(capsys, "compare", MODEL, port, "--all")
    assert "inherited" in out.split("layers.0.attention.context", 1)[1].splitlines()[0]  # ... unless --all


def test_the_table_is_the_librarys(tmp_path, capsys):
    # `jetmoe debug compare` prints reference.io.compare's rows and table: the same lines the library gives for
    # the port's file against the reference run on the file's inputs
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    status, out = debug(capsys, "compare", MODEL, port, "--all")
    printed = out.split("\n\n")[0].splitlines()[1:]  # the table: after the title line, up to the summary
    saved = load_with_metadata(str(port))[0]
    inputs = tuple(saved[f"inputs.{name}"] for name in ("input_ids", "attention_mask", "position_ids"))
    with trace.capture() as ours:
        run_forwards(JetMoeForCausalLM.from_pretrained(MODEL), Forwards([inputs], "file"))
    first, rows = compare(saved, ours, 1e-4, 0.0, [n for n in ours if n in saved])
    assert status == 1 and first.name == "layers.0.attention.probs"
    assert printed == format_rows(rows).splitlines()


def test_block_norm_eps_bug_in_float64(tmp_path, capsys):
    """A port that gives the block norms config.rms_norm_eps (HF hard-codes 1e-6 there), on a copy of the model
    with rms_norm_eps=1e-5 (jetmoe-8b's value). The change is ~5e-6 relative: found in float64 (rtol 1e-9)."""
    model_dir = tmp_path / "model"
    shutil.copytree(MODEL, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model_dir / "config.json").write_text(json.dumps(config))
    port = port_trace(tmp_path / "port.safetensors", model_dir, block_norm_eps_bug(1e-5), dtype="float64")
    status, rows = rows_of(capsys, model_dir, port, "--dtype", "float64", "--isolate")
    assert status == 1 and verdicts(rows, "introduced") == [f"layers.{i}.{n}" for i in range(6)
                                                            for n in ("input_layernorm", "post_attention_layernorm")]


def test_two_files_compare_offline_and_different_inputs_are_named(tmp_path, capsys):
    a = port_trace(tmp_path / "a.safetensors", MODEL)
    b = port_trace(tmp_path / "b.safetensors", MODEL, repeat_interleave_bug())
    status, out = debug(capsys, "compare", MODEL, b, a)  # no --prompt: the inputs are in the files
    assert status == 1 and "first divergence: layers.0.attention.probs" in out
    other = port_trace(tmp_path / "other.safetensors", MODEL, prompts=["JULIET:"])
    assert main(["debug", "compare", MODEL, other, a]) == 1
    err = capsys.readouterr().err
    assert "different inputs: inputs.input_ids is (1, " in err and "other.safetensors" in err
    assert "a.safetensors" in err


def test_a_port_file_without_positions_or_metadata(tmp_path, capsys, tiny):
    """A port's own file: names only, inputs without positions, float32 tensors, no metadata. It gets a note
    saying what to add, and is compared on positions from its mask."""
    full = load_with_metadata(port_trace(tmp_path / "full.safetensors", MODEL))[0]
    path = tmp_path / "port.safetensors"
    save_file({n: v for n, v in full.items() if n != "inputs.position_ids"}, str(path))
    status, out = debug(capsys, "compare", MODEL, path)
    assert status == 0 and "note: " in out and "has no inputs.position_ids" in out


def test_positions_come_from_the_file(tmp_path, capsys):
    """A port using HF's default positions (arange) on a left-padded batch: its RoPE tensors differ from ours on
    our positions, but the debugger runs the reference on the file's positions, so everything agrees."""
    full = load_with_metadata(port_trace(tmp_path / "full.safetensors", MODEL))[0]
    ids, mask = full["inputs.input_ids"], full["inputs.attention_mask"]
    assert (mask == 0).any()  # the batch is left-padded
    arange = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    model = JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.float32)
    with TraceWriter(tmp_path / "arange.safetensors") as writer, trace.handling(writer):
        run_forwards(model, Forwards([(ids, mask, arange)], "a port"))
    status, out = debug(capsys, "compare", MODEL, tmp_path / "arange.safetensors")
    assert status == 0 and "no divergence" in out


def test_json_only_and_plot(tmp_path, capsys):
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    status, rows = rows_of(capsys, MODEL, port, "--only", "layers.0.attention.*", "--isolate")
    assert status == 1 and {r["name"].rsplit(".", 1)[0] for r in rows} <= {"layers.0.attention",
                                                                            "layers.0.attention.router"}
    (probs,) = [r for r in rows if r["verdict"] != "ok"]
    assert probs["name"] == "layers.0.attention.probs" and set(probs["worst"]) == {"batch", "head", "query", "key"}
    assert set(probs) == {"name", "shape", "max_abs", "max_rel", "verdict", "worst", "note"}
    status, out = debug(capsys, "compare", MODEL, port, "--isolate", "--plot", tmp_path / "errors.png")
    assert (tmp_path / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rtol_and_near_ties(tmp_path, capsys):
    """A router whose k-th and (k+1)-th logits are within the tolerance may pick either: a near-tie, not a bug.
    Here the port's logits of layer 0's MoE router are the reference's plus noise, and the tolerance is set so
    large that every flipped choice is within it."""
    model = JetMoeForCausalLM.from_pretrained(MODEL, dtype=np.float32)
    ids, mask = Tokenizer.from_pretrained(MODEL).encode_batch(PROMPTS)
    noise = np.random.default_rng(0).normal(0, 1.0, (ids.size, model.config.num_local_experts))

    def noisy(name, value, frame):
        return value + noise.astype(value.dtype) if name == "layers.0.mlp.router.logits" else value

    with TraceWriter(tmp_path / "noisy.safetensors") as writer, trace.handling(writer), \
            trace.handling(noisy):
        run_forwards(model, Forwards([(ids, mask, positions_from_mask(mask))], "a port"))
    status, rows = rows_of(capsys, MODEL, tmp_path / "noisy.safetensors", "--isolate", "--only", "layers.0.mlp.*")
    row = next(r for r in rows if r["name"] == "layers.0.mlp.router.top_k_indices")
    assert row["verdict"] == "introduced" and "logit margin" in row["note"]  # flips far outside 1e-4
    status, rows = rows_of(capsys, MODEL, tmp_path / "noisy.safetensors", "--isolate", "--only", "layers.0.mlp.*",
                           "--rtol", "10")
    assert status == 0 and next(r for r in rows if r["name"].endswith("top_k_indices"))["verdict"] == "near-tie"


@pytest.mark.parametrize("argv, message", [
    (["compare", MODEL, "/nonexistent/trace.safetensors"], "neither ref, hf, gpu nor an existing"),
    (["compare", MODEL, "{corrupt}"], "is not a readable safetensors trace"),
    (["compare", MODEL, "{no_inputs}"], "holds no inputs.input_ids: add the token ids"),
    (["compare", MODEL, "hf:int8", "--prompt", "a"], "the dtype must be one of"),
    (["compare", MODEL, "{no_inputs}", "hf", "--isolate"], "--isolate recomputes each tensor with the reference"),
    (["dump", MODEL, "--out", "{out}"], "give a prompt"),
    (["dump", MODEL, "--prompt", " ", "--out", "{out}"], "the prompt is empty"),
    (["dump", MODEL, "--prompt", "a", "--out", "/nonexistent/dir/trace.safetensors"], "cannot write the trace"),
    (["compare", MODEL, "ref", "--prompt", "a", "--plot", "/nonexistent/dir/x.png"], "cannot write the plot"),
    (["step", MODEL, "--prompt", "a", "--break", "no.such.*"], "no trace point matched --break"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"embed_tokens": np.ones((1, 2, 3), np.float32)}, str(tmp_path / "no_inputs.safetensors"))
    paths = dict(corrupt=tmp_path / "corrupt.safetensors", no_inputs=tmp_path / "no_inputs.safetensors",
                 out=tmp_path / "out.safetensors")
    assert main(["debug", *[str(a).format(**paths) for a in argv]]) == 1
    assert message in capsys.readouterr().err


def test_gpu_side_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    import gpu
    if gpu.device.cuda_device_available():
        pytest.skip("CuPy and a GPU are here: the gpu side would run")
    monkeypatch.setenv("JETMOE_GPU", "cuda")  # not the CPU emulator, which the suite picks without a GPU
    assert main(["debug", "compare", MODEL, "gpu", "--prompt", "ROMEO:"]) == 1
    assert capsys.readouterr().err.startswith("error: gpu:")


def test_step_stops_in_pdb_in_the_computing_frame():
    """`jetmoe debug step` under pdb: `ll` lists the function that computed the tensor, `p` reads its locals."""
    done = subprocess.run([sys.executable, "-m", "jetmoe", "debug", "step", MODEL, "--prompt", "ROMEO:",
                           "--break", "layers.1.mlp.expert_out"], cwd=ROOT, capture_output=True, text=True,
                          input="p plan.top_k_indices.shape\nll\nc\n", timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "> trace point layers.1.mlp.expert_out (3, 2, 128) float32, computed in moe()" in out
    assert "(3, 2)" in out and "def moe(x, w, top_k, saved=None):" in out and "done: stopped at 1 trace points" in out


def test_cli_subprocess_exit_status(tmp_path):
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    done = subprocess.run([sys.executable, "-m", "jetmoe", "debug", "compare", MODEL, port],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and ">> layers.0.attention.probs" in done.stdout, done.stderr
