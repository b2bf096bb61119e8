"""The notebooks' build-it-yourself cells and their shape, read from the .ipynb files (nothing is executed but the
stub cells and the graders of notebooks/exercises.py):

- every stub cell (tagged "exercise") defines my_<op>; its grader, called in the next cell, returns False and
  says "not yet implemented" for the untouched stub, True for the solution in notebooks/solutions/, and False with
  a hint that names the mistake for a typical wrong answer;
- every notebook opens with its prerequisites, runtime and extras, closes with a 3-5 point summary and holds at
  least three asserts, so that `make test-notebooks` catches text drifting from output.
"""

import ast
import json
import os
import re
import sys

import numpy as np
import pytest

from paths import ROOT
from test_layout import forbidden_imports

NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)  # exercises.py, figures.py and solutions/, as the notebooks import them
import exercises  # noqa: E402
from solutions import attention, backward, experts, model, norm_and_rope, routing  # noqa: E402

SOLUTIONS = {"my_rms_norm": norm_and_rope.my_rms_norm, "my_rope": norm_and_rope.my_rope, "my_top_k_gates": routing.my_top_k_gates,
             "my_dispatch": experts.my_dispatch, "my_attention_probs": attention.my_attention_probs,
             "my_causal_lm_loss": model.my_causal_lm_loss,
             "my_top_k_gates_backward": backward.my_top_k_gates_backward}
# 06 is being rewritten for the CPU CUDA emulator elsewhere; it joins the structure checks with that rewrite.
STRUCTURED = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def cells(name):
    with open(os.path.join(NOTEBOOKS, name)) as f:
        return json.load(f)["cells"]


def source(cell):
    return "".join(cell["source"])


def exercise_cells():
    """-> [(notebook, stub source, grader call source)] for every cell tagged "exercise"."""
    found = []
    for name in sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")):
        notebook = cells(name)
        for i, cell in enumerate(notebook):
            if "exercise" in cell.get("metadata", {}).get("tags", []):
                found.append((name, source(cell), source(notebook[i + 1])))
    return found


def stub_and_grader(stub, call):
    """The stub cell's my_<op> (executed in a fresh namespace) and the exercises.check_* its next cell calls."""
    namespace = {}
    exec(compile(stub, "<stub cell>", "exec"), namespace)
    (name,) = [n for n in namespace if n.startswith("my_")]
    (grader,) = re.findall(r"\b(check_\w+)\(" + name + r"\)", call)
    return name, namespace[name], getattr(exercises, grader)


EXERCISES = exercise_cells()


def test_notebooks_01_to_05_and_08_each_have_an_exercise():
    have = {name[:2] for name, _, _ in EXERCISES}
    assert {"01", "02", "03", "04", "05", "08"} <= have, f"notebooks with a build-it-yourself cell: {sorted(have)}"
    assert sorted(stub_and_grader(stub, call)[0] for _, stub, call in EXERCISES) == sorted(SOLUTIONS)


@pytest.mark.parametrize("notebook, stub, call", EXERCISES, ids=[e[0][:2] for e in EXERCISES])
def test_untouched_stub_fails_its_check_without_raising(notebook, stub, call, capsys):
    name, stub_fn, grader = stub_and_grader(stub, call)
    assert grader(stub_fn) is False
    assert "not yet implemented" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_solution_passes_its_check(name, capsys):
    (stub, call), = [(s, c) for _, s, c in EXERCISES if stub_and_grader(s, c)[0] == name]
    _, _, grader = stub_and_grader(stub, call)
    assert grader(SOLUTIONS[name]) is True, capsys.readouterr().out


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gates_over_all_experts(logits, k):
    # the classic mistake: softmax over all E, then keep the top k without renormalizing
    indices = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(_softmax(logits), indices, axis=1)


def ties_to_the_higher_id(logits, k):
    indices = np.argsort(-logits[:, ::-1], axis=1, kind="stable")[:, :k]
    indices = logits.shape[1] - 1 - indices
    return indices, _softmax(np.take_along_axis(logits, indices, axis=1))


