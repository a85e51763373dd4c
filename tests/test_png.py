"""The PNG coder: decoders give back exactly the picture; the filter, the Huffman code and the stream
each checked against the PNG and DEFLATE specifications."""
from __future__ import annotations

import heapq
import io
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from vitexplain.io.inputs import load_rgb
from vitexplain.io.codecs.bits import SLACK, write_bits, written
from vitexplain.io.codecs.png import (
    MAX_CODE_BITS, canonical_codes, deflate_literals, encode_png, huffman_lengths, pair_code_table, paeth_rows,
    write_pairs)
from vitexplain.render.overlay import overlay

RNG = np.random.default_rng(0)
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").iterdir())
PICTURES = {
    "noise (incompressible: every byte value, codes of ~8 bits)": RNG.integers(0, 256, (61, 83, 3), dtype=np.uint8),
    "flat (two symbols: the filter byte and zero)": np.full((40, 30, 3), 200, dtype=np.uint8),
    "black (one residual value, which is also the filter byte's neighbour)": np.zeros((9, 9, 3), dtype=np.uint8),
    "one pixel": np.array([[[1, 2, 3]]], dtype=np.uint8),
    "one row": RNG.integers(0, 256, (1, 77, 3), dtype=np.uint8),
    "one column": RNG.integers(0, 256, (55, 1, 3), dtype=np.uint8),
    "ramp": (np.arange(120 * 97 * 3).reshape(120, 97, 3) % 251).astype(np.uint8),
}


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


@pytest.mark.parametrize("name", PICTURES)
def test_decoders_give_back_the_picture(name):
    picture = PICTURES[name]
    data = encode_png(picture)
    np.testing.assert_array_equal(decoded(data), picture)
    np.testing.assert_array_equal(iio.imread(data, extension=".png"), picture)


def test_photo_overlays_decode_exactly_and_are_as_small_as_pillows_zlib_level_1():
    mask = RNG.random((14, 14)).astype(np.float32)
    for path in EXAMPLES:
        picture = overlay(load_rgb(path), mask)
        data = encode_png(picture)
        np.testing.assert_array_equal(decoded(data), picture)
        pillow = io.BytesIO()
        Image.fromarray(picture).save(pillow, format="PNG", compress_level=1)
        assert len(data) < 1.05 * len(pillow.getvalue()), path.name  # measured: 0.87-0.93×


def paeth_reference(image: np.ndarray) -> np.ndarray:
    """PNG specification 9.4, byte by byte in Python."""
    height, width = image.shape[0], image.shape[1] * 3
    rows = image.reshape(height, width).astype(int)
    out = np.zeros((height, width + 1), dtype=np.uint8)
    for y in range(height):
        out[y, 0] = 4
        for x in range(width):
            a = rows[y, x - 3] if x >= 3 else 0
            b = rows[y - 1, x] if y > 0 else 0
            c = rows[y - 1, x - 3] if x >= 3 and y > 0 else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predicted = a if pa <= pb and pa <= pc else b if pb <= pc else c
            out[y, x + 1] = (rows[y, x] - predicted) % 256
    return out


def test_paeth_filter_matches_the_specification():
    image = RNG.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(paeth_rows(image), paeth_reference(image))
    # by hand: first row, first pixel predicts 0; then the left neighbour (up and upper-left are 0)
    first = paeth_rows(np.array([[[10, 20, 30], [15, 5, 30]]], dtype=np.uint8))
    np.testing.assert_array_equal(first, [[4, 10, 20, 30, 5, (5 - 20) % 256, 0]])


