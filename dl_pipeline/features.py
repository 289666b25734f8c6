"""Text cleaning and featurization: the one implementation shared by prepare and score.

Everything here is plain Python/NumPy over whole batches (pandas Series in, arrays out) so the
Spark side can run it inside Arrow ``pandas_udf``/``mapInPandas`` and scoring applies exactly the
transform training saw (train/serve parity). The spec that drives it is a JSON-able dict stored
in the prepared dataset's manifest and in every model bundle.

Features (per row):
  * ``chars``  uint8[char_length]: Zhang et al. (2015) quantization, index 1..len(alphabet),
    0 for unknown characters and padding; optionally reversed as in the paper.
  * ``tokens`` int32[max_tokens] + ``length`` int32: hashed word unigrams and bigrams in
    ``1..hash_buckets`` (0 = padding), fastText-style (Joulin et al. 2017); ``words`` int32:
    how many of them are the row's unigrams, in text order (what a recurrent model reads).
  * ``image``  uint8[H, W, C] for image datasets.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from dl_pipeline.config import DataConfig, FeaturesConfig

FEATURIZER_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------

# The Zhang et al. CSVs were scraped with '&' stripped from entities: "#39;" "quot;" "amp;".
# Constant replacements (no template expansion per match). The numeric pattern starts with a
# literal '#' so the regex engine skips ahead to candidates; the named one is zero-width and
# tried at every position, so it only runs when one of the names occurs at all.
_BARE_NUMERIC_ENTITY = re.compile(r"(?<!&)#(?=\d{1,6};)")
_BARE_NAMED_ENTITY = re.compile(r"(?<![&\w;])(?=(?:quot|amp|lt|gt|nbsp|apos);)")
_ENTITY_NAMES = ("quot;", "amp;", "lt;", "gt;", "nbsp;", "apos;")
_TAG = re.compile(r"<[^<>]{0,200}>")
_ESCAPED_NEWLINE = re.compile(r"\\n|\\")
_HSPACE = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r" ?\n[\s]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Undo the corpora's scraping artefacts and normalise one string.

    Order matters: entities are restored before tags are stripped (``&lt;b&gt;`` is a tag only
    once unescaped), and NFKC runs last so full-width and ligature forms fold to ASCII.
    """
    if not text:
        return ""
    t = _ESCAPED_NEWLINE.sub("\n", text) if "\\" in text else text
    if ";" in t:  # both bare-entity patterns end in ';'
        if "#" in t:
            t = _BARE_NUMERIC_ENTITY.sub("&#", t)
        if any(name in t for name in _ENTITY_NAMES):
            t = _BARE_NAMED_ENTITY.sub("&", t)
    if "&" in t:
        # Two rounds: the originals hold double-escaped entities such as "&amp;lt;".
        t = html.unescape(html.unescape(t))
    if "<" in t:
        t = _TAG.sub(" ", t)
    if not t.isprintable():  # every _CONTROL character is non-printable
        t = _CONTROL.sub(" ", t)
    ascii_text = t.isascii()
    if not ascii_text:  # ASCII is already NFKC-normal; normalizing costs ~1/3 of the time
        t = unicodedata.normalize("NFKC", t)
    # After _CONTROL the only ASCII horizontal spaces left are ' ' and '\t'. Without a tab,
    # collapsing runs of ' ' by str.replace is ~4x faster than the regex (often a no-op).
    if not ascii_text or "\t" in t:
        t = _HSPACE.sub(" ", t)
    else:
        while "  " in t:
            t = t.replace("  ", " ")
    if "\n" in t:
        t = _NEWLINES.sub("\n", t)
    return t.strip()


def join_title(title: str, body: str, separator: str) -> str:
    """Join title and body; no separator when either is empty or the title ends a sentence."""
    if not title:
        return body
    if not body:
        return title
    if title[-1] in ".!?:;":
        return f"{title} {body}"
    return f"{title}{separator}{body}"


def clean_record(parts: Sequence[Any], separator: str) -> str:
    """Clean each text field of one record (None allowed) and join them in order."""
    text = ""
    for part in parts:
        text = join_title(text, clean_text(part) if isinstance(part, str) else "", separator)
    return text


