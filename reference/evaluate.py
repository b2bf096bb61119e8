"""Loss and perplexity of a JetMoE checkpoint on a text file, with the NumPy reference.

    python -m reference.evaluate --model weights/jetmoe-tiny-shakespeare --text-file build/corpus/validation.txt

The text is tokenized once (bos first, as the tokenizer adds it) and cut into consecutive windows of --context
tokens; each window is scored on its own (its first token has no context, so it is not predicted), and the loss
is the mean next-token cross-entropy over every predicted token, in nats. Perplexity = exp(loss).
"""

import argparse
import math
import os
import sys

import numpy as np

from . import cli


def windows(ids, context):
    # ids: [N] -> list of [<= context] arrays, consecutive, non-overlapping; a last window of one token predicts
    # nothing and is dropped
    chunks = [ids[start: start + context] for start in range(0, len(ids), context)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


def mean_loss(model, ids, context, batch=8):
    """(mean cross-entropy in nats over every predicted token, predicted token count) of ids [N]."""
    chunks = windows(np.asarray(ids, dtype=np.int64), context)
    if not chunks:
        raise ValueError(f"the text is {len(ids)} token(s): at least 2 are needed to predict one")
    total, count = 0.0, 0
    full = [c for c in chunks if len(c) == len(chunks[0])]  # every window but maybe the last has `context` tokens
    groups = [np.stack(full[i: i + batch]) for i in range(0, len(full), batch)]
    groups += [c[None] for c in chunks[len(full):]]
    for group in groups:  # [b, t]
        # HF's causal-LM loss is the mean over the b*(t-1) shifted labels; weight it back to a sum
        # output_router_logits=False: a config asking for router logits would add aux_loss_coef * aux to .loss
        loss = model(input_ids=group, labels=group, use_cache=False, output_router_logits=False).loss
        predicted = group.shape[0] * (group.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    return total / count, count


def read_text(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                         f"({error.reason})") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m reference.evaluate", description=__doc__.split("\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--text-file", required=True, help="UTF-8 text to score")
    parser.add_argument("--context", type=cli.positive_int, default=None,
                        help="tokens per window (default: max_position_embeddings, at most 512)")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="windows per forward pass (default 8)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    text = read_text(args.text_file)  # before loading the model: a bad file fails fast
    if not text.strip():
        raise ValueError(f"{args.text_file} holds no text")
    model, tokenizer = cli.load(args.model, args.dtype)
    limit = model.config.max_position_embeddings
    context = args.context or min(limit, 512)
    if context > limit:
        raise ValueError(f"--context {context} is longer than max_position_embeddings={limit} of {args.model}")
    ids = tokenizer.encode(text)
    loss, count = mean_loss(model, ids, context, args.batch)
    print(f"tokens:     {count} predicted ({len(ids)} in windows of up to {context})")
    print(f"loss:       {loss:.4f} nats/token")
    print(f"perplexity: {math.exp(loss):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
