"""The compiled text featurizer: hashed n-grams and character codes for a batch of UTF-8 texts.

Compiled by numba, and cached on disk where numba can (see ``_cacheable``): the first process
compiles it in ~4 s, later ones, Spark's Python workers included, load it in ~0.4 s. It
computes exactly what ``features`` defines row by row (the regex tokenizer, ``str.lower``, and
the spec's token hash of each token's UTF-8: ``word64``, or version 1's ``zlib.crc32``), over
code points below U+10000. A row it cannot take alone (a code point outside
the Basic Multilingual Plane, or one whose lower case is not one code point or depends on its
neighbours: 'İ' -> 'i̇', final sigma) is flagged, and ``features`` computes that row in Python.

Inputs are Arrow's layout: one uint8 buffer of UTF-8 and int64 offsets [n + 1]. Outputs:
chars uint8 [n, char_length] and ids int32 [n, max_tokens], every byte written (padding
included, so they may be allocated uninitialised); lengths and words int32 [n], fallback bool [n].
The bytes must be valid UTF-8 (Arrow validates what it builds from str): the decoder trusts
each lead byte's length.

Where the time goes (AG News, ~238 bytes and ~47 tokens a row; 2 vCPUs here; tokens only, from
Arrow, ~0.6 us/row): token bounds 0.13 (64-byte vector masks, then one step per token; the
scalar classifier it replaced, and a separate ASCII pass, cost ~0.3 and ~0.17 more); ``word64``
~0.2 (one straight-line step for a token of up to 8 bytes; CRC-32 costs ~0.25-0.3 more, a
dependent table lookup per byte); placing ids 0.08 (multiply-shift); paging in the fresh ids
array 0.1.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import caching
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic


def _cacheable() -> bool:
    """Whether numba can cache this module's machine code: beside a source file (or wherever
    NUMBA_CACHE_DIR says), or, for a module inside a zip (``spark-submit --py-files``), in the
    user's cache directory where this numba has that locator. Elsewhere ``cache=True`` would
    fail at import, so each process compiles (~4 s) instead."""
    return os.path.isfile(__file__) or bool(os.environ.get("NUMBA_CACHE_DIR")) or hasattr(caching, "_ZipCacheLocator")


_CACHE = _cacheable()

BIGRAM_MULT = 116049371  # fastText's n-gram hash multiplier
BMP = 1 << 16

# Token hashes, by the spec's ``tokens.hash`` (``features.COMPUTED_HASHES``).
CRC32, WORD64 = 0, 1
WORD64_SEED = 0x9E3779B97F4A7C15
WORD64_STEP = 0xBF58476D1CE4E5B9
FMIX1, FMIX2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53  # MurmurHash3's 64-bit finalizer
# word64 reads little-endian words; a big-endian CPU assembles them a byte at a time (a
# compile-time constant to numba, so the check costs nothing).
_LITTLE_ENDIAN = sys.byteorder == "little"


@functools.cache
def code_point_tables() -> tuple[np.ndarray, np.ndarray]:
    """(lower int32 [65536], classes uint8 [65536]) over the Basic Multilingual Plane.

    ``lower[c]`` is the one code point ``chr(c).lower()`` gives, or -1 where the kernel must
    leave the row to Python: lower cases of more than one code point, surrogates, and capital
    sigma (CPython lower-cases it by context). ``classes[c]`` of a lower-cased code point: 1 for
    a regex ``\\w`` character (``isalnum()`` or '_', as ``re`` defines it for str), 2 for a
    ``\\s`` one (``isspace()``), 0 for any other (a one-character token). ~30 ms, once per process.
    """
    lower = np.full(BMP, -1, dtype=np.int32)
    classes = np.zeros(BMP, dtype=np.uint8)
    for c in range(BMP):
        if 0xD800 <= c < 0xE000:
            continue
        ch = chr(c)
        low = ch.lower()
        if len(low) == 1 and ord(low) < BMP and c != 0x3A3:
            lower[c] = ord(low)
        classes[c] = 1 if (ch.isalnum() or ch == "_") else 2 if ch.isspace() else 0
    return lower, classes


@functools.cache
def crc_table() -> np.ndarray:
    """zlib's CRC-32 table (reflected polynomial 0xEDB88320): uint32 [256]."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0xEDB88320), t >> 1).astype(np.uint32)
    return t


