"""Bit packing, least significant bit first, as GIF's LZW codes and DEFLATE's fields are stored
(shared by the compiled coders in :mod:`vitexplain.gif` and :mod:`vitexplain.png`)."""
from __future__ import annotations

import numba


@numba.njit(nogil=True, cache=True)
def write_bits(out, position, bits, count, value, width):
    """Append the low ``width`` bits of ``value`` to the ``count`` bits held in ``bits``; whole bytes go to
    ``out`` from ``position`` on. Returns the new ``(position, bits, count)``."""
    bits |= value << count
    count += width
    while count >= 8:
        out[position] = bits & 0xFF
        position += 1
        bits >>= 8
        count -= 8
    return position, bits, count


@numba.njit(nogil=True, cache=True)
def written(out, position, bits, count):
    """``out`` up to ``position``, with the last partial byte (zero-padded) appended."""
    if count > 0:
        out[position] = bits & 0xFF
        position += 1
    return out[:position]
