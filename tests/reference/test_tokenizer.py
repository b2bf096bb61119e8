"""reference/io/tokenizer.py on the two kinds of tokenizer.json JetMoE meets, both built here with `tokenizers`:
a byte-level BPE (like our bundled model's) and a Llama-style SentencePiece BPE with byte fallback (like
jetmoe-8b's); and on the bundled weights/jetmoe-tiny-shakespeare tokenizer."""

import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from reference.config import JetMoeConfig
from reference.io.tokenizer import Tokenizer, TokenizerError

from paths import TINY_MODEL as BUNDLED_DIR

# Training text is plain ASCII on purpose: every non-ASCII character below has no token of its own, so it is
# spelled with several byte tokens and exercises UTF-8 reassembly in decode and in TextStream.
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.",
    "Once upon a time there was a small model that wanted to read. It read (slowly) every line, "
    "counted the words - one, two, three - and asked: \"What comes next?\"",
]
TEXTS = [
    "Hello world",
    "The quick brown fox.\nJumps! Over: the (lazy) dog?",
    "  two leading spaces, one trailing ",
    "line\n\n\nbreaks\tand a tab",
    "naïve café — ½ 日本",
    "a 𝄞 clef, four bytes",
    "",
]
SPLIT_CHAR_TEXT = "a 𝄞 b 日本"  # 4- and 3-byte characters, each split over several byte tokens
KINDS = ["byte_level", "llama_style", "bundled"]


def save_model_dir(path, tokenizer, **token_ids):  # path, tokenizers.Tokenizer, bos/eos/pad ids -> path
    os.makedirs(path)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    JetMoeConfig(vocab_size=tokenizer.get_vocab_size(), **token_ids).save_pretrained(path)
    return path


def build_byte_level(path):
    """As jetmoe/corpus.py builds ours: specials <s>, </s>, <pad> = 0, 1, 2; the template adds <s>."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PARAGRAPHS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return save_model_dir(path, tok, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def build_llama_style(path):
    """Laid out like jetmoe-8b's tokenizer.json: <unk> <s> </s> = 0 1 2, then the byte tokens <0x00>..<0xFF>
    (plain vocabulary entries, as SentencePiece's BYTE pieces), then the learned pieces; no pre-tokenizer, no pad."""
    trained = HFTokenizer(models.BPE(unk_token="<unk>"))
    # Trained word by word like SentencePiece, so a piece never spans words and ▁ only ever starts one.
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained.train_from_iterator(PARAGRAPHS, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]) if p not in specials]
    vocab = dict(specials, **{f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({piece: 259 + i for i, piece in enumerate(pieces)})
    tok = HFTokenizer(models.BPE(vocab, [tuple(merge) for merge in learned["merges"]], unk_token="<unk>",
                                 fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens(list(specials))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return save_model_dir(path, tok, bos_token_id=1, eos_token_id=2, pad_token_id=None)


@pytest.fixture(scope="module")
def built_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"byte_level": build_byte_level(root / "byte_level"), "llama_style": build_llama_style(root / "llama_style")}


@pytest.fixture(params=KINDS)
def model_dir(request, built_dirs):
    if request.param == "bundled":
        return BUNDLED_DIR  # committed; a missing file fails the test (Tokenizer.from_pretrained names it)
    return built_dirs[request.param]


@pytest.fixture
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


def copy_dir(src, dst):  # a model directory to break or change without touching the shared one
    shutil.copytree(src, dst)
    return dst


def test_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, (text, ids)
        assert tok.decode(np.asarray(ids, dtype=np.int64)) == text  # a 1-D int array works like a list


def test_bos_prepended_exactly_once(tok, model_dir):
    text = "Hello world"
    ids = tok.encode(text)
    assert tok.add_bos_token and tok.bos_token_id is not None
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    file_tokenizer = HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    assert ids[1:] == file_tokenizer.encode(text, add_special_tokens=False).ids
    # The file's own "<s> $A" template gives the same ids: our bos and its bos are one and the same, never both.
    assert ids == file_tokenizer.encode(text).ids
    assert tok.encode("") == [tok.bos_token_id]
    without = Tokenizer(file_tokenizer, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, add_bos_token=False)
    assert without.encode(text) == ids[1:]


@pytest.mark.parametrize("kind", ["byte_level", "llama_style"])
def test_add_bos_token_from_tokenizer_config(kind, built_dirs, tmp_path):
    path = copy_dir(built_dirs[kind], tmp_path / kind)
    with_bos = Tokenizer.from_pretrained(path).encode("to be")
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"add_bos_token": False, "tokenizer_class": "LlamaTokenizer"}, f)
    tok = Tokenizer.from_pretrained(path)
    assert tok.add_bos_token is False
    assert tok.encode("to be") == with_bos[1:] and tok.bos_token_id not in tok.encode("to be")
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer"}, f)  # key absent: LlamaTokenizerFast's default, True
    assert Tokenizer.from_pretrained(path).encode("to be") == with_bos


def test_special_ids_and_pad_fallback(built_dirs, tmp_path):
    byte_level = Tokenizer.from_pretrained(built_dirs["byte_level"])
    assert (byte_level.bos_token_id, byte_level.eos_token_id, byte_level.pad_token_id) == (0, 1, 2)
    assert byte_level.vocab_size == 400
    llama = Tokenizer.from_pretrained(built_dirs["llama_style"])  # config.json has no pad: eos pads
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 2)
    path = copy_dir(built_dirs["llama_style"], tmp_path / "no_eos")
    JetMoeConfig(vocab_size=llama.vocab_size, bos_token_id=1, eos_token_id=None).save_pretrained(path)
    assert Tokenizer.from_pretrained(path).pad_token_id == 0
    JetMoeConfig(vocab_size=llama.vocab_size, bos_token_id=1, eos_token_id=[2, 5]).save_pretrained(path)
    several = Tokenizer.from_pretrained(path)  # HF allows a list of stop tokens; the first one pads
    assert several.eos_token_id == [2, 5] and several.pad_token_id == 2


