import re
import zlib

import numpy as np
import pytest

from dl_pipeline.config import DataConfig, FeaturesConfig
from dl_pipeline.features import (
    clean_record,
    clean_text,
    hash_tokens,
    ndarray_codec_bytes,
    quantize_chars,
    text_spec,
)

SPEC = text_spec(FeaturesConfig(char_length=8, max_tokens=6, hash_buckets=1000), DataConfig())


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Wall Street's dwindling\\band of ultra-cynics", "Wall Street's dwindling\nband of ultra-cynics"),
        ("line one\\nline two", "line one\nline two"),
        ("It #39;s quot;fine quot; AT&amp;T", 'It \'s "fine " AT&T'),
        ("&lt;b&gt;bold&lt;/b&gt; text", "bold text"),
        ("&amp;lt;p&amp;gt;double escaped", "double escaped"),
        ("ﬁne ＡＢＣ", "fine ABC"),  # NFKC folds ligatures and full-width forms
        ("  many    spaces\t\there  ", "many spaces here"),
        ("nul\x00byte", "nul byte"),
        ("<br>   ", ""),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def test_clean_record_joins_title_and_body():
    assert clean_record(["Title", "body text"], ". ") == "Title. body text"
    assert clean_record(["Title?", "body"], ". ") == "Title? body"
    assert clean_record(["", "body"], ". ") == "body"
    assert clean_record([None, "body"], ". ") == "body"


def test_quantize_chars_zhang_alphabet_reversed():
    out = quantize_chars(["Ab1!é", ""], SPEC)
    alphabet = SPEC["chars"]["alphabet"]
    idx = {c: alphabet.index(c) + 1 for c in "ab1!"}
    # reversed (latest characters first), unknown 'é' -> 0, padded with 0
    assert out.dtype == np.uint8 and out.shape == (2, 8)
    assert out[0].tolist() == [0, idx["!"], idx["1"], idx["b"], idx["a"], 0, 0, 0]
    assert out[1].tolist() == [0] * 8


def test_hash_tokens_unigrams_then_bigrams():
    ids, lengths = hash_tokens(["Hello, world", ""], SPEC)
    h = [zlib.crc32(w.encode()) for w in ["hello", ",", "world"]]
    uni = [x % 1000 + 1 for x in h]
    bi = [(h[i] * 116049371 + h[i + 1]) % 1000 + 1 for i in range(2)]
    assert ids[0].tolist() == uni + bi + [0]
    assert lengths.tolist() == [5, 0]
    assert ids[1].tolist() == [0] * 6


def _reference_hash_tokens(texts, spec):
    """The definition, one row at a time: unigrams then bigrams, truncated, 0-padded."""
    ts = spec["tokens"]
    ids = np.zeros((len(texts), ts["max_tokens"]), np.int32)
    for i, text in enumerate(texts):
        words = re.findall(r"\w+|[^\w\s]", text[: ts["max_tokens"] * 32].lower())
        h = [zlib.crc32(w.encode("utf-8")) for w in words]
        grams = [x % ts["buckets"] + 1 for x in h]
        if ts["ngrams"] >= 2:
            grams += [((a * 116049371) % 2**64 + b) % 2**64 % ts["buckets"] + 1 for a, b in zip(h, h[1:], strict=False)]
        grams = grams[: ts["max_tokens"]]
        ids[i, : len(grams)] = grams
    return ids, (ids > 0).sum(axis=1).astype(np.int32)


@pytest.mark.parametrize("ngrams, max_tokens", [(2, 6), (1, 6), (2, 64)])
def test_hash_tokens_batch_equals_row_by_row_definition(ngrams, max_tokens):
    spec = text_spec(FeaturesConfig(max_tokens=max_tokens, hash_buckets=1000, ngrams=ngrams), DataConfig())
    texts = ["Hello, world", "", "one", "a b", "x " * 100, "É école ÜBER 中文？", "ctl\x1csep\x1fmore!",
             "Straße İstanbul", "tabs\tand\nlines", "mixed ascii, then é"]
    ids, lengths = hash_tokens(texts, spec)
    ref_ids, ref_lengths = _reference_hash_tokens(texts, spec)
    assert ids.tolist() == ref_ids.tolist()
    assert lengths.tolist() == ref_lengths.tolist()


def test_ascii_token_pattern_splits_like_the_unicode_one():
    from dl_pipeline.features import _ASCII_TOKEN, _TOKEN

    for i in range(128):
        line = f"ab{chr(i)}cd{chr(i)}"
        assert [w.decode() for w in _ASCII_TOKEN.findall(line.encode())] == _TOKEN.findall(line), repr(chr(i))


def test_ndarray_codec_bytes_decode_with_petastorm():
    from petastorm.codecs import NdarrayCodec
    from petastorm.unischema import UnischemaField

    batch = np.arange(24, dtype=np.int32).reshape(3, 8)
    field = UnischemaField("x", np.int32, (8,), NdarrayCodec(), False)
    encoded = ndarray_codec_bytes(batch)
    for row, blob in zip(batch, encoded, strict=False):
        assert blob == bytes(NdarrayCodec().encode(field, row))
        np.testing.assert_array_equal(NdarrayCodec().decode(field, blob), row)