def huffman_cost_reference(counts: np.ndarray) -> int:
    """Σ count·length of an optimal (unlimited) Huffman code: the sum of all merged weights."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def kraft_sum(lengths: np.ndarray) -> float:
    return float(sum(2.0 ** -int(length) for length in lengths if length > 0))


@pytest.mark.parametrize("seed", range(5))
def test_huffman_lengths_are_optimal_and_complete(seed):
    counts = np.random.default_rng(seed).geometric(0.05, 257) * (np.random.default_rng(seed).random(257) < 0.7)
    lengths = huffman_lengths(counts, MAX_CODE_BITS)
    assert int((counts * lengths).sum()) == huffman_cost_reference(counts)
    assert kraft_sum(lengths) == 1.0 and ((lengths > 0) == (counts > 0)).all()


def test_huffman_lengths_respect_the_limit_and_stay_complete():
    fibonacci = [1, 1]
    while len(fibonacci) < 30:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    counts = np.array(fibonacci + [0] * 10)  # the optimal code is 29 deep
    assert huffman_lengths(counts, 64).max() == 29
    for limit in (15, 7):
        lengths = huffman_lengths(counts, limit)
        assert lengths.max() <= limit and kraft_sum(lengths) == 1.0 and ((lengths > 0) == (counts > 0)).all()


def test_a_lone_symbol_gets_a_partner_so_the_code_is_complete():
    lengths = huffman_lengths(np.array([0, 0, 9, 0]), 15)
    np.testing.assert_array_equal(lengths, [1, 0, 1, 0])


def test_canonical_codes_follow_rfc_1951():
    # RFC 1951, 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) give 010 011 100 101 110 00 1110 1111
    codes = canonical_codes(np.array([3, 3, 3, 3, 3, 2, 4, 4]))
    expected = ["010", "011", "100", "101", "110", "00", "1110", "1111"]
    assert [format(int(code), f"0{len(bits)}b")[::-1] for code, bits in zip(codes, expected)] == expected


def test_stream_is_a_valid_zlib_stream_of_the_filtered_rows():
    rows = paeth_rows(RNG.integers(0, 256, (33, 21, 3), dtype=np.uint8) // 16).reshape(-1)
    stream = deflate_literals(rows).tobytes() + zlib.adler32(rows).to_bytes(4, "big")
    assert zlib.decompress(stream) == rows.tobytes()


def test_streams_of_every_short_length_end_cleanly():
    """Lengths 1–80 of skewed bytes leave every count of pending bits (0–31) after the whole 32-bit words,
    before the end-of-block code."""
    data = (RNG.geometric(0.3, 80) % 256).astype(np.uint8)
    for length in range(1, 81):
        stream = deflate_literals(data[:length]).tobytes() + zlib.adler32(data[:length]).to_bytes(4, "big")
        assert zlib.decompress(stream) == data[:length].tobytes()


def least_significant_first(values, widths) -> str:
    """The bit string DEFLATE stores for ``values`` of ``widths`` bits, first bit first."""
    return "".join(format(int(value), f"0{int(width)}b")[::-1] if width else "" for value, width in zip(values, widths))


def test_pair_codes_are_the_two_codes_one_after_the_other():
    counts = RNG.geometric(0.02, 256)
    lengths = huffman_lengths(counts, MAX_CODE_BITS)
    codes = canonical_codes(lengths)
    pair_codes, pair_lengths = pair_code_table(codes, lengths)
    for first, second in [(0, 0), (255, 255), (3, 200)] + [tuple(RNG.integers(0, 256, 2)) for _ in range(300)]:
        pair = first | second << 8
        assert least_significant_first([pair_codes[pair]], [pair_lengths[pair]]) == least_significant_first(
            [codes[first], codes[second]], [lengths[first], lengths[second]])


@pytest.mark.parametrize("pending", [0, 1, 7, 8, 31])
def test_written_pairs_are_every_code_in_order_after_the_pending_bits(pending):
    """Odd and even lengths (an odd last byte is left to the caller), every count of bits already held."""
    counts = RNG.geometric(0.05, 256)
    lengths = huffman_lengths(counts, MAX_CODE_BITS)
    codes = canonical_codes(lengths)
    held = int(RNG.integers(0, 1 << pending)) if pending else 0
    for size in (0, 1, 2, 3, 64, 1001):
        data = RNG.integers(0, 256, size, dtype=np.uint8)
        out = np.zeros(2 * size + 8 + SLACK, dtype=np.uint8)
        position, bits, count = write_pairs(out, 0, held, pending, data, *pair_code_table(codes, lengths))
        assert count < 32 and position % 4 == 0
        stream = written(out, *write_bits(out, position, bits, count, 0, 0)).tobytes()  # drained as deflate_literals does
        bit_string = "".join(format(byte, "08b")[::-1] for byte in stream)
        whole = data[: size - size % 2]
        expected = least_significant_first([held], [pending]) + least_significant_first(codes[whole], lengths[whole])
        assert bit_string.rstrip("0") == expected.rstrip("0") and len(bit_string) - len(expected) in range(8)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (0, 3, 3)])
def test_only_rgb_pictures_are_accepted(shape):
    with pytest.raises(ValueError, match="RGB picture"):
        encode_png(np.zeros(shape, dtype=np.uint8))
