"""Text cleaning and featurization: the one implementation shared by prepare and score.

Cleaning is plain Python per field; featurization works on whole batches (a sequence of str or
an Arrow string array in, numpy arrays out), compiled (``text_kernel``), so the Spark side runs
it inside Arrow UDFs and scoring applies exactly the transform training saw (train/serve
parity). The spec that drives it is a JSON-able dict stored in the prepared dataset's manifest
and in every model bundle.

Features (per row):
  * ``chars``  uint8[char_length]: Zhang et al. (2015) quantization, index 1..len(alphabet),
    0 for unknown characters and padding; optionally reversed as in the paper.
  * ``tokens`` int32[max_tokens] + ``length`` int32: hashed word unigrams and bigrams in
    ``1..hash_buckets`` (0 = padding), fastText-style (Joulin et al. 2017); ``words`` int32:
    how many of them are the row's unigrams, in text order (what a recurrent model reads).
  * ``image``  uint8[H, W, C] for image datasets.
"""

from __future__ import annotations

import functools
import html
import io
import re
import unicodedata
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from dl_pipeline.config import TOKEN_HASHES, DataConfig, FeaturesConfig

# Raised whenever hashing, tokenizing or quantizing changes. Version 2 added the ``word64``
# token hash (and made it the default); version 1 specs hash with crc32, which this code still
# computes, so bundles trained before keep scoring.
FEATURIZER_VERSION = 2
# The token hashes each featurizer version this code computes may name (``tokens.hash``).
COMPUTED_HASHES = {1: ("crc32",), 2: TOKEN_HASHES}

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
    if parts is None:
        return "empty_text", None
    if None in parts:
        parts = [p or "" for p in parts]
    # Plain loops, not any()/sum() over generators: this runs once per input row (~0.5 us less).
    chars = 0
    for p in parts:
        chars += len(p)
    if not chars:
        return "empty_text", None
    if reject_invalid_utf8:
        for p in parts:
            if "\ufffd" in p:
                return "invalid_utf8", None
    if chars > max_chars:
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
            "hash": features.token_hash,
            "buckets": features.hash_buckets,
            "ngrams": features.ngrams,
            "max_tokens": features.max_tokens,
            "lowercase": True,
        },
    }


def not_computable(spec: dict[str, Any]) -> str | None:
    """Why this code cannot compute a stored featurizer spec exactly (its version, or its token
    hash under that version, unknown here), or None if it can: the one rule score applies
    before trusting a bundle's features (``bundle.check_featurizer``)."""
    version = spec.get("version")
    if version not in COMPUTED_HASHES:
        return f"featurizer version {version}, but this dl_pipeline computes versions {', '.join(map(str, COMPUTED_HASHES))}"
    if spec.get("kind") != "text":
        return None
    name = spec.get("tokens", {}).get("hash", "crc32")
    if name not in COMPUTED_HASHES[version]:
        return f"tokens.hash {name!r} is not a featurizer version {version} hash (this dl_pipeline knows {', '.join(COMPUTED_HASHES[version])})"
    return None


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
# Character codes and hashed n-grams
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


_U64 = (1 << 64) - 1


def word64(data: bytes) -> int:
    """The ``word64`` token hash (featurizer version 2), by definition: starting from
    0x9E3779B97F4A7C15 xor the byte length, each 8 bytes (little-endian, the last zero-padded)
    is xored in, multiplied by 0xBF58476D1CE4E5B9 and folded (``h ^= h >> 32``); then
    MurmurHash3's 64-bit finalizer. ``text_kernel._word64`` computes the same a word at a time."""
    from dl_pipeline import text_kernel as k

    h = k.WORD64_SEED ^ len(data)
    for j in range(0, len(data), 8):
        h = ((h ^ int.from_bytes(data[j : j + 8], "little")) * k.WORD64_STEP) & _U64
        h ^= h >> 32
    h ^= h >> 33
    h = (h * k.FMIX1) & _U64
    h ^= h >> 33
    h = (h * k.FMIX2) & _U64
    return h ^ (h >> 33)


