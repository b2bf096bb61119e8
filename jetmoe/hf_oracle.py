"""The Hugging Face side of our parity checks: builds HF's JetMoe (CPU torch; transformers 4.56.2, which defines the
semantics, or the pinned newest 5.x, the second oracle) and runs it.

Used by scripts/ (goldens, benchmarks, training) and tests/oracle/; `reference` and `gpu` never import this. What
differs between the versions is found by feature checks (jetmoe/hf_compat.py), not by version strings.

float64 oracle: HF casts some things to float32 whatever the model dtype (RMSNorm, RoPE angles and the inv_freq
buffer, router logits, the eager attention softmax, the causal-LM loss, the aux loss's expert counts), so a float64 HF
model only carries float32 precision there. `float64_precision()` finds every such cast in HF's JetMoe source (the
"float32 islands": `.to(torch.float32)`, `dtype=torch.float32`, `.float()`, `dtype=torch.float`) and re-executes
the functions that hold one with float64 in its place. It is only entered for float64 models, for which that is
exactly "float32 or better". float32 runs use HF unpatched.
"""

import contextlib
import functools
import inspect
import math
import os
import re
import shutil
import textwrap

import numpy as np
import torch
import transformers
from transformers.loss import loss_utils
from transformers.models.jetmoe import modeling_jetmoe as hf

from reference.io.checkpoint import is_norm_weight

from .hf_compat import ORACLE_VERSIONS, SEMANTICS_TRANSFORMERS, cache_argument, output_cache, rope_theta

# float32 router logits err ~1e-6; a larger top-k gap (float64 HF) means float32 picks the same experts everywhere
MIN_ROUTER_MARGIN = 1e-3
_HI = "torch.promote_types({}, torch.float32)"

# A cast to float32 in HF's source; comparisons (`input_dtype == torch.float32`) are not casts and stay.
ISLAND = re.compile(r"(?<![=!]= )torch\.float32\b|\.float\(\)|dtype=torch\.float\b(?!\d)")


def _to_float64(match):
    text = match.group(0)
    if text == ".float()":
        return ".double()"
    return text.replace("float32", "float64") if "float32" in text else text + "64"  # dtype=torch.float


def check_versions(semantics=False):
    """Raise unless transformers is one the oracle is pinned to (semantics=True: only 4.56.2, for goldens)."""
    allowed = (SEMANTICS_TRANSFORMERS,) if semantics else ORACLE_VERSIONS
    if transformers.__version__ not in allowed:
        raise RuntimeError(f"this needs transformers {' or '.join(allowed)}, found {transformers.__version__}")


def _reexecuted(func, source, namespace):
    scope = {}
    exec(compile(source, f"<float64 oracle: {func.__qualname__}>", "exec"), namespace, scope)
    return scope[func.__name__]


def _patched(func, substitutions, namespace):
    source = textwrap.dedent(inspect.getsource(func))
    for old, new in substitutions:
        if old not in source:
            raise RuntimeError(f"HF source of {func.__qualname__} no longer contains {old!r}")
        source = source.replace(old, new)
    return _reexecuted(func, source, namespace)


@functools.cache
def float32_islands():
    """[(owner, name)] of every plain function or method in HF's modeling_jetmoe whose source casts to float32.
    Static methods run at construction (the RoPE inv_freq init) are left to set_inv_freq_precision. Scanned once,
    before any patch (a re-executed function has no source to read)."""
    found = []
    owners = [hf] + [v for v in vars(hf).values() if inspect.isclass(v) and v.__module__ == hf.__name__]
    for owner in owners:
        for name, value in list(vars(owner).items()):
            if inspect.isfunction(value) and value.__module__ == hf.__name__:
                source = textwrap.dedent(inspect.getsource(value))
                if ISLAND.search(source):
                    if "super()" in source:
                        raise RuntimeError(f"{value.__qualname__} casts to float32 and calls super(): the float64 "
                                           "oracle cannot re-execute it")
                    found.append((owner, name))
    return found


@contextlib.contextmanager
def float64_precision():
    """Within: HF JetMoe computes its float32 islands in float64 (enter it for float64 models only)."""
    islands = float32_islands()
    saved = [(owner, name, vars(owner)[name]) for owner, name in islands]
    try:
        for owner, name, func in saved:
            source = ISLAND.sub(_to_float64, textwrap.dedent(inspect.getsource(func)))
            setattr(owner, name, _reexecuted(func, source, vars(hf)))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def causal_lm_loss(logits, labels, vocab_size):
    """HF ForCausalLMLoss with its `logits.float()` made float32-or-better (identical for float32 logits)."""
    patched = _patched(loss_utils.ForCausalLMLoss,
                       [("logits = logits.float()", "logits = logits.to(" + _HI.format("logits.dtype") + ")")],
                       vars(loss_utils))
    return patched(logits, labels, vocab_size)


