"""The tokenizer: text <-> token ids through an HF tokenizer.json.  Shapes: reference/__init__.py.

The `tokenizers` library runs the tokenizer.json (normalizer, pre-tokenizer, BPE model, decoder); this module
decides what HF's `LlamaTokenizerFast` decides on top of it: whether a bos token starts the ids, which id pads a
batch, and how generated ids become text as they arrive.
The bos/eos/pad ids come from the model's config.json. Two kinds of tokenizer.json are handled by the same code:
byte-level BPE (our bundled model) and Llama-style SentencePiece BPE with byte fallback (jetmoe-8b).

Notebook: notebooks/05_the_whole_model.ipynb.
"""

import os

import numpy as np
import tokenizers

from . import files
from ..config import JetMoeConfig

_REPLACEMENT_CHAR = "\ufffd"  # what a UTF-8 decoder writes for bytes that do not (yet) form a character


class TokenizerError(ValueError):
    """Bad or missing tokenizer files, or text/ids the tokenizer cannot take: the message names the culprit."""


class Tokenizer:
    """encode / encode_batch / decode / stream over a `tokenizers.Tokenizer`, with the model's special token ids."""

    def __init__(self, tokenizer, bos_token_id=None, eos_token_id=None, pad_token_id=None, add_bos_token=True):
        """tokenizer: tokenizers.Tokenizer; bos/pad: int or None; eos: int, list of ints (HF allows several stop
        tokens) or None; add_bos_token: bool, whether encode() starts with bos (LlamaTokenizerFast's default)."""
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)  # V
        eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        for name, token_id in [("bos_token_id", bos_token_id), ("pad_token_id", pad_token_id)] + [
                ("eos_token_id", i) for i in eos_ids]:
            if token_id is not None:
                self._check_in_vocab(name, token_id)
        if not isinstance(add_bos_token, bool):
            raise TokenizerError(f"add_bos_token must be true or false, got {add_bos_token!r}")
        self.bos_token_id, self.eos_token_id, self.add_bos_token = bos_token_id, eos_token_id, add_bos_token
        # With no pad id in the config, pad with eos, else 0: pads only fill the left of shorter rows in
        # encode_batch, where attention_mask is 0, so the model never reads them (HF's generate also falls back
        # to eos for padding). Any id in the vocab would do; these two always are.
        first_eos = eos_ids[0] if eos_ids else None
        self.pad_token_id = pad_token_id if pad_token_id is not None else first_eos if first_eos is not None else 0
        # A Llama-style BPE spells a character it has no token for as byte tokens <0x00>..<0xFF>. Its ByteFallback
        # decoder turns a run of byte tokens into text only if the whole run is valid UTF-8, and otherwise writes
        # one U+FFFD per byte: a character already decoded from the start of a run is taken back when the next
        # byte token starts an incomplete one. TextStream therefore waits for the end of every run.
        byte_ids = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        byte_fallback = getattr(tokenizer.model, "byte_fallback", False)
        self._byte_token_ids = frozenset(i for i in byte_ids if i is not None) if byte_fallback else frozenset()

    def _check_in_vocab(self, name, token_id):  # name: str, token_id: int; raises TokenizerError
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise TokenizerError(f"{name} must be an integer token id, got {token_id!r}")
        if not 0 <= token_id < self.vocab_size or self._tokenizer.id_to_token(int(token_id)) is None:
            raise TokenizerError(f"{name}={token_id} is not a token of the tokenizer (vocabulary of "
                                 f"{self.vocab_size} tokens, ids 0..{self.vocab_size - 1})")

    @classmethod
    def from_pretrained(cls, model_dir):
        """model_dir (str or path) with tokenizer.json and config.json, optionally tokenizer_config.json -> Tokenizer.

        bos/eos/pad ids are the model's: read through JetMoeConfig, so a key missing from config.json takes HF's
        JetMoeConfig default (bos 1, eos 2, pad None) exactly as the model's own config does.
        """
        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise TokenizerError(f"model directory {model_dir!r} does not exist")
        try:
            tokenizer_path, config_path, options_path = (files.inside(model_dir, name) for name in (
                "tokenizer.json", "config.json", "tokenizer_config.json"))
            if not files.present(tokenizer_path):
                raise TokenizerError(f"no tokenizer.json in {model_dir}: expected the HF tokenizer file "
                                     f"{tokenizer_path}")
            text = files.read_text(tokenizer_path, "tokenizer")
        except files.FileError as e:
            raise TokenizerError(str(e)) from None
        try:  # from the text already read: the file is opened once, through the guards
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception for every parse or schema error
            raise TokenizerError(f"{tokenizer_path} is not a valid tokenizer.json ({files.shown(str(e))})") from None
        try:
            config = JetMoeConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read the bos/eos/pad token ids from {config_path}: {e}") from None
        add_bos_token = _read_add_bos_token(options_path)
        try:
            return cls(tokenizer, config.bos_token_id, config.eos_token_id, config.pad_token_id, add_bos_token)
        except TokenizerError as e:
            raise TokenizerError(f"{config_path} does not fit {tokenizer_path}: {e}") from None

    def check_fits(self, vocab_size, source):
        """TokenizerError when this tokenizer has more tokens than a model's vocab_size (ids past the embedding)."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"{source} has {self.vocab_size} tokens but the model's vocab_size is {vocab_size}")

    def encode(self, text):  # str -> list[int], the token ids of text, led by bos when add_bos_token
        """Encode without the tokenizer.json post-processor (add_special_tokens=False), then prepend bos ourselves:
        LlamaTokenizerFast likewise rebuilds its post-processor from add_bos_token (update_post_processor), so the
        file's own "<s> $A" template never decides, and bos can never come twice.
        Special-token text in `text` (e.g. "</s>") still becomes that special token, as in HF by default."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}: {text!r:.80}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None:
            return [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts):  # B texts -> input_ids [B, T] int64, attention_mask [B, T] int64
        """Left padded with pad_token_id (mask 0 on pads), so every row's last token is real and batched
        generation appends each row's next token right after it. Row b's unpadded part equals encode(texts[b])."""
        if isinstance(texts, str):  # iterating a str would encode it one character per row
            raise TypeError(f"encode_batch() takes a list of str, got a single str {texts!r:.80}; use encode()")
        texts = list(texts)
        rows = [self.encode(text) for text in texts]
        if not rows:
            raise TokenizerError("encode_batch() got no texts: a batch needs at least one")
        for b, row in enumerate(rows):
            if not row:
                raise TokenizerError(f"text #{b} ({texts[b]!r}) encodes to no tokens (add_bos_token is False): every "
                                     "row of a batch needs at least one real token")
        T = max(len(row) for row in rows)
        input_ids = np.full((len(rows), T), self.pad_token_id, dtype=np.int64)  # [B, T]
        attention_mask = np.zeros((len(rows), T), dtype=np.int64)  # [B, T]
        for b, row in enumerate(rows):
            input_ids[b, T - len(row):] = row
            attention_mask[b, T - len(row):] = 1
        return input_ids, attention_mask

    def _token_ids(self, ids):  # list or [T] integer array -> list[int], each id checked against the vocab
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"token ids must be a list or 1-D array of integers, got shape {ids.shape} {ids.dtype}")
        outside = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if outside.size:  # tokenizers would silently drop them, hiding e.g. a model vocab larger than the tokenizer's
            raise TokenizerError(f"token id {int(ids[outside[0]])} at position {int(outside[0])} is not in the "
                                 f"vocabulary (ids 0..{self.vocab_size - 1})")
        return [int(i) for i in ids]

    def decode(self, ids, skip_special_tokens=True):  # ids: list or [T] int array -> str
        """The tokenizer.json decoder's text, unchanged: no clean_up_tokenization_spaces, whose default is False in
        LlamaTokenizerFast. A Llama-style decoder strips the text's first space (Strip(" ", 1, 0)), so decoding the
        ids of a continuation alone loses the space before its first word: stream(prompt_ids) keeps it."""
        return self._tokenizer.decode(self._token_ids(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, prompt_ids=()):  # prompt_ids: list or [T] int array -> TextStream
        """A TextStream for the ids that continue prompt_ids (whose own text it never returns); see TextStream."""
        return TextStream(self, prompt_ids)


class TextStream:
    """Incremental detokenization for streaming generation: push ids one by one, print what comes back.

    Each push decodes every id so far (special tokens skipped) and returns the text beyond what was already
    returned, so "".join(pushes) + flush() == tokenizer.decode(all ids). Text is held back while it may still
    change: while the decoded text ends in U+FFFD (a byte-level BPE character spans several tokens, and its first
    bytes alone decode to U+FFFD), and while a Llama-style run of byte tokens is open (see Tokenizer.__init__).
    With prompt_ids, the decoder sees prompt and continuation together and pushes return only the continuation's
    text: decode(prompt_ids) + pushes + flush() == decode(prompt_ids + pushed ids). Decoding the continuation
    alone would lose the space before its first word to a Llama-style decoder's Strip(" ", 1, 0).
    """

    def __init__(self, tokenizer, prompt_ids=()):  # tokenizer: Tokenizer; prompt_ids: list or [T] int array
        self._tokenizer = tokenizer
        self._ids = tokenizer._token_ids(prompt_ids)
        self._returned = len(tokenizer.decode(self._ids))  # characters of the decoded text already returned

    def push(self, token_id):  # int -> str, the newly printable text ('' while held back)
        (token_id,) = self._tokenizer._token_ids([token_id])
        self._ids.append(token_id)
        if token_id in self._tokenizer._byte_token_ids:
            return ""
        text = self._tokenizer.decode(self._ids)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._take(text)

    def flush(self):  # -> str, the held-back text (an unfinished character comes out as U+FFFD, as in decode)
        return self._take(self._tokenizer.decode(self._ids))

    def _take(self, text):  # text: decode of all ids so far -> str, its part not yet returned
        new = text[self._returned:]
        self._returned = len(text)
        return new


def _read_add_bos_token(path):  # path of an optional tokenizer_config.json -> bool
    """HF's "add_bos_token" key; True when the file or the key is absent, LlamaTokenizerFast's default."""
    if not files.present(path):
        return True
    try:
        values = files.read_json_object(path, "tokenizer_config")
    except files.FileError as e:  # not JSON, too large, not a regular file
        raise TokenizerError(str(e)) from None
    add_bos_token = values.get("add_bos_token", True)
    if not isinstance(add_bos_token, bool):
        raise TokenizerError(f"{path}: add_bos_token must be true or false, got {files.shown(add_bos_token)}")
    return add_bos_token
