"""SHA-256 of merge inputs and outputs, and the identity that tells a file was rewritten.

Imports nothing heavy (no torch): the CLI starts hashing the input files (`FileHashes`)
while torch is still being imported, and the merge hashes them beside its arithmetic.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from merger.errors import MergeError

_HASH_BLOCK = 1 << 20  # stays in cache between the read and the hash
_HASH_POLL_S = 0.1  # how often a thread waiting for a digest checks for cancellation


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of a file, read into one reused buffer; `stop` cancels a long hash."""
    return _sha256_and_identity(path, stop)[0]


FileIdentity = tuple[int, int, int, int]  # device, inode, size, mtime (ns)


def file_identity(st: os.stat_result) -> FileIdentity:
    """What changes when a file is replaced or rewritten."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _sha256_and_identity(
    path: Path, stop: threading.Event | None = None
) -> tuple[str, FileIdentity]:
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with path.open("rb", buffering=0) as fh:
        identity = file_identity(os.fstat(fh.fileno()))
        while n := fh.readinto(block):
            if stop is not None and stop.is_set():
                raise MergeError(f"{path}: hashing cancelled")
            digest.update(view[:n])
    return digest.hexdigest(), identity


class FileHashes:
    """SHA-256 of files, computed on a background thread from construction on.

    Other threads may join in (`hash_pending`); each takes the largest file not yet taken. A
    file that could not be hashed here is left out: `get` hashes it again and raises its
    error then. `cancel` stops the hashing (every thread, within one block); `close` (or
    leaving the `with` block) also waits for the background thread. Each digest comes with
    the file's identity when it was opened, so that `check_unchanged` can tell whether the
    file was replaced or rewritten since.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self._files = frozenset(files)
        self._digests: dict[Path, tuple[str, FileIdentity]] = {}
        self._stop = threading.Event()
        self._todo = sorted(self._files, key=_size_or_zero)  # largest last: popped first
        self._pending = set(self._files)  # not taken yet, or being hashed
        self._changed = threading.Condition()  # guards the three fields above
        self._thread = threading.Thread(
            target=self.hash_pending, name="warm-merge-hash", daemon=True
        )
        self._thread.start()

    def hash_pending(self) -> None:
        """Hash files not yet taken until none is left or the hashing is cancelled (the
        background thread runs this; so may any thread with nothing else to do)."""
        while not self._stop.is_set():
            with self._changed:
                if not self._todo:
                    return
                path = self._todo.pop()
            result = None
            try:
                result = _sha256_and_identity(path, self._stop)
            except Exception:  # whatever it is, `get` hashes the file again and raises it
                continue
            finally:
                with self._changed:
                    self._pending.discard(path)
                    if result is not None:
                        self._digests[path] = result
                    self._changed.notify_all()

    def get(self, path: Path, stop: threading.Event | None = None) -> str:
        """The digest of `path`: waits for it here, or hashes it now if it is not one of these
        files, or hashing it failed here (raising that error), or the hashing was cancelled."""
        with self._changed:
            while path in self._pending and not self._stop.is_set():
                if stop is not None and stop.is_set():
                    raise MergeError(f"{path}: hashing cancelled")
                self._changed.wait(_HASH_POLL_S)
            found = self._digests.get(path)
        if found is None:
            found = _sha256_and_identity(path, stop)
            with self._changed:
                self._digests[path] = found
        return found[0]

    def check_unchanged(self, opened: dict[Path, FileIdentity]) -> None:
        """Raise MergeError if a hashed file was replaced or rewritten since it was opened for
        hashing, or differs from the file `opened` (by a TensorReader): the digest would not
        describe the bytes merged."""
        with self._changed:
            hashed = {path: identity for path, (_, identity) in self._digests.items()}
        for path in sorted(hashed.keys() | opened.keys()):
            try:
                now = file_identity(path.stat())
            except OSError as exc:
                raise MergeError(f"{path}: gone while merging ({exc.strerror})") from exc
            if hashed.get(path, now) != now or opened.get(path, now) != now:
                raise MergeError(f"{path}: changed while merging; nothing was written")

    def cancel(self) -> None:
        """Stop hashing: every thread hashing here stops within one block."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Cancel the files not hashed yet and wait for the background thread."""
        self.cancel()
        self._thread.join()

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
