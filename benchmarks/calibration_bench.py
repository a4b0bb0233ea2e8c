"""Calibration on the synthetic preference benchmark, and the self-check's startup cost.

Run:  .venv/bin/python benchmarks/calibration_bench.py [--append] [--pairs 256]

The demo's WARM artifact (MiniLM fine-tuned by `make demo` on `merger/recipe/prefdata.py`;
trained here first if missing, cached in the demo directory) is copied and calibrated
(`merger.calibration.calibrate_artifact`, as `warm-merge calibrate`) on a seeded sample of
the benchmark's held-out distribution that training never saw, then served on loopback:
- the held-out half of the pairs: pairwise accuracy and log-loss at T = 1 and at the fitted
  temperature (target: log-loss no worse after);
- every reference response scored through `/v1/score` with `normalize: zscore` (target:
  mean 0 and std 1 within 1e-3) and `quantile` (in [0, 1], non-decreasing in the raw reward);
- the startup self-check: golden responses, max |served - recorded|, its time (target:
  under 2 s for 64 on a CPU), and the time to ready with it and with `--self-check off`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_report import machine_description, markdown_table, publish

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from merger.calibration import calibrate_artifact  # noqa: E402
from merger.preferences import pairs_sha256  # noqa: E402
from merger.recipe import demo, prefdata  # noqa: E402
from service.app import create_app  # noqa: E402
from service.loopback import serve  # noqa: E402
from service.settings import Settings  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
WORK = REPO / "benchmarks" / ".work" / "calibration"
SEED = 11  # the calibration sample; the demo trains on seed 0 and validates on seed 1


def app_for(artifact: Path, **settings: Any) -> Any:
    return create_app(Settings.model_validate({"model": artifact, **settings}))


def score(url: str, items: list[dict[str, str]], normalize: str) -> np.ndarray:
    rewards = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(items), 64):
            body = {"items": items[start : start + 64], "normalize": normalize}
            response = client.post("/v1/score", json=body)
            response.raise_for_status()
            rewards += [r["reward"] for r in response.json()["results"]]
    return np.array(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--pairs", type=int, default=256, help="calibration pairs")
    args = parser.parse_args()
    root = demo.demo_dir()
    root.mkdir(parents=True, exist_ok=True)
    report = demo.train(root)  # cached after `make demo`
    WORK.mkdir(parents=True, exist_ok=True)
    artifact = WORK / "warm"
    shutil.rmtree(artifact, ignore_errors=True)
    shutil.copytree(Path(report.artifact), artifact)
    pairs = prefdata.generate("val", args.pairs, seed=SEED, noise=0.0, spurious_corr=0.5)
    started = time.monotonic()
    calibration = calibrate_artifact(
        artifact, ("prefdata val, seed 11", pairs_sha256(pairs)), pairs,
        max_length=demo.MAX_LENGTH,
    )  # fmt: skip
    calibrate_s = time.monotonic() - started
    t = calibration.temperature
    items = [{"prompt": p.prompt, "response": r} for p in pairs for r in (p.chosen, p.rejected)]

    started = time.monotonic()
    with serve(app_for(artifact, max_length=demo.MAX_LENGTH)) as url:
        ready_s = time.monotonic() - started
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        z, q, raw = (score(url, items, how) for how in ("zscore", "quantile", "none"))
    started = time.monotonic()
    with serve(app_for(artifact, max_length=demo.MAX_LENGTH, self_check="off")):
        ready_off_s = time.monotonic() - started
    check = card["self_check"]
    order = np.argsort(raw, kind="stable")
    monotone = bool(np.all(np.diff(q[order]) >= 0))
    rows = [
        ["held-out pairs", str(t.after.pairs), "-", "-"],
        ["temperature T (fit on the other half)", f"{t.value:.4f}", "-", "-"],
        ["held-out log-loss, T = 1 -> T", f"{t.before.log_loss:.4f} -> {t.after.log_loss:.4f}",
         "no worse after", "met" if t.after.log_loss <= t.before.log_loss else "not met"],
        ["held-out accuracy", f"{t.after.accuracy:.3f}", "-", "-"],
        ["z-scores of the reference responses: mean, std",
         f"{z.mean():+.2e}, {z.std():.6f}", "0 and 1 within 1e-3",
         "met" if abs(z.mean()) <= 1e-3 and abs(z.std() - 1) <= 1e-3 else "not met"],
        ["quantiles: range; non-decreasing in the raw reward",
         f"[{q.min():.3f}, {q.max():.3f}]; {'yes' if monotone else 'no'}", "in [0, 1], monotone",
         "met" if q.min() >= 0 and q.max() <= 1 and monotone else "not met"],
        ["self-check: golden responses, max |served - recorded|",
         f"{check['checked']}, {check['max_deviation']:.1e} (tolerance {check['tolerance']:g})",
         "passes", "met" if check["status"] == "passed" else "not met"],
        ["self-check time (64 golden responses, CPU)", f"{check['seconds']:.2f} s", "< 2 s",
         "met" if check["seconds"] < 2 else "not met"],
        ["time to ready: self-check on / off", f"{ready_s:.1f} s / {ready_off_s:.1f} s", "-",
         "-"],
        ["warm-merge calibrate (2 x pairs responses, fp32 CPU)", f"{calibrate_s:.1f} s", "-", "-"],
    ]  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = "\n".join(
        [
            f"## Calibration and the startup self-check ({when})",
            "",
            f"`benchmarks/calibration_bench.py`: the demo's WARM artifact (4 MiniLM members) "
            f"calibrated on {args.pairs} pairs of the benchmark's held-out distribution "
            f"(`prefdata` val, seed {SEED}; training used seeds 0 and 1), items of up to "
            f"{demo.MAX_LENGTH} tokens, served on loopback (transformers, fp32, CPU). Machine: "
            f"{machine_description()}.",
            "",
            markdown_table(["measure", "value", "target", ""], rows),
        ]
    )
    publish(RESULTS, section, args.append)


if __name__ == "__main__":
    main()