def set_inv_freq_precision(model):
    """HF's default RoPE init (1 / base ** (arange(0, dim, 2) / dim)), evaluated in the model's dtype."""
    for module in model.modules():
        if isinstance(module, hf.JetMoeRotaryEmbedding):
            config = module.config
            dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
            dim = config.kv_channels
            inv_freq = 1.0 / (rope_theta(hf, config) ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq


def hf_config(config_dict):
    """transformers.JetMoeConfig from our config.json dict, eager attention (so attentions can be returned)."""
    values = {k: v for k, v in config_dict.items() if k not in ("num_attention_heads", "architectures", "model_type")}
    config = transformers.JetMoeConfig(**values)
    config._attn_implementation = "eager"
    return config


def randomize(model, seed, clear_margin=True):
    """Every parameter random, biases and norm weights included (HF's init leaves them 0 and 1, hiding bugs).

    Scales keep activations O(1), so router logits are spread out and top-k margins are clear.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm_weight(name):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("router.layer.weight"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 2.0 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1]))


def top_k_margin(router_logits, k):
    """Smallest gap between the k-th and (k+1)-th router logit over all tokens and layers (inf when K = E)."""
    margins = []
    for logits in router_logits:
        sorted_logits = torch.sort(logits.double(), dim=-1, descending=True).values
        if k < sorted_logits.shape[-1]:
            margins.append(float((sorted_logits[:, k - 1] - sorted_logits[:, k]).min()))
    return min(margins) if margins else math.inf


def to_numpy(t):
    return t.detach().cpu().numpy()


def hf_generation_positions(attention_mask):
    """position_ids as HF's prepare_inputs_for_generation makes them from a (left-)padded mask."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def cache_tensors(cache, prefix="past_key_values"):
    """HF DynamicCache -> {prefix.i.key: [B, H, S, Dh], prefix.i.value: ...}."""
    out = {}
    for i, layer in enumerate(cache.layers):
        out[f"{prefix}.{i}.key"] = to_numpy(layer.keys)
        out[f"{prefix}.{i}.value"] = to_numpy(layer.values)
    return out


def np_inputs(d):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


def load_hf(model_dir, dtype, head="causal_lm"):
    """HF's own from_pretrained on a checkpoint directory; float64 also gets float64 RoPE frequencies."""
    cls = {"causal_lm": hf.JetMoeForCausalLM, "sequence_classification": hf.JetMoeForSequenceClassification}[head]
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
    if dtype == torch.float64:
        set_inv_freq_precision(model)
    return model


def run_causal_lm(model, inputs):
    """Every scenario the parity tests check, on HF, as {name: float64/int64 array}.

    inputs (NumPy): input_ids [B,T], labels [B,T], padded_ids / padded_mask [B,T] (left padding),
    inputs_embeds [B,T,D], decode_splits [3] (token counts of three cached forwards), keep_index [k].
    """
    t = np_inputs(inputs)
    config = model.config
    out = {}
    with torch.no_grad():
        full = model(input_ids=t["input_ids"], labels=t["labels"], output_attentions=True,
                     output_hidden_states=True, use_cache=True)
        out["logits"] = to_numpy(full.logits)
        out["loss"] = to_numpy(causal_lm_loss(full.logits, t["labels"], config.vocab_size))
        if model.dtype == torch.float32:  # the helper must be HF's own loss path where no patch applies
            assert torch.equal(full.loss, torch.as_tensor(out["loss"])), (full.loss, out["loss"])
        for i, h in enumerate(full.hidden_states):
            out[f"hidden_states.{i}"] = to_numpy(h)
        for i, a in enumerate(full.attentions):
            out[f"attentions.{i}"] = to_numpy(a)
        out.update(cache_tensors(output_cache(full)))
        # HF's JetMoeForCausalLM crashes when asked for router logits (transformers#31791), so the aux loss
        # oracle is HF's load_balancing_loss_func on JetMoeModel's router logits, as the issue specifies.
        base = model.model(input_ids=t["input_ids"], output_router_logits=True)
        for i, r in enumerate(base.router_logits):
            out[f"router_logits.{i}"] = to_numpy(r)
        aux = hf.load_balancing_loss_func(base.router_logits, config.num_local_experts, config.num_experts_per_tok)
        out["aux_loss"] = to_numpy(aux)
        out["loss_with_aux"] = to_numpy(causal_lm_loss(full.logits, t["labels"], config.vocab_size)
                                        + config.aux_loss_coef * aux)
        out["router_margin"] = np.array(top_k_margin(base.router_logits, config.num_experts_per_tok))

        positions = hf_generation_positions(t["padded_mask"])
        padded = model(input_ids=t["padded_ids"], attention_mask=t["padded_mask"], position_ids=positions)
        out["padded.logits"] = to_numpy(padded.logits)
        base = model.model(input_ids=t["padded_ids"], attention_mask=t["padded_mask"], position_ids=positions,
                           output_router_logits=True)
        out["padded.aux_loss"] = to_numpy(hf.load_balancing_loss_func(
            base.router_logits, config.num_local_experts, config.num_experts_per_tok, t["padded_mask"]))

        cache, start = None, 0
        for step, n in enumerate(inputs["decode_splits"]):
            ids = t["input_ids"][:, start:start + int(n)]
            step_out = model(input_ids=ids, use_cache=True, **{cache_argument(hf): cache})
            cache, start = output_cache(step_out), start + int(n)
            out[f"decode.{step}.logits"] = to_numpy(step_out.logits)

        out["embeds.logits"] = to_numpy(model(inputs_embeds=t["inputs_embeds"].to(model.dtype)).logits)
        out["keep_last.logits"] = to_numpy(model(input_ids=t["input_ids"], logits_to_keep=3).logits)
        out["keep_index.logits"] = to_numpy(model(input_ids=t["input_ids"], logits_to_keep=t["keep_index"]).logits)

        prompt = t["input_ids"][:, : inputs["prompt_length"]]
        out["generate.tokens"] = to_numpy(model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                        max_new_tokens=inputs["max_new_tokens"].item(),
                                                        do_sample=False))
        out["generate_padded.tokens"] = to_numpy(model.generate(
            t["padded_ids"], attention_mask=t["padded_mask"], max_new_tokens=inputs["max_new_tokens"].item(),
            do_sample=False))
    return out


