"""line_splits: byte ranges of text files read line for line as Spark's text source reads them."""

import random

import numpy as np
import pytest

from dl_pipeline.line_splits import BrokenFile, LineSplit, count_lines, lines_before, plan, read_back, read_lines

PIECES = [b"a", b"bc", b" ", b"  ", b"", b"\xff", b"\xef\xbb\xbf", b"\xc3\xa9", b"\xe2\x80\xa8", b"x y", b"\x0c", b"\xc2\x85", b'"1","t","b"']
ENDS = [b"\n", b"\r\n", b"\r", b"\n\n", b"\r\r\n", b"\n", b"\n"]


def _definition(data: bytes) -> list[tuple[int, str]]:
    """(number, line) of each non-blank line: Hadoop's LineReader ends lines at LF, CRLF or a
    lone CR, which is what bytes.splitlines splits on, and its LineRecordReader drops a UTF-8
    byte-order mark at the start of a file; blank = empty or spaces only."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    return [(i + 1, b.decode("utf-8", "replace")) for i, b in enumerate(data.splitlines()) if b.strip(b" ")]


def _lines(split, first_number):
    """read_lines' pieces, joined: (numbers, lines); the lines it located read back the same."""
    numbers, lines = [], []
    for piece_numbers, piece_lines in read_lines(split, first_number):
        numbers += piece_numbers.tolist()
        lines += piece_lines
    located = [(n.tolist(), ls, spans, physical) for n, ls, spans, physical in read_lines(split, first_number, located=True)]
    assert [n for piece in located for n in piece[0]] == numbers and [x for p in located for x in p[1]] == lines
    for _, piece_lines, spans, _ in located:
        assert spans is None or read_back(split.url, spans) == piece_lines
    assert sum(p[3] for p in located) == count_lines(split)[0]
    return numbers, lines


def _read_all(url: str, size: int, min_splits: int, max_bytes: int):
    got, physical = [], 0
    for split in plan({url: size}, min_splits, max_bytes):
        lines_in, records = count_lines(split)
        numbers, lines = _lines(split, physical + 1)
        assert len(lines) == records  # the two counts agree split by split
        got += list(zip(numbers, lines, strict=True))
        physical += lines_in
    return got, physical


