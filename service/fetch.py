"""`python -m service.fetch URL DEST`: put a model directory in place before the service starts.

The Helm chart's init container runs this. It downloads a .tar / .tar.gz of a model
directory over HTTP(S) (an object store through a presigned URL; `WARM_FETCH_AUTHORIZATION`,
if set, is sent as the Authorization header), checks the archive's SHA-256 when one is
given, unpacks it next to DEST with tarfile's `data` filter (no absolute paths, no links
out, no devices), checks that the result is a model directory the service can load (and,
for a WARM artifact, re-hashes every file against its manifest), and only then renames it
to DEST. A DEST that already holds a valid model is kept: a restarted pod does not fetch
again. Nothing half-downloaded or half-unpacked is ever left at DEST.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

from merger.errors import MergeError
from merger.manifest import MANIFEST_NAME, verify_artifact
from service.loader import LoadError, check_model_dir

AUTH_ENV = "WARM_FETCH_AUTHORIZATION"
CHUNK = 1 << 20


class FetchError(Exception):
    """The model could not be fetched, or what was fetched is not a usable model."""


def check_model(directory: Path) -> None:
    """Raise FetchError unless `directory` is a loadable model (a WARM artifact must verify)."""
    try:
        check_model_dir(directory)
        if (directory / MANIFEST_NAME).is_file():
            verify_artifact(directory)
    except (LoadError, MergeError) as error:
        raise FetchError(str(error)) from None


def download(url: str, dest: Path, *, authorization: str | None, timeout_s: float) -> str:
    """Stream `url` into the file `dest`; return the SHA-256 of what was written."""
    headers = {"authorization": authorization} if authorization else {}
    digest = hashlib.sha256()
    transport = httpx.HTTPTransport(retries=3)  # connection failures only, never a 4xx/5xx
    try:
        with (
            httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=True) as http,
            http.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code != 200:
                raise FetchError(f"GET {url}: HTTP {response.status_code}")
            with dest.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except httpx.HTTPError as error:
        raise FetchError(f"GET {url}: {error}") from None
    return digest.hexdigest()


def unpack(archive: Path, into: Path) -> Path:
    """Extract `archive` into `into`; the model directory is its root or its one top folder."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise FetchError(f"{archive.name}: not a usable tar archive ({error})") from None
    entries = list(into.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (into / "config.json").exists():
        return entries[0]
    return into


def fetch(url: str, dest: Path, *, sha256: str | None = None, timeout_s: float = 60.0) -> bool:
    """Make `dest` a verified copy of the model at `url`; False when it already was one."""
    if dest.exists():
        try:
            check_model(dest)
        except FetchError as error:
            raise FetchError(f"{dest} exists but is not a usable model: {error}") from None
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Work beside DEST so the final rename stays on one filesystem (atomic).
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        archive = work / "model.tar"
        actual = download(url, archive, authorization=os.environ.get(AUTH_ENV), timeout_s=timeout_s)
        if sha256 is not None and actual != sha256.lower():
            raise FetchError(f"GET {url}: SHA-256 {actual} does not match the expected {sha256}")
        model = unpack(archive, work / "unpacked")
        check_model(model)
        try:
            model.rename(dest)
        except OSError:
            if not dest.exists():
                raise
            # Another pod on a shared volume placed it first: keep theirs if it is usable.
            check_model(dest)
            return False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 with the model in place, 1 with one line saying why not."""
    parser = argparse.ArgumentParser(prog="python -m service.fetch", description=__doc__)
    parser.add_argument("url", help="http(s) URL of a .tar or .tar.gz of a model directory")
    parser.add_argument("dest", type=Path, help="the model directory to create (WARM_MODEL)")
    parser.add_argument("--sha256", help="expected SHA-256 of the archive")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-read timeout")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"url {args.url!r}: expected http:// or https://")
    try:
        fetched = fetch(args.url, args.dest, sha256=args.sha256, timeout_s=args.timeout_s)
    except FetchError as error:
        print(f"fetch: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"fetch: {args.dest} {'fetched and verified' if fetched else 'already present'}")


if __name__ == "__main__":
    main()
