"""Output files: collision-free names, atomic writes, and the JSON-lines manifest."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
from PIL import Image

from .png import write_png

MANIFEST_NAME = "manifest.jsonl"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's files are 0600


def output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """A file-name stem per input: its own stem, plus a short path hash where two inputs share one."""
    counts = Counter(p.stem for p in paths)
    return {p: p.stem if counts[p.stem] == 1 else f"{p.stem}-{path_digest(p)}" for p in paths}


def path_digest(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def format_params(params: dict[str, Any]) -> str:
    """``{'fusion': 'max', 'discard_ratio': 0.9, 'target': 243}`` → ``max_d0.9_c243``."""
    prefixes = {"discard_ratio": "d", "target": "c"}
    return "_".join(f"{prefixes.get(k, '')}{v:g}" if isinstance(v, float) else f"{prefixes.get(k, '')}{v}"
                    for k, v in params.items() if v is not None)


Content = bytes | Callable[[BinaryIO], None]  # a file's bytes, or a function writing them to an open file


def atomic_write(path: Path, content: Content) -> None:
    """Write ``content`` to ``path`` via a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            content(file) if callable(content) else file.write(content)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


IMAGE_FORMATS = ("png", "jpg")


def encoded_image(image: np.ndarray, image_format: str = "png") -> Callable[[BinaryIO], None]:
    """An RGB picture's file content: PNG from :mod:`vitexplain.png` (Paeth-filtered, Huffman-coded: ~14× faster
    than Pillow's PNG at zlib level 1 and a little smaller), or JPEG at quality 90 (~1.5× faster
    still, ~6× smaller). Both encode without holding the GIL (Pillow only when it encodes straight into
    the open output file), so writer threads encode in parallel with each other and with the model."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    if image_format == "png":
        return lambda file: write_png(file, image)
    return lambda file: Image.fromarray(image).save(file, format="JPEG", quality=90)


def encoded_array(array: np.ndarray) -> Callable[[BinaryIO], None]:
    """A ``.npy`` file's content."""
    return lambda file: np.save(file, array)


FILE_FIELDS = ("overlay", "raw", "gif", "grid")


class OutputError(OSError):
    """The output folder cannot be written."""


def check_writable(folder: Path) -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file; raise :class:`OutputError` if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {str(folder)!r}: {error.strerror or error}") from None
    return folder


class OutputWriter:
    """Writes each output's files atomically and one manifest line per output (or failed input).

    Every line names its ``request`` (method and parameters, independent of the image), so that a
    rerun of the same command can tell which inputs are already complete.
    """

    def __init__(self, out_dir: Path, input_paths: Sequence[Path]):
        self.out_dir = check_writable(Path(out_dir))
        self.stems = output_stems(input_paths)
        self.manifest_path = self.out_dir / MANIFEST_NAME

    def write(self, input_path: Path, label: str, files: dict[str, tuple[str, Content]],
              record: dict[str, Any]) -> dict[str, Any]:
        """Write one output's files ``{stem}_{label}{suffix}`` and return its manifest entry.

        ``files`` maps a manifest field (``overlay``, ``raw``, ``gif``…) to a name suffix and the file's
        content. The entry is not yet in the manifest: :meth:`append_manifest` it once the files are written,
        so that the manifest lists only complete outputs.
        """
        name = f"{self.stems[input_path]}_{label}"
        paths = {}
        for field_name, (suffix, content) in files.items():
            paths[field_name] = self.out_dir / f"{name}{suffix}"
            atomic_write(paths[field_name], content)
        return {"input": str(input_path), "status": "ok", **record,
                **{field_name: str(path) for field_name, path in paths.items()}}

    def append_manifest(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append ``entry`` as one JSON line to the manifest; returns it."""
        with self.manifest_path.open("a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(entry) + "\n")
        return entry

    def record_failure(self, input_path: Path, reason: str, request: str) -> dict[str, Any]:
        return self.append_manifest({"input": str(input_path), "status": "failed", "request": request, "error": reason})

    def entries(self) -> list[dict[str, Any]]:
        """The manifest's entries (a line cut short by a killed process is ignored)."""
        if not self.manifest_path.is_file():
            return []
        entries = []
        for line in self.manifest_path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def completed_outputs(self, request: str) -> Counter:
        """Per input (resolved path), how many complete outputs of ``request`` the manifest lists
        whose files all still exist."""
        done: Counter = Counter()
        for entry in self.entries():
            if entry.get("status") == "ok" and entry.get("request") == request and all(
                    Path(entry[f]).is_file() for f in FILE_FIELDS if entry.get(f)):
                done[Path(entry["input"]).resolve()] += 1
        return done

    def forget(self, request: str, inputs: Sequence[Path]) -> None:
        """Drop the manifest lines of ``request`` for ``inputs`` (before recomputing them)."""
        targets = {Path(p).resolve() for p in inputs}
        kept = [e for e in self.entries() if not (e.get("request") == request and Path(e["input"]).resolve() in targets)]
        atomic_write(self.manifest_path, "".join(json.dumps(e) + "\n" for e in kept).encode())
