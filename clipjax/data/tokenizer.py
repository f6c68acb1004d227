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
import string
from typing import Sequence

import numpy as np

__all__ = ["Tokenizer", "ClipTokenizer", "ByteTokenizer", "SentencePieceTokenizer", "HFTokenizer", "get_tokenizer", "default_bpe_path", "bytes_to_unicode"]


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


_SPECIALS = re.compile(r"\s*(</s>|<unk>)\s*")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (SigLIP's English 32k and multilingual 250k vocabularies) as
    transformers' ``SiglipTokenizer`` applies it: lower-cased, ASCII punctuation removed, whitespace
    collapsed, ``[tokens] </s>`` cut to ``context_length`` (the end token kept) and padded with ``</s>``.
    """

    def __init__(self, path: str, context_length: int = 64, do_lower_case: bool = True):
        import sentencepiece

        self.path, self.context_length, self.do_lower_case = path, context_length, do_lower_case
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eot_id = self.pad_id = self._sp.piece_to_id("</s>")
        self.sot_id = -1  # SigLIP's texts have no start token
        # Encoding "<unk>" + text, then dropping the pieces of "<unk>", makes the text's first word a word
        # start whatever it begins with (transformers' SiglipTokenizer does the same).
        self._unk_pieces = len(self._sp.encode("<unk>"))
        self._drop = str.maketrans("", "", string.punctuation)

    def __getstate__(self):  # the SentencePiece processor is rebuilt in each worker
        return (self.path, self.context_length, self.do_lower_case)

    def __setstate__(self, state):
        self.__init__(*state)

    def _encode_chunk(self, text: str) -> list[int]:
        text = re.sub(r"\s+", " ", (text.lower() if self.do_lower_case else text).translate(self._drop)).strip()
        ids = self._sp.encode("<unk>" + text)
        return ids[self._unk_pieces:] if len(ids) >= self._unk_pieces else ids

    def encode(self, text: str) -> list[int]:
        # Literal special tokens (whitespace around them dropped) are their ids, as in transformers.
        parts = _SPECIALS.split("\u2581" + text.replace("\u2581", " "))
        ids: list[int] = []
        for n, part in enumerate(parts):
            ids += [self._sp.piece_to_id(part)] if n % 2 else self._encode_chunk(part)
        if len(parts) > 1 and len(ids) > 1 and ids[0] == self._sp.piece_to_id("\u2581") and \
                self._sp.id_to_piece(ids[1]) in ("</s>", "<unk>"):
            ids = ids[1:]  # the word-start mark before a leading special token
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        for i, text in enumerate(texts):
            row = self.encode(text)[: self.context_length - 1] + [self.eot_id]
            out[i, : len(row)] = row
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.eot_id])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (SigLIP 2's Gemma 256k, any other) through the ``tokenizers`` package,
    with its ``tokenizer_config.json``'s padding side, special tokens and lower-casing: ids equal
    ``AutoTokenizer(...)(texts, padding="max_length", truncation=True, max_length=context_length)``."""

    def __init__(self, path: str, context_length: int = 64):
        import json

        import tokenizers

        self.path, self.context_length = path, context_length
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.isfile(cfg_path) else {}
        tok = tokenizers.Tokenizer.from_file(file)
        # transformers' Siglip2Tokenizer lower-cases (SigLIP 2 trained on lower-cased text) and pads on the left.
        siglip2 = cfg.get("tokenizer_class") == "Siglip2Tokenizer"
        if siglip2 and "Lowercase" not in json.dumps(json.loads(tok.to_str()).get("normalizer")):
            normalizer = tok.normalizer
            tok.normalizer = tokenizers.normalizers.Sequence(
                [tokenizers.normalizers.Lowercase()] + ([normalizer] if normalizer else []))
        pad = _token_str(cfg.get("pad_token")) or "<pad>"
        self.pad_id = tok.token_to_id(pad)
        if self.pad_id is None:
            raise ValueError(f"{file}: pad token {pad!r} is not in the vocabulary")
        eos = _token_str(cfg.get("eos_token")) or "<eos>"
        self.eot_id = tok.token_to_id(eos) if tok.token_to_id(eos) is not None else self.pad_id
        self.sot_id = -1
        self.vocab_size = tok.get_vocab_size()
        side = cfg.get("padding_side", "left" if cfg.get("tokenizer_class", "").removesuffix("Fast") in
                       _LEFT_PADDING else "right")
        tok.enable_truncation(max_length=context_length, direction=cfg.get("truncation_side", "right"))
        tok.enable_padding(direction=side, pad_id=self.pad_id, pad_token=pad, length=context_length)
        self._tok = tok

    def __getstate__(self):
        return (self.path, self.context_length)

    def __setstate__(self, state):
        self.__init__(*state)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([e.ids for e in self._tok.encode_batch(list(texts))], dtype=np.int32).reshape(
            len(texts), self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


# transformers' tokenizer classes whose default padding side is the left (Gemma's, SigLIP 2's, Llama's).
_LEFT_PADDING = ("GemmaTokenizer", "Siglip2Tokenizer", "LlamaTokenizer", "CodeLlamaTokenizer", "CohereTokenizer",
                 "XLNetTokenizer")


def _token_str(token) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


TOKENIZERS: dict[str, type[Tokenizer]] = {"clip": ClipTokenizer, "bytes": ByteTokenizer}
KINDS = tuple(TOKENIZERS)
# data.tokenizer values that name a file: "sentencepiece:PATH", "hf:PATH_OR_DIR".
FILE_KINDS: dict[str, type[Tokenizer]] = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}


def check_spec(spec: str) -> str | None:
    """Why ``data.tokenizer=spec`` cannot work (None when it can)."""
    kind, _, path = spec.partition(":")
    if spec in TOKENIZERS:
        return None
    if kind not in FILE_KINDS or not path:
        return f"{spec!r} is not one of {KINDS} nor sentencepiece:PATH / hf:PATH_OR_DIR"
    if not os.path.exists(path):
        return f"{spec!r}: {path} does not exist"
    return None


@functools.lru_cache(maxsize=16)
def describe(spec: str) -> tuple[int, int]:
    """``(vocab_size, eot_id)`` of a ``data.tokenizer`` value (files are read once)."""
    if spec in TOKENIZERS:
        return TOKENIZERS[spec].vocab_size, TOKENIZERS[spec].eot_id
    tok = get_tokenizer(spec, context_length=8)
    return tok.vocab_size, tok.eot_id


def get_tokenizer(kind: str, *, context_length: int, bpe_path: str | None = None) -> Tokenizer:
    """``"clip"`` (OpenAI CLIP BPE, vocab 49408; ``bpe_path`` defaults to ``default_bpe_path()``), ``"bytes"``
    (vocab 259), ``"sentencepiece:PATH"`` or ``"hf:PATH_OR_DIR"`` (tokenizer.json)."""
    if kind == "clip":
        return ClipTokenizer(bpe_path=bpe_path, context_length=context_length)
    if kind == "bytes":
        return ByteTokenizer(context_length=context_length)
    name, _, path = kind.partition(":")
    if name in FILE_KINDS and path:
        return FILE_KINDS[name](path, context_length=context_length)
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {KINDS}, sentencepiece:PATH or hf:PATH_OR_DIR")


def save_hf_files(spec: str, out_dir: str, *, context_length: int, processor: str) -> int | None:
    """Writes the transformers tokenizer files of ``data.tokenizer=spec`` into ``out_dir``; returns the pad id
    (None for ``bytes``, which transformers has no tokenizer for: no files are written)."""
    import json
    import shutil

    kind, _, path = spec.partition(":")
    config: dict = {"model_max_length": context_length, "processor_class": processor}
    if spec == "clip":
        vocab, merges = read_bpe(default_bpe_path())
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        config.update(tokenizer_class="CLIPTokenizer", bos_token=_SOT, eos_token=_EOT, unk_token=_EOT, pad_token="!")
        pad_id = 0
    elif kind == "sentencepiece":
        shutil.copyfile(path, os.path.join(out_dir, "spiece.model"))
        config.update(tokenizer_class="SiglipTokenizer", eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                      do_lower_case=True)
        pad_id = SentencePieceTokenizer(path, context_length).pad_id
    elif kind == "hf":
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        shutil.copyfile(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path,
                        os.path.join(out_dir, "tokenizer.json"))
        src = os.path.join(folder, "tokenizer_config.json")
        config = {**(json.load(open(src, encoding="utf-8")) if os.path.isfile(src) else {}), **config}
        pad_id = HFTokenizer(path, context_length).pad_id
    else:
        return None
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return pad_id
