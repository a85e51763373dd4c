"""The GIF coder: what Pillow's and imageio's readers decode is exactly the quantised frames."""
from __future__ import annotations

import io

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from vitexplain.io.codecs.gif import encode_gif, lzw_codes, sub_blocks
from vitexplain.io.codecs.palette import quantize

RNG = np.random.default_rng(0)
FRAMES = {
    "noise (the 4,096 codes run out: clear codes)": RNG.integers(0, 256, (3, 120, 90, 3), dtype=np.uint8),
    "flat (long runs, the longest strings)": np.zeros((2, 300, 300, 3), dtype=np.uint8),
    "one pixel": RNG.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8),
    "ramp": (np.arange(200 * 300 * 3).reshape(1, 200, 300, 3) % 251).astype(np.uint8),
    "few colours": RNG.integers(0, 4, (2, 160, 140, 3), dtype=np.uint8) * 60,
}


def quantised(frames: np.ndarray) -> np.ndarray:
    """The frames as the shared palette renders them: what a decoder must give back."""
    palette, indices = quantize(frames)
    return palette[indices].reshape(frames.shape)


@pytest.mark.parametrize("name", FRAMES)
def test_decoders_give_back_the_quantised_frames(name):
    frames = FRAMES[name]
    data = encode_gif(frames, 250)
    np.testing.assert_array_equal(iio.imread(data, extension=".gif", index=None)[..., :3], quantised(frames))
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == len(frames) and gif.size == (frames.shape[2], frames.shape[1])
        assert gif.info["loop"] == 0 and gif.info["duration"] == 250
        for index, frame in enumerate(quantised(frames)):
            gif.seek(index)
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), frame)


def test_two_frames_coded_side_by_side_get_the_streams_each_gets_alone():
    """Noise (clear codes), runs, a single pixel; equal and unequal lengths, either one the longer."""
    frames = [RNG.integers(0, 256, 9000, dtype=np.uint8), np.repeat(RNG.integers(0, 3, 300), 25).astype(np.uint8),
              np.array([7], np.uint8), RNG.integers(0, 8, 9000, dtype=np.uint8)]
    alone = [lzw_codes(frame, np.empty(0, np.uint8)) for frame in frames]
    assert all(len(other) == 0 for _, other in alone)
    for first in frames:
        for second in frames:
            together = lzw_codes(first, second)
            assert together[0].tobytes() == lzw_codes(first, np.empty(0, np.uint8))[0].tobytes()
            assert together[1].tobytes() == lzw_codes(second, np.empty(0, np.uint8))[0].tobytes()
    with pytest.raises(ValueError, match="at least one pixel"):
        lzw_codes(np.empty(0, np.uint8), frames[0])


@pytest.mark.parametrize("length", [0, 1, 254, 255, 256, 600])
def test_sub_blocks_hold_at_most_255_bytes_each_and_end_with_zero(length):
    data = np.arange(length, dtype=np.uint8)
    framed, position, chunks = sub_blocks(data), 0, []
    while framed[position] != 0:
        size = framed[position]
        chunks.append(framed[position + 1:position + 1 + size])
        position += 1 + size
    assert position == len(framed) - 1
    assert all(len(c) == 255 for c in chunks[:-1]) and b"".join(chunks) == data.tobytes()