def check_record(parts: Sequence[Any] | None, separator: str, max_chars: int,
                 reject_invalid_utf8: bool = True) -> tuple[str | None, str | None]:
    """The one rule set for a record's text, in prepare (every input path) and score: its text
    fields (None allowed) -> (reject reason or None, cleaned text or None).

    In order: no text at all or nothing left after cleaning -> ``empty_text``; U+FFFD from
    decoding -> ``invalid_utf8`` (when rejected; score keeps such rows); more than ``max_chars``
    characters over the raw fields -> ``text_too_long``."""
    if parts is None or all(p is None or p == "" for p in parts):
        return "empty_text", None
    if reject_invalid_utf8 and any(p and "\ufffd" in p for p in parts):
        return "invalid_utf8", None
    if sum(len(p) for p in parts if p) > max_chars:
        return "text_too_long", None
    text = clean_record(parts, separator)
    return (None, text) if text else ("empty_text", None)


# ---------------------------------------------------------------------------------------------
# Featurizer spec
# ---------------------------------------------------------------------------------------------


def text_spec(features: FeaturesConfig, data: DataConfig) -> dict[str, Any]:
    """The JSON-able featurizer spec written to the manifest and every model bundle."""
    return {
        "version": FEATURIZER_VERSION,
        "kind": "text",
        "cleaning": {"title_separator": data.title_separator, "max_text_chars": data.max_text_chars},
        "chars": {
            "enabled": features.chars,
            "alphabet": features.alphabet,
            "length": features.char_length,
            "reverse": features.reverse_chars,
            "lowercase": True,
        },
        "tokens": {
            "enabled": features.tokens,
            "hash": "crc32",
            "buckets": features.hash_buckets,
            "ngrams": features.ngrams,
            "max_tokens": features.max_tokens,
            "lowercase": True,
        },
    }


def image_spec(data: DataConfig) -> dict[str, Any]:
    return {
        "version": FEATURIZER_VERSION,
        "kind": "image",
        "image": {
            "height": data.image_height,
            "width": data.image_width,
            "channels": data.image_channels,
            "dtype": "uint8",
            "normalize": {"scale": 1.0 / 255.0},
        },
    }


# ---------------------------------------------------------------------------------------------
# Character quantization
# ---------------------------------------------------------------------------------------------


def _char_table(alphabet: str) -> np.ndarray:
    """Code point (< 128) -> 1-based alphabet index; 0 elsewhere. Duplicates keep the first."""
    table = np.zeros(129, dtype=np.uint8)
    for i, ch in reversed(list(enumerate(alphabet, start=1))):
        if ord(ch) < 128:
            table[ord(ch)] = i
    return table


def quantize_chars(texts: Iterable[str], spec: dict[str, Any]) -> np.ndarray:
    """Texts -> uint8 array [n, length] of alphabet indices (0 = unknown/padding).

    Per row: the first ``length`` characters of the lower-cased text, reversed if the spec
    says so, then 0-padded. Vectorised over the batch: all rows' characters are encoded in one
    call, and a boolean mask of each row's prefix places them (row-major order is row order).
    """
    cs = spec["chars"]
    length, reverse = int(cs["length"]), bool(cs["reverse"])
    table = _char_table(cs["alphabet"])
    # Lower-case a bounded prefix: a 1 MB row costs no more than a short one.
    rows = [t[: length * 2].lower()[:length] if t else "" for t in texts]
    out = np.zeros((len(rows), length), dtype=np.uint8)
    if not rows:
        return out
    joined = "".join(rows)
    if joined.isascii():
        cps = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    else:
        cps = np.minimum(np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32), 128)
    codes = table[cps]
    mask = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))[:, None] > np.arange(length)
    if reverse:
        # Rows in reverse order, each reversed, is the whole flat sequence reversed.
        out[::-1][mask[::-1]] = codes[::-1]
    else:
        out[mask] = codes
    return out


