"""What `reward` carries: raw, z-scored or quantile, by hand and over real HTTP, on a
calibrated artifact and refused on an uncalibrated model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from live import live_server, wait_until

from merger.calibration import (
    Calibration,
    DataRecord,
    PairMetrics,
    Rendering,
    Temperature,
    read_calibration,
    reward_stats,
)
from service.errors import ServiceError
from service.scale import normalize
from service.settings import Settings

TEXTS = [f"the cat sat on mat number {i} while my dog ran" * (1 + i % 3) for i in range(8)]


def calibration_of(rewards: list[float]) -> Calibration:
    metrics = PairMetrics(pairs=1, accuracy=1.0, log_loss=0.1)
    return Calibration(
        data=DataRecord(name="d.jsonl", sha256="0" * 64, pairs=2, holdout=0.5, seed=0),
        rendering=Rendering(separator="\n\n", max_length=64, truncation_side="left"),
        rewards=reward_stats(rewards),
        temperature=Temperature(value=2.0, fit_pairs=1, before=metrics, after=metrics),
        golden=[],
    )


def test_normalisations_by_hand() -> None:
    calibration = calibration_of([1.0, 2.0, 3.0, 4.0])  # mean 2.5, std sqrt(1.25)
    assert normalize([3.0, 7.0], "none", calibration) == [3.0, 7.0]
    z = normalize([2.5, 3.0], "zscore", calibration)
    assert z == pytest.approx([0.0, 0.5 / np.sqrt(1.25)])
    assert normalize([0.0, 2.5, 4.0, 9.0], "quantile", calibration) == [0.0, 0.5, 1.0, 1.0]
    assert normalize([1.0], "none", None) == [1.0]
    with pytest.raises(ServiceError, match="no calibration"):
        normalize([1.0], "zscore", None)


@pytest.fixture(scope="module")
def served(calibrated_llama: Path) -> Any:
    with live_server(
        Settings.model_validate({"model": calibrated_llama, "max_length": 512})
    ) as live:
        yield live


def score(live: Any, **extra: Any) -> dict[str, Any]:
    with live.client() as client:
        response = client.post("/v1/score", json={"items": [{"text": t} for t in TEXTS], **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_raw_by_default_and_normalised_on_request(served: Any, calibrated_llama: Path) -> None:
    calibration = read_calibration(calibrated_llama)
    assert calibration is not None
    raw = score(served)
    assert raw["normalize"] == "none" and all(r["raw_reward"] is None for r in raw["results"])
    with served.client() as client:
        scale = client.get("/v1/models").json()["data"][0]["scale"]
    assert scale["reward"] == "raw" and scale["default_normalize"] == "none"
    rewards = np.array([r["reward"] for r in raw["results"]])
    z = score(served, normalize="zscore")
    assert z["normalize"] == "zscore"
    np.testing.assert_allclose([r["raw_reward"] for r in z["results"]], rewards)
    want = (rewards - calibration.rewards.mean) / calibration.rewards.std
    np.testing.assert_allclose([r["reward"] for r in z["results"]], want, rtol=1e-12)
    q = np.array([r["reward"] for r in score(served, normalize="quantile")["results"]])
    assert q.min() >= 0.0 and q.max() <= 1.0
    order = np.argsort(rewards)
    assert np.all(np.diff(q[order]) >= 0)  # monotone in the reward


def test_get_reward_scores_are_quantiles_when_calibrated(served: Any) -> None:
    raw = np.array([r["reward"] for r in score(served)["results"]])
    with served.client() as client:
        body = client.post("/get_reward", json={"query": TEXTS}).json()
    np.testing.assert_allclose(body["rewards"], raw)  # raw: the server's --normalize is none
    q = np.array(body["scores"])
    assert q.min() >= 0.0 and q.max() <= 1.0 and not np.allclose(q, raw)
    quantile = [r["reward"] for r in score(served, normalize="quantile")["results"]]
    np.testing.assert_allclose(q, quantile)


def test_an_uncalibrated_model_serves_raw_rewards_only(gpt2_rm: Path) -> None:
    with live_server(Settings.model_validate({"model": gpt2_rm})) as live, live.client() as client:
        refused = client.post("/v1/score", json={"items": [{"text": "hi"}], "normalize": "zscore"})
        body = client.post("/get_reward", json={"query": ["hi"]}).json()
    assert refused.status_code == 422 and "warm-merge calibrate" in refused.text
    assert body["scores"] == body["rewards"]  # raw, as before
    settings = Settings.model_validate({"model": gpt2_rm, "normalize": "quantile"})
    with live_server(settings, ready=False) as live:
        wait_until(lambda: live.state.load_error is not None, 60, "the load to fail")
    assert "has no calibration" in (live.state.load_error or "")
