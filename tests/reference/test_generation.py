"""Rung 8 of the op ladder (tests/reference/helpers.py lists them): greedy generation.

generate() on solo prompts against an argmax of a full forward (no cache) each step, then a batch of left-padded
prompts against the solo runs, with and without a row stopping early at its eos.
"""

import numpy as np
import pytest

from helpers import make_model, real_tokens
from reference.generation import cached_forward, generate


# ------------------------------------------------------------------------------------------------ 8. generate

def greedy_no_cache(model, prompt, max_new_tokens):
    # prompt: [T] -> new tokens [<= max_new]: argmax of a full forward each step, stop after an eos
    tokens = list(prompt)
    new = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(model(input_ids=np.array([tokens]), use_cache=False).logits[0, -1]))
        tokens.append(nxt)
        new.append(nxt)
        if nxt in model.config.eos_token_ids:
            break
    return np.array(new, dtype=np.int64)


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos_mid_way"])
@pytest.mark.parametrize("name", ["E4_K2_H2", "E3_K1_H3_untied"])
def test_batched_left_padded_generate_matches_solo(rng, name, with_eos):
    model = make_model(rng, name)
    config = model.config
    width, max_new = 6, 6
    lengths = [width, int(rng.integers(2, width)), 1]
    prompts = [real_tokens(rng, config, n) for n in lengths]
    if with_eos:
        # Make row 0's third new token an eos, so at least one row stops early and gets pad tokens after.
        config.eos_token_id = int(greedy_no_cache(model, prompts[0], 3)[-1])
    solo = []
    for p in prompts:
        out = model.generate(p[None], max_new_tokens=max_new)  # [1, n + new]
        np.testing.assert_array_equal(out[0, :len(p)], p)
        new = out[0, len(p):]
        # Independent oracle: argmax of a full forward (no cache) each step.
        np.testing.assert_array_equal(new, greedy_no_cache(model, p, max_new))
        solo.append(new)
    if with_eos:
        assert len(solo[0]) <= 3 and solo[0][-1] == config.eos_token_id

    ids = real_tokens(rng, config, (len(prompts), width))  # [B, W]: junk in the padding slots
    mask = np.zeros((len(prompts), width), dtype=np.int64)  # [B, W]
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=max_new)  # [B, W + new]
    np.testing.assert_array_equal(batched[:, :width], ids)
    new = batched[:, width:]  # [B, new]
    # Generation runs until every row is done: max_new, or the longest row's eos.
    assert new.shape[1] == max(len(s) for s in solo)
    for b, s in enumerate(solo):
        np.testing.assert_array_equal(new[b, :len(s)], s, err_msg=f"row {b}")
        assert np.all(new[b, len(s):] == config.pad_token_id), f"row {b} continues after its eos: {new[b]}"


def test_a_custom_stepper_drives_the_loop(rng):
    # generate(stepper=...) is how the GPU's captured decode plugs in: the loop must take every step's logits from
    # it, with the capacity and the inputs the default stepper would get.
    model = make_model(rng, "E4_K2_H2")
    ids = real_tokens(rng, model.config, (2, 5))
    seen = []

    def stepper(m, batch, capacity):
        seen.append(("made", batch, capacity))
        forward_step = cached_forward(m, batch, capacity)

        def step(step_ids, mask, positions):
            seen.append((step_ids.shape, mask.shape, positions.shape))
            logits = forward_step(step_ids, mask, positions)
            return -logits if len(seen) == 3 else logits  # the second step's choice comes from this stepper

        return step

    model.config.eos_token_id = None  # every step runs
    got = generate(model, ids, max_new_tokens=4, stepper=stepper)
    assert seen == [("made", 2, 9), ((2, 5), (2, 5), (2, 5)), ((2, 1), (2, 6), (2, 1)), ((2, 1), (2, 7), (2, 1)),
                    ((2, 1), (2, 8), (2, 1))]
    plain = generate(model, ids, max_new_tokens=4)
    np.testing.assert_array_equal(got[:, :6], plain[:, :6])
    last_logits = model(input_ids=got[:, :6]).logits[:, -1]
    np.testing.assert_array_equal(got[:, 6], (-last_logits).argmax(axis=-1))  # the stepper's logits, not the model's


def test_no_new_tokens_makes_no_stepper(rng):
    # max_new_tokens=0 returns the prompt without a cache or a forward (a GPU GraphDecoder needs a capacity > 0)
    model = make_model(rng, "E4_K2_H2")
    ids = real_tokens(rng, model.config, (2, 5))

    def stepper(m, batch, capacity):
        raise AssertionError("no step to run, so no stepper should be made")

    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=0, stepper=stepper), ids)
    assert generate(model, np.zeros((2, 0), np.int64), max_new_tokens=0).shape == (2, 0)
