"""What a new user hit when trying the tools for the first time; each case stays fixed.

The commands run as subprocesses, as a user runs them: exit status, stdout and stderr are what is checked.
"""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from reference.generation import check_sampling, sampling_probabilities

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "weights", "jetmoe-tiny-shakespeare")


def jetmoe(*args, env=None):
    done = subprocess.run([sys.executable, "-m", "jetmoe", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    return done.returncode, done.stdout, done.stderr


def test_negative_seed_is_a_usage_error_naming_the_flag():
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--seed", "-1")
    assert code == 2 and out == "", (code, out, err)  # argparse: before the model loads, nothing streamed
    assert "argument --seed: must be an integer >= 0, got -1" in err and "Traceback" not in err


def test_infinite_temperature_is_rejected():
    code, out, err = jetmoe("generate", "--model", MODEL, "--prompt", "ROMEO:", "--temperature", "inf")
    assert code == 2 and out == ""
    assert "argument --temperature: must be a finite number >= 0, got inf" in err


def test_tiny_temperature_samples_greedily_without_warnings():
    # As the temperature goes to 0 sampling becomes greedy: 1e-300 must give the greedy text, not `<s>` ten times.
    common = ("generate", "--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--no-stats")
    code, tiny, err = jetmoe(*common, "--temperature", "1e-300")
    assert code == 0 and "Warning" not in err, err
    assert tiny == jetmoe(*common, "--temperature", "0")[1]


def test_tiny_temperature_in_the_api_is_one_hot(rng):
    logits = rng.normal(0, 3, size=(3, 50)).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise"):  # exp underflow to 0 is expected
        warnings.simplefilter("error")
        probs = sampling_probabilities(logits, 1e-38, 50, 0.95)
    np.testing.assert_array_equal(probs, np.eye(50, dtype=np.float32)[logits.argmax(-1)])


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0])
def test_sampling_temperature_must_be_finite_and_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_sampling(temperature, 50, 1.0)


def test_context_one_blames_the_flag(tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text("ROMEO:\nBut soft, what light.\n", encoding="utf-8")
    code, out, err = jetmoe("evaluate", "--model", MODEL, "--text-file", str(text_file), "--context", "1")
    assert code == 2 and "argument --context: must be an integer >= 2" in err, err


def test_directory_as_text_file(tmp_path):
    code, out, err = jetmoe("evaluate", "--model", MODEL, "--text-file", str(tmp_path))
    assert code == 1 and f"--text-file {str(tmp_path)!r} is a directory" in err, err
    assert "does not exist" not in err


def test_evaluate_defaults_to_the_training_context(tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40, encoding="utf-8")
    code, out, err = jetmoe("evaluate", "--model", MODEL, "--text-file", str(text_file))
    assert code == 0, err
    assert "in windows of up to 256)" in out  # train_log.json: train.tokens, not max_position_embeddings=512


def test_warns_past_the_training_context(tmp_path):
    args = ("--prompt", "ROMEO:", "--max-new-tokens", "300", "--temperature", "0", "--no-stats")
    code, out, err = jetmoe("generate", "--model", MODEL, *args)
    assert code == 0 and "warning: prompt plus --max-new-tokens is" in err and "256-token context" in err, err
    hub_like = tmp_path / "model"  # no train_log.json: nothing is known about the training context
    shutil.copytree(MODEL, hub_like, ignore=shutil.ignore_patterns("train_log.json"))
    code, out, err = jetmoe("generate", "--model", str(hub_like), *args)
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize("prompt", ['He said "hi"', "Cost $HOME", "it's"])
def test_make_run_keeps_the_prompt_as_typed(prompt):
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: the README's first command needs it")
    env = dict(os.environ, PROMPT=prompt)
    done = subprocess.run([make, "-s", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(prompt), done.stdout[:80]
