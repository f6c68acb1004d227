"""Text tokenizers: CLIP's byte-level BPE (fast, via HuggingFace ``tokenizers``) and raw UTF-8 bytes.

Both turn a batch of strings into ``int32 [N, context_length]``::

    [start] tokens... [end] 0 0 ...

Text longer than ``context_length`` is cut and its last position is forced to
the end token, so every row ends with an end token. (As in CLIP, a caption that
spells ``<|endoftext|>`` itself gets that id there too.)

``clip`` reproduces OpenAI CLIP's ids exactly: same text cleaning (ftfy, HTML
unescape twice, whitespace collapse, lowercase), same regex split, byte map and
merge ranks. The regex split runs in Rust unless the text holds a character on
which Rust's regex engine and CLIP's Python ``regex`` disagree (found by probing
each new character once, see ``ClipTokenizer._agrees``) or a literal
``<|startoftext|>``/``<|endoftext|>``; such text is split in Python, then BPE'd
in Rust, so ids stay identical.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from typing import Sequence

import numpy as np

__all__ = ["Tokenizer", "ClipTokenizer", "ByteTokenizer", "get_tokenizer", "default_bpe_path", "bytes_to_unicode"]


# CLIP's pre-tokenisation regex (applied to lowercased, cleaned text, case-insensitively).
# The special-token alternatives are kept out: they are handled by ``_encode_slow``.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: vocab 49408 = 2*256 bytes + merges + 2 specials
_WS = re.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def _py_split():
    """CLIP's own split regex (Python ``regex``), special tokens first, case-insensitive."""
    import regex

    return regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _CLIP_SPLIT, regex.IGNORECASE)


class Tokenizer:
    """Batch tokenizer interface: ``tok(texts) -> int32 [N, context_length]``, padded with ``pad_id``."""

    vocab_size: int
    context_length: int
    pad_id: int
    sot_id: int
    eot_id: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids; start/end/pad tokens are dropped."""
        raise NotImplementedError

    def _pack(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """``[sot] row [eot]`` per row, cut to context_length (last kept = eot), padded with pad_id."""
        n, length = len(rows), self.context_length
        out = np.full((n, length), self.pad_id, dtype=np.int32)
        out[:, 0] = self.sot_id
        body = length - 2
        for i, row in enumerate(rows):
            k = min(len(row), body)
            out[i, 1 : 1 + k] = row[:k]
            out[i, 1 + k] = self.eot_id
        return out


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of GPT-2/CLIP byte-level BPE.

    Iteration order matters: it is the id order of CLIP's first 256 tokens (printable bytes
    first, mapped to themselves, then the rest in byte order, mapped to chr(256 + k)).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    for k, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + k)
    return chars


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescape twice, whitespace collapsed, stripped, lowercased."""
    # ftfy is the slow step; it provably leaves printable ASCII without '&' unchanged, so skip it there.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy  # imported lazily: only needed for non-trivial text

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    text = text.strip()
    return _WS.sub(" ", text).strip().lower()


def default_bpe_path() -> str:
    """``$CLIPJAX_BPE_PATH``, else ``<repo>/.cache/bpe_simple_vocab_16e6.txt.gz`` (fetched by ``make bpe``)."""
    env = os.environ.get("CLIPJAX_BPE_PATH")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, ".cache", "bpe_simple_vocab_16e6.txt.gz")


def read_bpe(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's vocabulary (49408 strings, id order) and merges (rank order) from the gzipped merges file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found at {path!r}; run `make bpe` or set CLIPJAX_BPE_PATH / data.bpe_path"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]  # line 0 is a version header
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path!r} is not a CLIP BPE merges file")
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [_SOT, _EOT]
    return vocab, merges  # type: ignore[return-value]


