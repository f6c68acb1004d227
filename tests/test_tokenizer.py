"""Tokenizers: CLIP ids against golden values and an independent pure-Python CLIP BPE; byte tokenizer."""

import gzip
import html
import random
import re

import ftfy
import numpy as np
import pytest
import regex

from clipjax.data import tokenizer as tok_lib
from clipjax.data.tokenizer import get_tokenizer


# --------------------------------------------------------------------------- reference
class ReferenceClipBPE:
    """CLIP's original algorithm, written out plainly: clean, regex split, byte map, greedy merges."""

    SPECIALS = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, path: str):
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:48895]]
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable}
        self.byte_char.update({b: chr(256 + k) for k, b in enumerate(others)})
        symbols = [self.byte_char[b] for b in printable + others]
        symbols += [s + "</w>" for s in symbols]
        symbols += [a + b for a, b in merges]
        symbols += list(self.SPECIALS)
        self.ids = {s: i for i, s in enumerate(symbols)}
        self.rank = {m: r for r, m in enumerate(merges)}
        self.split = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def merge(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):  # replace every occurrence, scanning left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self.split.findall(self.clean(text)):
            if piece in self.SPECIALS:
                out.append(self.ids[piece])
                continue
            mapped = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            out.extend(self.ids[p] for p in self.merge(mapped))
        return out

    def tokenize(self, texts, context_length: int = 77) -> np.ndarray:
        out = np.zeros((len(texts), context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [49406] + self.encode(t) + [49407]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = 49407
            out[i, : len(ids)] = ids
        return out


CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "",
    "   ",
    "Hello, world! How's it going? I'm fine; you're great, they've left, we'll see, he'd go, it's 'quoted'",
    "DON'T SHOUT'S 'RE 'VE",
    "numbers 1234567890 3.14159 -42 1,000,000 2nd 21st 1e-9",
    "café naïve résumé Zürich São Paulo Ångström façade",
    "東京タワーの夜景 北京 서울의 밤 ภาษาไทย русский текст العربية हिन्दी",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &amp;amp;quot; &#39;x&#39; &eacute;",
    "excess   \t whitespace \n\n and\r\nnewlines\u00a0nbsp\u2003em",
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "curly “quotes” and ‘single’ — dash … ellipsis ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "punct!!! ??? ... --- ((()))[]{} @#$%^&*_+=~`|\\/<> ' \" ;:",
    "http://example.com/path?q=1&b=2 user@mail.org #hashtag @mention",
    "special <|endoftext|> inside and <|startoftext|>x and !!<|endoftext|> and <|ENDOFTEXT|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa supercalifragilisticexpialidocious",
    "Combining: e\u0301 a\u0308 \u0345 'ſ 'K ß ǅ İstanbul",
    "control\x00chars\x07 and\x1b[31m ansi \x1f unit sep",
    "word " * 100,  # over-long: truncated, last token forced to end-of-text
    "x" * 2000,
    "supercalifragilistic " * 400,  # long enough for the exact cut of long text
    "\u0345" * 5000 + " a b c",  # characters CLIP drops: the cut must not lose tokens
]


@pytest.fixture(scope="module")
def ref(bpe_path):
    return ReferenceClipBPE(bpe_path)


@pytest.fixture(scope="module")
def clip(bpe_path):
    return get_tokenizer("clip", context_length=77, bpe_path=bpe_path)


# --------------------------------------------------------------------------- clip
def test_golden_ids(clip):
    ids = clip(["a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not ids[0, 7:].any()
    assert (clip.vocab_size, clip.context_length, clip.pad_id, clip.sot_id, clip.eot_id) == (49408, 77, 0, 49406, 49407)
    assert clip.decode(ids[0]) == "a photo of a cat"


@pytest.mark.parametrize("i", range(len(CAPTIONS)))
def test_parity_with_reference(clip, ref, i):
    np.testing.assert_array_equal(clip([CAPTIONS[i]]), ref.tokenize([CAPTIONS[i]]))


def test_batch_equals_single_and_truncation(clip, ref):
    got = clip(CAPTIONS)
    np.testing.assert_array_equal(got, ref.tokenize(CAPTIONS))
    long = got[CAPTIONS.index("word " * 100)]
    assert long[-1] == 49407 and (long == 49407).sum() == 1 and long[0] == 49406
    short = clip(["word " * 100], )
    np.testing.assert_array_equal(short[0], long)
    # one end token per row, except where the caption spells "<|endoftext|>" itself (as in CLIP)
    plain = np.array(["<|" not in c for c in CAPTIONS])
    assert ((got[plain] == 49407).sum(axis=1) == 1).all()


def test_context_length_and_special_in_text(bpe_path, ref):
    tok = get_tokenizer("clip", context_length=8, bpe_path=bpe_path)
    texts = ["a photo of a very very very large cat", "cat", "a <|endoftext|> b"]
    np.testing.assert_array_equal(tok(texts), ref.tokenize(texts, context_length=8))
    assert tok(["a <|endoftext|> b"])[0, :5].tolist() == [49406, 320, 49407, 321, 49407]


def test_random_unicode_parity(clip, ref):
    """Random mixes over many scripts and symbol blocks (seeded), including rare code points."""
    rng = random.Random(0)
    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x530), (0x530, 0x590), (0x600, 0x700),
              (0x900, 0x980), (0xE00, 0xE80), (0x1E00, 0x2000), (0x2000, 0x2BFF), (0x3040, 0x3100),
              (0x4E00, 0x4F00), (0xA700, 0xA800), (0xAC00, 0xAD00), (0xFB00, 0xFB50), (0xFF00, 0xFFEF),
              (0x10780, 0x10800), (0x10940, 0x10960), (0x1F300, 0x1FAFF)]
    texts = []
    for _ in range(300):
        n = rng.randint(1, 30)
        chars = []
        for _ in range(n):
            lo, hi = rng.choice(blocks)
            chars.append(chr(rng.randrange(lo, hi)))
            if rng.random() < 0.2:
                chars.append(rng.choice([" ", "'", "'s", "&amp;", "1", "A"]))
        texts.append("".join(chars))
    np.testing.assert_array_equal(clip(texts), ref.tokenize(texts))


def test_ascii_fast_cleaning_matches_ftfy():
    """clean_text skips ftfy for printable ASCII without '&'; that must not change anything."""
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(2000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert tok_lib.clean_text(t) == ReferenceClipBPE.clean(t)


def test_pickle_round_trip(clip):
    import pickle

    again = pickle.loads(pickle.dumps(clip))
    np.testing.assert_array_equal(again(CAPTIONS[:5]), clip(CAPTIONS[:5]))


def test_missing_vocab_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="make bpe"):
        get_tokenizer("clip", context_length=77, bpe_path=str(tmp_path / "missing.txt.gz"))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece", context_length=16)


# --------------------------------------------------------------------------- bytes
def test_bytes_round_trip():
    tok = get_tokenizer("bytes", context_length=64)
    texts = ["hello world", "héllo wörld 東京 😀", "", "  spaces  kept "]
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (4, 64) and tok.vocab_size == 259
    assert (ids[:, 0] == tok.sot_id).all() and ((ids == tok.eot_id).sum(axis=1) == 1).all()
    assert ids.max() < tok.vocab_size
    assert [tok.decode(r) for r in ids] == texts
    assert ids[0, 1:3].tolist() == [ord("h") + 3, ord("e") + 3]
    assert ids[2, :3].tolist() == [tok.sot_id, tok.eot_id, tok.pad_id]


def test_bytes_truncation():
    tok = get_tokenizer("bytes", context_length=8)
    ids = tok(["abcdefghijkl", "abcdef", "abcde"])
    assert ids[0].tolist() == [1] + [b + 3 for b in b"abcdef"] + [2]
    assert ids[1].tolist() == [1] + [b + 3 for b in b"abcdef"] + [2]
    assert ids[2].tolist() == [1] + [b + 3 for b in b"abcde"] + [2, 0]
