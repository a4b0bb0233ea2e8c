"""Finding and hashing merge inputs without reading their tensors (and without torch)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import make_rm

from merger.checkpoints import input_files, open_checkpoint
from merger.errors import MergeError
from merger.hashing import FileHashes, file_identity


def test_input_files_lists_what_open_checkpoint_hashes(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    tok = tiny_tokenizer_dir
    sharded = make_rm(
        tmp_path / "sharded", "gpt2", seed=0, max_shard_size="20KB", tokenizer_dir=tok
    )
    single = make_rm(tmp_path / "single", "gpt2", seed=1, tokenizer_dir=tok)
    for path in (sharded, single, single / "model.safetensors"):
        files = input_files(path)
        assert files == open_checkpoint(path).files
        assert all(f.is_file() for f in files)
    assert len(input_files(sharded)) > len(input_files(single)) == 4  # + index, - one shard
    assert input_files(single / "model.safetensors") == ((single / "model.safetensors"),)


def test_input_files_refuses_what_open_checkpoint_refuses(tmp_path: Path) -> None:
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    for path in (tmp_path / "pickled", tmp_path / "absent"):
        with pytest.raises(MergeError) as expected:
            open_checkpoint(path)
        with pytest.raises(MergeError) as found:
            input_files(path)
        assert str(found.value) == str(expected.value)


def test_file_hashes_are_sha256_with_a_second_thread_joining_in(tmp_path: Path) -> None:
    sizes = [0, 1, 3 << 20, (1 << 20) + 7, 12345]
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(os.urandom(size))
    outside = tmp_path / "outside"
    outside.write_bytes(b"not in the set")
    with FileHashes(files) as hashes:
        helper = threading.Thread(target=hashes.hash_pending)
        helper.start()
        hashes.hash_pending()
        helper.join()
        for f in [*files, outside]:
            assert hashes.get(f) == hashlib.sha256(f.read_bytes()).hexdigest(), f.name


def test_a_file_that_failed_is_hashed_again_and_its_error_raised(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with FileHashes([missing]) as hashes, pytest.raises(FileNotFoundError):
        hashes.get(missing)


def test_waiting_for_a_digest_is_cancelled_by_stop(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a hash in progress
    stop = threading.Event()
    hashes = FileHashes([fifo])
    try:
        stop.set()
        with pytest.raises(MergeError, match="hashing cancelled"):
            hashes.get(fifo, stop)
    finally:
        with fifo.open("wb"):
            pass  # lets the hashing thread read an empty file and finish
        hashes.close()
    assert hashes.get(fifo) == hashlib.sha256(b"").hexdigest()


def test_a_file_changed_since_hashing_or_reading_is_caught(tmp_path: Path) -> None:
    f = tmp_path / "weights"
    f.write_bytes(b"abc")
    with FileHashes([f]) as hashes:
        hashes.get(f)
        hashes.check_unchanged({})
        hashes.check_unchanged({f: file_identity(f.stat())})
        with pytest.raises(MergeError, match="weights: changed while merging"):
            hashes.check_unchanged({f: (0, 0, 0, 0)})  # the reader opened another file
        f.write_bytes(b"abd")
        os.utime(f, ns=(0, 0))
        with pytest.raises(MergeError, match="weights: changed while merging"):
            hashes.check_unchanged({})
        f.unlink()
        with pytest.raises(MergeError, match="weights: gone while merging"):
            hashes.check_unchanged({})


def test_the_cli_starts_hashing_before_importing_torch(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    members = [
        make_rm(tmp_path / f"m{s}", "gpt2", seed=s, tokenizer_dir=tiny_tokenizer_dir)
        for s in range(2)
    ]
    code = (
        "import sys\n"
        "from merger import hashing\n"
        "start = hashing.FileHashes.__init__\n"
        "def init(self, files):\n"
        "    files = list(files)\n"
        "    print('hashing', len(files), 'files; torch imported:', 'torch' in sys.modules)\n"
        "    start(self, files)\n"
        "hashing.FileHashes.__init__ = init\n"
        "from merger.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", code, "build", *map(str, members), "--out", str(tmp_path / "o")]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "hashing 8 files; torch imported: False" in result.stdout  # 4 per member
    assert (tmp_path / "o" / "warm_manifest.json").is_file()
