"""The bug zoo (notebooks/zoo, notebook 09): in every exercise the debugger call the exercise gives names the
planted tensors, and its first divergence is the first of them. Without the bug (the same dump, no patches) the
same call finds nothing, so each verdict is the bug's."""

import json

import pytest

from jetmoe.command import main
from notebooks import zoo


def named_rows(capsys, argv):
    """(exit status, the first divergence, {name: verdict} of every row that is not ok) of a debugger call."""
    capsys.readouterr()
    status = main(["debug", "compare", *argv, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    named = {r["name"]: r["verdict"] for r in rows if r["verdict"] not in ("ok", "input")}
    return status, next(iter(named), None), named


@pytest.mark.parametrize("name", zoo.EXERCISES)
def test_the_debugger_names_the_planted_tensor(name, tmp_path, capsys):
    exercise = zoo.exercise(name)
    model_dir, argv = zoo.dump(name, tmp_path / "port.safetensors")
    status, first, named = named_rows(capsys, argv)
    assert first == exercise.PLANTED[0], (name, list(named)[:5])
    assert set(exercise.PLANTED) <= set(named), (name, set(exercise.PLANTED) - set(named))
    tie = name == "ties"  # a tie broken the other way is a near-tie (exit 0); every other bug is introduced
    assert set(named[p] for p in exercise.PLANTED) == {"near-tie" if tie else "introduced"}
    assert status == (0 if tie else 1)


@pytest.mark.parametrize("name", zoo.EXERCISES)
def test_without_the_bug_the_same_call_finds_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(zoo.exercise(name), "patches", lambda model: [])
    _, argv = zoo.dump(name, tmp_path / "port.safetensors")
    status, first, named = named_rows(capsys, argv)
    assert (status, named) == (0, {}), name


@pytest.mark.parametrize("name", zoo.EXERCISES)
def test_each_exercise_says_what_it_is(name):
    exercise = zoo.exercise(name)
    assert exercise.SYMPTOM and exercise.ANSWER and exercise.PLANTED
    assert all(p in zoo.answer(name) for p in exercise.PLANTED)
