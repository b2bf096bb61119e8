"""Rung 7 of the op ladder (tests/reference/helpers.py lists them): padding.

Left- and right-padded rows of a batch give their unpadded logits (the pad slots hold junk tokens: the mask alone
must hide them), with HF's positions for padding, and every output stays finite under left padding.
"""

import numpy as np
import pytest

from reference.generation import positions_from_mask

from helpers import MODEL_CONFIGS, assert_close, make_model, real_tokens


# ------------------------------------------------------------------------------------------------ 7. padding

@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_left_and_right_padding_match_unpadded(rng, name):
    model = make_model(rng, name)
    config = model.config
    width = 8
    lengths = [width, int(rng.integers(2, width)), 1]
    rows = [real_tokens(rng, config, n) for n in lengths]
    solo = [model(input_ids=r[None]).logits[0] for r in rows]  # each [n, V]
    # Padding slots hold random junk tokens (not pad_token_id): the mask alone must hide them.
    left = real_tokens(rng, config, (len(rows), width))  # [B, W]
    right = real_tokens(rng, config, (len(rows), width))  # [B, W]
    left_mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, W]
    right_mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, W]
    for b, r in enumerate(rows):
        left[b, width - len(r):], left_mask[b, width - len(r):] = r, 1
        right[b, :len(r)], right_mask[b, :len(r)] = r, 1
    # HF's positions for padding: real tokens count 0, 1, ..., pads hold 1 (masked_fill(mask == 0, 1)).
    for b, r in enumerate(rows):
        want = [1] * (width - len(r)) + list(range(len(r)))
        np.testing.assert_array_equal(positions_from_mask(left_mask)[b], want)
    left_out = model(input_ids=left, attention_mask=left_mask, position_ids=positions_from_mask(left_mask)).logits
    right_out = model(input_ids=right, attention_mask=right_mask).logits  # default positions 0..W-1
    for b, r in enumerate(rows):
        n = len(r)
        # float64: masked keys get weight exactly 0; only the batch shape (summation order) differs
        assert_close(left_out[b, width - n:], solo[b], 1e-12, f"left-padded row {b} (length {n})")
        assert_close(right_out[b, :n], solo[b], 1e-12, f"right-padded row {b} (length {n})")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_left_padding_outputs_are_finite(rng, dtype):
    # A left-pad query sees no key; HF's eager float64 path gives NaN there, the reference must stay finite.
    model = make_model(rng, "E4_K2_H2", dtype=dtype)
    config = model.config
    ids = real_tokens(rng, config, (2, 7))  # [B, T]
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # [B, T]: row 0 left-padded by 4
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                output_attentions=True, output_hidden_states=True, output_router_logits=True)
    named = {"logits": out.logits, "aux_loss": out.aux_loss}
    named.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    named.update({f"attentions.{i}": a for i, a in enumerate(out.attentions)})
    named.update({f"router_logits.{i}": r for i, r in enumerate(out.router_logits)})
    for key, value in named.items():
        assert np.all(np.isfinite(value)), f"{np.dtype(dtype).name} left padding: {key} is not finite"
    # Sanity that the padded rows were really fully masked: their attention is spread over all keys.
    assert np.all(out.attentions[0][0, :, :4] > 0)
