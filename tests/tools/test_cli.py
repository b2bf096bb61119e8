"""The command-line tools on the bundled model: `jetmoe generate` and `jetmoe evaluate` (run as `python -m jetmoe`).

Each runs as a subprocess, as a user runs it: exit status, stdout and stderr are what is checked. Every bad input
the tools promise to reject gets a non-zero exit and a one-line message naming the problem, never a traceback.
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from reference import JetMoeForCausalLM
from reference.io.tokenizer import Tokenizer
from reference.losses import mean_loss

from paths import ROOT, TINY_MODEL as MODEL

TEXT = """ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.
"""


def run(*args):
    """(exit status, stdout, stderr) of `python -m jetmoe <args>` from the repository root."""
    done = subprocess.run([sys.executable, "-m", "jetmoe", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def generate(*args):
    return run("generate", "--model", MODEL, *args)


def assert_user_error(result, status, message):
    code, out, err = result
    assert code == status, (code, out, err)
    assert message in err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("module, options", [("generate", ["--prompt", "--temperature", "--top-k",
                                                                     "--top-p", "--seed", "--max-new-tokens"]),
                                             ("evaluate", ["--model", "--text-file", "--context"])])
def test_help(module, options):
    code, out, _ = run(module, "--help")
    assert code == 0
    for option in options:
        assert option in out


def test_generate_streams_text_and_reports(seed):
    code, out, err = generate("--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", str(seed % 1000))
    assert code == 0, err
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:\n")
    assert "new tokens in" in err and "tokens/s" in err
    model = JetMoeForCausalLM.from_pretrained(MODEL)
    layers = model.config.num_hidden_layers
    assert "expert load" in err and len([line for line in err.splitlines() if line[:5].strip().isdigit()]) == layers


def test_generate_same_seed_same_text():
    first = generate("--prompt", "JULIET:", "--max-new-tokens", "16", "--seed", "11", "--no-stats")
    again = generate("--prompt", "JULIET:", "--max-new-tokens", "16", "--seed", "11", "--no-stats")
    other = generate("--prompt", "JULIET:", "--max-new-tokens", "16", "--seed", "12", "--no-stats",
                     "--temperature", "1.5", "--top-k", "0", "--top-p", "1")
    assert first[0] == 0 and first[1] == again[1]
    assert other[1] != first[1]  # 16 tokens at temperature 1.5 with no top-k/top-p: never the same text


def test_generate_matches_library_greedy():
    code, out, err = generate("--prompt", "KING:", "--max-new-tokens", "10", "--temperature", "0", "--no-stats")
    assert code == 0, err
    model, tokenizer = JetMoeForCausalLM.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    ids = np.asarray([tokenizer.encode("KING:")])
    tokens = model.generate(ids, max_new_tokens=10)
    assert out == "KING:" + tokenizer.decode(tokens[0, ids.shape[1]:]) + "\n"


def test_generate_batch_of_prompts():
    code, out, err = generate("--prompt", "ROMEO:", "--prompt", "Now is the winter", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.count("--- prompt") == 2 and "ROMEO:" in out and "Now is the winter" in out
    assert "batch 2" in err


def test_evaluate_matches_library(tmp_path):
    text_file = tmp_path / "passage.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    code, out, err = run("evaluate", "--model", MODEL, "--text-file", str(text_file), "--context", "16")
    assert code == 0, err
    values = dict(line.split(":", 1) for line in out.strip().splitlines())
    model, tokenizer = JetMoeForCausalLM.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    loss, count = mean_loss(model, tokenizer.encode(TEXT), 16)
    assert float(values["loss"].split()[0]) == pytest.approx(loss, abs=1e-4)  # printed with 4 decimals
    assert float(values["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-3)  # printed with 2 decimals
    assert int(values["tokens"].split()[0]) == count
    assert 0 < loss < math.log(model.config.vocab_size)  # a trained model beats uniform guessing


# ---------------------------------------------------------------- bad input


def copy_model(tmp_path, without):
    target = tmp_path / "model"
    shutil.copytree(MODEL, target)
    os.remove(target / without)
    return str(target)


def test_missing_model_directory(tmp_path):
    assert_user_error(run("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "A"), 1,
                      f"model directory {str(tmp_path / 'nowhere')!r} does not exist")


@pytest.mark.parametrize("missing, message", [("model.safetensors", "model.safetensors"),
                                              ("config.json", "config.json"),
                                              ("tokenizer.json", "no tokenizer.json in")])
def test_missing_files(tmp_path, missing, message):
    model_dir = copy_model(tmp_path, missing)
    for module, extra in [("generate", ["--prompt", "A"]),
                          ("evaluate", ["--text-file", os.path.join(MODEL, "README.md")])]:
        code, out, err = run(module, "--model", model_dir, *extra)
        assert_user_error((code, out, err), 1, message)


def test_empty_prompt():
    assert_user_error(generate("--prompt", "  "), 1, "the prompt is empty")


def test_prompt_longer_than_max_positions():
    limit = JetMoeForCausalLM.from_pretrained(MODEL).config.max_position_embeddings
    assert_user_error(generate("--prompt", "to be or not " * limit), 1, f"max_position_embeddings={limit}")
    assert_user_error(generate("--prompt", "ROMEO:", "--max-new-tokens", str(limit)), 1,
                      "would go past max_position_embeddings")


@pytest.mark.parametrize("flag, value, message", [("--temperature", "-0.5", "must be a finite number >= 0, got -0.5"),
                                                  ("--top-p", "0", "must be in (0, 1], got 0"),
                                                  ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
                                                  ("--top-k", "-1", "must be an integer >= 0, got -1"),
                                                  ("--top-k", "many", "expected an integer, got 'many'")])
def test_bad_sampling_flags(flag, value, message):
    assert_user_error(generate("--prompt", "ROMEO:", flag, value), 2, message)  # argparse: usage error, status 2


def test_text_file_not_utf8(tmp_path):
    text_file = tmp_path / "latin1.txt"
    text_file.write_bytes("Romeo, wherefore art thou? caf\u00e9".encode("latin-1"))
    assert_user_error(run("evaluate", "--model", MODEL, "--text-file", str(text_file)), 1,
                      f"{text_file} is not UTF-8 text: byte 0xe9 at offset 30")


def test_text_file_missing(tmp_path):
    assert_user_error(run("evaluate", "--model", MODEL, "--text-file", str(tmp_path / "none.txt")), 1,
                      "does not exist")


def test_mean_loss_is_cross_entropy_only():
    """A config that asks for router logits makes .loss include aux_loss_coef * aux; evaluate must not report it."""
    model, tokenizer = JetMoeForCausalLM.from_pretrained(MODEL), Tokenizer.from_pretrained(MODEL)
    ids = tokenizer.encode(TEXT)
    plain, _ = mean_loss(model, ids, 16)
    model.config.output_router_logits = True
    assert model(input_ids=np.asarray([ids[:16]]), labels=np.asarray([ids[:16]])).aux_loss > 0  # control
    assert mean_loss(model, ids, 16)[0] == plain
