"""Animated GIF encoding: one shared palette, indexed frames, and a compiled LZW coder.

The GIF container is a few fixed records (GIF89a, the global palette, a NETSCAPE2.0 loop block, per
frame a graphic-control block with its delay and an image block); the pixels of each frame are LZW-coded
with variable-width codes (9 to 12 bits, least significant bit first, a clear code when the 4,096 codes
run out), as the GIF89a specification describes. Written here so that the whole GIF is coded without
holding the GIL (numba, ``nogil``): sweeps are then written by threads, not processes. The palette comes
from :mod:`vitexplain.io.codecs.palette`. Decoders agree exactly (tested against Pillow's and imageio's
readers); the speed against Pillow's is in docs/performance.md.
"""
from __future__ import annotations

import numba
import numpy as np

from .bits import write_bits, write_word_bits, written
from .palette import quantize

MIN_CODE_SIZE = 8  # 256-colour palettes
CLEAR = 1 << MIN_CODE_SIZE
END = CLEAR + 1
MAX_CODE = 4095
SLOT_BITS = 13  # 8,192 dictionary slots of 4 bytes: 32 KiB, within a core's L1 cache
EMPTY = 0xFFFFFFFF  # no entry: its key (prefix 4095) is never looked up, as codes end at 4094
FIRST_WIDTH = MIN_CODE_SIZE + 1  # code width after each clear code, and the code count that widens it
FIRST_OVERFLOW = 1 << FIRST_WIDTH


@numba.njit(nogil=True, cache=True)
def _dictionary_step(pixel, code, table, codes, widths, k, width, last):
    """One pixel of LZW with a direct-mapped dictionary (see :func:`lzw_codes`), without a branch: the
    code of the string so far is always stored at ``codes[k]`` (with its ``width``) and kept only if the
    string does not go on (``k`` moves by ``new``). Returns the new string's code, ``k`` and ``new``."""
    key = (code << 8) | pixel
    slot = ((pixel << (SLOT_BITS - 8)) ^ code) & ((1 << SLOT_BITS) - 1)
    entry = np.int64(table[slot])
    found = (entry >> 12) == key
    new = np.int64(1) - np.int64(found)  # 1: emit the prefix's code, the decoder adds a string
    codes[k] = code
    widths[k] = width
    table[slot] = entry if found else (key << 12) | (last + 1)
    return (entry & MAX_CODE) if found else pixel, k + new, new


@numba.njit(nogil=True, cache=True)
def _widened(last, width, overflow):
    """Code width and next overflow once code ``last`` is assigned."""
    return (width + 1, overflow << 1) if last == overflow else (width, overflow)


@numba.njit(nogil=True, cache=True)
def _clear(table, codes, widths, k, width):
    """Emit a clear code (at the start, and when the 4,096 codes ran out) and empty the dictionary; returns
    the stream's fresh state ``k, width, last, overflow``."""
    codes[k], widths[k] = CLEAR, width
    table[:] = EMPTY
    return k + 1, FIRST_WIDTH, END, FIRST_OVERFLOW


@numba.njit(nogil=True, cache=True)
def _code_buffers(pixels):
    """Codes, widths and an empty dictionary for one stream, the first clear code in place, and its state."""
    room = pixels.size + pixels.size // 2048 + 8  # a code per pixel at most, clear codes, last and end
    codes, widths = np.empty(room, np.uint16), np.empty(room, np.uint8)
    table = np.empty(1 << SLOT_BITS, dtype=np.uint32)
    return codes, widths, table, _clear(table, codes, widths, 0, FIRST_WIDTH)


@numba.njit(nogil=True, cache=True)
def _ended(codes, widths, k, code, width, last, overflow):
    """The stream's codes up to its last string's code and the end code."""
    codes[k], widths[k] = code, width
    width, overflow = _widened(last + 1, width, overflow)
    codes[k + 1], widths[k + 1] = END, width
    return codes[:k + 2], widths[:k + 2]


