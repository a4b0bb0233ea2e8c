"""`python -m service.fetch`, the chart's init container, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny_models import make_rm

from merger.build import run_merge
from merger.config import MergeSpec
from merger.manifest import verify_artifact
from merger.plan import plan_merge
from service.fetch import FetchError, fetch


class Store:
    """A tiny object store: serves `files` by path and records each request's headers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.on_get: Callable[[], None] = lambda: None
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                store.requests.append({k.lower(): v for k, v in self.headers.items()})
                store.on_get()
                body = store.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture
def store() -> Iterator[Store]:
    served = Store()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()


def tar_of(directory: Path, *, top: str | None = None, gz: bool = True) -> bytes:
    """A .tar(.gz) of `directory`'s files, at the root or under one top folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return buf.getvalue()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A WARM artifact of two tiny GPT-2 RMs (with a manifest to verify)."""
    root = tmp_path_factory.mktemp("fetch")
    members = [
        make_rm(root / f"m{seed}", "gpt2", seed=seed, tokenizer_dir=tiny_tokenizer_dir)
        for seed in (1, 2)
    ]
    out = root / "warm"
    run_merge(plan_merge(MergeSpec(inputs=tuple(members))), out)
    return out


def test_fetches_verifies_and_places_a_warm_artifact(
    store: Store, artifact: Path, tmp_path: Path
) -> None:
    archive = tar_of(artifact, top="warm")
    store.files["/rm.tar.gz"] = archive
    dest = tmp_path / "models" / "warm-rm"
    assert fetch(f"{store.url}/rm.tar.gz", dest, sha256=hashlib.sha256(archive).hexdigest())
    verify_artifact(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in artifact.iterdir())
    assert [p.name for p in dest.parent.iterdir()] == ["warm-rm"]  # no work files left
    # A restarted pod finds it in place and does not download again.
    assert not fetch(f"{store.url}/rm.tar.gz", dest)
    assert len(store.requests) == 1


def test_plain_tar_of_a_model_at_the_archive_root(
    store: Store, gpt2_rm: Path, tmp_path: Path
) -> None:
    store.files["/rm.tar"] = tar_of(gpt2_rm, gz=False)
    dest = tmp_path / "rm"
    assert fetch(f"{store.url}/rm.tar", dest)
    assert (dest / "config.json").is_file()


def test_sends_the_authorization_from_the_environment(
    store: Store, gpt2_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.files["/rm.tar.gz"] = tar_of(gpt2_rm)
    monkeypatch.setenv("WARM_FETCH_AUTHORIZATION", "Bearer s3cr3t")
    fetch(f"{store.url}/rm.tar.gz", tmp_path / "rm")
    assert store.requests[0]["authorization"] == "Bearer s3cr3t"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "HTTP 404"),
        ("checksum", "does not match the expected"),
        ("not-tar", "not a usable tar archive"),
        ("escape", "not a usable tar archive"),
        ("not-a-model", "no config.json"),
        ("tampered", "SHA-256"),
    ],
)
def test_refuses_bad_downloads_and_leaves_nothing_behind(
    store: Store, artifact: Path, tmp_path: Path, setup: str, message: str
) -> None:
    sha = None
    if setup == "checksum":
        store.files["/rm"] = tar_of(artifact)
        sha = "0" * 64
    elif setup == "not-tar":
        store.files["/rm"] = b"<html>login page</html>"
    elif setup == "escape":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("../../etc/evil")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        store.files["/rm"] = buf.getvalue()
    elif setup == "not-a-model":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "README").write_text("hello")
        store.files["/rm"] = tar_of(tmp_path / "docs")
    elif setup == "tampered":
        copy = tmp_path / "tampered"
        copy.mkdir()
        for path in artifact.iterdir():
            data = path.read_bytes()
            (copy / path.name).write_bytes(data + b" " if path.name == "config.json" else data)
        store.files["/rm"] = tar_of(copy)
    dest = tmp_path / "models" / "warm-rm"
    with pytest.raises(FetchError, match=message):
        fetch(f"{store.url}/rm", dest, sha256=sha)
    assert list(dest.parent.iterdir()) == []


def test_another_pod_placing_the_model_first_is_not_an_error(
    store: Store, gpt2_rm: Path, tmp_path: Path
) -> None:
    store.files["/rm.tar.gz"] = tar_of(gpt2_rm)
    dest = tmp_path / "rm"
    store.on_get = lambda: shutil.copytree(gpt2_rm, dest) and None  # a pod on the same volume
    assert not fetch(f"{store.url}/rm.tar.gz", dest)
    assert (dest / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]


def test_an_existing_directory_that_is_not_a_model_is_an_error(tmp_path: Path) -> None:
    dest = tmp_path / "rm"
    dest.mkdir()
    with pytest.raises(FetchError, match="exists but is not a usable model"):
        fetch("http://127.0.0.1:9/never-asked", dest)


def test_command_line_exit_codes(store: Store, gpt2_rm: Path, tmp_path: Path) -> None:
    store.files["/rm.tar.gz"] = tar_of(gpt2_rm)
    command = [sys.executable, "-m", "service.fetch"]
    ok = subprocess.run(
        [*command, f"{store.url}/rm.tar.gz", str(tmp_path / "rm")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "fetched and verified" in ok.stdout
    bad = subprocess.run(
        [*command, f"{store.url}/nope", str(tmp_path / "other")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("fetch: GET") and "HTTP 404" in bad.stderr
    scheme = subprocess.run(
        [*command, "s3://bucket/rm", str(tmp_path / "other")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert scheme.returncode == 2
    assert "expected http:// or https://" in scheme.stderr
