"""PNG encoding of RGB pictures: the Paeth row filter and a compiled, Huffman-only DEFLATE coder.

A PNG file is a signature and chunks, each with its CRC-32: IHDR (size; 8-bit RGB), IDAT (a zlib stream
of the filtered rows), IEND. Every row is stored with PNG's Paeth filter (type 4): each byte minus its
prediction from the left, upper and upper-left bytes, modulo 256. On photographs and heatmap overlays
that leaves small residuals whose byte entropy is about half of the raw data's, and one dynamic Huffman
code over the residuals (RFC 1951 block type 2, literals only, no string matching) makes files 7–13%
smaller than Pillow's at zlib level 1. The codes are written a byte pair at a time, from a table of all
65,536 pairs' codes, without a branch (:func:`write_pairs`). Written here, like :mod:`vitexplain.io.codecs.gif`, so
that the whole file is coded without holding the GIL (numba, ``nogil``), and with one filter where
Pillow's encoder tries all five on every row (its speed against Pillow's: docs/performance.md). Decoders
agree exactly (tested against Pillow's and imageio's readers).
"""
from __future__ import annotations

import io
import zlib
from typing import BinaryIO

import numba
import numpy as np

from .bits import SLACK, write_bits, write_word_bits, written

SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAETH = 4
LITERALS = 257  # byte values 0-255 and the end-of-block symbol 256
END_OF_BLOCK = 256
MAX_CODE_BITS = 15  # DEFLATE's limit for literal codes
MAX_LENGTH_CODE_BITS = 7  # and for the code that codes the code lengths
LENGTH_CODE_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15], dtype=np.int64)


@numba.njit(nogil=True, cache=True)
def paeth_rows(image):
    """``(H, 1 + 3W)`` uint8: per row the filter type byte (4) and the Paeth residuals of an ``(H, W, 3)`` image,
    ``x − p`` mod 256 with ``p`` whichever of left ``a``, up ``b``, upper-left ``c`` is closest to
    ``a + b − c`` (ties: ``a``, then ``b``); neighbours outside the image count as 0."""
    height, width = image.shape[0], image.shape[1] * 3
    rows = image.reshape(height, width)
    out = np.empty((height, width + 1), dtype=np.uint8)
    for y in range(height):
        out[y, 0] = PAETH
        for x in range(width):
            a = np.int32(rows[y, x - 3]) if x >= 3 else np.int32(0)
            b = np.int32(rows[y - 1, x]) if y > 0 else np.int32(0)
            c = np.int32(rows[y - 1, x - 3]) if x >= 3 and y > 0 else np.int32(0)
            estimate = a + b - c
            to_a, to_b, to_c = abs(estimate - a), abs(estimate - b), abs(estimate - c)
            predicted = a if to_a <= to_b and to_a <= to_c else (b if to_b <= to_c else c)
            out[y, x + 1] = (np.int32(rows[y, x]) - predicted) & 0xFF
    return out


@numba.njit(nogil=True, cache=True)
def byte_counts(data):
    """How often each value occurs in ``data`` (uint8), ``(256,)``. Four interleaved sets of counters:
    filtered bytes crowd into few values, and with one set every increment would wait for the last."""
    lanes = np.zeros((4, 256), dtype=np.int64)
    whole = data.size - data.size % 4
    for index in range(0, whole, 4):
        lanes[0, data[index]] += 1
        lanes[1, data[index + 1]] += 1
        lanes[2, data[index + 2]] += 1
        lanes[3, data[index + 3]] += 1
    for index in range(whole, data.size):
        lanes[0, data[index]] += 1
    return lanes.sum(axis=0)


@numba.njit(nogil=True, cache=True)
def huffman_lengths(counts, limit):
    """Code lengths of a Huffman code for symbol ``counts`` (0 for unused symbols), none longer than
    ``limit``: where the optimal code is too deep, the counts are halved (used ones stay ≥ 1) and the code
    is rebuilt, so the result is always a complete prefix code. At least two symbols get a code."""
    counts = counts.astype(np.int64)
    if (counts > 0).sum() < 2:  # a one-symbol alphabet still needs a complete code: add a partner
        counts[0 if counts[0] == 0 else 1] = 1
    while True:
        lengths = _optimal_lengths(counts)
        if lengths.max() <= limit:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