# ---------------------------------------------------------------------------------------------
# Hashed n-grams
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")
_BIGRAM_MULT = np.uint64(116049371)  # fastText's n-gram hash multiplier


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _byte_classes() -> tuple[np.ndarray, np.ndarray]:
    """ASCII byte -> is a ``\\w`` character, is a ``\\s`` character (as _TOKEN sees them)."""
    word, space = np.zeros(256, dtype=bool), np.zeros(256, dtype=bool)
    for i in range(128):
        word[i] = re.fullmatch(r"\w", chr(i)) is not None
        space[i] = re.fullmatch(r"\s", chr(i)) is not None  # includes \x1c-\x1f
    return word, space


def _crc32_tables() -> tuple[np.ndarray, np.ndarray]:
    """zlib's CRC-32 byte table, and the same update for 2 bytes at once (65,536 entries).

    CRC is linear, so from state c, two bytes w (little-endian) give
    ``T16[(c ^ w) & 0xFFFF] ^ (c >> 16)``: half the steps of the byte-wise loop.
    """
    t8 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t8 = np.where(t8 & 1, (t8 >> 1) ^ np.uint32(0xEDB88320), t8 >> 1).astype(np.uint32)
    t16 = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        t16 = t8[t16 & 0xFF] ^ (t16 >> 8)
    return t8, t16


_WORD_BYTE, _SPACE_BYTE = _byte_classes()
_CRC8, _CRC16 = _crc32_tables()
_CRC_MAX_LEN = 32  # longer tokens (rare: URLs, runs of letters) go through zlib one by one
_MIN_VECTOR_ROWS = 16  # below this many ASCII rows the regex path is faster (~16 us/row either way)