@functools.cache
def ascii_tables(alphabet_codes: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per byte value (uint8 [256] each): its lower case (ASCII; others unchanged), its class
    (as ``code_point_tables``; meaningful below 0x80), and its alphabet code once lower-cased
    (0 from 0x80), from ``alphabet_codes``, the 129-entry code table as bytes."""
    lower, classes = code_point_tables()
    byte_lower = np.arange(256, dtype=np.uint8)
    byte_lower[:128] = lower[:128]
    codes = np.zeros(256, dtype=np.uint8)
    codes[:128] = np.frombuffer(alphabet_codes, dtype=np.uint8)[byte_lower[:128]]
    return byte_lower, classes[:256].copy(), codes


@njit(cache=_CACHE, nogil=True, inline="always")
def _crc32(buf, start, stop, byte_map, table):
    """zlib.crc32 of byte_map[buf[start:stop]], a byte a step (tokens are ~4 bytes: wider steps
    measured no faster)."""
    crc = np.uint32(0xFFFFFFFF)
    for j in range(start, stop):
        crc = table[(crc ^ np.uint32(byte_map[buf[j]])) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
    return np.uint64(crc ^ np.uint32(0xFFFFFFFF))


@intrinsic
def _load_u64(typingctx, arr, idx):
    """arr[idx:idx + 8] of a uint8 array as one little-endian uint64, one unaligned load (8
    byte loads and shifts are not merged into one by this LLVM). The caller keeps idx + 8 in
    bounds."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        return builder.load(builder.bitcast(ptr, ir.IntType(64).as_pointer()), align=1)

    return types.uint64(arr, idx), codegen


@njit(cache=_CACHE, nogil=True, inline="always")
def _word(buf, j, nbytes):
    """buf[j:j + nbytes] (1 <= nbytes <= 8) as a little-endian uint64, zero above nbytes."""
    if _LITTLE_ENDIAN and j + 8 <= buf.shape[0]:
        w = _load_u64(buf, j)
        if nbytes < 8:
            w &= (np.uint64(1) << np.uint64(8 * nbytes)) - np.uint64(1)
        return w
    w = np.uint64(0)
    for k in range(nbytes):
        w |= np.uint64(buf[j + k]) << np.uint64(8 * k)
    return w


@njit(cache=_CACHE, nogil=True, inline="always")
def _ascii_lower_word(w):
    """ASCII 'A'-'Z' -> 'a'-'z' in each byte of w (every byte < 0x80): a byte b has its top bit
    set by b + 0x3F when b >= 'A' and by b + 0x25 when b > 'Z', with no carry between bytes."""
    upper = (w + np.uint64(0x3F3F3F3F3F3F3F3F)) & ~(w + np.uint64(0x2525252525252525)) & np.uint64(0x8080808080808080)
    return w | (upper >> np.uint64(2))


@njit(cache=_CACHE, nogil=True, inline="always")
def _word64_step(h, w, ascii_lower):
    """One word of ``word64``: w (lower-cased first if asked) xored in, multiplied, folded."""
    if ascii_lower:
        w = _ascii_lower_word(w)
    h = (h ^ w) * np.uint64(WORD64_STEP)
    return h ^ (h >> np.uint64(32))


@njit(cache=_CACHE, nogil=True, inline="always")
def _word64(buf, start, stop, ascii_lower):
    """The ``word64`` hash of buf[start:stop] (``features.word64``'s definition): the bytes 8 at
    a time as little-endian words (the last zero-padded), each xored in and multiplied, then
    MurmurHash3's finalizer. ``ascii_lower``: lower-case ASCII letters on the way (the bytes must
    then be ASCII). One word for most tokens (~4 bytes), against CRC-32's lookup per byte."""
    n = stop - start
    h = np.uint64(WORD64_SEED) ^ np.uint64(n)
    if 0 < n <= 8:  # most tokens: one word, straight-line code (the loop below cost ~0.1 us/row more)
        h = _word64_step(h, _word(buf, start, n), ascii_lower)
    else:
        for j in range(start, stop, 8):
            h = _word64_step(h, _word(buf, j, min(8, stop - j)), ascii_lower)
    h ^= h >> np.uint64(33)
    h *= np.uint64(FMIX1)
    h ^= h >> np.uint64(33)
    h *= np.uint64(FMIX2)
    h ^= h >> np.uint64(33)
    return h


@njit(cache=_CACHE, nogil=True)
def hash_values(data, offsets):
    """``word64`` (no case folding) of each value data[offsets[i]:offsets[i + 1]] -> uint64 [n]:
    prepare's content hash, the key its de-duplication, row groups and splits follow."""
    n = offsets.shape[0] - 1
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = _word64(data, offsets[i], offsets[i + 1], False)
    return out


@njit(cache=_CACHE, nogil=True, inline="always")
def _mod(v, d, inv):
    """v % d for uint64 v and 1 <= d < 2^31 (``features.hash_buckets``), without a 64-bit
    division (~40 cycles on many CPUs): a quotient from float64 (``inv`` = 1/d) is off by at
    most ~2^64 / d * 2^-52 + 1 units, and the remainder is corrected in signed arithmetic, where
    that error times d stays far below 2^63. (Tiny d loop more: d = 2 up to ~2^11 steps.)"""
    if d == 1:
        return 0
    q = np.uint64(np.float64(v) * inv)
    r = np.int64(v - q * d)
    sd = np.int64(d)
    while r < 0:
        r += sd
    while r >= sd:
        r -= sd
    return r


@njit(cache=_CACHE, nogil=True, inline="always")
def _put_utf8(buf, k, c):
    """Append code point ``c`` (< U+10000, not a surrogate) to buf at k as UTF-8; returns the new k."""
    if c < 0x80:
        buf[k] = c
        return k + 1
    if c < 0x800:
        buf[k] = 0xC0 | (c >> 6)
        buf[k + 1] = 0x80 | (c & 0x3F)
        return k + 2
    buf[k] = 0xE0 | (c >> 12)
    buf[k + 1] = 0x80 | ((c >> 6) & 0x3F)
    buf[k + 2] = 0x80 | (c & 0x3F)
    return k + 3


@njit(cache=_CACHE, nogil=True, inline="always")
def _bucket(v, buckets, inv, hash_kind):
    """A 64-bit gram hash -> its bucket in 0..buckets-1: ``v mod buckets`` for CRC32 (as fastText
    reduces), the top 32 bits scaled, ``(v >> 32) * buckets >> 32``, for WORD64 (a multiply
    and a shift; its hashes are mixed into every bit)."""
    if hash_kind == WORD64:
        return np.int64(((v >> np.uint64(32)) * buckets) >> np.uint64(32))
    return _mod(v, buckets, inv)


@njit(cache=_CACHE, nogil=True)
def place_grams(ids_row, hashes, count, buckets, ngrams, hash_kind):
    """One row's token hashes (uint64 [>= min(count, T + 1)], ``count`` tokens) -> ids_row int32
    [T]: unigram ids ``1 + bucket(h)`` in columns 0.., then bigram ids
    ``1 + bucket((h1 * 116049371 + h2) mod 2^64)`` after them, cut at T (``_bucket``).
    Returns (length, words): ids written, and how many of them are unigrams. The rest is 0."""
    t = ids_row.shape[0]
    words = min(count, t)
    inv = 1.0 / np.float64(buckets)
    for j in range(words):
        ids_row[j] = np.int32(_bucket(hashes[j], buckets, inv, hash_kind)) + 1
    length = words
    if ngrams >= 2:
        mult = np.uint64(BIGRAM_MULT)
        for j in range(count - 1):
            col = count + j
            if col >= t:
                break
            ids_row[col] = np.int32(_bucket(hashes[j] * mult + hashes[j + 1], buckets, inv, hash_kind)) + 1
            length = col + 1
    ids_row[length:] = 0
    return length, words


@njit(cache=_CACHE, nogil=True)
def place_chars(chars_row, codes, n, reverse):
    """The first ``n`` alphabet codes of a row -> chars_row uint8 [L], reversed if asked, 0-padded."""
    for p in range(n):
        chars_row[p] = codes[n - 1 - p] if reverse else codes[p]
    chars_row[n:] = 0


@intrinsic
def _class_masks64(typingctx, arr, idx):
    """64 bytes from arr[idx] -> (word mask, punctuation mask, non-ASCII mask), bit k for byte idx + k, over
    whole vectors (one 64-byte load, compares, each <64 x i1> bitcast to a 64-bit mask: pmovmskb).
    The ASCII classes by arithmetic (``\\w``: 0-9 A-Z a-z _; ``\\s``: \\t-\\r, \\x1c-\\x1f, space;
    the rest punctuation), the same as ``code_point_tables`` below 0x80. The caller keeps
    idx + 64 in bounds, and ignores bits of bytes past its row (or of non-ASCII ones)."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vt = ir.VectorType(ir.IntType(8), 64)
        v = builder.load(builder.bitcast(builder.gep(ary.data, [args[1]]), vt.as_pointer()), align=1)

        def k(c):
            return ir.Constant(vt, [c] * 64)

        def below(x, c):  # unsigned x < c, per byte
            return builder.icmp_unsigned("<", x, k(c))

        word = builder.or_(builder.or_(below(builder.sub(v, k(48)), 10), below(builder.sub(builder.or_(v, k(0x20)), k(97)), 26)),
                           builder.icmp_unsigned("==", v, k(95)))
        space = builder.or_(builder.or_(builder.icmp_unsigned("==", v, k(32)), below(builder.sub(v, k(9)), 5)),
                            below(builder.sub(v, k(28)), 4))
        punct = builder.not_(builder.or_(word, space))
        high = builder.icmp_unsigned(">=", v, k(0x80))
        i64 = ir.IntType(64)
        return context.make_tuple(builder, signature.return_type, [builder.bitcast(m, i64) for m in (word, punct, high)])

    return types.UniTuple(types.uint64, 3)(arr, idx), codegen


@njit(cache=_CACHE, nogil=True)
def _ascii_token_bounds(data, p, stop, byte_class, starts, ends):
    """Tokens of the ASCII bytes data[p:stop] -> their bounds in starts/ends; returns the count,
    or -1 if a byte there is not ASCII (found on the way: a separate pass cost ~0.15 us/row).

    64 bytes a step become a word mask and a punctuation mask; a token starts at a word byte
    after a non-word byte and at every punctuation byte, and ends symmetrically; set bits are
    read off with trailing-zero counts, one step per token rather than a branch per byte."""
    ns = 0
    ne = 0
    carry = np.uint64(0)  # 1 if the byte before this block is a word byte
    q0 = p
    while q0 < stop:
        nb = min(64, stop - q0)
        if q0 + 64 <= data.shape[0]:  # a whole vector, even where the row ends inside it
            wm, pm, hm = _class_masks64(data, q0)
            if nb < 64:
                keep = (np.uint64(1) << np.uint64(nb)) - np.uint64(1)
                wm &= keep
                pm &= keep
                hm &= keep
            if hm:
                return -1
        else:  # the buffer's last bytes
            wm = np.uint64(0)
            pm = np.uint64(0)
            for k in range(nb):
                if data[q0 + k] >= 0x80:
                    return -1
                c = byte_class[data[q0 + k]]
                wm |= np.uint64(c == 1) << np.uint64(k)
                pm |= np.uint64(c == 0) << np.uint64(k)
        after = np.uint64(0)
        if q0 + nb < stop:
            after = np.uint64(byte_class[data[q0 + nb]] == 1)
        sm = (wm & ~((wm << np.uint64(1)) | carry)) | pm
        em = (wm & ~((wm >> np.uint64(1)) | (after << np.uint64(nb - 1)))) | pm
        while sm:
            starts[ns] = q0 + trailing_zeros(sm)
            ns += 1
            sm &= sm - np.uint64(1)
        while em:
            ends[ne] = q0 + trailing_zeros(em) + 1
            ne += 1
            em &= em - np.uint64(1)
        carry = (wm >> np.uint64(nb - 1)) & np.uint64(1)
        q0 += nb
    return ns


@njit(cache=_CACHE, nogil=True)
def _ascii_row(data, p, end, byte_lower, byte_class, byte_code, crc, hash_kind, reverse, token_chars, chars_row,
               hashes, max_tokens, starts, ends):
    """A row read as ASCII (bytes are characters): codes into chars_row (all of it), token hashes
    into hashes; returns the token count, at most max_tokens (more cannot change the ids), or -1
    if a byte it reads (the first chars_row.shape[0], and the first token_chars when it has
    tokens) is not ASCII: the caller then reads the row as UTF-8. The bounds of every token in
    the first token_chars bytes are found (a block at a time, so no early stop), hence
    ``starts``/``ends`` of >= token_chars slots."""
    m = min(end - p, chars_row.shape[0])
    seen = np.uint8(0)  # every byte read, or-ed: non-ASCII if its top bit is set
    if reverse:
        for j in range(m):
            b = data[p + m - 1 - j]
            seen |= b
            chars_row[j] = byte_code[b]
    else:
        for j in range(m):
            b = data[p + j]
            seen |= b
            chars_row[j] = byte_code[b]
    if seen >= 0x80:
        return -1
    chars_row[m:] = 0
    if max_tokens == 0:
        return 0
    nt = _ascii_token_bounds(data, p, min(end, p + token_chars), byte_class, starts, ends)
    if nt < 0:
        return -1
    nt = min(nt, max_tokens)
    if hash_kind == WORD64:
        for t in range(nt):
            hashes[t] = _word64(data, starts[t], ends[t], True)
    else:
        for t in range(nt):
            hashes[t] = _crc32(data, starts[t], ends[t], byte_lower, crc)
    return nt


@njit(cache=_CACHE, nogil=True, inline="always")
def _hash_word(word, k, identity, crc, hash_kind):
    """The hash of word[:k], a token's lower-cased UTF-8."""
    if hash_kind == WORD64:
        return _word64(word, 0, k, False)
    return _crc32(word, 0, k, identity, crc)


@njit(cache=_CACHE, nogil=True)
def _unicode_row(data, p, end, lower, classes, char_table, crc, identity, hash_kind, reverse, token_chars,
                 chars_row, hashes, max_tokens, codes, word):
    """Any row, decoded from UTF-8 one code point at a time (as ``_ascii_row``, through the
    code point tables). Returns the token count, or -1 for a row left to Python. A word's
    lower-cased UTF-8 collects in ``word`` and is hashed with the ``identity`` byte map (the
    ASCII path passes its lower-casing map to the same ``_crc32``)."""
    char_len = chars_row.shape[0]
    nchar = 0  # code points read
    ntok = 0
    tokens_open = max_tokens > 0
    k = 0  # bytes of the current word so far (0: not in a word)
    while p < end and (nchar < char_len or tokens_open):
        b0 = np.int32(data[p])
        if b0 < 0x80:
            c = b0
            p += 1
        elif b0 < 0xE0:
            c = ((b0 & 0x1F) << 6) | (np.int32(data[p + 1]) & 0x3F)
            p += 2
        elif b0 < 0xF0:
            c = ((b0 & 0x0F) << 12) | ((np.int32(data[p + 1]) & 0x3F) << 6) | (np.int32(data[p + 2]) & 0x3F)
            p += 3
        else:
            return -1
        low = lower[c]
        if low < 0:
            return -1
        if nchar < char_len:
            codes[nchar] = char_table[min(low, 128)]
        nchar += 1
        if tokens_open:
            cls = classes[low]
            if cls == 1:  # a word character: start or extend a word
                k = _put_utf8(word, k, low)
            else:
                if k:
                    hashes[ntok] = _hash_word(word, k, identity, crc, hash_kind)
                    ntok += 1
                    k = 0
                if cls == 0 and ntok < max_tokens:  # punctuation: a token of its own
                    hashes[ntok] = _hash_word(word, _put_utf8(word, 0, low), identity, crc, hash_kind)
                    ntok += 1
            if nchar >= token_chars or ntok >= max_tokens:
                # The rest of the row cannot change the ids: the text is cut here, or all
                # T columns hold unigrams (no room for bigrams either way).
                tokens_open = False
                if k and ntok < max_tokens:
                    hashes[ntok] = _hash_word(word, k, identity, crc, hash_kind)
                    ntok += 1
                k = 0
    if k:
        hashes[ntok] = _hash_word(word, k, identity, crc, hash_kind)
        ntok += 1
    place_chars(chars_row, codes, min(nchar, char_len), reverse)
    return ntok


@njit(cache=_CACHE, nogil=True)
def featurize_utf8(data, offsets, lower, classes, char_table, byte_lower, byte_class, byte_code, crc, hash_kind,
                   reverse, token_chars, buckets, ngrams, chars_out, ids_out, lengths_out, words_out, fallback_out):
    """Rows ``data[offsets[i]:offsets[i + 1]]`` -> chars_out[i] (if it has columns), ids_out[i],
    lengths_out[i], words_out[i] (if ids_out has columns); fallback_out[i] = True for a row left
    to Python (its outputs unwritten). Tokens are read from the first ``token_chars`` code
    points, characters from the first ``chars_out.shape[1]``."""
    n = offsets.shape[0] - 1
    char_len = chars_out.shape[1]
    max_tokens = ids_out.shape[1]
    codes = np.zeros(max(char_len, 1), dtype=np.uint8)
    hashes = np.zeros(max(token_chars, 1), dtype=np.uint64)
    word = np.zeros(3 * token_chars + 3, dtype=np.uint8)  # the current word's lower-cased UTF-8
    starts = np.zeros(max(token_chars, 1), dtype=np.int64)
    ends = np.zeros(max(token_chars, 1), dtype=np.int64)
    identity = np.arange(256).astype(np.uint8)
    for i in range(n):
        p, end = offsets[i], offsets[i + 1]
        # Only the first max(L, token_chars) characters are ever read: a row whose non-ASCII
        # text lies past them is still an ASCII row here.
        ntok = _ascii_row(data, p, end, byte_lower, byte_class, byte_code, crc, hash_kind, reverse, token_chars,
                          chars_out[i], hashes, max_tokens, starts, ends)
        if ntok < 0:
            ntok = _unicode_row(data, p, end, lower, classes, char_table, crc, identity, hash_kind, reverse,
                                token_chars, chars_out[i], hashes, max_tokens, codes, word)
            if ntok < 0:
                fallback_out[i] = True
                continue
        if max_tokens:
            lengths_out[i], words_out[i] = place_grams(ids_out[i], hashes, ntok, buckets, ngrams, hash_kind)
