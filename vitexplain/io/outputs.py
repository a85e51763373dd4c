"""Output files: names that never collide, atomic writes, and the JSON-lines manifest.

Every output (one input × one request × one target) has an identity ``(input, request key, output
index)``. Its name is ``{stem}_{label}`` where that is free in ``--out`` — not used by another output in
the manifest, nor by a file already there — and otherwise ``{stem}_{label}-{hash}``, the hash of its
identity. The manifest remembers each identity's name, so a rerun (``--overwrite`` too) writes the
same files, and nothing ever overwrites another request's or another input's files.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np

from .inputs import input_key

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".vitexplain.lock"
PART = re.compile(r"[A-Za-z0-9_-]+")  # a manifest part's name: manifest.{part}.jsonl
FILE_FIELDS = ("overlay", "raw", "gif", "grid")
CLAIMS = ".{stem}.claims{part}.jsonl"  # beside the manifest: the names outputs claimed before their files were written
SUFFIXES = (".png", ".jpg", ".npy", ".gif")
MAX_NAME_BYTES = 230  # file names stay under 255 bytes with the longest suffix and the temporary prefix
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
FATAL_ERRORS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on",
                errno.EROFS: "read-only file system at", errno.EIO: "input/output error on"}

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
    """The output folder cannot be written (found before anything is computed)."""


class OutputStop(Exception):
    """Writing cannot go on (a full disk, a read-only file system, an unwritable manifest): the run stops after
    the outputs in flight, and the rerun resumes."""


def stop_for(error: OSError, out_dir: Path) -> OutputStop | None:
    """The :class:`OutputStop` for a disk-level ``error``, or ``None`` for one that concerns one file only."""
    reason = FATAL_ERRORS.get(error.errno)
    return OutputStop(f"{reason} {out_dir}") if reason else None


def check_writable(folder: Path, manifest_name: str = MANIFEST_NAME) -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file, and its manifest (if there is one)
    a regular file open for appending; raise :class:`OutputError` if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {str(folder)!r}: {error.strerror or error}") from None
    manifest = folder / manifest_name
    try:
        mode = os.lstat(manifest).st_mode
    except FileNotFoundError:
        return folder
    if stat.S_ISLNK(mode):
        raise OutputError(f"{str(manifest)!r} is a symlink: vitexplain writes its manifest only as a file of its own")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{str(manifest)!r} is not a regular file (a folder, a FIFO or a device)")
    try:
        os.close(os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
    except OSError as error:
        raise OutputError(f"cannot write to {str(manifest)!r}: {error.strerror or error}") from None
    return folder


class OutputLock:
    """A lock on an output folder for one run (``flock`` on ``.vitexplain.lock``): a second run into the same
    ``--out`` at once is refused rather than duplicating entries. A writer of a manifest part (a shard, a Ray
    worker) holds that lock shared, so that the parts of one run write side by side while a plain run is
    refused, and its own part's lock (``.vitexplain.{part}.lock``) alone. Released by :meth:`release` or when
    the process ends; where ``flock`` does not exist, nothing is locked."""

    def __init__(self, folder: Path, part: str | None = None):
        self.handles = []
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        try:
            self.handles.append(self.take(folder / LOCK_NAME, fcntl.LOCK_SH if part else fcntl.LOCK_EX, folder))
            if part:
                self.handles.append(self.take(folder / f".vitexplain.{part}.lock", fcntl.LOCK_EX, folder))
        except BaseException:
            self.release()
            raise

    @classmethod
    def none(cls) -> "OutputLock":
        """A lock that locks nothing."""
        lock = cls.__new__(cls)
        lock.handles = []
        return lock

    @staticmethod
    def take(path: Path, mode: int, folder: Path):
        import fcntl

        handle = open(path, "a+")
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise OutputError(f"another vitexplain run{f' (pid {holder})' if holder else ''} is writing to "
                              f"{str(folder)!r}: wait for it, or choose another --out") from None
        if mode & fcntl.LOCK_EX:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        return handle

    def release(self) -> None:
        for handle in self.handles:
            handle.close()  # closing the file releases the lock
        self.handles = []


def digest(text: str, length: int = 8) -> str:
    """Hex digits of ``text``'s SHA-1; a name's bytes that are not UTF-8 (surrogate-escaped, as Python reads them
    from the file system) count as those bytes."""
    return hashlib.sha1(os.fsencode(text)).hexdigest()[:length]


def short_stem(stem: str) -> str:
    """``stem`` if output names built on it stay short enough for any file system, else its start and a hash."""
    raw = os.fsencode(stem)  # the name's bytes, whatever their encoding
    if len(raw) <= MAX_NAME_BYTES - 100:  # room for the longest labels
        return stem
    head = raw[: MAX_NAME_BYTES - 110].decode(errors="ignore")
    return f"{head}~{digest(stem)}"


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
    names are taken. ``evaluate`` keeps its records the same way, in ``evaluation.jsonl``.
    """

    def __init__(self, out_dir: Path, manifest_name: str = MANIFEST_NAME, part: str | None = None,
                 locked: bool = True, line_problem: Callable[[dict[str, Any]], str | None] = lambda entry: None):
        """``part``: append to ``manifest.{part}.jsonl`` (a shard's, a worker's) rather than the manifest;
        ``locked=False`` takes no lock, for the workers of a run whose driver holds it; ``line_problem`` says
        what else makes a parsed entry unusable (``evaluate``: a score that is not a number), or ``None``."""
        self.line_problem = line_problem
        if part is not None and not PART.fullmatch(part):
            raise ValueError(f"a manifest part is named by letters, digits, '-' and '_', got {part!r}")
        self.out_dir = check_writable(Path(out_dir), manifest_name)
        self.lock = OutputLock(self.out_dir, part) if locked else OutputLock.none()
        self.main_manifest = self.out_dir / manifest_name
        stem, suffix = os.path.splitext(manifest_name)
        self.manifest_path = self.main_manifest if part is None else self.out_dir / f"{stem}.{part}{suffix}"
        self.part_pattern = re.compile(re.escape(stem) + r"\.(" + PART.pattern + ")" + re.escape(suffix))
        self.warnings: list[str] = []  # what the manifest reader skipped
        self.shared_stems: set[str] = set()  # stems that several inputs of the run have (see expect_inputs)
        if part is None:  # no other writer can be at work: the lock is exclusive
            self.remove_orphans()
        self.end_cut_line()
        self.names: dict[Identity, str] = {}
        self.taken: set[str] = names_in_folder(self.out_dir)
        for entry in self.entries():
            if entry.get("status") == "ok":
                self.names.setdefault(self.identity_of(entry), entry["name"])
                self.taken.add(entry["name"])
        self.claims_path = self.out_dir / CLAIMS.format(stem=stem, part="" if part is None else f".{part}")
        self.claims_pattern = re.compile(re.escape(CLAIMS.format(stem=stem, part="")[:-len(".jsonl")])
                                         + r"(\.(" + PART.pattern + r"))?\.jsonl")
        self.exclusive = part is None and locked
        self.open_claims: set[Identity] = set()  # claimed, and no entry listed yet
        for identity, name in self.unfinished_claims(self.exclusive).items():  # rewritten in place
            self.names[identity] = name
            self.taken.add(name)
            self.open_claims.add(identity)

    def unfinished_claims(self, exclusive: bool) -> dict[Identity, str]:
        """The names claimed (:meth:`write`) by outputs that no manifest entry lists: work a run left unfinished.
        With no other writer at work (``exclusive``) the claims files are folded into one holding only these."""
        claimed: dict[Identity, str] = {}
        files = sorted(Path(e.path) for e in os.scandir(self.out_dir) if self.claims_pattern.fullmatch(e.name))
        for path in files:
            entries: list = []
            self.parse_lines(path, path.read_bytes(), entries, {})
            claimed.update((self.identity_of(e), e["name"]) for e in entries)
        unfinished = {identity: name for identity, name in claimed.items() if identity not in self.names}
        if exclusive and (len(unfinished) < len(claimed) or len(files) > 1):
            lines = [json.dumps(self.claim(*identity, name)) + "\n" for identity, name in unfinished.items()]
            atomic_write(self.claims_path, "".join(lines).encode())
            for path in files:
                if path != self.claims_path:
                    path.unlink(missing_ok=True)
        return unfinished

    @staticmethod
    def claim(input_key_: str, request: str | None, index: int, name: str) -> dict[str, Any]:
        return {"input": input_key_, "status": "ok", "name": name, "output": index, "request": {"key": request}}

    def close(self) -> None:
        """Release the folder's lock (the writer can still be read from); with no claim left open, the claims
        file goes."""
        if self.exclusive and not self.open_claims:
            self.claims_path.unlink(missing_ok=True)
        self.lock.release()

    def remove_orphans(self) -> None:
        """Delete the temporary files a killed run left (the lock says no other run is writing)."""
        for entry in os.scandir(self.out_dir):
            if TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)

    def end_cut_line(self) -> None:
        """End a last line that a killed run cut short, so that the next entry is not glued to it."""
        try:
            with open(self.manifest_path, "rb+") as manifest:
                if manifest.seek(0, os.SEEK_END) and (manifest.seek(-1, os.SEEK_END), manifest.read(1))[1] != b"\n":
                    manifest.write(b"\n")
        except FileNotFoundError:
            pass

    def manifest_files(self) -> list[Path]:
        """The manifest and its parts (``manifest.{part}.jsonl``, one per shard or worker), in reading order."""
        parts = sorted(Path(e.path) for e in os.scandir(self.out_dir) if self.part_pattern.fullmatch(e.name))
        return [self.main_manifest, *parts]

    def expect_inputs(self, paths: Iterable[Path]) -> None:
        """Tell the writer every input of the run (all shards' and workers'), so that names do not depend on
        which input is written first: an input whose stem another input shares gets hashed names."""
        seen: set[str] = set()
        for path in paths:
            stem = short_stem(Path(path).stem)
            (self.shared_stems if stem in seen else seen).add(stem)

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
        stem = short_stem(Path(input_path).stem)
        base = f"{stem}_{label}"
        name, attempt = base, 0
        if stem in self.shared_stems:
            attempt = 1
            name = f"{base}-{digest(repr(identity))}"
        while name in self.taken:
            attempt += 1
            name = f"{base}-{digest(repr(identity))}" + (f"-{attempt}" if attempt > 1 else "")
        self.taken.add(name)
        self.names[identity] = name
        return name

    def write(self, name: str, files: dict[str, tuple[str, Content]], entry: dict[str, Any]) -> dict[str, Any]:
        """Write one output's files ``{name}{suffix}`` and return its manifest entry (``entry`` with the
        files' absolute paths). A line naming the output goes to the claims file beside the manifest first
        (:data:`CLAIMS`): if the run dies before the entry follows, the rerun knows the files under that name as
        its own unfinished work and rewrites them in place, where a file of the user's under the name is never
        touched. ``files`` maps a manifest field (``overlay``, ``raw``, ``gif``…) to a name suffix and the
        file's content. The entry is not yet in the manifest: :meth:`append_manifest` it once the files are
        written, so that the manifest lists only complete outputs.

        An error that concerns this output's files alone (a name the file system refuses, a folder in the
        way) returns a failure entry instead; a disk-level one (full, read-only) raises :class:`OutputStop`."""
        self.append_line(self.claims_path, self.claim(entry["input"], entry["request"]["key"], entry.get("output", 0), name))
        self.open_claims.add(self.identity_of(entry))
        paths = {}
        try:
            for field_name, (suffix, content) in files.items():
                paths[field_name] = self.out_dir / f"{name}{suffix}"
                atomic_write(paths[field_name], content)
        except OSError as error:
            stop = stop_for(error, self.out_dir)
            if stop is not None:
                raise stop from None
            return failure_entry(entry["input"], f"cannot write {paths[field_name].name}: {error.strerror or error}",
                                 entry["request"])
        return {**entry, "name": name, **{field_name: os.path.abspath(path) for field_name, path in paths.items()}}

    def append_manifest(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append ``entry`` as one line of strict JSON to the manifest; returns it. Any error writing it raises
        :class:`OutputStop`: a run that cannot record its outputs stops."""
        self.append_line(self.manifest_path, entry)
        if entry["status"] == "ok":
            self.open_claims.discard(self.identity_of(entry))
        return entry

    def append_line(self, path: Path, entry: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(entry, allow_nan=False) + "\n"
        try:
            with path.open("a", encoding="utf-8") as file:
                file.write(line)
        except OSError as error:
            raise (stop_for(error, self.out_dir) or OutputStop(
                f"cannot write {path}: {error.strerror or error}")) from None
        return entry

    def record_failure(self, input_path: Path, reason: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.append_manifest(failure_entry(input_key(input_path), reason, request))

    def entries(self) -> list[dict[str, Any]]:
        """The manifest's usable entries. Lines that are not valid UTF-8, not JSON objects, or lack the fields
        of an entry are skipped, each kind noted once in :attr:`warnings`; the reader never fails."""
        entries, skipped = [], {}
        for path in self.manifest_files():
            try:
                data = path.read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue
            self.parse_lines(path, data, entries, skipped)
        self.warnings = [f"{path}: skipped {len(lines)} line{'s' if len(lines) > 1 else ''} "
                         f"({problem}; line {lines[0]}{'…' if len(lines) > 1 else ''})"
                         for (path, problem), lines in skipped.items()]
        return entries

    def parse_lines(self, path: Path, data: bytes, entries: list, skipped: dict) -> None:
        """Append the usable entries among ``data``'s lines to ``entries``; note the others in ``skipped`` by
        ``(path, problem)``: their work is redone."""
        for number, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
                problem = entry_problem(entry) or self.line_problem(entry)
            except UnicodeDecodeError:
                problem = "not valid UTF-8"
            except json.JSONDecodeError:
                problem = "not JSON (cut short?)"
            if problem:
                skipped.setdefault((path, problem), []).append(number)
            else:
                entries.append(entry)

    def completed(self, request: str) -> set[tuple[str, int]]:
        """``(input key, output index)`` of every output of ``request`` that the manifest lists as complete
        and whose files all still exist."""
        return self.completed_by_request().get(request, set())

    def completed_by_request(self) -> dict[str, set[tuple[str, int]]]:
        """:meth:`completed` for every request key in the manifest, from one reading of it."""
        done: dict[str, set[tuple[str, int]]] = {}
        for e in self.entries():
            if is_complete(e, self.out_dir):
                done.setdefault(request_key(e), set()).add((input_key(Path(e["input"])), int(e.get("output", 0))))
        return done

    def forget(self, request: str, inputs: Iterable[Path]) -> None:
        """Drop the manifest lines of ``request`` for ``inputs`` (before recomputing them); their names stay
        theirs."""
        targets = {input_key(p) for p in inputs}

        def forgotten(line: bytes) -> bool:
            try:
                entry = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return False  # kept as it is: nothing is lost
            return entry_problem(entry) is None and request_key(entry) == request and input_key(
                Path(entry["input"])) in targets

        for path in self.manifest_files():  # a file is rewritten only if it has lines to forget
            try:
                lines = path.read_bytes().splitlines(keepends=True)
            except FileNotFoundError:
                continue
            kept = [line for line in lines if not forgotten(line)]
            if len(kept) < len(lines):
                atomic_write(path, b"".join(kept))


def compact_manifest(out_dir: Path, manifest_name: str = MANIFEST_NAME) -> int:
    """Fold the manifest's parts into one ``manifest.jsonl`` (its lines first, then each part's, byte for
    byte: nothing is dropped) and delete the parts; the number of parts folded. Refused
    (:class:`OutputError`) while any run writes to ``out_dir``."""
    writer = OutputWriter(Path(out_dir), manifest_name)  # the exclusive lock: no shard or worker at work
    try:
        parts = writer.manifest_files()[1:]
        if not parts:
            return 0
        chunks = []
        for path in writer.manifest_files():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            chunks.append(data if not data or data.endswith(b"\n") else data + b"\n")
        atomic_write(writer.main_manifest, b"".join(chunks))
        for path in parts:
            path.unlink()
        for lock in Path(out_dir).glob(".vitexplain.*.lock"):
            lock.unlink(missing_ok=True)
        return len(parts)
    finally:
        writer.close()


def is_complete(entry: dict[str, Any], folder: Path) -> bool:
    """Whether a manifest entry is a finished output whose files all still exist in ``folder``, the manifest's
    own folder (where every output file lives): the check does not depend on the working directory, on how
    ``--out`` was typed, or on where the folder has moved since (older manifests recorded paths as typed)."""
    return entry.get("status") == "ok" and all(
        (folder / os.path.basename(entry[f])).is_file() for f in FILE_FIELDS if entry.get(f))


class ManifestTail:
    """The outputs of one request complete so far, kept up to date by reading only what the manifest and its
    parts gained since the last look (other processes append to them as they work)."""

    def __init__(self, writer: OutputWriter, request: str):
        self.writer, self.request = writer, request
        self.offsets: dict[Path, int] = {}
        self.done: set[tuple[str, int]] = set()

    def update(self) -> set[tuple[str, int]]:
        for path in self.writer.manifest_files():
            try:
                with open(path, "rb") as file:
                    file.seek(self.offsets.get(path, 0))
                    data = file.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            entries: list = []
            self.writer.parse_lines(path, complete, entries, {})
            self.done |= {(input_key(Path(e["input"])), int(e.get("output", 0))) for e in entries
                          if request_key(e) == self.request and is_complete(e, self.writer.out_dir)}
        return self.done


def failure_entry(input_key_: str, reason: str, request: dict[str, Any]) -> dict[str, Any]:
    return {"input": input_key_, "status": "failed", "error": reason, "request": request}


def entry_problem(entry: Any) -> str | None:
    """What keeps a parsed manifest line from being an entry, or ``None``."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("input"), str) or entry.get("status") not in ("ok", "failed"):
        return "no input or status"
    if not isinstance(entry.get("request"), dict) or not isinstance(entry["request"].get("key"), str):
        return "no request key"
    if entry["status"] == "ok" and not (isinstance(entry.get("name"), str) and isinstance(entry.get("output", 0), int)
                                        and all(isinstance(entry.get(f, ""), str) for f in FILE_FIELDS)):
        return "wrong-typed output fields"
    return None


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
