"""Train a JetMoE from scratch in pure NumPy: the reference's hand-written backward, AdamW and clipping, no torch.

    jetmoe train --config configs/jetmoe-tiny-shakespeare.json --out build/train/tiny
    jetmoe train --resume build/train/tiny/checkpoints/step-01000 --out build/train/tiny

The config is a JSON file with a "model" object (config.json keys of HF's JetMoeConfig) and a "train" object (the
recipe; RECIPE lists every key and its default). The data is the Shakespeare corpus that `make corpus` prepares
(jetmoe/corpus.py): a byte-level BPE tokenizer of the model's vocab_size is trained on the training plays, unless
--tokenizer gives one. A step takes `batch` random windows of `tokens` tokens from the training stream (labels are
the inputs, shifted inside the loss as in HF) and does:

    loss, grads = value_and_grad(...)            cross-entropy + aux_loss_coef * the aux loss (reference/losses.py)
    clip_grad_norm(grads, clip)                  torch.nn.utils.clip_grad_norm_
    AdamW.step(grads)                            lr from cosine_lr; weight decay on matrices only (ndim >= 2)

The weights start as HF's _init_weights makes them (reference.io.checkpoint.initial_parameters). Every eval_every steps
the validation loss is measured on eval_batches fixed batches of held-out windows, with the expert load. Every
save_every steps, at the end, and on Ctrl-C, a checkpoint is written to OUT/checkpoints/step-NNNNN: the float32
model (save_pretrained), tokenizer.json, optimizer.safetensors (AdamW's moments) and trainer_state.json (the step,
the data Generator's state, the recipe, the log). --resume continues from one exactly where it stopped, on the same
corpus: the log keeps the sha256 of the token streams, and a resume that would read other streams is refused. At the end
OUT holds the model in bfloat16 (as HF checkpoints ship), tokenizer.json, train_log.json, loss_curve.png and
expert_load.png.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import tokenizers
from tqdm import tqdm

from reference import AdamW, JetMoeConfig, JetMoeForCausalLM, clip_grad_norm, cosine_lr, value_and_grad
from reference.io import files
from reference.io.checkpoint import write_checkpoint
from reference.io.mapped import THREADS
from reference.io.safetensors import BF16, SafetensorsError, read_safetensors, write_safetensors
from reference.io.tokenizer import Tokenizer
from reference.losses import AUX_LOSSES, causal_lm_loss
from reference.routing import expert_load

from . import cli, corpus

# The recipe of the bundled model (configs/jetmoe-tiny-shakespeare.json), each key's default.
RECIPE = dict(
    steps=2000, batch=16, tokens=256,  # optimizer steps, windows per step, tokens per window
    lr=3e-3, min_lr=3e-4, warmup=50,  # cosine_lr: linear warm-up to lr, cosine down to min_lr at the last step
    betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, clip=1.0,  # AdamW and clip_grad_norm
    aux_loss="per_router", aux_loss_coef=0.02,  # reference/losses.py AUX_LOSSES; coefficient 0 trains without one
    eval_every=50, eval_batches=8, save_every=500,  # in steps; eval batches have `batch` windows each
    seed=1234,  # weight init, training windows (the data Generator), validation windows (seed + 1)
)
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def add_arguments(parser):
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--config", help='JSON with "model" (JetMoeConfig keys) and "train" (recipe) objects')
    start.add_argument("--resume", help="a checkpoint directory (OUT/checkpoints/step-NNNNN) to continue from")
    parser.add_argument("--out", required=True, help="output directory: the trained model, logs, plots, checkpoints")
    parser.add_argument("--corpus", default=corpus.CORPUS_DIR,
                        help=f"corpus directory holding {corpus.ARCHIVE} (default {corpus.CORPUS_DIR}, which "
                             "`make corpus` writes)")
    parser.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one (not with --resume)")
    parser.add_argument("--steps", type=cli.positive_int, help="override the recipe's steps (e.g. to extend a run)")
    parser.set_defaults(run=main)


def check_recipe(values, source):
    """{key: value} from a config's "train" object -> the full recipe; unknown keys and bad values raise ValueError
    naming source."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: \"train\" must be an object of recipe keys, got {type(values).__name__}")
    unknown = sorted(set(values) - set(RECIPE))
    if unknown:
        raise ValueError(f"{source}: unknown train keys {unknown}; known: {', '.join(RECIPE)}")
    recipe = {**RECIPE, **values}
    whole = ["steps", "batch", "tokens", "eval_every", "eval_batches", "save_every"]
    for key in whole:
        if isinstance(recipe[key], bool) or not isinstance(recipe[key], int) or recipe[key] < 1:
            raise ValueError(f"{source}: train.{key} must be an integer >= 1, got {recipe[key]!r}")
    if isinstance(recipe["seed"], bool) or not isinstance(recipe["seed"], int) or recipe["seed"] < 0:
        raise ValueError(f"{source}: train.seed must be an integer >= 0, got {recipe['seed']!r}")
    if recipe["tokens"] < 2:
        raise ValueError(f"{source}: train.tokens must be >= 2 (a window of one token predicts nothing)")
    if isinstance(recipe["warmup"], bool) or not isinstance(recipe["warmup"], int) or recipe["warmup"] < 0:
        raise ValueError(f"{source}: train.warmup must be an integer >= 0 (steps), got {recipe['warmup']!r}")
    for key, low in [("lr", 0), ("min_lr", 0), ("weight_decay", 0), ("aux_loss_coef", 0), ("eps", None),
                     ("clip", None)]:  # eps = 0 turns a zero gradient into 0/0; clip = 0 zeroes every gradient
        value = recipe[key]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value < math.inf
                or not (value >= 0 if low == 0 else value > 0)):
            bound = ">= 0" if low == 0 else "> 0"
            raise ValueError(f"{source}: train.{key} must be a finite number {bound}, got {value!r}")
    betas = recipe["betas"]
    if (not isinstance(betas, list) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{source}: train.betas must be two numbers in [0, 1), got {betas!r}")
    if recipe["aux_loss"] not in AUX_LOSSES:
        raise ValueError(f"{source}: train.aux_loss must be one of {', '.join(AUX_LOSSES)}, got {recipe['aux_loss']!r}")
    return recipe


def read_text(path, missing, kind):
    """The UTF-8 text of path, read through reference/io/files.py's guards (a regular file within the size cap of
    `kind`); FileNotFoundError(missing) where there is no file."""
    if not files.present(path):
        raise FileNotFoundError(missing)
    return files.read_text(path, kind)


def read_json(path, what, kind):
    return files.parse_json(read_text(path, f"{what} {path!r} does not exist", kind), path)


def read_config(path):
    """-> (JetMoeConfig, recipe) from a training config file (module docstring)."""
    values = read_json(path, "config file", "config")
    if not isinstance(values, dict) or "model" not in values or not isinstance(values["model"], dict):
        raise ValueError(f'{path}: expected an object with a "model" object (JetMoeConfig keys) and a "train" object')
    unknown = sorted(set(values) - {"model", "train"})
    if unknown:
        raise ValueError(f'{path}: unknown keys {unknown}; a training config has "model" and "train"')
    try:
        config = JetMoeConfig.from_dict(values["model"])
    except TypeError as error:
        raise ValueError(f"{path}: bad model config: {error}") from None
    return config, check_recipe(values.get("train", {}), path)


class Run:
    """What a training run carries from step to step, and what a checkpoint saves of it."""

    def __init__(self, model, tokenizer_json, recipe, optimizer, rng, step, log):
        self.model, self.tokenizer_json, self.recipe = model, tokenizer_json, recipe
        self.optimizer, self.rng, self.step, self.log = optimizer, rng, step, log


LOG_SERIES = ["steps", "train_loss", "aux_loss", "grad_norm", "lr",  # one entry per step
              "eval_steps", "validation_loss", "dead_experts", "min_expert_load"]  # one entry per evaluation


def streams_sha256(train_ids, validation_ids):
    """sha256 of both token streams (their lengths, then their ids as little-endian int64): what a run reads, so a
    resume can check that it reads the same corpus through the same tokenizer."""
    digest = hashlib.sha256()
    for ids in (train_ids, validation_ids):
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    return digest.hexdigest()


def new_log(recipe, model, train_ids, validation_ids):
    log = {"config": model.config.to_dict(), "train": recipe, "trainer": "jetmoe train (NumPy reference)",
           "threads": THREADS, "train_tokens": int(len(train_ids)), "validation_tokens": int(len(validation_ids)),
           "corpus_sha256": streams_sha256(train_ids, validation_ids),
           "parameters": int(sum(t.size for t in model.state_dict().values())),
           "train_seconds": 0.0, "step_seconds": 0.0}  # the loop's wall clock; the part spent in train_step
    log.update({key: [] for key in LOG_SERIES})
    return log


def check_log(log, source):
    """A resumed log must have new_log's per-step and per-eval lists, as lists, and its two timings."""
    if not isinstance(log, dict) or not all(isinstance(log.get(k), list) for k in LOG_SERIES):
        raise ValueError(f"{source}: log must be an object with the lists {', '.join(LOG_SERIES)}")
    for key in ["train_seconds", "step_seconds", "parameters", "train_tokens", "validation_tokens", "threads"]:
        if isinstance(log.get(key), bool) or not isinstance(log.get(key), (int, float)):
            raise ValueError(f"{source}: log.{key} must be a number")
    if not isinstance(log.get("corpus_sha256", ""), str):  # absent in logs from before it was recorded
        raise ValueError(f"{source}: log.corpus_sha256 must be a string")
    for key in LOG_SERIES:
        if not all(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
                   for value in log[key]):
            raise ValueError(f"{source}: log.{key} must hold numbers")
    return log


def new_optimizer(model, recipe):
    return AdamW(model, lr=recipe["lr"], betas=tuple(recipe["betas"]), eps=recipe["eps"],
                 weight_decay=recipe["weight_decay"], decay=lambda name, p: p.ndim >= 2)


def start(args):
    """-> (Run, train ids [N_train], validation ids [N_val]) for a new run or a resumed one."""
    corpus.archive_path(args.corpus)  # a missing corpus is an error before any work (nothing is downloaded)
    if args.resume:
        if args.tokenizer:
            raise ValueError("--tokenizer cannot be given with --resume: the checkpoint has its tokenizer")
        return resume(args)
    config, recipe = read_config(args.config)
    if args.steps:
        recipe["steps"] = args.steps
    train_works, validation_works = corpus.split_corpus(corpus.fetch_corpus(args.corpus), args.corpus)
    if args.tokenizer:
        tokenizer_json = read_text(args.tokenizer, f"tokenizer file {args.tokenizer!r} does not exist",
                                   "tokenizer")
    else:
        wrong = {k: getattr(config, k) for k, v in corpus.SPECIAL_IDS.items() if getattr(config, k) != v}
        if wrong:
            raise ValueError(f"{args.config}: the tokenizer trained here has <s>, </s>, <pad> = 0, 1, 2, but the model "
                             f"says {wrong}: set bos_token_id 0, eos_token_id 1, pad_token_id 2 or give --tokenizer")
        tokenizer_json = corpus.train_tokenizer(train_works, config.vocab_size).to_str(pretty=True)
    train_ids, validation_ids = token_streams(tokenizer_json, config, train_works, validation_works)
    config = dataclasses.replace(config, aux_loss_coef=float(recipe["aux_loss_coef"]))
    model = JetMoeForCausalLM.from_init(config, seed=recipe["seed"], dtype=np.float32)
    run = Run(model, tokenizer_json, recipe, new_optimizer(model, recipe), np.random.default_rng(recipe["seed"]),
              0, new_log(recipe, model, train_ids, validation_ids))
    return run, train_ids, validation_ids


def token_streams(tokenizer_json, config, train_works, validation_works):
    """-> (train ids [N_train], validation ids [N_val]): each split's works tokenized by tokenizer_json, a
    tokenizer.json's text, which must fit the model's vocabulary."""
    try:
        inner = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as error:  # the tokenizers library raises its own Exception type for a bad file
        raise ValueError(f"not a tokenizer.json: {error}") from None
    tokenizer = Tokenizer(inner, config.bos_token_id, config.eos_token_id, config.pad_token_id)
    tokenizer.check_fits(config.vocab_size, "the tokenizer")
    if not isinstance(config.eos_token_id, int):
        raise ValueError(f"training needs one eos_token_id to end each play, got {config.eos_token_id!r}")
    return tuple(corpus.token_stream(tokenizer, works, config.eos_token_id)
                 for works in (train_works, validation_works))


def resume(args):
    """A checkpoint written by save_checkpoint -> the run at its step. Every file is validated: the model as any
    checkpoint, the optimizer state against the model's names and shapes, trainer_state.json's keys and types."""
    path = args.resume
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    state_path, tokenizer_path, optimizer_path = (files.inside(path, name) for name in (
        TRAINER_STATE, "tokenizer.json", OPTIMIZER_STATE))  # a checkpoint is untrusted: nothing outside it is read
    state = read_json(state_path, "trainer state", "train_log")
    if not isinstance(state, dict) or not {"step", "recipe", "rng", "log"} <= set(state):
        raise ValueError(f"{path}/{TRAINER_STATE} must hold step, recipe, rng and log")
    recipe = check_recipe(state["recipe"], f"{path}/{TRAINER_STATE}")
    if args.steps:
        recipe["steps"] = args.steps
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= recipe["steps"]:
        raise ValueError(f"{path}/{TRAINER_STATE}: step must be an integer in [0, {recipe['steps']}], got {step!r}")
    log = check_log(state["log"], f"{path}/{TRAINER_STATE}")
    log["train"] = recipe
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path}/{TRAINER_STATE}: rng is not a NumPy PCG64 state: {error}") from None
    model = JetMoeForCausalLM.from_pretrained(path, dtype=np.float32)
    tokenizer_json = read_text(tokenizer_path, f"no tokenizer.json in checkpoint {path!r}", "tokenizer")
    train_ids, validation_ids = token_streams(tokenizer_json, model.config,
                                              *corpus.split_corpus(corpus.fetch_corpus(args.corpus), args.corpus))
    digest = streams_sha256(train_ids, validation_ids)
    if log.get("corpus_sha256", digest) != digest:  # another corpus, or the same text split or tokenized otherwise
        raise ValueError(f"the corpus in {args.corpus!r} gives other token streams than the run in {path!r} started "
                         f"on (sha256 {digest[:12]}... against {log['corpus_sha256'][:12]}...): resume with the "
                         f"corpus it was trained on, or start a new run")
    optimizer = new_optimizer(model, recipe)
    if not os.path.isfile(optimizer_path):
        raise FileNotFoundError(f"no {OPTIMIZER_STATE} in checkpoint {path!r}")
    try:
        optimizer_state = read_safetensors(optimizer_path)
    except SafetensorsError as error:
        raise ValueError(f"{optimizer_path} is not a safetensors file: {error}") from None
    optimizer.load_state_dict(optimizer_state)
    if optimizer.steps != step:
        raise ValueError(f"{optimizer_path} is at step {optimizer.steps} but {state_path} at step {step}: they are "
                         f"not one checkpoint")
    if log["threads"] != THREADS:  # value_and_grad's batch shards: their count sets the gradient's summation order
        print(f"warning: the run used {log['threads']} threads and this machine gives {THREADS}: training continues, "
              f"but not bit for bit as the original run would have", file=sys.stderr)
    return Run(model, tokenizer_json, recipe, optimizer, rng, step, log), train_ids, validation_ids