def run_sequence_classification(model, inputs):
    """Pooled logits and the three HF problem types' losses on the left-padded batch."""
    t = np_inputs(inputs)
    out = {}
    with torch.no_grad():
        for problem, labels in [("single_label_classification", t["class_labels"]),
                                ("multi_label_classification", t["multi_labels"]),
                                ("regression", t["regression_labels"])]:
            model.config.problem_type = None if problem != "regression" else "regression"  # HF mutates it
            res = model(input_ids=t["padded_ids"], attention_mask=t["padded_mask"], labels=labels)
            out[f"seqcls.loss.{problem}"] = to_numpy(res.loss)
            out["seqcls.logits"] = to_numpy(res.logits)
        model.config.problem_type = None
    return out


def save_checkpoint(config_dict, out_dir, seed, score_seed=None):
    """A randomized float64 HF JetMoeForCausalLM saved with HF's save_pretrained into out_dir, and under
    out_dir/seqcls a JetMoeForSequenceClassification with the same base weights and a random score head."""
    config = hf_config(config_dict)
    torch.manual_seed(seed)
    model = hf.JetMoeForCausalLM(config).to(torch.float64).eval()
    randomize(model, seed)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    seqcls = hf.JetMoeForSequenceClassification(config).to(torch.float64)
    seqcls.model.load_state_dict(model.model.state_dict())
    score_gen = torch.Generator().manual_seed(seed if score_seed is None else score_seed)
    with torch.no_grad():
        score = torch.randn(seqcls.score.weight.shape, dtype=torch.float64, generator=score_gen) / 4
        seqcls.score.weight.copy_(score)
    seqcls.save_pretrained(os.path.join(out_dir, "seqcls"), safe_serialization=True)


def run_checkpoint(model_dir, dtype, inputs):
    """Every HF output (causal LM and sequence classification) for a save_checkpoint directory, the model loaded
    in dtype: float64 within float64_precision() (the float32 islands promoted), float32 HF unpatched."""
    ctx = float64_precision() if dtype == torch.float64 else contextlib.nullcontext()
    with ctx:
        result = run_causal_lm(load_hf(model_dir, dtype), inputs)
        seqcls = load_hf(os.path.join(model_dir, "seqcls"), dtype, "sequence_classification")
        result.update(run_sequence_classification(seqcls, inputs))
    return result