def crc32_spans(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``zlib.crc32(buf[s:s+n])`` for every span, vectorised over spans: uint32 [len(starts)].

    Spans are processed longest first, so the spans still running at byte j are a prefix of
    the array; each step advances all of them by two bytes.
    """
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    capped = np.minimum(lengths, 255)
    order = np.argsort((255 - capped).astype(np.uint8), kind="stable")  # radix sort, longest first
    s, ln = starts[order], lengths[order]
    neg = -capped[order]  # ascending, for searchsorted
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    for j in range(0, min(int(ln[0]), _CRC_MAX_LEN) - 1, 2):
        k = int(np.searchsorted(neg, -(j + 2), side="right"))  # spans with >= j + 2 bytes
        p = s[:k] + j
        w = buf[p].astype(np.uint32) | (buf[p + 1].astype(np.uint32) << 8)
        c = crc[:k]
        crc[:k] = _CRC16[(c ^ w) & 0xFFFF] ^ (c >> 16)
    odd = np.flatnonzero((ln & 1).astype(bool) & (ln <= _CRC_MAX_LEN))
    c = crc[odd]
    crc[odd] = _CRC8[(c ^ buf[s[odd] + ln[odd] - 1]) & 0xFF] ^ (c >> 8)
    crc = ~crc
    n_long = int(np.searchsorted(neg, -_CRC_MAX_LEN, side="left"))
    if n_long:
        raw = buf.tobytes()
        for i in range(n_long):
            crc[i] = zlib.crc32(raw[s[i] : s[i] + ln[i]])
    out = np.empty(n, dtype=np.uint32)
    out[order] = crc
    return out


def _ascii_token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ASCII texts -> (crc32 of every lower-cased token, flattened in row order; tokens per row).

    Tokenizes like _TOKEN without a Python object per token: a token starts at a word byte
    after a non-word byte, or at any byte that is neither word nor space (punctuation is one
    token per character), and ends symmetrically. Rows are joined by newlines, which never
    belong to a token.
    """
    raw = ("\n".join(texts) + "\n").lower().encode("ascii")
    buf = np.frombuffer(raw, dtype=np.uint8)
    word = _WORD_BYTE[buf]
    single = ~(word | _SPACE_BYTE[buf])
    after_word = np.zeros_like(word)
    after_word[1:] = word[:-1]
    before_word = np.zeros_like(word)
    before_word[:-1] = word[1:]
    first = (word & ~after_word) | single
    starts = np.flatnonzero(first)
    ends = np.flatnonzero((word & ~before_word) | single) + 1
    owned = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 1  # text + newline
    row_start = np.cumsum(owned) - owned  # every row owns >= 1 byte, as reduceat needs
    counts = np.add.reduceat(first, row_start, dtype=np.int64)
    return crc32_spans(buf, starts, ends - starts).astype(np.uint64), counts


def _unicode_token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Any texts -> as _ascii_token_hashes, one regex and one crc32 call per token."""
    words: list[bytes] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        w = [x.encode("utf-8") for x in _TOKEN.findall(text.lower())]
        words.extend(w)
        counts[i] = len(w)
    return np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words)), counts


def _place_grams(ids: np.ndarray, rows: np.ndarray, h: np.ndarray, counts: np.ndarray, buckets: np.uint64,
                 ngrams: int) -> np.ndarray:
    """Write rows' unigram then bigram ids into ``ids[rows]``; returns their untruncated lengths.

    ``h`` holds the token hashes of ``rows`` flattened in order, ``counts`` tokens per row.
    Unigrams go to columns 0..n-1 of their row and bigrams to columns n.., all in one scatter.
    """
    max_tokens = ids.shape[1]
    flat = ids.reshape(-1)  # a view: one flat index per write instead of (row, column) pairs
    row_counts = np.repeat(counts, counts)  # per token: tokens in its row
    pos = np.arange(len(h)) - np.repeat(np.cumsum(counts) - counts, counts)  # index within row
    at = np.repeat(rows * max_tokens, counts) + pos
    keep = pos < max_tokens
    flat[at[keep]] = (h[keep] % buckets).astype(np.int32) + 1
    if ngrams < 2 or len(h) < 2:
        return counts
    bigram = (h[:-1] * _BIGRAM_MULT + h[1:]) % buckets  # pairs token j with token j+1 ...
    col = row_counts[:-1] + pos[:-1]
    keep = (pos[1:] > 0) & (col < max_tokens)  # ... of the same row (j+1 does not start a row)
    flat[(at[:-1] + row_counts[:-1])[keep]] = bigram[keep].astype(np.int32) + 1
    return counts + np.maximum(counts - 1, 0)


def hash_tokens(texts: Iterable[str], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [n, max_tokens], lengths int32 [n]); see ``hash_token_words``."""
    ids, lengths, _ = hash_token_words(texts, spec)
    return ids, lengths


def hash_token_words(texts: Iterable[str], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [n, max_tokens], lengths int32 [n], words int32 [n]).

    Per row: tokens of the lower-cased text (``\\w+`` runs and single other non-space
    characters, within its first 32 * max_tokens characters), hashed with crc32 of their
    UTF-8; unigram ids (``words`` of them, in text order) then bigram ids, each ``1 + h mod
    buckets``; 0 pads. ``words`` is stored because ``lengths`` alone cannot say where the
    unigrams end once a row is truncated to max_tokens. crc32 is a stable
    hash (Python's ``hash`` is salted per process, which would break scoring). ASCII rows (almost
    all, after NFKC) are tokenized and hashed by numpy over the whole batch (~3x faster);
    others, and batches of a few rows, by the regex, row by row.
    """
    ts = spec["tokens"]
    buckets, max_tokens, ngrams = np.uint64(ts["buckets"]), int(ts["max_tokens"]), int(ts["ngrams"])
    limit = max_tokens * 32
    rows = [(t[:limit] if len(t) > limit else t) if t else "" for t in texts]
    ids = np.zeros((len(rows), max_tokens), dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int64)
    words = np.zeros(len(rows), dtype=np.int64)
    is_ascii = np.fromiter((t.isascii() for t in rows), dtype=bool, count=len(rows))
    if is_ascii.sum() < _MIN_VECTOR_ROWS:  # numpy's fixed cost per call outweighs the regex
        is_ascii[:] = False
    for mask, hasher in ((is_ascii, _ascii_token_hashes), (~is_ascii, _unicode_token_hashes)):
        idx = np.flatnonzero(mask)
        if len(idx):
            h, counts = hasher(rows if len(idx) == len(rows) else [rows[i] for i in idx])
            lengths[idx] = _place_grams(ids, idx, h, counts, buckets, ngrams)
            words[idx] = counts
    return ids, np.minimum(lengths, max_tokens).astype(np.int32), np.minimum(words, max_tokens).astype(np.int32)


# Rows featurized per block. Each row's temporaries (character mask and codes, token hashes and
# positions, padded ids) take ~10 KB, so a 20,000-row call works far outside the CPU caches:
# measured 1.6x the CPU per row of 2,048-row blocks (1,024 to 4,096 are all within 3%).
BLOCK_ROWS = 2048


def featurize_texts(texts: Sequence[str], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cleaned texts -> the feature arrays named in the spec, computed BLOCK_ROWS rows at a time."""
    if len(texts) <= BLOCK_ROWS:
        return _featurize_block(texts, spec)
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), BLOCK_ROWS):
        block = _featurize_block(texts[start : start + BLOCK_ROWS], spec)
        for name, arr in block.items():
            if name not in out:
                out[name] = np.empty((len(texts), *arr.shape[1:]), dtype=arr.dtype)
            out[name][start : start + len(arr)] = arr
    return out