def windows(stream, starts, tokens):
    # stream: [N_stream], starts: [B] -> [B, tokens] int64
    return np.stack([stream[s: s + tokens] for s in starts])


def random_windows(rng, stream, batch, tokens):
    # -> [batch, tokens]: windows at uniformly random starts, drawn from rng (the run's data Generator)
    if len(stream) <= tokens:
        raise ValueError(f"the token stream has {len(stream)} tokens, too few for {tokens}-token windows")
    return windows(stream, rng.integers(0, len(stream) - tokens, batch), tokens)


def evaluate(model, validation_ids, recipe):
    """-> (mean validation cross-entropy over eval_batches fixed batches, expert load [2L, E] on them)."""
    rng = np.random.default_rng(recipe["seed"] + 1)  # the same windows at every evaluation
    losses, router_logits = [], []
    for _ in range(recipe["eval_batches"]):
        ids = random_windows(rng, validation_ids, recipe["batch"], recipe["tokens"])
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
        losses.append(causal_lm_loss(out.logits, ids))
        router_logits.append(out.router_logits)
    load = expert_load([np.concatenate(r) for r in zip(*router_logits)], model.config.num_experts_per_tok)
    return float(np.mean(losses)), load


def record_evaluation(run, validation_ids):
    """Evaluate and append to the log: validation loss, dead experts, smallest expert share -> the load [2L, E]."""
    validation, load = evaluate(run.model, validation_ids, run.recipe)
    run.log["eval_steps"].append(run.step - 1)
    run.log["validation_loss"].append(validation)
    run.log["dead_experts"].append(int((load == 0).sum()))
    run.log["min_expert_load"].append(float(load.min()))
    return load