@numba.njit(nogil=True, cache=True)
def _optimal_lengths(counts):
    """Huffman code lengths (two-queue construction over the used symbols sorted by count)."""
    symbols = np.nonzero(counts)[0]
    symbols = symbols[np.argsort(counts[symbols], kind="mergesort")]
    used = symbols.size
    weight = np.empty(2 * used - 1, dtype=np.int64)  # leaves first, then merged nodes in creation order
    parent = np.empty(2 * used - 1, dtype=np.int64)
    weight[:used] = counts[symbols]
    leaf, node = 0, used  # heads of the two queues: leaves in count order, merged nodes in weight order
    for merged in range(used, 2 * used - 1):
        total = 0
        for _ in range(2):
            if leaf < used and (node >= merged or weight[leaf] <= weight[node]):
                parent[leaf] = merged
                total += weight[leaf]
                leaf += 1
            else:
                parent[node] = merged
                total += weight[node]
                node += 1
        weight[merged] = total
    depth = np.zeros(2 * used - 1, dtype=np.int64)
    for index in range(2 * used - 3, -1, -1):  # the root is last; parents come after children
        depth[index] = depth[parent[index]] + 1
    lengths = np.zeros(counts.size, dtype=np.int64)
    lengths[symbols] = depth[:used]
    return lengths


@numba.njit(nogil=True, cache=True)
def canonical_codes(lengths):
    """DEFLATE's canonical codes for ``lengths`` (RFC 1951, 3.2.2), bit-reversed: the stream is written
    least significant bit first, Huffman codes most significant bit first."""
    bit_counts = np.zeros(MAX_CODE_BITS + 1, dtype=np.int64)
    for length in lengths:
        bit_counts[length] += 1
    bit_counts[0] = 0
    next_code = np.zeros(MAX_CODE_BITS + 1, dtype=np.int64)
    code = 0
    for bits in range(1, MAX_CODE_BITS + 1):
        code = (code + bit_counts[bits - 1]) << 1
        next_code[bits] = code
    codes = np.zeros(lengths.size, dtype=np.int64)
    for symbol in range(lengths.size):
        length = lengths[symbol]
        if length:
            value, reversed_value = next_code[length], 0
            next_code[length] += 1
            for _ in range(length):
                reversed_value = (reversed_value << 1) | (value & 1)
                value >>= 1
            codes[symbol] = reversed_value
    return codes


@numba.njit(nogil=True, cache=True)
def pair_code_table(codes, lengths):
    """The code of every byte pair ``first | second << 8``: ``first``'s code then ``second``'s, as one
    bit string of up to 2 × 15 bits (``(65536,)`` codes and lengths)."""
    pair_codes = np.empty(65536, dtype=np.uint32)  # small types: the tables stay in the L2 cache
    pair_lengths = np.empty(65536, dtype=np.uint8)
    for second in range(256):  # the inner loop over ``first`` runs over consecutive entries
        for first in range(256):
            pair_codes[(second << 8) + first] = codes[first] | (codes[second] << lengths[first])
            pair_lengths[(second << 8) + first] = lengths[first] + lengths[second]
    return pair_codes, pair_lengths