def repeat_interleave(q, k):
    heads, tokens, head_dim = k.shape
    scores = q @ np.swapaxes(np.repeat(k, q.shape[0] // heads, axis=0), -1, -2) / np.sqrt(head_dim)
    return _softmax(np.where(np.tril(np.ones((tokens, tokens), bool)), scores, -np.inf))


def unshifted_loss(logits, ids):
    log_probs = np.log(_softmax(logits))
    return float(-np.take_along_axis(log_probs, ids[..., None], axis=-1).mean())


def layer_norm(x, weight, eps):
    centred = x - x.mean(axis=-1, keepdims=True)
    return weight * centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps)


def interleaved_rope(x, positions, theta):
    half = x.shape[-1] // 2
    angles = np.repeat(positions[:, None] * theta ** (-2 * np.arange(half) / x.shape[-1]), 2, axis=-1)  # [T, Dh]
    pairs = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * np.cos(angles) + pairs * np.sin(angles)


def unstable_dispatch(top_k_indices, num_experts):
    sorted_slots, offsets = experts.my_dispatch(top_k_indices, num_experts)
    for e in range(num_experts):  # reverse each group: grouped by expert, slot order lost
        sorted_slots[offsets[e]:offsets[e + 1]] = sorted_slots[offsets[e]:offsets[e + 1]][::-1].copy()
    return sorted_slots, offsets


def backward_everywhere(d_gates, top_k_gates, top_k_indices, num_experts):
    return backward.my_top_k_gates_backward(d_gates, top_k_gates, top_k_indices, num_experts) + 1e-3


@pytest.mark.parametrize("grader, wrong, hint", [
    (exercises.check_rms_norm, layer_norm, "LayerNorm"),
    (exercises.check_rope, interleaved_rope, "interleaved"),
    (exercises.check_top_k_gates, gates_over_all_experts, "softmax over all E"),
    (exercises.check_top_k_gates, ties_to_the_higher_id, "expert id order"),
    (exercises.check_dispatch, unstable_dispatch, "stable sort"),
    (exercises.check_attention_probs, repeat_interleave, "repeat_interleave"),
    (exercises.check_causal_lm_loss, unshifted_loss, "t+1"),
    (exercises.check_top_k_gates_backward, backward_everywhere, "did not choose"),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_wrong_answer_fails_with_a_hint(grader, wrong, hint, capsys):
    assert grader(wrong) is False
    assert hint in capsys.readouterr().out


def test_cost_predictions_hide_the_answer_until_predicted(capsys):
    from reference import JetMoeConfig
    base = JetMoeConfig(hidden_size=64, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                        num_key_value_heads=2, kv_channels=16, intermediate_size=96, vocab_size=100,
                        max_position_embeddings=64)
    unknown = dict.fromkeys(("total parameters", "active parameters", "decode FLOPs per token"))
    assert exercises.check_predictions(base, {"num_local_experts": 16}, unknown) is False
    assert " x " not in capsys.readouterr().out  # no ratio printed
    ratios = exercises.cost_ratios(base, {"num_local_experts": 16})
    assert exercises.check_predictions(base, {"num_local_experts": 16}, ratios) is True
    assert ratios["total parameters"] > 1.5 > ratios["active parameters"]  # experts grow, a token reads K


@pytest.mark.parametrize("notebook", STRUCTURED)
def test_notebook_opens_with_prerequisites_and_closes_with_a_summary(notebook):
    notebook_cells = cells(notebook)
    opening = source(notebook_cells[0])
    for needed in ("Prerequisites", "Goals", "Runtime", "Extras"):
        assert f"**{needed}" in opening, f"{notebook}: its first cell has no **{needed}...** line"
    closing = source(notebook_cells[-1])
    assert closing.startswith("## Summary"), f"{notebook}: its last cell is not a '## Summary'"
    points = [line for line in closing.splitlines() if re.match(r"[-*] |\d+\. ", line)]
    assert 3 <= len(points) <= 5, f"{notebook}: its summary has {len(points)} points, not 3 to 5"


@pytest.mark.parametrize("notebook", STRUCTURED)
def test_notebook_asserts_what_it_states(notebook):
    asserts = sum(isinstance(node, ast.Assert) for cell in cells(notebook) if cell["cell_type"] == "code"
                  for node in ast.walk(ast.parse("\n".join(line for line in source(cell).splitlines()
                                                           if not line.lstrip().startswith(("%", "!"))))))
    assert asserts >= 3, f"{notebook}: {asserts} asserts; the text's numbers must be computed or asserted"


def test_notebook_modules_never_import_jetmoe():
    problems = []
    for folder in (NOTEBOOKS, os.path.join(NOTEBOOKS, "solutions")):
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                problems += forbidden_imports(f.read(), name, lambda top: top != "jetmoe")
    assert not problems