def train_step(run, train_ids):
    """One optimizer step -> (cross-entropy, aux loss or None, gradient norm before clipping, lr)."""
    recipe, model = run.recipe, run.model
    ids = random_windows(run.rng, train_ids, recipe["batch"], recipe["tokens"])  # [B, T]
    with_aux = recipe["aux_loss_coef"] > 0
    out, grads = value_and_grad(model, input_ids=ids, labels=ids, output_router_logits=with_aux,
                                aux_loss=recipe["aux_loss"])
    aux = float(out.aux_loss) if with_aux else None
    loss = float(out.loss) - (model.config.aux_loss_coef * aux if with_aux else 0.0)
    norm = clip_grad_norm(grads, recipe["clip"])
    run.optimizer.lr = cosine_lr(run.step, recipe["steps"], recipe["lr"], recipe["warmup"], recipe["min_lr"])
    run.optimizer.step(grads)
    run.step += 1
    return loss, aux, norm, run.optimizer.lr


def save_checkpoint(run, out_dir):
    """-> the directory OUT/checkpoints/step-NNNNN, written whole under a temporary name and then renamed, so an
    interrupted write never leaves a checkpoint that looks complete."""
    final = os.path.join(out_dir, CHECKPOINTS, f"step-{run.step:05d}")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    run.model.save_pretrained(partial)
    with open(os.path.join(partial, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(run.tokenizer_json)
    write_safetensors(os.path.join(partial, OPTIMIZER_STATE), run.optimizer.state_dict())
    state = {"step": run.step, "recipe": run.recipe, "rng": run.rng.bit_generator.state, "log": run.log}
    with open(os.path.join(partial, TRAINER_STATE), "w", encoding="utf-8") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def save_model(run, out_dir, load):
    """The trained model as HF ships checkpoints (bfloat16 weights), with its tokenizer, log and plots."""
    config = dataclasses.replace(run.model.config, extra={**run.model.config.extra, "dtype": "bfloat16"})
    write_checkpoint(out_dir, config, {name: np.asarray(t).astype(BF16)
                                       for name, t in run.model.state_dict().items()})
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(run.tokenizer_json)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}  # what HF's save_pretrained writes from a model config
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    write_log(run, out_dir, load)


def write_log(run, out_dir, load):
    from . import plots  # matplotlib: imported by the runs that draw, not by every `jetmoe` command
    with open(os.path.join(out_dir, "train_log.json"), "w", encoding="utf-8") as f:
        json.dump(run.log, f)
    if run.log["steps"]:
        plots.plot_loss_curves([("NumPy", run.log)], os.path.join(out_dir, "loss_curve.png"),
                               "jetmoe train: training loss")
    if load is not None:
        plots.plot_expert_load(load, run.model.config.num_hidden_layers, os.path.join(out_dir, "expert_load.png"),
                               f"Expert load on held-out text, step {run.step}")


class StopRequest:
    """SIGINT (Ctrl-C) sets .requested, and the loop stops after the step in progress (a step cut in half would
    leave the weights half-updated); a second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step to write a checkpoint (Ctrl-C again to quit without one)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def main(args):
    run, train_ids, validation_ids = start(args)
    os.makedirs(args.out, exist_ok=True)
    recipe, log = run.recipe, run.log
    tokens_per_step = recipe["batch"] * recipe["tokens"]
    print(f"training {log['parameters']:,} parameters: {recipe['steps']} steps of {recipe['batch']}x"
          f"{recipe['tokens']} tokens from {log['train_tokens']:,} ({recipe['aux_loss']} aux loss x "
          f"{recipe['aux_loss_coef']}); starting at step {run.step}; writing {args.out}")
    load = None
    with StopRequest() as stop, tqdm(total=recipe["steps"], initial=run.step, desc="training", unit="step") as bar:
        started, before = time.perf_counter(), log["train_seconds"]
        while run.step < recipe["steps"] and not stop.requested:
            began = time.perf_counter()
            loss, aux, norm, lr = train_step(run, train_ids)
            seconds = time.perf_counter() - began
            log["step_seconds"] += seconds
            for key, value in [("steps", run.step - 1), ("train_loss", loss), ("aux_loss", aux),
                               ("grad_norm", norm), ("lr", lr)]:
                log[key].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            if run.step % recipe["eval_every"] == 0 or run.step == recipe["steps"]:
                load = record_evaluation(run, validation_ids)
                tqdm.write(f"step {run.step}: train loss {loss:.3f}, validation loss {log['validation_loss'][-1]:.3f}, "
                           f"dead experts {log['dead_experts'][-1]}, {before + time.perf_counter() - started:.0f} s")
            log["train_seconds"] = before + time.perf_counter() - started  # wall clock: steps, evals, checkpoints
            if run.step % recipe["save_every"] == 0 and run.step < recipe["steps"]:
                where = save_checkpoint(run, args.out)
                write_log(run, args.out, load)
    if stop.requested and run.step < recipe["steps"]:
        if run.step % recipe["save_every"] != 0:  # else the loop has just written this step's checkpoint
            where = save_checkpoint(run, args.out)
            write_log(run, args.out, load)
        print(f"stopped at step {run.step}: checkpoint {where}\nresume with: jetmoe train --resume {where} "
              f"--out {args.out}")
        return 130
    where = save_checkpoint(run, args.out)
    save_model(run, args.out, load)
    validation = f"validation loss {log['validation_loss'][-1]:.4f}" if log["validation_loss"] else "no evaluation"
    print(f"trained {run.step} steps in {log['train_seconds'] / 60:.1f} min; {validation}; model {args.out}, "
          f"checkpoint {where}")
    return 0