@numba.njit(nogil=True, cache=True)
def write_pairs(out, position, bits, count, data, pair_codes, pair_lengths):
    """Append the codes of ``data``'s whole byte pairs to the ``count`` (< 32) bits held in ``bits``
    (:func:`vitexplain.io.codecs.bits.write_word_bits`): one table lookup per two bytes and no branch, so the bit
    count is the only chain from one step to the next."""
    held, pending, at = np.uint64(bits), np.uint64(count), np.uint64(position)  # unsigned: no negative-index checks
    for index in range(data.size // 2):
        pair = np.uint64(data[2 * index]) | (np.uint64(data[2 * index + 1]) << np.uint64(8))
        at, held, pending = write_word_bits(out, at, held, pending, np.uint64(pair_codes[pair]),
                                            np.uint64(pair_lengths[pair]))  # ≤ 31 + 30 bits: fits in 64
    return np.int64(at), np.int64(held), np.int64(pending)


@numba.njit(nogil=True, cache=True)
def deflate_literals(data):
    """A zlib stream (RFC 1950) of ``data`` (uint8) without its closing checksum: one final DEFLATE block
    with a dynamic Huffman code, every byte a literal."""
    counts = np.ones(LITERALS, dtype=np.int64)  # the end-of-block symbol occurs once
    counts[:END_OF_BLOCK] = byte_counts(data)
    lengths = huffman_lengths(counts, MAX_CODE_BITS)
    codes = canonical_codes(lengths)
    # code lengths sent: the literal code's, then two 1-bit distance codes (a complete code, never used)
    sent = np.concatenate((lengths, np.ones(2, dtype=np.int64)))
    length_lengths = huffman_lengths(np.bincount(sent, minlength=19), MAX_LENGTH_CODE_BITS)
    length_codes = canonical_codes(length_lengths)
    header_count = 19
    while length_lengths[LENGTH_CODE_ORDER[header_count - 1]] == 0:
        header_count -= 1
    payload_bits = (counts * lengths).sum()
    out = np.empty(16 + 3 * 19 // 8 + sent.size + payload_bits // 8 + 8 + SLACK, dtype=np.uint8)
    out[0], out[1] = 0x78, 0x01  # deflate, 32 KiB window; header check: 0x7801 % 31 == 0
    position, bits, count = 2, np.int64(0), 0
    position, bits, count = write_bits(out, position, bits, count, 1 | (2 << 1), 3)  # final block, dynamic codes
    position, bits, count = write_bits(out, position, bits, count, LITERALS - 257, 5)  # HLIT
    position, bits, count = write_bits(out, position, bits, count, 2 - 1, 5)  # HDIST
    position, bits, count = write_bits(out, position, bits, count, header_count - 4, 4)  # HCLEN
    for index in range(header_count):
        position, bits, count = write_bits(out, position, bits, count, length_lengths[LENGTH_CODE_ORDER[index]], 3)
    for length in sent:
        position, bits, count = write_bits(out, position, bits, count, length_codes[length], length_lengths[length])
    pair_codes, pair_lengths = pair_code_table(codes, lengths)
    position, bits, count = write_pairs(out, position, bits, count, data, pair_codes, pair_lengths)
    position, bits, count = write_bits(out, position, bits, count, 0, 0)  # count < 32: its whole bytes out, < 8 left
    if data.size % 2:
        last = data[data.size - 1]
        position, bits, count = write_bits(out, position, bits, count, codes[last], lengths[last])
    position, bits, count = write_bits(out, position, bits, count, codes[END_OF_BLOCK], lengths[END_OF_BLOCK])
    return written(out, position, bits, count)


def write_chunk(file: BinaryIO, kind: bytes, *parts) -> None:
    """Write a PNG chunk whose data is ``parts`` (bytes-like) one after the other: length, type, data,
    CRC-32 of type and data. Each part is written as it is, never copied into one ``bytes``."""
    length, crc = 0, zlib.crc32(kind)
    for part in parts:
        length, crc = length + memoryview(part).nbytes, zlib.crc32(part, crc)
    file.write(length.to_bytes(4, "big") + kind)
    for part in parts:
        file.write(part)
    file.write(crc.to_bytes(4, "big"))


def chunk(kind: bytes, data: bytes) -> bytes:
    """:func:`write_chunk`'s bytes for one part."""
    buffer = io.BytesIO()
    write_chunk(buffer, kind, data)
    return buffer.getvalue()


def rgb_header(width: int, height: int) -> bytes:
    """IHDR chunk data: ``width × height``, 8-bit RGB, deflate, adaptive filtering, no interlace."""
    return width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])


def write_png(file: BinaryIO, image: np.ndarray) -> None:
    """Write the PNG file of an ``(H, W, 3)`` uint8 RGB picture (Paeth-filtered rows, Huffman-coded) to
    ``file``. The coded rows go out straight from the coder's buffer, never copied into one ``bytes``."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) RGB picture, got shape {image.shape}")
    height, width = image.shape[:2]
    rows = paeth_rows(image).reshape(-1)
    file.write(SIGNATURE)
    write_chunk(file, b"IHDR", rgb_header(width, height))
    write_chunk(file, b"IDAT", deflate_literals(rows), zlib.adler32(rows).to_bytes(4, "big"))  # zlib stream, its Adler-32
    write_chunk(file, b"IEND")


def encode_png(image: np.ndarray) -> bytes:
    """:func:`write_png`'s file content as ``bytes``."""
    buffer = io.BytesIO()
    write_png(buffer, image)
    return buffer.getvalue()
