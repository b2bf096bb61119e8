"""The port debugger (`jetmoe debug`) finds injected bugs: a "port" is the reference with one function
swapped for a classic mistake, its trace is saved as a port would save it (tests/ports.py), and the debugger must
name the first tensor the mistake touches, and nothing before it.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jetmoe.cli import main
from jetmoe.debug import INPUT_NAMES
from reference.trace import Trace

from paths import ROOT, TINY_MODEL as MODEL
from ports import PROMPTS, attention_probs_repeat_interleave, port_trace


def debug(capsys, *argv):
    status = main(["debug", *argv])
    return status, capsys.readouterr().out


def first_divergence(out):
    (line,) = [line for line in out.splitlines() if line.startswith(">>")]
    return line.split()[1]


def test_same_implementation_has_no_divergence(tmp_path, capsys):
    status, out = debug(capsys, "dump", MODEL, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out",
                        str(tmp_path / "trace.safetensors"))
    assert status == 0 and "wrote" in out
    status, out = debug(capsys, "compare", MODEL, "--against", str(tmp_path / "trace.safetensors"))
    assert status == 0
    assert "no divergence: all 129 shared tensors agree" in out  # 21 per layer x 6 + embed, norm, logits
    names = list(Trace.load(str(tmp_path / "trace.safetensors")))
    assert names[:3] == ["embed_tokens", "layers.0.input_layernorm", "layers.0.attention.router.logits"]
    assert names[-4:] == ["norm", "logits", *INPUT_NAMES]  # forward order survives the file (sorted it would not)


def test_finds_repeat_interleave_bug(tmp_path, capsys):
    trace = port_trace(tmp_path / "port.safetensors", MODEL, attention_probs=attention_probs_repeat_interleave)
    status, out = debug(capsys, "compare", MODEL, "--against", trace)
    assert status == 1
    assert first_divergence(out) == "layers.0.attention.probs"
    assert out.splitlines()[-1].startswith("first divergence: layers.0.attention.probs")
    rows = [line for line in out.splitlines() if line.startswith("   layers.") or line.startswith(">>")]
    assert rows[-1].startswith(">>")  # it stops at the first divergence
    assert "layers.0.attention.key_rope" in out  # ... after showing that everything before it agrees


def test_finds_block_norm_eps_bug_in_float64(tmp_path, capsys):
    """A port that gives the block norms config.rms_norm_eps (HF hard-codes 1e-6 there). The bundled model's eps
    is 1e-6, so the bug is invisible on it; a copy with rms_norm_eps=1e-5 (jetmoe-8b's value) exposes it. The
    change is 9e-6 / (2 mean(x^2)) relative, ~5e-6 for hidden states of mean square 1, so the check runs in
    float64 (tolerance 1e-9), where it is found at the first block norm whatever the scale of the model."""
    model_dir = tmp_path / "model"
    shutil.copytree(MODEL, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model_dir / "config.json").write_text(json.dumps(config))
    trace = port_trace(tmp_path / "port.safetensors", str(model_dir), dtype=np.float64, BLOCK_NORM_EPS=1e-5)
    status, out = debug(capsys, "compare", str(model_dir), "--against", trace, "--dtype", "float64")
    assert status == 1 and first_divergence(out) == "layers.0.input_layernorm"
    assert out.count("DIVERGES") == 1 and "embed_tokens" in out


def test_all_rows_and_top_k_column(tmp_path, capsys):
    trace = port_trace(tmp_path / "port.safetensors", MODEL, attention_probs=attention_probs_repeat_interleave)
    status, out = debug(capsys, "compare", MODEL, "--against", trace, "--all")
    assert status == 1 and "logits" in out.splitlines()[-3]  # every row, up to the last tensor
    assert out.count(">>") == 1 and "(--all lists them all)" not in out
    top_k_rows = [line for line in out.splitlines() if "top_k_indices" in line]
    assert top_k_rows[0].rstrip().endswith("yes")  # layer 0's routers come before the bug
    assert any("NO (" in line for line in top_k_rows)  # the bug changes hidden states, so routing, later


def test_cli_subprocess_exit_status(tmp_path):
    trace = port_trace(tmp_path / "port.safetensors", MODEL, attention_probs=attention_probs_repeat_interleave)
    done = subprocess.run([sys.executable, "-m", "jetmoe", "debug", "compare", MODEL, "--against", trace],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and ">> layers.0.attention.probs" in done.stdout, done.stderr


@pytest.mark.parametrize("argv, message", [
    (["compare", MODEL, "--against", "/nonexistent/trace.safetensors"], "neither hf, gpu nor an existing"),
    (["compare", MODEL, "--against", "{corrupt}"], "is not a readable safetensors trace"),
    (["compare", MODEL, "--against", "{no_inputs}"], "give --prompt"),
    (["dump", MODEL, "--out", "{out}"], "give a prompt"),
    (["dump", MODEL, "--prompt", " ", "--out", "{out}"], "the prompt is empty"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from safetensors.numpy import save_file
    save_file({"embed_tokens": np.ones((1, 2, 3), np.float32)}, str(tmp_path / "no_inputs.safetensors"))
    paths = dict(corrupt=tmp_path / "corrupt.safetensors", no_inputs=tmp_path / "no_inputs.safetensors",
                 out=tmp_path / "out.safetensors")
    assert main(["debug", *[a.format(**paths) for a in argv]]) == 1
    assert message in capsys.readouterr().err
