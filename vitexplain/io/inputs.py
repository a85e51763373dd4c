"""Finding the input images and decoding them: every file once, every problem said in one line."""
from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
class ImageDecodeError(ValueError):
    """A file that cannot be used as an image; the message says why."""


@dataclass(frozen=True)
class Failure:
    """An input that was skipped, and why."""

    path: Path
    reason: str


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


INSIDE_OUT = "inside the output folder (--out): outputs are never taken as inputs"


def input_key(path: Path) -> str:
    """An input's identity: its absolute path as named, not resolved (two symlinks to one file are two
    inputs, each with outputs of its own)."""
    return os.path.abspath(path)


def find_images(inputs: Iterable[str | Path], exclude: str | Path | None = None) -> tuple[list[Path], list[Failure]]:
    """Image files named by ``inputs`` (files, or folders searched recursively), each once, in order,
    and the inputs that name none (missing paths, empty folders, broken or looping symlinks).

    Files given explicitly are kept whatever their extension; folders contribute files with a
    common image extension, sorted by path. Symlinked folders are not followed (no loops). Nothing
    inside ``exclude`` (the output folder) is ever an input: folders skip it, files in it are refused.
    """
    found: dict[str, Path] = {}
    failures: list[Failure] = []
    excluded = Path(exclude).resolve() if exclude is not None else None
    for entry in map(Path, inputs):
        if entry.is_dir():
            if excluded is not None and is_within(entry.resolve(), excluded):
                failures.append(Failure(entry, INSIDE_OUT))
                continue
            images, problems = images_in_folder(entry, excluded)
            for image in images:
                found.setdefault(input_key(image), image)
            failures += problems
            if not images and not problems:
                failures.append(Failure(entry, "folder contains no images"))
        elif entry.is_file():
            if excluded is not None and is_within(Path(os.path.abspath(entry)).parent.resolve(), excluded):
                failures.append(Failure(entry, INSIDE_OUT))
            else:
                found.setdefault(input_key(entry), entry)
        else:
            failures.append(Failure(entry, unusable_path_reason(entry)))
    return list(found.values()), failures


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def images_in_folder(folder: Path, exclude: Path | None = None) -> tuple[list[Path], list[Failure]]:
    """Image files below ``folder`` (sorted), and the entries that could not be read; the folder
    ``exclude`` (resolved) is skipped."""
    images, failures = [], []

    def unreadable(error: OSError) -> None:
        failures.append(Failure(Path(error.filename or folder), f"cannot read folder: {error.strerror}"))

    for root, folders, files in os.walk(folder, onerror=unreadable, followlinks=False):
        if exclude is not None:
            folders[:] = [f for f in folders if (Path(root) / f).resolve() != exclude]
        folders.sort()
        for name in sorted(files):
            path = Path(root) / name
            if not is_image_file(path):
                continue
            if path.is_file():
                images.append(path)
            else:
                failures.append(Failure(path, unusable_path_reason(path)))
    return sorted(images), failures


def unusable_path_reason(path: Path) -> str:
    """Why ``path`` is neither a file nor a folder."""
    if not path.is_symlink():
        return "does not exist" if not os.path.lexists(path) else "not a regular file"
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except OSError as error:
        return "symlink loop" if error.errno == errno.ELOOP else "broken symlink"
    return "not a regular file"


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` as an ``(H, W, 3)`` uint8 RGB array; raise :class:`ImageDecodeError` saying why not.
    See :func:`load_image` for what is done to the pixels."""
    return np.array(load_image(path))


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` as an RGB Pillow image; raise :class:`ImageDecodeError` saying why not.

    EXIF orientation is honoured; animated images give their first frame; 16-bit images are scaled
    to 8 bits; transparent images are composited on white. Images over ``Image.MAX_IMAGE_PIXELS``
    (89.5 megapixels) are refused (decompression-bomb protection). An upright RGB file is decoded
    without further copies (a 12-megapixel photo carries 36 MB of pixels).
    """
    try:
        with warnings.catch_warnings(), open_regular_file(path) as file:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                ImageOps.exif_transpose(image, in_place=True)  # loads the pixels; copies only to rotate
                return to_rgb_image(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image, or a format Pillow cannot read") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except FileNotFoundError:
        raise ImageDecodeError("does not exist (any more)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


def open_regular_file(path: str | Path) -> BinaryIO:
    """``path`` opened for reading, if it is a non-empty regular file; :class:`ImageDecodeError` if not. Opened
    without blocking and checked on the open file itself, so that a FIFO or a device — even one put in a
    file's place after the folder was listed — is refused at once instead of hanging the run."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError("not a regular file (a FIFO, a device or a folder)")
        if info.st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def to_rgb_image(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB (``image`` itself when it is RGB already)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