def test_encode_batch_left_pads(tok):
    texts = ["Hi", "The quick brown fox jumps over the lazy dog.", "", "naïve café"]
    input_ids, attention_mask = tok.encode_batch(texts)
    rows = [tok.encode(text) for text in texts]
    T = max(len(row) for row in rows)
    assert input_ids.shape == attention_mask.shape == (len(texts), T)
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert attention_mask[:, -1].all()  # every row ends with a real token, as batched generation needs
    for b, row in enumerate(rows):
        pads = T - len(row)
        assert attention_mask[b].tolist() == [0] * pads + [1] * len(row)
        assert input_ids[b, pads:].tolist() == row
        assert (input_ids[b, :pads] == tok.pad_token_id).all()
    assert tok.encode_batch(("x",))[0].tolist() == [tok.encode("x")]


def test_stream_joins_to_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text) + [tok.eos_token_id]  # special tokens are skipped, as in decode
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids) == text, (text, pieces)


def test_stream_holds_back_a_split_character(tok):
    ids = tok.encode(SPLIT_CHAR_TEXT)
    stream = tok.stream()
    pieces = [stream.push(np.int64(i)) for i in ids]  # generation hands numpy ints
    mid_character = [k for k in range(len(ids)) if tok.decode(ids[:k + 1]).endswith("\ufffd")]
    assert mid_character, "no token of the test text ends mid-character: the hold-back is not exercised"
    assert all(pieces[k] == "" for k in mid_character), pieces
    assert not any("\ufffd" in piece for piece in pieces), pieces  # never a half character on screen
    assert "".join(pieces) + stream.flush() == SPLIT_CHAR_TEXT


def test_stream_ending_mid_character_flushes_what_decode_gives(tok):
    ids = tok.encode(SPLIT_CHAR_TEXT)[:-1]  # generation stopped inside 本
    stream = tok.stream()
    pushed = "".join(stream.push(i) for i in ids)
    held = stream.flush()
    assert held.endswith("\ufffd") and pushed + held == tok.decode(ids)
    assert stream.flush() == ""  # flushed text is returned once


def test_stream_byte_fallback_run_is_held_until_it_ends(built_dirs):
    """ByteFallback decodes a byte run only when all of it is valid UTF-8: 日 complete, then one byte of 本,
    decodes as four U+FFFD. Returning 日 as soon as it completes would print text that decode() takes back."""
    tok = Tokenizer.from_pretrained(built_dirs["llama_style"])
    byte_ids = tok.encode("日本")[2:]  # after <s> and the ▁ the normalizer prepends
    assert [tok._tokenizer.id_to_token(i) for i in byte_ids] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>",
                                                                  "<0xAC>"]
    a = tok._tokenizer.token_to_id("a")  # "a" without ▁: a plain, non-byte token right after the broken run
    ids = tok.encode("x") + byte_ids[:4] + [a]
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert tok.decode(ids) == "x\ufffd\ufffd\ufffd\ufffda"
    assert "".join(pieces) + stream.flush() == tok.decode(ids), pieces


def test_stream_continuation_of_a_prompt(tok):
    ids = tok.encode("Once upon a time there was a fox")
    for k in range(1, len(ids)):
        stream = tok.stream(ids[:k])
        continuation = "".join(stream.push(i) for i in ids[k:]) + stream.flush()
        assert tok.decode(ids[:k]) + continuation == tok.decode(ids), k