def _featurize_block(texts: Sequence[str], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if spec["chars"]["enabled"]:
        out["chars"] = quantize_chars(texts, spec)
    if spec["tokens"]["enabled"]:
        out["tokens"], out["length"], out["words"] = hash_token_words(texts, spec)
    return out


def encoded_features(values: Sequence[Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Cleaned texts, or pixel blobs (uint8 H*W*C bytes), -> the stored feature columns as
    Arrow arrays by name (``dataset.arrow_schema``): fixed-length lists, int32 ``length`` and
    ``words``."""
    import pyarrow as pa

    if spec["kind"] == "text":
        feats = featurize_texts(list(values), spec)
        out = {name: list_array(feats[name]) for name in ("chars", "tokens") if name in feats}
        for name in ("length", "words"):
            if name in feats:
                out[name] = pa.array(feats[name], type=pa.int32())
        return out
    im = spec["image"]
    width = im["height"] * im["width"] * im["channels"]
    pixels = np.frombuffer(b"".join(values), np.uint8).reshape(len(values), width)
    return {"image": list_array(pixels)}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def decode_images(blobs: Iterable[Any], spec: dict[str, Any]) -> list[np.ndarray | None]:
    """Encoded images (bytes-like; None allowed) -> uint8 [H, W, C] each, or None where the
    blob is missing or undecodable (the caller's ``undecodable_image`` reject). Prepare and
    score both decode through here, so they see the same pixels."""
    out: list[np.ndarray | None] = []
    for blob in blobs:
        try:
            out.append(None if blob is None else decode_image(bytes(blob), spec))
        except ValueError:
            out.append(None)
    return out


def decode_image(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W, C] resized to the spec. Raises ValueError if undecodable."""
    from PIL import Image

    im = spec["image"]
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if im["channels"] == 1 else "RGB")
            if img.size != (im["width"], im["height"]):
                img = img.resize((im["width"], im["height"]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises a zoo of types for broken files
        raise ValueError(f"undecodable image: {exc}") from None
    return arr.reshape(im["height"], im["width"], im["channels"])


# ---------------------------------------------------------------------------------------------
# Fixed-length rows as one Arrow list array
# ---------------------------------------------------------------------------------------------


def list_array(batch: np.ndarray):
    """[n, ...] array -> pyarrow ListArray of n rows, each row flattened (row-major), with no
    Python object per row: the values buffer is the array's own bytes, offsets a multiple of
    the row width. Stored as a plain Parquet list, read back whole by ``make_batch_reader``."""
    import pyarrow as pa

    n = batch.shape[0]
    width = int(np.prod(batch.shape[1:], dtype=np.int64)) if batch.ndim > 1 else 1
    if n * width >= 1 << 31:  # Arrow list offsets are int32
        # Unreachable with validated settings (score: Arrow batches of maxRecordsPerBatch rows;
        # prepare: row groups of <= shard.row_group_mb); a clear message if that ever changes.
        raise ValueError(f"{n} rows of {width} values exceed one Arrow list array (2^31 values): write fewer rows at a time")
    values = pa.array(np.ascontiguousarray(batch).reshape(-1))
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * np.int32(width))
    return pa.ListArray.from_arrays(offsets, values)