def token_hash(token: str, name: str) -> int:
    """A token's 64-bit hash by the spec's ``tokens.hash``: ``crc32`` or ``word64`` of its UTF-8."""
    data = token.encode("utf-8")
    return word64(data) if name == "word64" else zlib.crc32(data)


@functools.lru_cache(maxsize=8)
def _char_table(alphabet: str) -> np.ndarray:
    """Code point (< 128) -> 1-based alphabet index; 0 elsewhere (index 128: every code point
    above). Duplicates keep the first."""
    table = np.zeros(129, dtype=np.uint8)
    for i, ch in reversed(list(enumerate(alphabet, start=1))):
        if ord(ch) < 128:
            table[ord(ch)] = i
    return table


def featurize_texts(texts: Sequence[str | None] | Any, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cleaned texts (a sequence of str/None, or an Arrow string array) -> the feature arrays
    the spec enables:

    * ``chars`` uint8 [n, length]: the first ``length`` characters of the lower-cased text,
      reversed if the spec says so, as 1-based alphabet indices (0: not in it, and padding).
    * ``tokens`` int32 [n, max_tokens], ``length`` and ``words`` int32 [n]: tokens of the
      lower-cased text (``\\w+`` runs, and single other non-space characters) within its first
      32 * max_tokens characters, each hashed from its UTF-8 by the spec's ``tokens.hash``
      (``token_hash``; stable across processes, unlike Python's salted ``hash``); unigram ids
      ``1 + bucket(h)`` in text order, then bigram ids ``1 + bucket((h1 * 116049371 + h2) mod
      2^64)``, cut at max_tokens, 0-padded; ``bucket(v)`` is ``v mod buckets`` for crc32 and
      ``(v >> 32) * buckets >> 32`` for word64.
      ``length`` counts the ids, ``words`` the unigrams among them (a recurrent model reads those;
      ``length`` alone cannot say where they end once a row is cut).

    Computed in one compiled pass over the batch's UTF-8 (``text_kernel``), with no Python
    object per row or token; a row the kernel cannot take alone (see ``text_kernel``) is
    computed here in Python by the same definition.
    """
    try:
        from dl_pipeline import text_kernel
    except ImportError as exc:  # a cluster whose Python lacks numba (e.g. a --no-deps install)
        from dl_pipeline.errors import UserError

        raise UserError(f"featurization needs numba where it runs (driver and executors): pip install 'numba>=0.59' ({exc})") from None
    data, offsets = _utf8_buffers(texts)
    n = len(offsets) - 1
    cs, ts = spec["chars"], spec["tokens"]
    # np.empty, not zeros: the kernel writes every byte, padding included, and numpy backs a large
    # empty array with huge pages (calloc's fresh zero pages cost ~4x more to fault in).
    chars = np.empty((n, int(cs["length"]) if cs["enabled"] else 0), dtype=np.uint8)
    ids = np.empty((n, int(ts["max_tokens"]) if ts["enabled"] else 0), dtype=np.int32)
    lengths, words = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    fallback = np.zeros(n, dtype=np.bool_)
    lower, classes = text_kernel.code_point_tables()
    table = _char_table(cs["alphabet"])
    byte_lower, byte_class, byte_code = text_kernel.ascii_tables(table.tobytes())
    buckets, ngrams = np.uint64(ts["buckets"]), int(ts["ngrams"])
    hash_name = ts.get("hash", "crc32")
    if hash_name not in TOKEN_HASHES:  # bundles are checked on load (not_computable); a hand-made spec here
        raise ValueError(f"tokens.hash={hash_name!r}: this featurizer computes {' or '.join(TOKEN_HASHES)}")
    hash_kind = text_kernel.WORD64 if hash_name == "word64" else text_kernel.CRC32
    text_kernel.featurize_utf8(data, offsets, lower, classes, table, byte_lower, byte_class, byte_code,
                               text_kernel.crc_table(), hash_kind,
                               bool(cs["reverse"]), 32 * ids.shape[1], buckets, ngrams,
                               chars, ids, lengths, words, fallback)
    for i in np.flatnonzero(fallback):
        # The row by position, from the buffers the kernel read (a pandas Series indexes by label).
        text = bytes(data[offsets[i] : offsets[i + 1]]).decode("utf-8")
        if chars.shape[1]:
            length = chars.shape[1]
            points = np.array([ord(c) for c in text[: 2 * length].lower()[:length]], dtype=np.int64)
            codes = table[np.minimum(points, 128)]  # code points past ASCII are not in the alphabet
            text_kernel.place_chars(chars[i], codes, len(codes), bool(cs["reverse"]))
        if ids.shape[1]:
            tokens = tokenize(text[: 32 * ids.shape[1]])
            hashes = np.array([token_hash(t, hash_name) for t in tokens], dtype=np.uint64)
            lengths[i], words[i] = text_kernel.place_grams(ids[i], hashes, len(tokens), buckets, ngrams, hash_kind)
    out: dict[str, np.ndarray] = {}
    if chars.shape[1]:
        out["chars"] = chars
    if ids.shape[1]:
        out.update(tokens=ids, length=lengths, words=words)
    return out


def _utf8_buffers(texts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (UTF-8 bytes uint8 [total], row offsets int64 [n + 1]); None and null are empty.

    Arrow's own layout, so an Arrow column is read in place and a Python list is converted by
    Arrow in C (~40 ns/row)."""
    import pyarrow as pa

    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, type=pa.large_string())
    return _value_buffers(arr, pa.large_string())


def _value_buffers(arr: Any, large_type: Any) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow string or binary array -> (its bytes uint8 [total], row offsets int64 [n + 1]),
    as ``large_type``; nulls are empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != large_type:
        arr = arr.cast(large_type)
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar(b"" if large_type == pa.large_binary() else "", large_type))
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
    return data, offsets


