import re
import struct
import zlib

import numpy as np
import pytest

from dl_pipeline import text_kernel
from dl_pipeline.config import DataConfig, FeaturesConfig
from dl_pipeline.features import (
    clean_record,
    clean_text,
    featurize_texts,
    hash_token_words,
    hash_tokens,
    list_array,
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
        ("no tab,   five     spaces", "no tab, five spaces"),  # ASCII, no tab: str.replace path
        ("x  \\n   y", "x\ny"),
        ("ｗide　 space", "wide space"),  # NFKC'd ideographic space, then collapsed
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


def _word64(data: bytes) -> int:
    """The word64 hash as featurizer version 2 defines it (README): 64-bit words of the UTF-8,
    little-endian, the last zero-padded; multiply-xor steps; MurmurHash3's finalizer."""
    m = 2**64
    h = 0x9E3779B97F4A7C15 ^ len(data)
    padded = data + b"\0" * (-len(data) % 8)
    for (w,) in struct.iter_unpack("<Q", padded):
        h = (h ^ w) * 0xBF58476D1CE4E5B9 % m
        h ^= h >> 32
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h = (h ^ (h >> 33)) * mult % m
    return h ^ (h >> 33)


def _bucket(h, spec):
    buckets = spec["tokens"]["buckets"]
    return (h >> 32) * buckets >> 32 if spec["tokens"]["hash"] == "word64" else h % buckets


def test_hash_tokens_unigrams_then_bigrams():
    for hash_name, hash_fn in (("crc32", zlib.crc32), ("word64", _word64)):
        spec = text_spec(FeaturesConfig(char_length=8, max_tokens=6, hash_buckets=1000, token_hash=hash_name), DataConfig())
        ids, lengths = hash_tokens(["Hello, world", ""], spec)
        h = [hash_fn(w.encode()) for w in ["hello", ",", "world"]]
        uni = [_bucket(x, spec) + 1 for x in h]
        bi = [_bucket((h[i] * 116049371 + h[i + 1]) % 2**64, spec) + 1 for i in range(2)]
        assert ids[0].tolist() == uni + bi + [0]
        assert lengths.tolist() == [5, 0]
        assert ids[1].tolist() == [0] * 6
        assert spec["tokens"]["hash"] == hash_name and spec["version"] == 2


def test_word64_is_the_published_hash():
    # Pinned values: a change here changes every stored id (a new featurizer version).
    assert _word64(b"hello") == 0x622364FA8C0E28DE
    assert _word64("école".encode()) == 0xF60F0E42579440C8


def _reference_hash_tokens(texts, spec):
    """The definition, one row at a time: unigrams then bigrams, truncated, 0-padded."""
    ts = spec["tokens"]
    hash_fn = _word64 if ts["hash"] == "word64" else zlib.crc32
    ids = np.zeros((len(texts), ts["max_tokens"]), np.int32)
    unigrams = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        words = re.findall(r"\w+|[^\w\s]", text[: ts["max_tokens"] * 32].lower())
        h = [hash_fn(w.encode("utf-8")) for w in words]
        grams = [_bucket(x, spec) + 1 for x in h]
        if ts["ngrams"] >= 2:
            grams += [_bucket((a * 116049371 + b) % 2**64, spec) + 1 for a, b in zip(h, h[1:], strict=False)]
        grams = grams[: ts["max_tokens"]]
        ids[i, : len(grams)] = grams
        unigrams[i] = min(len(words), ts["max_tokens"])
    return ids, (ids > 0).sum(axis=1).astype(np.int32), unigrams


@pytest.mark.parametrize("ngrams, max_tokens, token_hash", [(2, 6, "word64"), (1, 6, "word64"), (2, 64, "word64"),
                                                            (2, 64, "crc32")])
def test_hash_tokens_batch_equals_row_by_row_definition(ngrams, max_tokens, token_hash):
    spec = text_spec(FeaturesConfig(max_tokens=max_tokens, hash_buckets=1000, ngrams=ngrams, token_hash=token_hash),
                     DataConfig())
    texts = ["Hello, world", "", "one", "a b", "x " * 100, "É école ÜBER 中文？", "ctl\x1csep\x1fmore!",
             "Straße İstanbul", "tabs\tand\nlines", "mixed ascii, then é"]
    texts = texts * 4  # enough ASCII rows for the vectorised path; the first 10 also alone (regex path)
    ids, lengths, words = hash_token_words(texts, spec)
    assert hash_tokens(texts[:10], spec)[0].tolist() == ids[:10].tolist()
    ref_ids, ref_lengths, ref_words = _reference_hash_tokens(texts, spec)
    assert ids.tolist() == ref_ids.tolist()
    assert lengths.tolist() == ref_lengths.tolist()
    assert words.tolist() == ref_words.tolist()  # the unigrams a recurrent model reads, in order


@pytest.mark.parametrize("token_hash", ["word64", "crc32"])
def test_hash_tokens_ascii_path_splits_every_character_like_the_regex(token_hash):
    # The kernel classifies bytes itself: check each ASCII character between words, doubled,
    # at both ends of a row, and tokens around word64's 8-byte steps.
    spec = text_spec(FeaturesConfig(max_tokens=64, hash_buckets=1 << 20, token_hash=token_hash), DataConfig())
    # Repeated 9 times a row is 99+ bytes: the kernel's 64-byte block classifier, then its tail.
    texts = [f"{c}ab{c}cd{c}{c}E_f9{c}" * k for c in map(chr, range(128)) for k in (1, 9)]
    texts += ["a" * n + " b" for n in (1, 2, 3, 31, 32, 33, 64, 255, 256, 300)] + ["", " ", "\n\n"]
    texts += ["AbCdEfGh"[:n] + " " + "XyZ@[`{_" * 3 for n in range(9)]  # letters' neighbours in 8-byte words
    ids, lengths = hash_tokens(texts, spec)
    ref_ids, ref_lengths, _ = _reference_hash_tokens(texts, spec)
    for i, text in enumerate(texts):
        assert ids[i].tolist() == ref_ids[i].tolist(), repr(text)
    assert lengths.tolist() == ref_lengths.tolist()


def test_quantize_chars_batch_equals_row_by_row_definition():
    texts = ["Ab1!é", "", "x" * 20, "ÉCOLE ǅ İstanbul", "short", "ﬁne"]
    for reverse in (True, False):
        spec = text_spec(FeaturesConfig(char_length=12, reverse_chars=reverse), DataConfig())
        table = {c: i for i, c in reversed(list(enumerate(spec["chars"]["alphabet"], start=1)))}
        for text, row in zip(texts, quantize_chars(texts, spec), strict=True):
            codes = [table.get(c, 0) for c in text[:24].lower()[:12]]
            assert row.tolist() == (codes[::-1] if reverse else codes) + [0] * (12 - len(codes)), repr(text)


def _reference_chars(texts, spec):
    """The definition: the first L characters of the lower-cased text (lower-casing a 2L
    prefix: it may lengthen it), as alphabet indices, reversed if asked, 0-padded."""
    cs = spec["chars"]
    table = {c: i for i, c in reversed(list(enumerate(cs["alphabet"], start=1)))}
    out = np.zeros((len(texts), cs["length"]), np.uint8)
    for i, text in enumerate(texts):
        codes = [table.get(c, 0) for c in text[: 2 * cs["length"]].lower()[: cs["length"]]]
        out[i, : len(codes)] = codes[::-1] if cs["reverse"] else codes
    return out


def _random_texts(rng, n):
    """Rows that exercise every path: ASCII (runs over the kernel's 64-byte blocks and the token
    cut), 2- and 3-byte UTF-8, characters whose lower case is two code points ('İ'), final
    sigma, and astral emoji (rows the kernel leaves to Python)."""
    pieces = (list("abcXYZ019_ .,;'!?-") + ["\t", "\n", "\x1c", "\x7f", "é", "ß", "Ü", "Ж", "中文", "？", "　", "\u00a0",
              "İ", "ΟΔΟΣ", "😀", "ǅ", "ﬁ", "Σ"])
    texts = []
    for i in range(n):
        k = int(rng.integers(0, 400))
        weights = rng.dirichlet(np.ones(len(pieces)) * 0.3)
        if i % 2:  # half the rows ASCII only (the kernel's other path)
            weights[[j for j, p in enumerate(pieces) if not p.isascii()]] = 0
            weights /= weights.sum()
        texts.append("".join(rng.choice(pieces, size=k, p=weights)))
    return texts


@pytest.mark.parametrize("char_length, max_tokens, ngrams, reverse, token_hash", [
    (16, 8, 2, True, "word64"), (70, 300, 2, False, "word64"), (1014, 256, 1, True, "word64"), (70, 300, 2, True, "crc32")])
def test_compiled_featurizer_equals_the_definition_row_by_row(char_length, max_tokens, ngrams, reverse, token_hash):
    spec = text_spec(FeaturesConfig(char_length=char_length, max_tokens=max_tokens, ngrams=ngrams, hash_buckets=997,
                                    reverse_chars=reverse, token_hash=token_hash), DataConfig())
    texts = _random_texts(np.random.default_rng(char_length), 600) + ["", "a" * 70 + " b" * 80, "x " * 5000, None]
    feats = featurize_texts(texts, spec)
    texts[-1] = ""  # None is an empty row
    ref_ids, ref_lengths, ref_words = _reference_hash_tokens(texts, spec)
    ref_chars = _reference_chars(texts, spec)
    for i, text in enumerate(texts):
        assert feats["tokens"][i].tolist() == ref_ids[i].tolist(), repr(text)
        assert feats["chars"][i].tolist() == ref_chars[i].tolist(), repr(text)
    assert feats["length"].tolist() == ref_lengths.tolist() and feats["words"].tolist() == ref_words.tolist()
    alone = featurize_texts(texts[:50], spec)  # a row's features do not depend on its batch
    assert all(np.array_equal(alone[k], feats[k][:50]) for k in alone)


def test_arrow_strings_give_the_same_features_as_python_strings():
    import pyarrow as pa

    spec = text_spec(FeaturesConfig(char_length=32, max_tokens=16, hash_buckets=1000), DataConfig())
    texts = _random_texts(np.random.default_rng(7), 200)
    expected = featurize_texts(texts, spec)
    arrow = pa.array([None, *texts, "tail"], pa.string()).slice(1, len(texts))  # a sliced array: offset 1
    for given in (arrow, pa.chunked_array([arrow[:77], arrow[77:]])):
        got = featurize_texts(given, spec)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_a_pandas_series_is_read_by_position_on_every_path():
    import pandas as pd

    spec = text_spec(FeaturesConfig(char_length=8, max_tokens=6, hash_buckets=1000), DataConfig())
    texts = ["İb x", "plain ascii row", "😀 emoji", "é word"]  # rows 0 and 2 go to the Python path
    series = pd.Series(texts, index=[3, 2, 1, 0])  # labels in the other order
    got, want = featurize_texts(series, spec), featurize_texts(texts, spec)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert want["chars"][0].tolist() == _reference_chars(texts, spec)[0].tolist()


def test_code_point_tables_classify_as_the_regex_does():
    lower, classes = text_kernel.code_point_tables()
    for c in range(text_kernel.BMP):
        if 0xD800 <= c < 0xE000:
            continue
        ch = chr(c)
        want = 1 if re.fullmatch(r"\w", ch) else 2 if re.fullmatch(r"\s", ch) else 0
        assert classes[c] == want, hex(c)
        assert lower[c] == -1 or chr(lower[c]) == ch.lower(), hex(c)
    assert lower[ord("İ")] == -1 and lower[ord("Σ")] == -1 and lower[ord("A")] == ord("a")


def test_list_array_is_a_plain_arrow_list_of_equal_rows():
    import pyarrow as pa

    batch = np.arange(24, dtype=np.int32).reshape(3, 8)
    arr = list_array(batch)
    assert arr.type == pa.list_(pa.int32()) and len(arr) == 3
    assert arr.to_pylist() == batch.tolist()
    # the flat values are the batch's bytes, row-major: no per-row encoding
    assert arr.values.to_numpy().tobytes() == batch.tobytes()
