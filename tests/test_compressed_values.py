"""Compressed values are refused unless whole (docs/FORMAT.md, "Value encodings"): one complete frame, nothing
after it, a decompressed size within the limits known before anything is inflated.  The same checks run
on ingest (record.count_records), in readers (decode_payload) and in `walsvc verify` (walsvc.verify)."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import zstandard
from crc32c import crc32c

from walsvc import record as R
from walsvc.errors import DecompressionError, RecordError, RecordTooLargeError

MiB = 1024 * 1024
VALUE = b"hello compressed world " * 200


def _record(stored: bytes, code: int = 2, key: bytes = b"k") -> bytes:
    body = R.encode_varint(len(key)) + R.encode_varint(len(stored)) + bytes((code << 2,)) + key + stored
    return body + crc32c(body).to_bytes(4, "little")


def _rle_zstd(total: int, *, content_size: bool = True, byte: int = 0) -> bytes:
    """A hand-made zstd frame of RLE blocks that inflates to `total` bytes: a bomb costs 4 bytes per 128 KiB."""
    block = 128 * 1024
    fhd = 0xC0 if content_size else 0x00  # FCS field 8 bytes, or none; not single-segment; no checksum
    out = bytearray(R.ZSTD_MAGIC + bytes((fhd, 7 << 3)))  # window descriptor: 2**(10+7) = 128 KiB
    if content_size:
        out += total.to_bytes(8, "little")
    left = total
    while True:
        n = min(left, block)
        left -= n
        header = (1 if left == 0 else 0) | (1 << 1) | (n << 3)
        out += header.to_bytes(3, "little") + bytes((byte,))
        if left == 0:
            return bytes(out)


def _no_size(value: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(value)


def _with_size(value: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(value)


def _all_decoders(data: bytes, **limits: int) -> None:
    """Every decoder refuses `data` the same way; raises the first error (all must agree on the class)."""
    errors = []
    for decode in (lambda: R.decode(data, **{k: v for k, v in limits.items() if k == "max_record_bytes"}),
                   lambda: R.count_records(data, 0, len(data), **limits),
                   lambda: R.decode_payload(data, 1, 1, 0, **limits)):
        with pytest.raises(RecordError) as info:
            decode()
        errors.append(info.value)
    assert len({type(e) for e in errors}) == 1, errors
    raise errors[0]


def test_hand_made_rle_frame_is_valid_zstd():
    assert zstandard.ZstdDecompressor().decompress(_rle_zstd(300_000, byte=7)) == b"\x07" * 300_000
    assert R.decode(_record(_rle_zstd(300_000, content_size=False, byte=7)))[0].value == b"\x07" * 300_000


@pytest.mark.parametrize("frame", [_with_size, _no_size], ids=["content-size", "no-content-size"])
@pytest.mark.parametrize("cut", [1, 3, 10, 0.5])
def test_zstd_frame_cut_short_is_refused_everywhere(frame, cut):
    packed = frame(VALUE)
    stored = packed[:-cut] if isinstance(cut, int) else packed[:int(len(packed) * cut)]
    with pytest.raises(DecompressionError) as info:
        _all_decoders(_record(stored))
    assert "zstd" in str(info.value) and "offset 0" in str(info.value)


@pytest.mark.parametrize("stored, missing", [
    (R.ZSTD_MAGIC + b"\x00\x00" + (1 | 100 << 3).to_bytes(3, "little") + b"abc", 97),  # a raw block of 100
    (zstandard.ZstdCompressor(write_checksum=True).compress(VALUE)[:-3], 3),          # the checksum
], ids=["block-data", "checksum"])
def test_zstd_frame_cut_short_says_how_many_bytes_are_missing(stored, missing):
    with pytest.raises(DecompressionError, match=rf"cut short \({missing} bytes missing\)"):
        _all_decoders(_record(stored))


@pytest.mark.parametrize("frame", [_with_size, _no_size], ids=["content-size", "no-content-size"])
@pytest.mark.parametrize("junk", [b"\0", b"xyz", b"\x28\xb5\x2f\xfd", None])
def test_zstd_bytes_after_the_frame_are_refused(frame, junk):
    packed = frame(VALUE)
    stored = packed + (packed if junk is None else junk)  # None: a second complete frame
    with pytest.raises(DecompressionError):
        _all_decoders(_record(stored))


@pytest.mark.parametrize("stored", [
    b"",                                                        # nothing at all
    b"\x28\xb5\x2f",                                            # magic cut short
    b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd",                     # a skippable frame holds no value
    R.ZSTD_MAGIC + b"\x03\x38" + b"\x01\x00\x00\x00" + b"\x01\x00\x00\x01",  # needs dictionary 1
    R.ZSTD_MAGIC + b"\x00\x38" + b"\x07\x00\x00",                # reserved block type 3
    b"garbage that is not zstd",
])
def test_zstd_odd_values_are_decompression_errors(stored):
    with pytest.raises(DecompressionError):
        _all_decoders(_record(stored))


def _block(last: int, kind: int, size: int) -> bytes:
    return ((size << 3) | (kind << 1) | last).to_bytes(3, "little")


_EMPTY = R.ZSTD_MAGIC + bytes((0x20, 0))  # single segment, content size 0, no checksum
_EMPTY_CHECKED = zstandard.ZstdCompressor(write_checksum=True).compress(b"")


@pytest.mark.parametrize("codec", ["compiled", "pure"])
@pytest.mark.parametrize("stored", [
    _EMPTY + _block(1, 0, 5) + b"abcde",                        # a raw block of 5 bytes
    _EMPTY + _block(1, 2, 10) + b"\xff" * 10,                   # a compressed block of garbage
    _EMPTY + _block(1, 1, 100) + b"x",                          # an RLE block of 100 bytes
    _EMPTY + _block(0, 0, 0) * 1000 + _block(1, 2, 10) + b"\xff" * 10,  # garbage after empty blocks
    _EMPTY_CHECKED[:-1] + bytes((_EMPTY_CHECKED[-1] ^ 1,)),     # a wrong checksum
], ids=["raw", "garbage", "rle", "late-garbage", "checksum"])
def test_zstd_frame_declaring_no_content_must_have_empty_blocks(stored, codec, monkeypatch):
    """python-zstandard's decompress() returns b"" for a frame that declares content size 0 without decoding
    its blocks: such values were stored as b"" and passed verify."""
    if codec == "pure":
        monkeypatch.setattr(R, "_c", None)
    with pytest.raises(DecompressionError) as info:
        _all_decoders(_record(stored))
    assert "does not decompress" in str(info.value)


@pytest.mark.parametrize("codec", ["compiled", "pure"])
@pytest.mark.parametrize("stored", [_EMPTY + _block(1, 0, 0), _EMPTY + _block(1, 1, 0) + b"x", _EMPTY_CHECKED,
                                    zstandard.ZstdCompressor().compress(b"")])
def test_zstd_frame_of_no_content_is_the_empty_value(stored, codec, monkeypatch):
    if codec == "pure":
        monkeypatch.setattr(R, "_c", None)
    assert R.decode(_record(stored))[0].value == b""
    assert R.count_records(_record(stored), 0, len(_record(stored))) == 1


def test_zstd_bomb_with_content_size_is_refused_before_inflating():
    bomb = _rle_zstd(64 * 1024 * MiB)  # 64 GiB from 2 MiB of RLE blocks
    data = _record(bomb)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RecordTooLargeError) as info:
            _all_decoders(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "declares 68719476736 bytes" in str(info.value)
    assert time.perf_counter() - started < 5.0  # checked from the header; inflating would take a minute
    assert peak < 16 * MiB


def test_zstd_bomb_without_content_size_stops_at_the_cap():
    bomb = _rle_zstd(4 * 1024 * MiB, content_size=False)  # 4 GiB, no size in the header
    data = _record(bomb)
    started = time.perf_counter()
    with pytest.raises(RecordTooLargeError) as info:
        R.decode(data, max_record_bytes=MiB)
    assert "more than its limit of 1048575 bytes" in str(info.value)
    with pytest.raises(RecordTooLargeError):
        R.count_records(data, 0, len(data), max_record_bytes=MiB)
    assert time.perf_counter() - started < 5.0


def test_value_limit_counts_the_key():
    """key + decompressed value <= max_record_bytes, as for plain records."""
    data = _record(_with_size(b"a" * 4000), key=b"K" * 96)
    assert R.decode(data, max_record_bytes=4096)[0].value == b"a" * 4000
    data = _record(_with_size(b"a" * 4001), key=b"K" * 96)
    with pytest.raises(RecordTooLargeError):
        _all_decoders(data, max_record_bytes=4096)


def test_batch_budget_stops_many_small_bombs():
    """Each record is within max_record_bytes, but the batch would inflate to 1 GiB: refused, and fast."""
    one = _record(_rle_zstd(8 * MiB))
    payload = one * 128
    assert len(payload) < 64 * 1024
    started = time.perf_counter()
    with pytest.raises(RecordTooLargeError) as info:
        R.count_records(payload, 0, len(payload))  # defaults: 16 MiB records, 32 MiB batches
    assert info.value.offset == 3 * len(one)  # the fourth record would take the batch past 32 MiB
    with pytest.raises(RecordTooLargeError) as info:
        R.decode_payload(payload, 1, 128, 0)
    assert info.value.lsn == 4  # the reader stops at the same record as ingest, not at a later one
    assert time.perf_counter() - started < 5.0
    small = one * 3
    assert R.count_records(small, 0, len(small)) == 3
    assert [len(r.value) for r in R.decode_payload(small, 1, 3, 0)] == [8 * MiB] * 3


def test_readers_accept_every_batch_the_writer_accepts():
    """The reader's budget accounting is never stricter than ingest's."""
    values = [_with_size(bytes(range(200)) * (1000 + i)) for i in range(4)]
    payload = b"".join(_record(v) for v in values)
    exact = sum(len(bytes(range(200)) * (1000 + i)) for i in range(4)) + len(payload) - sum(map(len, values))
    assert R.count_records(payload, 0, len(payload), max_batch_bytes=exact) == 4
    assert len(R.decode_payload(payload, 1, 4, 0, max_batch_bytes=exact)) == 4
    with pytest.raises(RecordTooLargeError):
        R.count_records(payload, 0, len(payload), max_batch_bytes=exact - 1)


try:
    import lz4.block as lz4_block
except ImportError:  # the optional 'lz4' extra
    lz4_block = None


def _lz4(value: bytes) -> bytes:
    if lz4_block is None:
        return b""  # the tests below are skipped
    return R.encode_varint(len(value)) + lz4_block.compress(value, store_size=False)


@pytest.mark.skipif(lz4_block is None, reason="the optional lz4 package is not installed")
@pytest.mark.parametrize("stored, error", [
    (_lz4(VALUE)[:-3], DecompressionError),                        # block cut short
    (_lz4(VALUE) + b"junk", DecompressionError),                    # bytes after the block
    (R.encode_varint(len(VALUE) + 1) + _lz4(VALUE)[2:], DecompressionError),  # prefix says one more byte
    (R.encode_varint(len(VALUE) - 1) + _lz4(VALUE)[2:], DecompressionError),  # ... or one fewer
    (b"\x80", DecompressionError),                                  # prefix cut short
    (b"\xff" * 11, DecompressionError),                             # prefix over-long
    (b"", DecompressionError),                                      # nothing at all
    (R.encode_varint(1 << 40) + b"\x00", RecordTooLargeError),       # a 1 TiB claim, refused before inflating
])
def test_lz4_damaged_values_are_refused_everywhere(stored, error):
    with pytest.raises(error):
        _all_decoders(_record(stored, code=1))


def test_readers_and_verify_raise_on_a_damaged_value_in_the_log(open_log, tmp_path):
    """A value that breaks the rules inside a log (another tool wrote it; its CRCs are valid) makes readers
    raise CorruptionError and `verify` report it: never b"" (which every reader returned before)."""
    from walsvc.errors import CorruptionError
    from walsvc.verify import verify
    from walsvc.scan import LogReader

    good = _record(_with_size(VALUE), key=b"good")
    cut = _record(_no_size(VALUE)[:-4], key=b"cut")
    log = open_log()
    log.append_encoded(good, 1)
    log.append_encoded(cut, 1)  # append_encoded trusts its caller: the writer service validates first
    log.append_encoded(_record(_rle_zstd(64 * MiB), key=b"bomb") * 2, 2)  # 128 MiB from one 4 KiB batch
    log.sync()
    with LogReader(log.directory, "earliest") as reader:
        assert [(r.key, r.value) for r in reader.read_batch()] == [(b"good", VALUE)]
        with pytest.raises(CorruptionError) as info:
            reader.read_batch()
        assert "zstd frame is cut short" in str(info.value) and "LSN 2" in str(info.value)
        with pytest.raises(CorruptionError):
            reader.read_batch()  # stays on the damaged frame
    with LogReader(log.directory, 3) as reader:
        with pytest.raises(CorruptionError) as info:
            reader.read_batch()
        assert "above its limit" in str(info.value)
    report = verify(log.directory, max_record_bytes=16 * MiB, max_batch_bytes=32 * MiB)
    assert [(p.lsn, "cut short" in p.detail or "above its limit" in p.detail) for p in report.issues] == \
        [(2, True), (3, True)], report.summary()


def test_zstd_window_limit_applies_only_to_frames_without_a_content_size():
    """Inflating a frame without a size needs its whole window: above ZSTD_MAX_WINDOW it is refused."""
    value = bytes(range(256)) * (96 * 1024)  # 24 MiB, so level 22 picks a window above 16 MiB
    sized = zstandard.ZstdCompressor(level=22).compress(value)
    assert zstandard.get_frame_parameters(sized).window_size > R.ZSTD_MAX_WINDOW
    assert R._decompress(2, sized, 32 * MiB) == value
    unsized = zstandard.ZstdCompressor(level=22, write_content_size=False).compress(value)
    with pytest.raises(DecompressionError) as info:
        R._decompress(2, unsized, 32 * MiB)
    assert "too much memory" in str(info.value)