def _random_file(rng) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 12)):
        parts += [rng.choice(PIECES) * rng.randint(0, 3), rng.choice(ENDS)]
    if parts and rng.random() < 0.5:
        parts.pop()  # no terminator after the last line
    return (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + b"".join(parts)


def test_every_line_is_read_once_whatever_the_cuts(tmp_path, monkeypatch):
    """Random files of LF / CRLF / lone-CR lines, blank and space-only lines, invalid UTF-8, a
    byte-order mark, and the characters str.splitlines (not Hadoop) splits on, cut into random
    byte ranges, read ahead a few bytes at a time and handed on in pieces of a few bytes (so line
    ends fall across reads and pieces)."""
    from dl_pipeline import line_splits

    rng = random.Random(7)
    path = tmp_path / "f.csv"
    for _ in range(1500):
        data = _random_file(rng)
        path.write_bytes(data)
        monkeypatch.setattr(line_splits, "_TAIL_READ", rng.randint(1, 5))
        monkeypatch.setattr(line_splits, "CHUNK_BYTES", rng.randint(1, 9))  # splits read in pieces
        got, physical = _read_all(f"file://{path}", len(data), rng.randint(1, 8), rng.randint(1, 7))
        assert got == _definition(data), data
        assert physical == len(data.removeprefix(b"\xef\xbb\xbf").splitlines()), data


def test_each_split_numbers_its_lines_after_those_before_it_in_its_file(tmp_path):
    """Several files cut into several splits each: with ``lines_before`` (the rule prepare and
    score share) every file's lines come out numbered 1..n, in order, whatever the cuts."""
    rng = random.Random(11)
    for _ in range(200):
        files = {}
        for name in ("a.csv", "b.csv", "c.csv"):
            data = _random_file(rng)
            (tmp_path / name).write_bytes(data)
            files[f"file://{tmp_path / name}"] = data
        splits = plan({url: len(d) for url, d in files.items()}, rng.randint(1, 9), rng.randint(1, 7))
        before = lines_before(splits, [count_lines(s)[0] for s in splits])
        got: dict[str, list] = {url: [] for url in files}
        for split, n in zip(splits, before, strict=True):
            numbers, lines = _lines(split, n + 1)
            got[split.url] += zip(numbers, lines, strict=True)
        assert got == {url: _definition(d) for url, d in files.items()}
    with pytest.raises(ValueError, match="not in byte order"):
        lines_before([LineSplit("a", 5, 9), LineSplit("a", 0, 5)], [1, 1])


@pytest.mark.parametrize("k", [65534, 65535, 65536])
def test_a_crlf_across_the_read_ahead_is_one_line_end(tmp_path, k):
    """A split starting inside a line longer than one read-ahead (64 KiB), its CR the last byte
    read (k = 65535) or about to be: the next line starts after the LF."""
    from dl_pipeline.line_splits import LineSplit

    data = b"x" * k + b"\r\n" + b"y\n"
    path = tmp_path / "long.csv"
    path.write_bytes(data)
    url = f"file://{path}"
    assert _lines(LineSplit(url, 1, len(data)), 2) == ([2], ["y"])
    assert count_lines(LineSplit(url, 0, 1)) == (1, 1) and count_lines(LineSplit(url, 1, len(data))) == (1, 1)


def test_a_gzip_file_is_read_whole_as_its_lines_whatever_the_pieces(tmp_path, monkeypatch):
    """The same random files gzipped (sometimes as two concatenated members, which Hadoop's codec
    reads on through), decompressed a few bytes at a time: line ends, CRLFs and the byte-order
    mark fall across pieces. One split, whatever the split size asked."""
    import gzip

    from dl_pipeline import line_splits

    rng = random.Random(11)
    path = tmp_path / "f.csv.gz"
    for _ in range(800):
        data = _random_file(rng)
        cut = rng.randint(0, len(data))
        members = [data[:cut], data[cut:]] if rng.random() < 0.3 else [data]
        path.write_bytes(b"".join(gzip.compress(m) for m in members))
        monkeypatch.setattr(line_splits, "CHUNK_BYTES", rng.randint(1, 7))
        size = path.stat().st_size
        assert len(plan({f"file://{path}": size}, 4, 3)) == 1
        got, physical = _read_all(f"file://{path}", size, 4, 3)
        assert got == _definition(data), data
        assert physical == len(data.removeprefix(b"\xef\xbb\xbf").splitlines()), data


def test_a_broken_gzip_file_is_named(tmp_path):
    """A gzip file cut short, or with a corrupt body, stops with its name (score turns it into one
    line before anything is written)."""
    import gzip


    whole = gzip.compress(b'"1","a","b"\n' * 5000)
    cut, corrupt = tmp_path / "cut.csv.gz", tmp_path / "corrupt.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    corrupt.write_bytes(whole[:20] + bytes(b ^ 0xFF for b in whole[20:40]) + whole[40:])
    for path in (cut, corrupt):
        (split,) = plan({f"file://{path}": path.stat().st_size}, 1, 100)
        with pytest.raises(BrokenFile, match=rf"file://{path}: not a whole gzip file"):
            count_lines(split)


def test_a_real_file_cut_in_two_gives_its_lines_in_order(tmp_path):
    import gzip

    from conftest import AG_TEST

    data = gzip.open(AG_TEST).read()
    path = tmp_path / "ag.csv"
    path.write_bytes(data)
    got, physical = _read_all(f"file://{path}", len(data), 2, 1 << 30)
    assert physical == len(got) == 7600 and got == _definition(data)


@pytest.mark.parametrize("sizes, min_splits, max_bytes, expect", [
    ({"a": 10}, 2, 100, [("a", 0, 5), ("a", 5, 10)]),
    ({"a": 10, "b": 0, "c": 3}, 1, 4, [("a", 0, 4), ("a", 4, 8), ("a", 8, 10), ("c", 0, 3)]),
    ({"a": 0}, 4, 100, []),
    ({"a.gz": 10, "b": 4, "e.gz": 0}, 4, 3, [("a.gz", 0, 10), ("b", 0, 2), ("b", 2, 4)]),  # gzip: one split, whole
    ({"a.gz": 1000, "b": 40}, 5, 100, [("a.gz", 0, 1000), ("b", 0, 10), ("b", 10, 20), ("b", 20, 30), ("b", 30, 40)]),
    ({"a.GZ": 4}, 2, 100, [("a.GZ", 0, 2), ("a.GZ", 2, 4)]),  # not a suffix Hadoop decompresses
])
def test_splits_cover_every_byte_once_and_no_more_than_asked(sizes, min_splits, max_bytes, expect):
    assert [(s.url, s.start, s.end) for s in plan(sizes, min_splits, max_bytes)] == expect


def test_score_batches_do_not_depend_on_the_piece_size():
    """score_tasks cuts a split's rows into model batches as if the split came in one piece: a
    batch's rows (and so the float rounding of its scores) do not change with CHUNK_BYTES."""
    import numpy as np

    from dl_pipeline.score_tasks import _batches

    rng = random.Random(3)
    numbers, lines = np.arange(1, 1001, dtype=np.int64), [f"line {i}" for i in range(1000)]
    whole = [(n.tolist(), x) for n, x in _batches([(numbers, lines)], 64)]
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, 1000), rng.randint(1, 40)))
        pieces = [(numbers[a:b], lines[a:b]) for a, b in zip([0, *cuts], [*cuts, 1000], strict=True)]
        assert [(n.tolist(), x) for n, x in _batches(pieces, 64)] == whole


