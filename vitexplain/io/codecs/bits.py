"""Bit packing, least significant bit first, as GIF's LZW codes and DEFLATE's fields are stored
(shared by the compiled coders in :mod:`vitexplain.io.codecs.gif` and :mod:`vitexplain.io.codecs.png`)."""
from __future__ import annotations

import numba
import numpy as np

SLACK = 3  # bytes ``write_bits`` may store beyond the last whole byte: leave this much room in ``out``


@numba.njit(nogil=True, cache=True)
def write_bits(out, position, bits, count, value, width):
    """Append the low ``width`` (≤ 17) bits of ``value`` to the ``count`` (< 8) bits held in ``bits``;
    whole bytes go to ``out`` from ``position`` on. Returns the new ``(position, bits, count)``, ``count``
    again < 8. Without a branch: three bytes are always stored and the position moves by the whole ones,
    so a coder may call it with ``width`` 0 to write nothing."""
    bits |= value << count
    count += width
    out[position] = bits & 0xFF
    out[position + 1] = (bits >> 8) & 0xFF
    out[position + 2] = (bits >> 16) & 0xFF
    whole = count >> 3
    return position + whole, bits >> (whole << 3), count & 7


@numba.njit(nogil=True, cache=True)
def write_word_bits(out, position, bits, count, value, width):
    """Bulk variant of :func:`write_bits` on unsigned 64-bit state: append ``width`` (≤ 32) bits of ``value``
    to the ``count`` (< 32) bits held; whole 32-bit words go to ``out``. Four bytes are always stored and the
    position moves by 0 or 4: no branch. ``count`` stays < 32; drain it with :func:`write_bits` (it takes
    up to 31 pending bits when ``width`` is 0)."""
    bits |= value << count
    count += width
    out[position] = bits & np.uint64(0xFF)
    out[position + np.uint64(1)] = (bits >> np.uint64(8)) & np.uint64(0xFF)
    out[position + np.uint64(2)] = (bits >> np.uint64(16)) & np.uint64(0xFF)
    out[position + np.uint64(3)] = (bits >> np.uint64(24)) & np.uint64(0xFF)
    whole = count >> np.uint64(5)
    return position + (whole << np.uint64(2)), bits >> (whole << np.uint64(5)), count & np.uint64(31)


@numba.njit(nogil=True, cache=True)
def written(out, position, bits, count):
    """``out`` up to ``position``, with the last partial byte (zero-padded) appended."""
    if count > 0:
        out[position] = bits & 0xFF
        position += 1
    return out[:position]