class ClipTokenizer(Tokenizer):
    """OpenAI CLIP's tokenizer (ids identical), built on ``tokenizers`` and run with ``encode_batch``."""

    # Of CLIP's own merges file; an instance reads its file's (the class values are for config validation).
    vocab_size = 2 * 256 + _NUM_MERGES + 2
    pad_id, sot_id, eot_id = 0, vocab_size - 2, vocab_size - 1

    def __init__(self, bpe_path: str | None = None, context_length: int = 77):
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.bpe_path = bpe_path or default_bpe_path()
        vocab, merges = read_bpe(self.bpe_path)
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.context_length = int(context_length)
        self.sot_id, self.eot_id = vocab.index(_SOT), vocab.index(_EOT)
        model = models.BPE(
            vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
            ignore_merges=False,  # CLIP always runs the merge loop, even for in-vocab words
        )
        # No normaliser: cleaning is done in Python (ftfy has no Rust equivalent).
        self._tk = HFTokenizer(model)  # fast path: regex split in Rust (Oniguruma)
        self._tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex("(?i)" + _CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._tk_words = HFTokenizer(model)  # slow path: words already split in Python
        self._tk_words.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._rust_split = pre_tokenizers.Split(Regex("(?i)" + _CLIP_SPLIT), behavior="removed", invert=True)
        self._py_split = _py_split()
        self._char_ok: dict[str, bool] = {}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # Bound for cutting long text: no token covers more bytes than the longest vocab entry.
        self._max_token_bytes = max(len(t.replace("</w>", "")) for t in vocab[:-2])

    def __getstate__(self):  # rebuilt in each worker rather than pickling the Rust object
        return {"bpe_path": self.bpe_path, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(**state)

    def _cut(self, text: str) -> str:
        """Drops a tail of cleaned text that cannot reach the first context_length tokens (exact: cuts at a space)."""
        # Every token covers <= max_token_bytes bytes and spaces are single, so a prefix with this
        # many characters already holds more than context_length tokens; pieces never span a space.
        limit = 2 * self.context_length * self._max_token_bytes + 2
        if len(text) <= limit:
            return text
        space = text.find(" ", limit)
        return text if space < 0 else text[:space]

    def _agrees(self, c: str) -> bool:
        """Whether Rust's split treats character ``c`` like CLIP's ``regex`` split does (cached).

        They differ for a few code points: Unicode version gaps (letters newer than
        Oniguruma's tables) and case-folding quirks (CLIP's case-insensitive classes drop
        U+0345, and fold e.g. U+017F into ``'s``). Probes cover every regex branch.
        """
        ok = self._char_ok.get(c)
        if ok is None:
            probes = (c, f"'{c}", f"'{c}x", f"'r{c}", f"'v{c}", f"'l{c}", f"a{c}a", f"1{c}1", f"!{c}!", f" {c} ", f"{c}{c}")
            ok = all(self._py_split.findall(p) == [w for w, _ in self._rust_split.pre_tokenize_str(p)] for p in probes)
            self._char_ok[c] = ok
        return ok

    def _fast_ok(self, text: str) -> bool:
        if "<|" in text:  # maybe a literal special token: CLIP matches those in its regex
            return False
        chars = set(text)
        known = self._char_ok
        return all(known[c] if c in known else self._agrees(c) for c in chars)

    def _encode_slow(self, texts: Sequence[str]) -> list[list[int]]:
        """CLIP's exact algorithm: its regex (in Python, with the special tokens), then BPE per word."""
        specials = {_SOT: self.sot_id, _EOT: self.eot_id}
        out = []
        for text in texts:
            ids: list[int] = []
            words: list[str] = []
            for piece in self._py_split.findall(text) + [_EOT]:  # sentinel flushes the last words
                if piece in specials:
                    if words:
                        ids.extend(self._tk_words.encode(words, is_pretokenized=True, add_special_tokens=False).ids)
                        words = []
                    ids.append(specials[piece])
                else:
                    words.append(piece)
            out.append(ids[:-1])
        return out

    def _encode_cleaned(self, cleaned: Sequence[str]) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in cleaned]
        fast = [i for i, t in enumerate(cleaned) if self._fast_ok(t)]
        slow = sorted(set(range(len(cleaned))) - set(fast))
        if fast:
            for i, enc in zip(fast, self._tk.encode_batch([cleaned[i] for i in fast], add_special_tokens=False)):
                rows[i] = enc.ids
        for i, ids in zip(slow, self._encode_slow([cleaned[i] for i in slow])):
            rows[i] = ids
        return rows

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        return self._encode_cleaned([clean_text(text)])[0]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a sequence of strings, not a single string")
        full = [clean_text(t) for t in texts]
        cut = [self._cut(t) for t in full]
        rows = self._encode_cleaned(cut)
        # A cut text can only come up short if many characters yield no token at all (CLIP drops
        # U+0345, say): then tokenize the whole text, so the result stays exact.
        redo = [i for i, r in enumerate(rows) if len(r) < self.context_length - 2 and len(cut[i]) < len(full[i])]
        for i, r in zip(redo, self._encode_cleaned([full[i] for i in redo])):
            rows[i] = r
        return self._pack(rows)

    def decode(self, ids: Sequence[int]) -> str:
        # Stop at the end token: what follows is padding (pad id 0 is also the id of "!").
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i != self.sot_id:
                out.append(self.vocab[i])
        data = bytearray()
        for piece in out:
            word = piece.endswith("</w>")
            data.extend(self._byte_decoder[c] for c in (piece[:-4] if word else piece))
            if word:
                data.append(ord(" "))
        return data.decode("utf-8", errors="replace").strip()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids: pad 0, start 1, end 2, byte b -> b + 3 (vocab 259). Any language, no files."""

    pad_id, sot_id, eot_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + 3

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.context_length = int(context_length)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a sequence of strings, not a single string")
        body = self.context_length - 2
        rows = []
        for t in texts:
            b = t.encode("utf-8", errors="replace")[:body]  # bytes beyond the window are never used
            rows.append(np.frombuffer(b, dtype=np.uint8).astype(np.int32) + self.offset)
        return self._pack(rows)

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i >= self.offset:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")


TOKENIZERS: dict[str, type[Tokenizer]] = {"clip": ClipTokenizer, "bytes": ByteTokenizer}
KINDS = tuple(TOKENIZERS)


def get_tokenizer(kind: str, *, context_length: int, bpe_path: str | None = None) -> Tokenizer:
    """``"clip"`` (OpenAI CLIP BPE, vocab 49408; ``bpe_path`` defaults to ``default_bpe_path()``) or ``"bytes"`` (vocab 259)."""
    if kind == "clip":
        return ClipTokenizer(bpe_path=bpe_path, context_length=context_length)
    if kind == "bytes":
        return ByteTokenizer(context_length=context_length)
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {KINDS}")
