"""Behaviour under load: backpressure (429), dropped work, deadlines, failures, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live import Live, free_port, live_server, wait_until

from service.settings import Settings

TEXT = " ".join(["the cat sat on a mat"] * 6)


def items(n: int, text: str = TEXT) -> dict[str, Any]:
    """A score request of n copies of one text."""
    return {"items": [{"text": text}] * n}


Forward = Callable[[Sequence[Sequence[int]], int | None], np.ndarray]


def wrap_forward(live: Live, wrapper: Callable[[Forward], Forward]) -> Forward:
    """Replace the backend's forward by `wrapper(original)`; return the original."""
    assert live.state.model is not None
    backend = live.state.model.backend
    forward = backend.forward
    backend.forward = wrapper(forward)  # type: ignore[method-assign]
    return forward


def slow_down(live: Live, seconds: float) -> None:
    """Make every forward pass take at least `seconds` (to hold work in the queue)."""

    def slow(forward: Forward) -> Forward:
        def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
            time.sleep(seconds)
            return forward(sequences, threads)

        return run

    wrap_forward(live, slow)


@contextmanager
def in_background(
    live: Live, body: dict[str, Any], timeout: float = 60
) -> Iterator[list[httpx.Response]]:
    """Post `body` from another thread; yields a list that holds the response once done."""
    out: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: out.append(httpx.post(f"{live.url}/v1/score", json=body, timeout=timeout))
    )
    thread.start()
    try:
        yield out
    finally:
        thread.join(timeout)


def queued(live: Live) -> float:
    """Items waiting for a forward pass, from /metrics."""
    return live.metrics()["warm_queue_depth"]


def settings_for(model: Path, **overrides: object) -> Settings:
    """Settings for a test server."""
    return Settings.model_validate({"model": model, **overrides})


def test_a_full_queue_answers_429_with_retry_after(gpt2_rm: Path) -> None:
    settings = settings_for(gpt2_rm, max_batch_size=1, max_queue_requests=1)
    with live_server(settings) as live:
        slow_down(live, 0.05)
        with in_background(live, items(20)) as busy, live.client() as client:
            wait_until(lambda: queued(live) > 0, what="queued work")
            refused = client.post("/v1/score", json=items(1))
        assert busy[0].status_code == 200
        with live.client() as client:
            accepted = client.post("/v1/score", json=items(1))
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert accepted.status_code == 200


