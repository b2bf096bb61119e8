"""Loss and perplexity of a JetMoE checkpoint on a text file, with the NumPy reference.

    jetmoe evaluate --model weights/jetmoe-tiny-shakespeare --text-file build/corpus/validation.txt

The text is tokenized once (bos first, as the tokenizer adds it) and cut into consecutive windows of --context
tokens (reference.losses.windows); each window is scored on its own (its first token has no context, so it is not
predicted), and the loss is the mean next-token cross-entropy over every predicted token, in nats
(reference.losses.mean_loss). Perplexity = exp(loss). The default context is the window the model was trained on
(its train_log.json), else max_position_embeddings, at most 512.
"""

import argparse
import math
import os

from reference.losses import mean_loss

from . import cli


def read_text(path):
    if os.path.isdir(path):
        raise ValueError(f"--text-file {path!r} is a directory: give a UTF-8 text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                         f"({error.reason})") from None


def context_length(text):
    """--context: a window predicts from its second token on, so it needs at least 2."""
    value = cli.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (a window of one token predicts nothing), "
                                             f"got {text}")
    return value


def add_arguments(parser):
    cli.add_model_arguments(parser)
    parser.add_argument("--text-file", required=True, help="UTF-8 text to score")
    parser.add_argument("--context", type=context_length, default=None,
                        help="tokens per window (default: the model's training window from its train_log.json, "
                             "else max_position_embeddings, at most 512)")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="windows per forward pass (default 8)")
    parser.set_defaults(run=main)


def main(args):
    text = read_text(args.text_file)  # before loading the model: a bad file fails fast
    if not text.strip():
        raise ValueError(f"{args.text_file} holds no text")
    trained = cli.training_context(args.model)  # None where the directory (or its train_log.json) is missing
    model, tokenizer = cli.load(args.model, args.dtype, args.device)
    limit = model.config.max_position_embeddings
    context = args.context or trained or min(limit, 512)
    if context > limit:
        raise ValueError(f"--context {context} is longer than max_position_embeddings={limit} of {args.model}")
    ids = tokenizer.encode(text)
    loss, count = mean_loss(model, ids, context, args.batch)
    print(f"tokens:     {count} predicted ({len(ids)} in windows of up to {context})")
    print(f"loss:       {loss:.4f} nats/token")
    print(f"perplexity: {math.exp(loss):.2f}")
    return 0
