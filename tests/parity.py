"""The reference side of the HF parity checks: the same scenarios as scripts/hf_oracle.py, same output names.

Relative error = max|ours - HF| / max|HF| per tensor (normwise, so entries near zero do not dominate).
Integer outputs (generated tokens) must be equal.
"""

import numpy as np

from reference import JetMoeForCausalLM, JetMoeForSequenceClassification
from reference.generation import positions_from_mask
from reference.io.compare import compare_tensor

# float64: both sides compute in float64; what is left is summation order (~1e-15 per op over a few ops).
FLOAT64_RTOL = 1e-10
# float32: HF and NumPy round differently inside matmuls and reductions (~1e-7 per op, amplified by depth).
FLOAT32_RTOL = 1e-5


def run_causal_lm(model, inputs):
    out = {}
    full = model(input_ids=inputs["input_ids"], labels=inputs["labels"], output_attentions=True,
                 output_hidden_states=True, output_router_logits=True, use_cache=True)
    out["logits"] = full.logits
    out["loss_with_aux"] = full.loss
    out["aux_loss"] = full.aux_loss
    out["loss"] = model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss
    out.update({f"hidden_states.{i}": h for i, h in enumerate(full.hidden_states)})
    out.update({f"attentions.{i}": a for i, a in enumerate(full.attentions)})
    out.update({f"router_logits.{i}": r for i, r in enumerate(full.router_logits)})
    for i, (k, v) in enumerate(zip(full.past_key_values.key_cache, full.past_key_values.value_cache)):
        out[f"past_key_values.{i}.key"], out[f"past_key_values.{i}.value"] = k, v

    mask = inputs["padded_mask"]
    padded = model(input_ids=inputs["padded_ids"], attention_mask=mask, position_ids=positions_from_mask(mask),
                   output_router_logits=True)
    out["padded.logits"], out["padded.aux_loss"] = padded.logits, padded.aux_loss

    cache, start = None, 0
    for step, n in enumerate(inputs["decode_splits"]):
        step_out = model(input_ids=inputs["input_ids"][:, start:start + int(n)], past_key_values=cache, use_cache=True)
        cache, start = step_out.past_key_values, start + int(n)
        out[f"decode.{step}.logits"] = step_out.logits

    out["embeds.logits"] = model(inputs_embeds=inputs["inputs_embeds"]).logits
    out["keep_last.logits"] = model(input_ids=inputs["input_ids"], logits_to_keep=3).logits
    out["keep_index.logits"] = model(input_ids=inputs["input_ids"], logits_to_keep=inputs["keep_index"]).logits
    prompt = inputs["input_ids"][:, : inputs["prompt_length"].item()]
    new = inputs["max_new_tokens"].item()
    # An explicit all-ones mask, as hf_oracle passes: without one, a prompt token equal to pad_token_id would be
    # masked out (HF and we infer padding from pad_token_id), and the oracle would check a different scenario.
    out["generate.tokens"] = model.generate(prompt, attention_mask=np.ones_like(prompt), max_new_tokens=new)
    out["generate_padded.tokens"] = model.generate(inputs["padded_ids"], attention_mask=mask, max_new_tokens=new)
    return out


def run_sequence_classification(model, inputs):
    out = {}
    for problem, labels in [("single_label_classification", inputs["class_labels"]),
                            ("multi_label_classification", inputs["multi_labels"]),
                            ("regression", inputs["regression_labels"])]:
        model.config.problem_type = "regression" if problem == "regression" else None
        res = model(input_ids=inputs["padded_ids"], attention_mask=inputs["padded_mask"], labels=labels)
        out[f"seqcls.loss.{problem}"] = res.loss
        out["seqcls.logits"] = res.logits
    model.config.problem_type = None
    return out


def run_all(model_dir, dtype, inputs):
    ours = run_causal_lm(JetMoeForCausalLM.from_pretrained(model_dir, dtype=dtype), inputs)
    seqcls = JetMoeForSequenceClassification.from_pretrained(f"{model_dir}/seqcls", dtype=dtype)
    ours.update(run_sequence_classification(seqcls, inputs))
    return ours


def assert_matches(ours, expected, rtol, where):
    """Check every expected output, in order; fail naming the first mismatch and its errors."""
    for name, want in expected.items():
        if name == "router_margin":
            continue
        assert name in ours, f"{where}: reference produced no {name!r}"
        got, want = np.asarray(ours[name]), np.asarray(want)
        if got.ndim == 0 and want.shape == (1,):  # safetensors stores HF's 0-d losses as shape [1]
            got = got.reshape(1)
        assert np.all(np.isfinite(got)) if np.issubdtype(got.dtype, np.floating) else True, \
            f"{where}: {name} has non-finite values"
        row = compare_tensor(name, got, want, rtol=rtol, atol=0.0)
        assert row.ok, (f"{where}: first mismatch at {name}: shape {row.shape}, max abs err {row.max_abs:.3e}, "
                        f"max rel err {row.max_rel:.3e} > rtol {rtol:g}")