def test_llama_style_strips_the_first_space_of_decoded_text(built_dirs):
    # Why stream() takes the prompt: decoding a continuation alone drops the space before its first word.
    tok = Tokenizer.from_pretrained(built_dirs["llama_style"])
    ids = tok.encode("Once upon a time")
    pieces = [tok._tokenizer.id_to_token(i) for i in ids]
    k = next(k for k in range(2, len(pieces)) if pieces[k].startswith("▁"))  # the ▁ before "upon"
    assert tok.decode(ids[:k]) == "Once" and tok.decode(ids[k:]) == "upon a time"
    stream = tok.stream(ids[:k])
    assert "".join(stream.push(i) for i in ids[k:]) + stream.flush() == " upon a time"


def test_special_token_text_becomes_the_special_token(tok):
    # As HF's default (split_special_tokens=False): "</s>" typed in the text is the eos token, not its characters.
    assert tok.eos_token_id in tok.encode("the end</s>")


def test_errors_name_the_missing_or_corrupt_file(built_dirs, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match=r"model directory .*nowhere.* does not exist"):
        Tokenizer.from_pretrained(missing)
    no_tokenizer = copy_dir(built_dirs["byte_level"], tmp_path / "no_tokenizer")
    os.remove(no_tokenizer / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json in .*no_tokenizer"):
        Tokenizer.from_pretrained(no_tokenizer)
    corrupt = copy_dir(built_dirs["byte_level"], tmp_path / "corrupt")
    with open(corrupt / "tokenizer.json", "w") as f:
        f.write('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"corrupt.tokenizer\.json is not a valid tokenizer\.json"):
        Tokenizer.from_pretrained(corrupt)
    no_config = copy_dir(built_dirs["byte_level"], tmp_path / "no_config")
    os.remove(no_config / "config.json")
    with pytest.raises(TokenizerError, match=r"cannot read the bos/eos/pad token ids from .*no_config.config\.json"):
        Tokenizer.from_pretrained(no_config)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_a_link_out_of_the_directory_is_refused(built_dirs, tmp_path, name):
    path = copy_dir(built_dirs["byte_level"], tmp_path / "model")
    outside = tmp_path / f"outside-{name}"
    if (path / name).exists():
        os.replace(path / name, outside)  # a valid file, but outside: only the path check refuses it
    else:
        outside.write_text('{"add_bos_token": true}')
    os.symlink(outside, path / name)
    with pytest.raises(TokenizerError, match="leads outside the model directory"):
        Tokenizer.from_pretrained(path)


def test_errors_name_the_bad_setting(built_dirs, tmp_path):
    path = copy_dir(built_dirs["llama_style"], tmp_path / "bad_ids")
    vocab_size = Tokenizer.from_pretrained(path).vocab_size
    for key, value in [("bos_token_id", 100_000), ("eos_token_id", vocab_size)]:
        JetMoeConfig(vocab_size=200_000, **{key: value}).save_pretrained(path)
        with pytest.raises(TokenizerError, match=rf"config\.json does not fit .*tokenizer\.json: {key}={value} "
                                                 rf"is not a token of the tokenizer \(vocabulary of {vocab_size}"):
            Tokenizer.from_pretrained(path)
    JetMoeConfig(vocab_size=vocab_size).save_pretrained(path)
    for content, message in [('{"add_bos_token": "yes"}', r"add_bos_token must be true or false, got 'yes'"),
                             ('{"add_bos_token": ', r"tokenizer_config\.json is not valid JSON")]:
        with open(path / "tokenizer_config.json", "w") as f:
            f.write(content)
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_pretrained(path)
    file_tokenizer = HFTokenizer.from_file(str(path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"bos_token_id must be an integer token id, got True"):
        Tokenizer(file_tokenizer, bos_token_id=True)


def test_errors_name_the_bad_text_or_id(built_dirs):
    tok = Tokenizer.from_pretrained(built_dirs["byte_level"])
    with pytest.raises(TypeError, match=r"encode\(\) takes a str, got bytes"):
        tok.encode(b"bytes are not text")
    with pytest.raises(TypeError, match=r"encode\(\) takes a str, got NoneType"):
        tok.encode_batch(["fine", None])
    with pytest.raises(TypeError, match=r"takes a list of str, got a single str 'one text'"):
        tok.encode_batch("one text")
    with pytest.raises(TokenizerError, match=r"got no texts"):
        tok.encode_batch([])
    no_bos = Tokenizer(tok._tokenizer, 0, 1, 2, add_bos_token=False)
    with pytest.raises(TokenizerError, match=r"text #1 \(''\) encodes to no tokens"):
        no_bos.encode_batch(["fine", ""])
    with pytest.raises(TokenizerError, match=rf"token id {tok.vocab_size} at position 1 is not in the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TypeError, match=r"1-D array of integers, got shape \(1, 2\)"):
        tok.decode(np.array([[5, 6]]))
    with pytest.raises(TokenizerError, match=r"token id -1 at position 0"):
        tok.stream().push(-1)