def test_the_token_bound_also_applies(gpt2_rm: Path) -> None:
    settings = settings_for(gpt2_rm, max_batch_size=1, max_queue_tokens=2000)
    with live_server(settings) as live:
        slow_down(live, 0.05)
        one = httpx.post(f"{live.url}/v1/score", json=items(1)).json()["usage"]["tokens"]
        fits = 2000 // one
        with in_background(live, items(fits - 1)) as busy, live.client() as client:
            wait_until(lambda: queued(live) > 0, what="queued work")
            # Fits once half of the busy request is scored (items release tokens as they go).
            refused = client.post("/v1/score", json=items(fits // 2))
            too_big = client.post("/v1/score", json=items(fits + 1))
        assert busy[0].status_code == 200
    assert refused.status_code == 429
    # A request that could never fit is not "retry later" but "split it".
    assert too_big.status_code == 422 and "split it" in too_big.json()["error"]["message"]


def test_a_disconnected_clients_work_is_dropped_before_compute(gpt2_rm: Path) -> None:
    with live_server(settings_for(gpt2_rm, max_batch_size=1)) as live:
        slow_down(live, 0.05)
        before = live.metrics()
        with in_background(live, items(30)) as busy:
            wait_until(lambda: queued(live) > 0, what="queued work")
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{live.url}/v1/score", json=items(25, "a dog ran"), timeout=0.3)
        assert busy[0].status_code == 200
        after = live.metrics()
    dropped = 'warm_items_dropped_total{reason="disconnected"}'
    assert after[dropped] - before.get(dropped, 0) == 25
    assert after['warm_errors_total{type="client_closed"}'] == 1  # not a client error (4xx)
    assert after["warm_items_scored_total"] - before["warm_items_scored_total"] == 30
    assert after["warm_queue_depth"] == 0 and after["warm_queue_tokens"] == 0
    assert after["warm_queue_requests"] == 0


def test_requests_past_their_deadline_get_504_and_the_rest_is_dropped(gpt2_rm: Path) -> None:
    settings = settings_for(gpt2_rm, max_batch_size=1, request_timeout_s=0.3)
    with live_server(settings) as live, live.client() as client:
        slow_down(live, 0.05)
        late = client.post("/v1/score", json=items(40))
        wait_until(lambda: queued(live) == 0, what="an empty queue")
        fine = client.post("/v1/score", json=items(1))
        metrics = live.metrics()
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"
    assert metrics['warm_items_dropped_total{reason="deadline"}'] > 0
    assert metrics["warm_items_scored_total"] < 40 + 1 + 10  # warm-up is not counted
    assert fine.status_code == 200


def test_a_failing_forward_fails_only_its_batch(gpt2_rm: Path) -> None:
    with live_server(settings_for(gpt2_rm)) as live, live.client() as client:
        calls = {"n": 0}

        def fails_once(forward: Forward) -> Forward:
            def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("CUDA error: device-side assert triggered")
                return forward(sequences, threads)

            return run

        wrap_forward(live, fails_once)
        failed = client.post("/v1/score", json=items(3))
        served = client.post("/v1/score", json=items(3))
        metrics = live.metrics()
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "backend_error" and "device-side assert" in error["message"]
    assert served.status_code == 200
    assert metrics['warm_errors_total{type="backend_error"}'] == 1
    assert metrics["warm_queue_requests"] == 0


def staggered_batches(settings: Settings, gap: float) -> list[tuple[float, int]]:
    """(start time, size) of each forward for four 1-item requests sent `gap` s apart."""
    with live_server(settings) as live:
        forwards: list[tuple[float, int]] = []

        def recording(forward: Forward) -> Forward:
            def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
                forwards.append((time.monotonic(), len(sequences)))
                return forward(sequences, threads)

            return run

        wrap_forward(live, recording)
        threads = [
            threading.Thread(
                target=httpx.post, args=(f"{live.url}/v1/score",), kwargs={"json": items(1)}
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
            time.sleep(gap)
        for thread in threads:
            thread.join()
    return forwards


def test_max_wait_fills_batches_from_staggered_arrivals(gpt2_rm: Path) -> None:
    settings = settings_for(gpt2_rm, max_wait_ms=300, model_workers=1)
    assert [size for _, size in staggered_batches(settings, 0.02)] == [4]


@pytest.mark.usefixtures("restore_torch_threads")
def test_a_batch_filled_by_max_wait_is_split_and_its_rest_does_not_wait_again(
    gpt2_rm: Path,
) -> None:
    # Arrivals at about 0, 0.1, 0.2 and 0.3 s; at 0.5 s the first has waited max_wait and
    # all four are due: two go first, and the rest follows at once, not when its own oldest
    # item (0.2 s) has waited max_wait too (0.7 s).
    settings = settings_for(gpt2_rm, max_wait_ms=500, torch_threads=2, model_workers=2)
    forwards = staggered_batches(settings, 0.1)
    assert forwards[0][1] == 2 and sum(size for _, size in forwards) == 4
    assert forwards[-1][0] - forwards[0][0] < 0.15  # without: about 0.2 s later


THREAD_ROLES = ("event_loop", "tokenizer", "model")


def test_metrics_export_every_warm_series(gpt2_rm: Path) -> None:
    with live_server(settings_for(gpt2_rm)) as live:
        httpx.post(f"{live.url}/v1/score", json=items(2))
        samples = live.metrics()
    names = {key.split("{")[0] for key in samples}
    expected = {
        "warm_requests_total", "warm_request_duration_seconds_bucket",
        "warm_tokenize_duration_seconds_bucket", "warm_queue_wait_seconds_bucket",
        "warm_inference_duration_seconds_bucket", "warm_batch_size_bucket",
        "warm_batch_tokens_bucket", "warm_batch_padding_ratio_bucket", "warm_queue_depth",
        "warm_queue_requests", "warm_queue_tokens", "warm_items_scored_total",
        "warm_tokens_scored_total", "warm_reward_bucket", "warm_model_info", "warm_ready",
        "warm_forwards_total", "warm_process_cpu_seconds_total",
        "warm_process_resident_memory_bytes", "warm_process_open_fds",
    }  # fmt: skip
    assert expected <= names, expected - names
    # The server runs in this process: its own CPU time and memory, not zeros.
    assert 0 < samples["warm_process_cpu_seconds_total"] <= time.process_time() + 1
    assert samples["warm_process_resident_memory_bytes"] > 50e6  # torch and a model
    roles = {k: v for k, v in samples.items() if k.startswith("warm_thread_cpu_seconds_total{")}
    assert set(roles) == {f'warm_thread_cpu_seconds_total{{role="{r}"}}' for r in THREAD_ROLES}
    assert roles['warm_thread_cpu_seconds_total{role="model"}'] > 0  # it loaded the model


def serve_process(model: Path, port: int, *args: str) -> subprocess.Popen[str]:
    """`warm-serve` in its own process, as a deployment runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WARM_LOG_LEVEL": "info"}
    cmd = [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(port)]
    return subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigterm_stops_readiness_finishes_in_flight_work_and_exits_cleanly(
    gpt2_rm: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A long grace period: the drain must finish the work, however slow the machine is.
    proc = serve_process(gpt2_rm, port, "--max-batch-size", "1", "--graceful-shutdown-s", "300")
    try:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, 120, "/ready")
        out: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: out.append(httpx.post(f"{url}/v1/score", json=items(600), timeout=300))
        )
        request.start()

        def in_flight() -> bool:
            text = httpx.get(f"{url}/metrics").text
            return "warm_queue_depth 0.0" not in text

        wait_until(in_flight, 30, "work in flight")
        proc.send_signal(signal.SIGTERM)
        request.join(300)
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read() if proc.stdout else ""
    assert out and out[0].status_code == 200, log
    assert len(out[0].json()["results"]) == 600
    assert code == 0, log
    assert "draining" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_warm_serve_without_a_model_or_a_built_demo_says_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARM_")}
    env["WARM_DEMO_DIR"] = str(tmp_path / "demo")  # the embedded default is not built here
    result = subprocess.run(
        [sys.executable, "-m", "service.cli"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "no model given: pass --model DIR" in result.stderr
    assert f"not built yet at {tmp_path / 'demo' / 'warm'}" in result.stderr
    assert "make demo" in result.stderr


def test_a_backend_returning_the_wrong_shape_fails_its_batch_cleanly(gpt2_rm: Path) -> None:
    # One worker: the 3 items stay one batch (with more, they may be split across them).
    with live_server(settings_for(gpt2_rm, model_workers=1)) as live, live.client() as client:
        original = wrap_forward(
            live, lambda forward: lambda seqs, threads=None: forward(seqs, threads)[1:]
        )
        failed = client.post("/v1/score", json=items(3))
        wrap_forward(live, lambda _: original)
        served = client.post("/v1/score", json=items(3))
        metrics = live.metrics()
    assert failed.status_code == 500 and "outputs of shape (2, 1), not (3, 1)" in failed.text
    assert served.status_code == 200
    assert metrics["warm_queue_requests"] == 0 and metrics["warm_queue_tokens"] == 0


def test_a_model_that_can_no_longer_serve_turns_unready_and_stops_the_server(
    gpt2_rm: Path,
) -> None:
    with live_server(settings_for(gpt2_rm)) as live, live.client() as client:
        assert client.get("/ready").status_code == 200
        fatal: list[str] = []
        live.state.on_fatal = fatal.append
        assert live.state.model is not None
        backend = live.state.model.backend
        backend.failure = lambda: "vLLM's engine died: EngineDeadError()"  # type: ignore[method-assign]
        score = client.post("/v1/score", json=items(1))
        ready = client.get("/ready")
    assert score.status_code == 503 and "engine died" in score.json()["error"]["message"]
    assert ready.status_code == 503
    assert fatal == ["vLLM's engine died: EngineDeadError()"]  # warm-serve then exits 1


@pytest.mark.usefixtures("restore_torch_threads")
def test_torch_threads_sets_the_forward_threads(gpt2_rm: Path) -> None:
    import torch

    seen: list[int] = []
    with live_server(settings_for(gpt2_rm, torch_threads=1)) as live:

        def recording(forward: Forward) -> Forward:
            def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
                seen.append(torch.get_num_threads())  # runs on the model thread
                return forward(sequences, threads)

            return run

        wrap_forward(live, recording)
        assert httpx.post(f"{live.url}/v1/score", json=items(1)).status_code == 200
    assert seen == [1]


@pytest.mark.usefixtures("restore_torch_threads")
def test_model_threads_share_the_cores_under_load_and_a_lone_batch_takes_them_all(
    gpt2_rm: Path,
) -> None:
    import torch

    settings = settings_for(gpt2_rm, torch_threads=2, model_workers=2, max_batch_size=1)
    texts = [f"{TEXT} {word}" for word in "abcdefgh"]
    lock = threading.Lock()
    running: dict[int, int] = {}  # model thread -> threads its forward in flight runs on
    seen: list[tuple[int | None, int, int, int]] = []  # asked, torch's, all in flight, forwards
    with live_server(settings) as live, live.client() as client:

        def recording(forward: Forward) -> Forward:
            def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
                me = threading.get_native_id()
                with lock:
                    running[me] = threads or 0
                    in_flight, forwards = sum(running.values()), len(running)
                outputs = forward(sequences, threads)
                seen.append((threads, torch.get_num_threads(), in_flight, forwards))
                time.sleep(0.1)  # hold the threads: work queues up behind this forward
                with lock:
                    del running[me]
                return outputs

            return run

        wrap_forward(live, recording)
        alone = [client.post("/v1/score", json=items(1, t)).json() for t in texts]
        lone = len(seen)
        with ThreadPoolExecutor(len(texts)) as pool:
            loaded = list(pool.map(lambda t: client.post("/v1/score", json=items(1, t)), texts))
        metrics = live.metrics()
    assert [s[:3] for s in seen[:lone]] == [(2, 2, 2)] * lone  # one at a time, on both threads
    under_load = seen[lone:]
    assert all(asked == got for asked, got, _, _ in seen)  # each model thread's own count
    assert max(in_flight for _, _, in_flight, _ in under_load) == 2  # never oversubscribed
    assert max(forwards for *_, forwards in under_load) == 2  # two forwards side by side
    assert sum(asked == 1 for asked, *_ in under_load) >= 2
    for r, a in zip(loaded, alone, strict=True):
        assert r.status_code == 200
        assert abs(r.json()["results"][0]["reward"] - a["results"][0]["reward"]) < 1e-5
    assert metrics['warm_forwards_total{threads="2"}'] >= lone
    assert metrics['warm_forwards_total{threads="1"}'] >= 2


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize(
    ("threads", "workers", "pieces"),
    [
        (2, 2, [(4, 1), (4, 1)]),  # a worker per thread: a piece per thread
        (3, 2, [(8, 3)]),  # fewer workers than threads: the lone batch takes them all
        (2, 1, [(8, None)]),  # one worker: one forward on the backend's own threads
    ],
)
def test_work_that_fits_one_batch_is_split_one_piece_per_free_thread(
    gpt2_rm: Path, threads: int, workers: int, pieces: list[tuple[int, int | None]]
) -> None:
    # A large fixed cost per forward: the batch former takes all 8 items whatever their
    # lengths, and no warm-up measures a different one.
    settings = settings_for(
        gpt2_rm,
        torch_threads=threads,
        model_workers=workers,
        warmup=False,
        batch_overhead_tokens=10_000,
    )
    texts = [f"{TEXT} {word}" for word in "abcdefgh"]
    lock = threading.Lock()
    in_flight: list[int] = []
    seen: list[tuple[int, int | None, int]] = []  # items, threads asked, forwards in flight
    meet = threading.Barrier(len(pieces), timeout=30)
    with live_server(settings) as live, live.client() as client:
        alone = [client.post("/v1/score", json=items(1, t)).json()["results"][0] for t in texts]

        def recording(forward: Forward) -> Forward:
            def run(sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
                with lock:
                    in_flight.append(1)
                    seen.append((len(sequences), threads, len(in_flight)))
                outputs = forward(sequences, threads)
                meet.wait()  # breaks (an error) unless every piece runs at once
                with lock:
                    in_flight.pop()
                return outputs

            return run

        wrap_forward(live, recording)
        together = client.post("/v1/score", json={"items": [{"text": t} for t in texts]})
    assert together.status_code == 200
    assert sorted(s[:2] for s in seen) == pieces
    assert max(s[2] for s in seen) == len(pieces)  # the pieces ran side by side
    for got, one in zip(together.json()["results"], alone, strict=True):
        assert abs(got["reward"] - one["reward"]) < 1e-5


def _thread_nice(tid: int) -> int:
    # /proc/self/task/TID/stat: field 19 is the nice value (after the parenthesised name).
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.parametrize(("front_nice", "expected"), [(3, 3), (0, 0)])
def test_front_nice_lowers_the_http_and_tokeniser_threads_not_the_model(
    gpt2_rm: Path, front_nice: int, expected: int
) -> None:
    settings = Settings.model_validate({"model": gpt2_rm, "front_nice": front_nice})
    base = _thread_nice(threading.get_native_id())
    before = {int(t.name) for t in Path("/proc/self/task").iterdir()}
    with live_server(settings) as live, live.client() as client:
        assert client.post("/v1/score", json=items(2)).status_code == 200
        assert live.state.model is not None
        threads = [t for t in threading.enumerate() if t.native_id not in before]
        named = {t.name.split("_")[0]: t.native_id for t in threads}  # this server's
        model_tid, tokeniser_tid = named["warm-model"], named["warm-tokenize"]
        assert model_tid is not None and tokeniser_tid is not None
        new = {int(t.name) for t in Path("/proc/self/task").iterdir()} - before
        niced = {tid for tid in new if _thread_nice(tid) == min(19, base + expected)}
        assert _thread_nice(model_tid) == base  # and the compute threads it started
        assert tokeniser_tid in niced
        assert len(niced - {tokeniser_tid}) >= 1  # the server's event loop
        assert _thread_nice(threading.get_native_id()) == base  # the caller is untouched