def test_a_small_file_is_one_range_on_any_number_of_cores():
    """With a floor on the range size (prepare's: Spark's 4 MB open cost), a multi-line record in
    a small file is read whole whatever the cores; past the floor, ranges are cut as before."""
    assert len(plan({"file:///a.csv": 17_903}, 42, 64 << 20, 4 << 20)) == 1
    assert len(plan({"file:///a.csv": 17_903}, 42, 64 << 20)) == 42
    assert [s.end - s.start for s in plan({"file:///a.csv": 10 << 20}, 4, 64 << 20, 4 << 20)] == [4 << 20, 4 << 20, 2 << 20]


def test_count_byte_counts_across_its_slices():
    """count_byte compares a slice at a time: counts on both sides of each cut, and in a short tail."""
    from dl_pipeline.line_splits import _COUNT_SLICE, count_byte

    rng = np.random.default_rng(5)
    data = rng.choice(np.frombuffer(b"ab\n\r", np.uint8), 2 * _COUNT_SLICE + 7).tobytes()
    assert count_byte(data, 0x0A) == data.count(b"\n") and count_byte(data, 0x0D) == data.count(b"\r")
    assert count_byte(b"", 0x0A) == 0


def test_lines_without_cr_are_located_and_read_back(tmp_path):
    """Without CRs every line is located: read back from its byte range (past a byte-order
    mark, blank lines, invalid UTF-8, a line longer than a piece, no final terminator), it is
    the line read_lines gave."""
    data = b"\xef\xbb\xbfa\n\n  \nb\xff c\n" + b"long " * 40 + b"\n\xc3\xa9\n \nlast"
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    url = path.as_uri()
    for cut in (1, 7, 64, len(data)):
        got = []
        for split in plan({url: len(data)}, 1, cut):
            split = LineSplit(split.url, split.start, split.end, chunk_bytes=16)
            for _, lines, spans, _ in read_lines(split, 1, located=True):
                assert spans is not None and read_back(url, spans) == lines
                got += lines
        assert got == ["a", "b\ufffd c", "long " * 40, "\xe9", "last"]


def test_read_back_through_fsspec_reads_the_same_ranges():
    """A file that is not local is read back through its fsspec filesystem, in file order."""
    import fsspec

    fsspec.filesystem("memory").pipe("/read_back/f.csv", b"ab\ncd\n\xc3\xa9\n")
    assert read_back("memory:///read_back/f.csv", np.array([[6, 8], [0, 2], [3, 5]])) == ["\xe9", "ab", "cd"]
    with pytest.raises(BrokenFile, match="memory:///read_back/f.csv: shorter than when it was read"):
        read_back("memory:///read_back/f.csv", np.array([[6, 12]]))  # the file changed since
