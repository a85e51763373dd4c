"""Output files: collision-free names, atomic writes, and the JSON-lines manifest."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import imageio.v3 as iio
import numpy as np

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def png_bytes(image: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", image, extension=".png")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class OutputWriter:
    """Writes each output's files atomically and one manifest line per output."""

    def __init__(self, out_dir: Path, input_paths: Sequence[Path]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stems = output_stems(input_paths)
        self.manifest_path = self.out_dir / MANIFEST_NAME

    def write(self, input_path: Path, label: str, files: dict[str, tuple[str, bytes]],
              record: dict[str, Any]) -> dict[str, Any]:
        """Write one output's files ``{stem}_{label}{suffix}`` and return its manifest entry.

        ``files`` maps a manifest field (``overlay``, ``raw``, ``gif``…) to a name suffix and the file's
        bytes. The entry is not yet in the manifest: :meth:`append_manifest` it once the files are written,
        so that the manifest lists only complete outputs.
        """
        name = f"{self.stems[input_path]}_{label}"
        paths = {}
        for field_name, (suffix, data) in files.items():
            paths[field_name] = self.out_dir / f"{name}{suffix}"
            atomic_write_bytes(paths[field_name], data)
        return {"input": str(input_path), **record, **{field_name: str(path) for field_name, path in paths.items()}}

    def append_manifest(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append ``entry`` as one JSON line to the manifest; returns it."""
        with self.manifest_path.open("a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(entry) + "\n")
        return entry
