"""The torch baseline of `jetmoe train`: the bundled model's recipe run on HF's JetMoeForCausalLM with autograd.

    make train-tiny-torch      # = python scripts/train_tiny_torch.py: about 35 minutes on 2 cores

The oracle side of training (torch, transformers==4.56.2). It trained the first bundled model; now it is the
baseline the NumPy trainer is measured against in the model card (scripts/model_card.py --compare). Same corpus
and tokenizer (jetmoe/corpus.py), same recipe (configs/jetmoe-tiny-shakespeare.json): HF's JetMoeForCausalLM,
E=8, K=2, AdamW on random windows of the training stream, plus the Switch load-balancing loss for every router:
HF's load_balancing_loss_func applied to each of the 2L routers on its own, summed (the Switch Transformer's
per-layer sum, coefficient BALANCE_COEF; reference/losses.py calls it "per_router"). HF's own aux loss (which
JetMoeForCausalLM cannot even return, transformers#31791) concatenates all layers' router logits first, so it only
balances the experts summed over layers: with it, a pilot run left single layers with dead experts (0% of the
choices) next to experts taking 47%.

Two differences from `jetmoe train`, both of the torch trainer's making: its windows are tokens + 1 long and
predict all `tokens` positions (the NumPy trainer feeds `tokens` and predicts tokens - 1, HF's labels=input_ids),
and its initial weights come from torch's generator. Writes OUT/{config.json, generation_config.json,
model.safetensors (bfloat16), tokenizer.json, train_log.json}.
"""

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers.models.jetmoe import modeling_jetmoe as hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jetmoe import corpus  # noqa: E402
from jetmoe.train import read_config  # noqa: E402
from reference.io.tokenizer import Tokenizer  # noqa: E402
from reference.optim import cosine_lr  # noqa: E402

CONFIG_PATH = os.path.join(ROOT, "configs", "jetmoe-tiny-shakespeare.json")
CONFIG = json.load(open(CONFIG_PATH))
RECIPE = read_config(CONFIG_PATH)[1]  # the "train" object with jetmoe train's defaults filled in
OUT_DIR = os.path.join(ROOT, "build", "train", "tiny-torch")
MODEL = dict(CONFIG["model"], aux_loss_coef=0.01)  # HF's default; the trainer below adds its own balance loss
SEED = RECIPE["seed"]
BALANCE_COEF = RECIPE["aux_loss_coef"]  # per router: twice the Switch Transformer's alpha
TRAIN = {k: RECIPE[k] for k in ["steps", "batch", "tokens", "lr", "min_lr", "warmup", "weight_decay", "clip",
                                "eval_every", "eval_batches"]}
TRAIN["threads"] = 2
if RECIPE["aux_loss"] != "per_router":  # lm_losses below writes that variant in torch
    raise SystemExit(f"train_tiny_torch implements aux_loss='per_router' only, the config asks for "
                     f"{RECIPE['aux_loss']!r}")


def windows(stream, starts, tokens):
    # stream: [N] -> [len(starts), tokens + 1] (inputs and their next-token labels)
    return torch.from_numpy(np.stack([stream[s: s + tokens + 1] for s in starts]))


def lm_losses(model, batch):
    """(cross-entropy, balancing loss) of batch [B, T+1]: HF's base model with router logits, then its lm_head,
    and load_balancing_loss_func on each router (see the module docstring)."""
    out = model.model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
    logits = model.lm_head(out.last_hidden_state)  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    aux = sum(hf.load_balancing_loss_func((router,), MODEL["num_local_experts"], MODEL["num_experts_per_tok"])
              for router in out.router_logits)  # one term per router; each is K=2 when perfectly balanced
    return loss, aux


def evaluate(model, stream, rng_seed):
    starts = np.random.default_rng(rng_seed).integers(0, len(stream) - TRAIN["tokens"] - 1,
                                                      TRAIN["eval_batches"] * TRAIN["batch"])
    model.eval()
    with torch.no_grad():
        losses = [lm_losses(model, windows(stream, chunk, TRAIN["tokens"]))[0].item()
                  for chunk in np.split(starts, TRAIN["eval_batches"])]
    model.train()
    return float(np.mean(losses))


def train(train_ids, validation_ids):
    torch.manual_seed(SEED)
    torch.set_num_threads(TRAIN["threads"])
    config = transformers.JetMoeConfig(**MODEL)
    model = hf.JetMoeForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"],
                                  betas=tuple(RECIPE["betas"]), eps=RECIPE["eps"])
    rng = np.random.default_rng(SEED)
    log = {"config": MODEL, "train": TRAIN, "balance_coef": BALANCE_COEF, "steps": [], "train_loss": [],
           "aux_loss": [], "eval_steps": [], "validation_loss": [], "train_tokens": int(len(train_ids)),
           "validation_tokens": int(len(validation_ids)), "parameters": sum(p.numel() for p in model.parameters())}
    started = time.time()
    bar = tqdm(range(TRAIN["steps"]), desc="training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, TRAIN["steps"], TRAIN["lr"], TRAIN["warmup"], TRAIN["min_lr"])
        starts = rng.integers(0, len(train_ids) - TRAIN["tokens"] - 1, TRAIN["batch"])
        loss, aux = lm_losses(model, windows(train_ids, starts, TRAIN["tokens"]))
        (loss + BALANCE_COEF * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log["steps"].append(step)
        log["train_loss"].append(loss.item())
        log["aux_loss"].append(aux.item())
        if (step + 1) % TRAIN["eval_every"] == 0 or step + 1 == TRAIN["steps"]:
            log["eval_steps"].append(step)
            log["validation_loss"].append(evaluate(model, validation_ids, SEED + 1))
            tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, validation loss "
                       f"{log['validation_loss'][-1]:.3f}, aux {aux.item():.3f}, {time.time() - started:.0f} s")
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
    log["train_seconds"] = time.time() - started
    return model, log


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=OUT_DIR, help="output directory (default build/train/tiny-torch)")
    args = parser.parse_args(argv)
    if transformers.__version__ != "4.56.2":
        raise SystemExit(f"train_tiny_torch needs transformers==4.56.2 (make setup-oracle), found "
                         f"{transformers.__version__}")
    train_works, validation_works = corpus.split_corpus(corpus.fetch_corpus())
    tok = corpus.train_tokenizer(train_works, MODEL["vocab_size"])
    ids_of = Tokenizer(tok, MODEL["bos_token_id"], MODEL["eos_token_id"], MODEL["pad_token_id"])
    train_ids, validation_ids = (corpus.token_stream(ids_of, works, MODEL["eos_token_id"])
                                 for works in (train_works, validation_works))
    print(f"corpus: {len(train_works)} training works ({len(train_ids):,} tokens), {len(validation_works)} "
          f"validation plays ({len(validation_ids):,} tokens); vocab {tok.get_vocab_size()}")
    model, log = train(train_ids, validation_ids)
    os.makedirs(args.out, exist_ok=True)
    for stale in glob.glob(os.path.join(args.out, "model*.safetensors*")):
        os.remove(stale)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f)
    print(f"wrote {args.out} ({log['parameters'] / 1e6:.2f}M parameters, {log['train_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
