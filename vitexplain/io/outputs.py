"""Output files: names that never collide, atomic writes, and the JSON-lines manifest.

Every output (one input × one request × one target) has an identity ``(input, request key, output
index)``. Its name is ``{stem}_{label}`` where that is free in ``--out`` — not used by another output in
the manifest, nor by a file already there — and otherwise ``{stem}_{label}-{hash}``, the hash of its
identity. The manifest remembers each identity's name, so a rerun (``--overwrite`` too) writes the
same files, and nothing ever overwrites another request's or another input's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np

from .inputs import input_key

MANIFEST_NAME = "manifest.jsonl"
FILE_FIELDS = ("overlay", "raw", "gif", "grid")
SUFFIXES = (".png", ".jpg", ".npy", ".gif")

Content = bytes | Callable[[BinaryIO], None]  # a file's bytes, or a function writing them to an open file
Identity = tuple[str, str, int]  # (input key, request key, output index)


def atomic_write(path: Path, content: Content) -> None:
    """Write ``content`` to ``path`` via a temporary file and a rename: never half-written. The file gets
    the permissions ``open()`` would give it (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            content(file) if callable(content) else file.write(content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def encoded_image(image: np.ndarray, image_format: str = "png") -> Callable[[BinaryIO], None]:
    """An RGB picture's file content: PNG from :mod:`vitexplain.io.codecs.png` (Paeth-filtered,
    Huffman-coded), or JPEG at quality 90 by Pillow. Both encode without holding the GIL (Pillow only when it
    encodes straight into the open output file), so writer threads encode in parallel with the model."""
    if image_format == "png":
        from .codecs.png import write_png

        return lambda file: write_png(file, image)
    if image_format == "jpg":
        from PIL import Image

        return lambda file: Image.fromarray(image).save(file, format="JPEG", quality=90)
    raise ValueError(f"unknown image format {image_format!r}; choose png or jpg")


def encoded_array(array: np.ndarray) -> Callable[[BinaryIO], None]:
    """A ``.npy`` file's content."""
    return lambda file: np.save(file, array)


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


def digest(text: str, length: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def names_in_folder(folder: Path) -> set[str]:
    """Output names the files in ``folder`` could belong to: each file's name less a known suffix (and less
    ``_grid`` for contact sheets, either way)."""
    names = set()
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        if suffix in SUFFIXES and not entry.name.startswith("."):
            names.add(stem)
            names.add(stem.removesuffix("_grid"))
    return names


class OutputWriter:
    """Writes each output's files atomically and one manifest line per output (or failed input).

    Every line records the whole request (``request``: its key and every parameter), the output's
    identity (``input``, ``output``) and ``name``; a rerun reads them to know what is complete and which
    names are taken.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = check_writable(Path(out_dir))
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.names: dict[Identity, str] = {}
        self.taken: set[str] = names_in_folder(self.out_dir)
        for entry in self.entries():
            if entry.get("status") == "ok" and isinstance(entry.get("name"), str):
                self.names.setdefault(self.identity_of(entry), entry["name"])
                self.taken.add(entry["name"])

    @staticmethod
    def identity_of(entry: dict[str, Any]) -> Identity:
        return input_key(Path(entry["input"])), request_key(entry), int(entry.get("output", 0))

    def output_name(self, input_path: Path, request: str, index: int, label: str) -> str:
        """The name of output ``index`` of ``request`` for ``input_path``: the one it had, else
        ``{stem}_{label}`` if free, else with its identity's hash appended; reserved from now on."""
        identity = (input_key(input_path), request, index)
        known = self.names.get(identity)
        if known is not None:
            return known
        base = f"{Path(input_path).stem}_{label}"
        name, attempt = base, 0
        while name in self.taken:
            attempt += 1
            name = f"{base}-{digest(repr(identity))}" + (f"-{attempt}" if attempt > 1 else "")
        self.taken.add(name)
        self.names[identity] = name
        return name

    def write(self, name: str, files: dict[str, tuple[str, Content]], entry: dict[str, Any]) -> dict[str, Any]:
        """Write one output's files ``{name}{suffix}`` and return its manifest entry (``entry`` with the
        files' paths). ``files`` maps a manifest field (``overlay``, ``raw``, ``gif``…) to a name suffix and the
        file's content. The entry is not yet in the manifest: :meth:`append_manifest` it once the files are
        written, so that the manifest lists only complete outputs."""
        paths = {}
        for field_name, (suffix, content) in files.items():
            paths[field_name] = self.out_dir / f"{name}{suffix}"
            atomic_write(paths[field_name], content)
        return {**entry, "name": name, **{field_name: str(path) for field_name, path in paths.items()}}

    def append_manifest(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append ``entry`` as one JSON line to the manifest; returns it."""
        with self.manifest_path.open("a", encoding="utf-8") as manifest:
            manifest.write(json.dumps(entry) + "\n")
        return entry

    def record_failure(self, input_path: Path, reason: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.append_manifest({"input": input_key(input_path), "status": "failed", "error": reason,
                                     "request": request})

    def entries(self) -> list[dict[str, Any]]:
        """The manifest's entries (a line cut short by a killed process is ignored)."""
        if not self.manifest_path.is_file():
            return []
        entries = []
        for line in self.manifest_path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                entries.append(entry)
        return entries

    def completed(self, request: str) -> set[tuple[str, int]]:
        """``(input key, output index)`` of every output of ``request`` that the manifest lists as complete
        and whose files all still exist."""
        return {(input_key(Path(e["input"])), int(e.get("output", 0))) for e in self.entries()
                if e.get("status") == "ok" and request_key(e) == request
                and all(Path(e[f]).is_file() for f in FILE_FIELDS if e.get(f))}

    def forget(self, request: str, inputs: Iterable[Path]) -> None:
        """Drop the manifest lines of ``request`` for ``inputs`` (before recomputing them); their names stay
        theirs."""
        targets = {input_key(p) for p in inputs}
        kept = [e for e in self.entries() if not (request_key(e) == request and input_key(Path(e["input"])) in targets)]
        atomic_write(self.manifest_path, "".join(json.dumps(e) + "\n" for e in kept).encode())


def request_key(entry: dict[str, Any]) -> str | None:
    """The request key a manifest entry records."""
    request = entry.get("request")
    return request.get("key") if isinstance(request, dict) else None


def pending_outputs(writer: OutputWriter, request_key_: str, outputs_per_image: int,
                    paths: Sequence[Path]) -> tuple[list[Path], set[tuple[str, int]]]:
    """The inputs with an output of the request still to write, and the outputs already complete."""
    done = writer.completed(request_key_)
    todo = [p for p in paths if any((input_key(p), i) not in done for i in range(outputs_per_image))]
    return todo, done