def content_hashes(values: Any) -> np.ndarray:
    """Texts or pixel blobs (an Arrow string or binary array) -> uint64 [n]: ``word64`` of each
    value's bytes (no case folding; a text's UTF-8). Two values are the same content for
    prepare when these are equal."""
    import pyarrow as pa

    from dl_pipeline import text_kernel

    binary = pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
    data, offsets = _value_buffers(values, pa.large_binary() if binary else pa.large_string())
    return text_kernel.hash_values(data, offsets)


def quantize_chars(texts: Sequence[str], spec: dict[str, Any]) -> np.ndarray:
    """Texts -> chars uint8 [n, length] (``featurize_texts``'s, whatever the spec enables)."""
    return featurize_texts(texts, _only(spec, "chars"))["chars"]


def hash_token_words(texts: Sequence[str], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [n, max_tokens], lengths int32 [n], words int32 [n]) (``featurize_texts``'s)."""
    out = featurize_texts(texts, _only(spec, "tokens"))
    return out["tokens"], out["length"], out["words"]


def hash_tokens(texts: Sequence[str], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [n, max_tokens], lengths int32 [n])."""
    ids, lengths, _ = hash_token_words(texts, spec)
    return ids, lengths


def _only(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    other = "tokens" if kind == "chars" else "chars"
    return {**spec, kind: {**spec[kind], "enabled": True}, other: {**spec[other], "enabled": False}}


def encoded_features(values: Sequence[Any] | Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Cleaned texts, or pixel blobs (uint8 H*W*C bytes), as a sequence or an Arrow array (read
    in place), -> the stored feature columns as
    Arrow arrays by name (``dataset.arrow_schema``): fixed-length lists, int32 ``length`` and
    ``words``."""
    import pyarrow as pa

    if spec["kind"] == "text":
        feats = featurize_texts(values, spec)
        out = {name: list_array(feats[name]) for name in ("chars", "tokens") if name in feats}
        for name in ("length", "words"):
            if name in feats:
                out[name] = pa.array(feats[name], type=pa.int32())
        return out
    im = spec["image"]
    width = im["height"] * im["width"] * im["channels"]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
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