@numba.njit(nogil=True, cache=True)
def _codes_of(pixels, other):
    """Codes and widths of :func:`lzw_codes` for ``pixels`` and ``other`` side by side (``other`` may be
    empty). The two streams' steps are written out one after the other: compiled helpers taking arrays
    cost a reference count per call unless they are branch-free."""
    codes_a, widths_a, table_a, (k_a, width_a, last_a, overflow_a) = _code_buffers(pixels)
    codes_b, widths_b, table_b, (k_b, width_b, last_b, overflow_b) = _code_buffers(other)
    size_a, size_b = pixels.size, other.size
    code_a, code_b = np.int64(pixels[0]), np.int64(other[0]) if size_b else np.int64(0)
    for index in range(1, max(size_a, size_b)):
        if index < size_a:
            code_a, k_a, new = _dictionary_step(np.int64(pixels[index]), code_a, table_a, codes_a, widths_a,
                                                k_a, width_a, last_a)
            last_a += new
            width_a, overflow_a = _widened(last_a, width_a, overflow_a)
            if last_a == MAX_CODE:
                k_a, width_a, last_a, overflow_a = _clear(table_a, codes_a, widths_a, k_a, width_a)
        if index < size_b:
            code_b, k_b, new = _dictionary_step(np.int64(other[index]), code_b, table_b, codes_b, widths_b,
                                                k_b, width_b, last_b)
            last_b += new
            width_b, overflow_b = _widened(last_b, width_b, overflow_b)
            if last_b == MAX_CODE:
                k_b, width_b, last_b, overflow_b = _clear(table_b, codes_b, widths_b, k_b, width_b)
    return (_ended(codes_a, widths_a, k_a, code_a, width_a, last_a, overflow_a)
            + _ended(codes_b, widths_b, k_b, code_b, width_b, last_b, overflow_b))


@numba.njit(nogil=True, cache=True)
def _packed(codes, widths):
    """The codes as one bit stream, least significant bit first."""
    out = np.empty(2 * codes.size + 8, dtype=np.uint8)  # codes of at most 12 bits: 1.5 bytes each
    position, bits, count = np.uint64(0), np.uint64(0), np.uint64(0)
    for index in range(codes.size):
        position, bits, count = write_word_bits(out, position, bits, count, np.uint64(codes[index]),
                                                np.uint64(widths[index]))
    return written(out, *write_bits(out, np.int64(position), np.int64(bits), np.int64(count), 0, 0))


@numba.njit(nogil=True, cache=True)
def lzw_codes(pixels, other):
    """GIF LZW streams (without sub-block framing) of two flat uint8 arrays of palette indices, coded side
    by side; ``other`` may be empty (its stream is then empty too).

    The dictionary is direct-mapped: the string ``prefix code + pixel`` lives in slot
    ``(pixel << 5) ^ prefix`` as ``(prefix << 8 | pixel) << 12 | code``, and a newer string overwrites an
    older one in its slot. That is still valid LZW: the decoder assigns a code after every code it reads,
    as the encoder does, whether or not the encoder ever uses it again; the encoder just misses some
    longer matches (streams ~8% longer than with every string kept). In exchange every pixel costs the
    same few operations with no branch on the match. Each pixel's steps depend on the previous pixel's
    dictionary lookup; two frames coded in one loop give the core two independent chains to overlap, and
    the codes are packed into bits afterwards."""
    if pixels.size == 0:
        raise ValueError("a GIF frame has at least one pixel")
    codes, widths, other_codes, other_widths = _codes_of(pixels, other)
    if other.size == 0:
        return _packed(codes, widths), np.empty(0, np.uint8)
    return _packed(codes, widths), _packed(other_codes, other_widths)


def sub_blocks(data: np.ndarray) -> bytes:
    """GIF data sub-blocks of a uint8 array: chunks of at most 255 bytes, each after its length, then a
    zero length."""
    full, rest = divmod(len(data), 255)
    blocks = np.empty((full, 256), dtype=np.uint8)
    blocks[:, 0] = 255
    blocks[:, 1:] = data[:full * 255].reshape(full, 255)
    tail = bytes([rest]) + data[full * 255:].tobytes() if rest else b""
    return blocks.tobytes() + tail + b"\x00"


def encode_gif(frames: np.ndarray, delay_ms: float) -> bytes:
    """An endlessly looping GIF of ``(R, H, W, 3)`` uint8 frames, ``delay_ms`` per frame, one shared palette
    (:func:`vitexplain.io.codecs.palette.quantize`)."""
    frames = np.asarray(frames)
    height, width = frames.shape[1:3]
    palette, indexed = quantize(frames)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:len(palette)] = palette
    size = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    centiseconds = max(1, round(delay_ms / 10)).to_bytes(2, "little")
    parts = [b"GIF89a", size, b"\xf7\x00\x00", colours.tobytes(),
             b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"]  # loop forever
    streams = []
    for first in range(0, len(indexed), 2):  # frames coded two at a time (see lzw_codes)
        pair = indexed[first + 1] if first + 1 < len(indexed) else np.empty(0, np.uint8)
        streams += lzw_codes(indexed[first], pair)[:1 + (first + 1 < len(indexed))]
    for stream in streams:
        parts += [b"\x21\xf9\x04\x04", centiseconds, b"\x00\x00",  # no transparency, keep the frame
                  b"\x2c\x00\x00\x00\x00", size, b"\x00", bytes([MIN_CODE_SIZE]), sub_blocks(stream)]
    parts.append(b"\x3b")
    return b"".join(parts)