def make_inputs(config_dict, rng, batch=3, tokens=11):
    """Fresh random inputs for every scenario of run_causal_lm / run_sequence_classification."""
    V, D = config_dict["vocab_size"], config_dict["hidden_size"]
    pad = config_dict["pad_token_id"]
    input_ids = rng.integers(0, V, size=(batch, tokens))
    labels = input_ids.copy()
    labels[rng.random(labels.shape) < 0.2] = -100
    padded_mask = np.ones((batch, tokens), np.int64)
    for b in range(1, batch):  # row 0 unpadded, later rows left-padded by 2, 4, ...
        padded_mask[b, : min(2 * b, tokens - 2)] = 0
    padded_ids = np.where(padded_mask == 1, rng.integers(0, V, size=(batch, tokens)), pad)
    padded_ids[padded_mask == 1] = np.where(padded_ids[padded_mask == 1] == pad, (pad + 1) % V,
                                            padded_ids[padded_mask == 1])  # a real token is never the pad id
    first = int(rng.integers(2, tokens - 3))
    return {
        "input_ids": input_ids, "labels": labels, "padded_ids": padded_ids, "padded_mask": padded_mask,
        "inputs_embeds": rng.standard_normal((batch, tokens, D)),
        "decode_splits": np.array([first, 1, 2]),
        "keep_index": np.sort(rng.choice(tokens, size=3, replace=False)),
        "prompt_length": np.array(4), "max_new_tokens": np.array(6),
        "class_labels": rng.integers(0, config_dict["num_labels"], size=batch),
        "multi_labels": (rng.random((batch, config_dict["num_labels"])) < 0.5).astype(np.float64),
        "regression_labels": rng.standard_normal((batch, config_dict["num_labels"])),
    }


def jetmoe_router_loss(router_logits, num_experts, top_k, z_loss_coef=0.1):
    """The original JetMoE's aux loss (its jetmoe/utils/gate.py compute_aux_loss), written in torch for the gradient
    oracle: per router E * sum(normalize(sum probs) * normalize(expert counts)) + 0.1 * mean(logsumexp^2), summed.
    As in the original, every position counts, pads included (it takes no attention mask), and an expert is
    counted where its top-k gate is > 0. torch.logsumexp is the stable form of the original's
    log(exp(logits).sum()): equal wherever that is finite.
    tests/oracle/test_original_jetmoe.py holds this to a line-by-line transcription of the original."""
    total = 0
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(logits, top_k, dim=-1)
        gated = torch.softmax(top.values, dim=-1) > 0  # [N, K]
        counts = (torch.nn.functional.one_hot(top.indices, num_experts) * gated[..., None]).sum((0, 1))
        switch = num_experts * (torch.nn.functional.normalize(probs.sum(0), p=1, dim=0)
                                * torch.nn.functional.normalize(counts.to(logits.dtype), p=1, dim=0)).sum()
        z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        total = total + switch + z_loss_coef * z_loss
    return total


def hf_loss(model, input_ids, labels, attention_mask=None, output_router_logits=False, aux_loss="hf"):
    """HF's causal-LM loss, plus aux_loss_coef times the aux loss `aux_loss` (reference/losses.py's variants, here in
    torch) when output_router_logits: JetMoeModel's router logits, its lm_head, HF's loss functions."""
    config = model.config
    base = model.model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True,
                       use_cache=False)
    logits = model.lm_head(base.last_hidden_state)
    loss = causal_lm_loss(logits, labels, config.vocab_size)
    if output_router_logits:
        E, K = config.num_local_experts, config.num_experts_per_tok
        if aux_loss == "hf":
            aux = hf.load_balancing_loss_func(base.router_logits, E, K, attention_mask)
        elif aux_loss == "per_router":
            aux = sum(hf.load_balancing_loss_func((r,), E, K, attention_mask) for r in base.router_logits)
        else:
            aux = jetmoe_router_loss(base.router_logits, E, K)  # the original's: every position, no mask
        loss = loss + config.aux_loss_coef * aux
    return loss


def hf_value_and_grad(model, inputs, output_router_logits=False, aux_loss="hf"):
    """(loss, {parameter name: gradient}) by torch autograd on an HF JetMoeForCausalLM; inputs: NumPy input_ids,
    labels and optionally attention_mask. Parameter names are HF's (a tied lm_head is model.embed_tokens.weight)."""
    t = np_inputs(inputs)
    model.zero_grad(set_to_none=True)
    loss = hf_loss(model, t["input_ids"], t["labels"], t.get("attention_mask"), output_router_logits, aux_loss)
    loss.backward()
    return to_numpy(loss), {name: to_numpy(p.grad) for name, p in model.named_parameters()}
