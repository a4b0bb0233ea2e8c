"""What an artifact's rewards mean, recorded in the artifact: reward statistics, a
Bradley-Terry temperature and a golden set (`warm_calibration.json`).

`calibrate_artifact` scores preference data with the artifact (fp32, CPU; rendered by
`merger.formatting.render` and tokenised by `TokenLayout`, as the service does) and records:
- the statistics of the rewards of every response in the data, chosen and rejected (the
  reference responses): mean, std (population) and QUANTILES evenly spaced quantiles, from
  which a server z-scores a reward or maps it to its quantile in [0, 1];
- a temperature T fitted on a seeded share of the pairs by maximum likelihood, so that
  P(a preferred over b) = sigmoid((r_a - r_b) / T), with the pairwise accuracy and log-loss
  of the other pairs (held out) at T = 1 and at T;
- a golden set: up to N responses, not truncated, chosen to span the reward range and the
  lengths, with their fp32 rewards and token counts: a server scores them through its own
  path at startup and refuses to serve rewards that differ (a wrong tokenizer, template,
  head, weights or kernel).
The file is listed in the manifest with its SHA-256, so the artifact's fingerprint changes:
a calibrated artifact is a new version of the artifact, and `warm-merge verify` checks it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from merger.errors import MergeError
from merger.formatting import DEFAULT_SEPARATOR
from merger.hashing import sha256_file
from merger.manifest import (
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    manifest_bytes,
    read_record,
    verify_artifact,
)
from merger.preferences import Preference
from merger.writer import atomic_file

FORMAT = "warm-rm.calibration/1"
CALIBRATION_NAME = "warm_calibration.json"
QUANTILES = 101  # quantile points at probabilities 0, 0.01, ..., 1
# The temperature is searched over this factor either side of the margins' spread: a data
# set the model orders perfectly has no finite maximum-likelihood temperature.
TEMPERATURE_RANGE = 1e3


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RewardStats(Frozen):
    """The distribution of the reference responses' rewards."""

    count: int
    mean: float
    std: float = Field(description="Population standard deviation.")
    quantiles: list[float] = Field(
        description=f"{QUANTILES} quantiles at probabilities 0, 1/{QUANTILES - 1}, ..., 1."
    )

    def zscore(self, rewards: np.ndarray) -> np.ndarray:
        """(reward - mean) / std."""
        return (rewards - self.mean) / (self.std or 1.0)

    def quantile(self, rewards: np.ndarray) -> np.ndarray:
        """Each reward's quantile among the reference rewards, in [0, 1], non-decreasing in
        the reward (linear between the recorded quantiles, 0 and 1 outside them)."""
        probabilities = np.linspace(0.0, 1.0, len(self.quantiles))
        mapped: np.ndarray = np.interp(rewards, self.quantiles, probabilities)
        return mapped


class PairMetrics(Frozen):
    """How well rewards order held-out pairs under a temperature."""

    pairs: int
    accuracy: float = Field(description="Share of pairs with chosen > rejected (ties: half).")
    log_loss: float = Field(description="Mean -log sigmoid((r_chosen - r_rejected) / T).")


class Temperature(Frozen):
    """The Bradley-Terry temperature and what it changes on held-out pairs."""

    value: float
    fit_pairs: int
    before: PairMetrics = Field(description="Held-out pairs at T = 1.")
    after: PairMetrics = Field(description="Held-out pairs at T = value.")


class GoldenItem(Frozen):
    """One response and its fp32 reward, as the artifact scored it."""

    prompt: str
    response: str
    n_tokens: int
    reward: float


class Rendering(Frozen):
    """How the data was turned into token ids (a server must render the same way)."""

    separator: str
    max_length: int
    truncation_side: str


class DataRecord(Frozen):
    """The preference data the calibration was fitted on."""

    name: str
    sha256: str
    pairs: int
    holdout: float
    seed: int


class Calibration(Frozen):
    """The content of warm_calibration.json."""

    format: str = FORMAT
    output: int = Field(0, description="The model output the rewards are (a multi-head RM's).")
    data: DataRecord
    rendering: Rendering
    rewards: RewardStats
    temperature: Temperature
    golden: list[GoldenItem]


def reward_stats(rewards: Sequence[float]) -> RewardStats:
    """Mean, population std and QUANTILES quantiles (linear interpolation) of `rewards`."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no rewards to describe")
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, QUANTILES))
    return RewardStats(
        count=int(values.size),
        mean=float(values.mean()),
        std=float(values.std()),
        quantiles=[float(q) for q in quantiles],
    )


def pair_metrics(margins: Sequence[float] | np.ndarray, temperature: float) -> PairMetrics:
    """Accuracy and log-loss of pairs whose chosen-minus-rejected rewards are `margins`."""
    import torch

    from merger.diagnose import margin_accuracy

    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        raise ValueError("no pairs to measure")
    log_loss = float(np.mean(np.logaddexp(0.0, -m / temperature)))
    accuracy = margin_accuracy(torch.from_numpy(m))
    return PairMetrics(pairs=int(m.size), accuracy=accuracy, log_loss=log_loss)


def fit_temperature(margins: Sequence[float] | np.ndarray) -> float:
    """The T minimising the mean of -log sigmoid(margin / T) (convex in 1/T), searched within
    TEMPERATURE_RANGE either side of the margins' root mean square."""
    from scipy.optimize import minimize_scalar

    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        raise ValueError("no pairs to fit a temperature on")
    scale = float(np.sqrt(np.mean(m**2))) or 1.0
    bound = math.log(TEMPERATURE_RANGE)

    def loss(log_t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -m / (scale * math.exp(log_t)))))

    found = minimize_scalar(loss, bounds=(-bound, bound), method="bounded", options={"xatol": 1e-6})
    return scale * math.exp(float(found.x))


def split_pairs(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices of n pairs: a seeded shuffle, `holdout` of them held out (at
    least one pair on each side)."""
    if n < 2:
        raise ValueError(f"{n} pair(s): calibration needs at least 2 (one to fit, one held out)")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout {holdout}: must be strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    held = min(n - 1, max(1, round(n * holdout)))
    return np.sort(order[held:]), np.sort(order[:held])


def choose_golden(
    rewards: Sequence[float], lengths: Sequence[int], eligible: Sequence[bool], n: int
) -> list[int]:
    """Up to n indices of eligible items spanning the rewards and the lengths: half evenly
    spaced in reward order, half in length order (the extremes of both included), then
    filled from reward order; sorted by reward."""
    pool = [i for i, ok in enumerate(eligible) if ok]
    if n <= 0 or not pool:
        return []
    by_reward = sorted(pool, key=lambda i: (rewards[i], i))
    by_length = sorted(pool, key=lambda i: (lengths[i], i))

    def spaced(order: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        if k == 1:
            return [order[0]]
        return [order[round(j * (len(order) - 1) / (k - 1))] for j in range(k)]

    chosen = dict.fromkeys(spaced(by_reward, (n + 1) // 2) + spaced(by_length, n // 2))
    for i in by_reward:
        if len(chosen) >= min(n, len(pool)):
            break
        chosen.setdefault(i)
    return sorted(list(chosen)[:n], key=lambda i: (rewards[i], i))


def calibrate(
    pairs: Sequence[Preference],
    chosen: Sequence[float],
    rejected: Sequence[float],
    lengths: Sequence[int],
    truncated: Sequence[bool],
    *,
    golden: int,
    holdout: float,
    seed: int,
    data: tuple[str, str],
    rendering: Rendering,
) -> Calibration:
    """The calibration of rewards already computed: `chosen[i]`, `rejected[i]` of pair i;
    `lengths` and `truncated` of the 2n responses (chosen first, then rejected); `data`:
    the data file's name and SHA-256."""
    n = len(pairs)
    if not len(chosen) == len(rejected) == n or not len(lengths) == len(truncated) == 2 * n:
        raise ValueError("one reward per response and one length per response")
    margins = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    fit, held = split_pairs(n, holdout, seed)
    rewards = [*chosen, *rejected]
    stats = reward_stats(rewards)
    if not stats.std > 0:
        raise ValueError(
            f"the {len(rewards)} responses all score {stats.mean:.6g}: no scale to calibrate"
        )
    t = fit_temperature(margins[fit])
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    picked = choose_golden(rewards, lengths, [not t_ for t_ in truncated], golden)
    return Calibration(
        data=DataRecord(name=data[0], sha256=data[1], pairs=n, holdout=holdout, seed=seed),
        rendering=rendering,
        rewards=stats,
        temperature=Temperature(
            value=t,
            fit_pairs=len(fit),
            before=pair_metrics(margins[held], 1.0),
            after=pair_metrics(margins[held], t),
        ),
        golden=[
            GoldenItem(
                prompt=items[i][0],
                response=items[i][1],
                n_tokens=int(lengths[i]),
                reward=float(rewards[i]),
            )
            for i in picked
        ],
    )


def score_preferences(
    artifact: Path,
    pairs: Sequence[Preference],
    rendering: Rendering,
    batch_size: int,
) -> tuple[list[float], list[float], list[int], list[bool]]:
    """fp32 CPU rewards of every pair's chosen and rejected response, and the lengths and
    truncation flags of the 2n responses (chosen first), rendered as the service does."""
    from transformers import AutoTokenizer

    from merger.formatting import TokenLayout, render
    from merger.scoring import filler_id, id_batches, load_reward_model, score_batches

    tokenizer = AutoTokenizer.from_pretrained(artifact)
    model = load_reward_model(artifact)
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    texts = [
        render(tokenizer, prompt=p.prompt, response=r, separator=rendering.separator)
        for p, r in zip([*pairs, *pairs], responses, strict=True)
    ]
    layout = TokenLayout.of(tokenizer, rendering.max_length)
    rows = layout.encode(tokenizer, texts, rendering.truncation_side)
    pad = filler_id(tokenizer.pad_token_id, tokenizer.eos_token_id)
    batches = id_batches([ids for ids, _ in rows], pad, batch_size)
    rewards = [float(r) for r in score_batches(model, batches)]
    n = len(pairs)
    return rewards[:n], rewards[n:], [len(ids) for ids, _ in rows], [cut for _, cut in rows]


def calibrate_artifact(
    artifact: Path,
    data: tuple[str, str],
    pairs: Sequence[Preference],
    *,
    golden: int = 64,
    holdout: float = 0.5,
    seed: int = 0,
    max_length: int = 512,
    separator: str = DEFAULT_SEPARATOR,
    truncation_side: str = "left",
    batch_size: int = 16,
) -> Calibration:
    """Verify `artifact`, calibrate it on `pairs` (`data`: their name and
    `preferences.pairs_sha256`) and record the calibration in it (`write_calibration`).
    Nothing is written if anything fails first."""
    verified_without_calibration(artifact)
    rendering = Rendering(
        separator=separator, max_length=max_length, truncation_side=truncation_side
    )
    chosen, rejected, lengths, truncated = score_preferences(artifact, pairs, rendering, batch_size)
    calibration = calibrate(
        pairs,
        chosen,
        rejected,
        lengths,
        truncated,
        golden=golden,
        holdout=holdout,
        seed=seed,
        data=data,
        rendering=rendering,
    )
    write_calibration(artifact, calibration)
    return calibration


def write_calibration(artifact: Path, calibration: Calibration) -> str:
    """Write warm_calibration.json into the artifact and list it in the manifest; the new
    fingerprint.

    Each file is replaced atomically, the calibration first, so an interruption between the
    two leaves the rest of the artifact verified and the calibration unlisted (the service
    then serves it uncalibrated, with a warning) or listed with its old digest (refused at
    load); either way, running the calibration again repairs it: the artifact is verified
    without its calibration, which is then replaced, and temporaries left are removed.
    """
    manifest = verified_without_calibration(artifact)
    path = artifact / CALIBRATION_NAME
    with atomic_file(path) as fh:
        fh.write(calibration_bytes(calibration))
    files = dict(manifest.files) | {CALIBRATION_NAME: sha256_file(path)}
    updated = build_manifest(manifest.merge, files)
    with atomic_file(artifact / MANIFEST_NAME) as fh:
        fh.write(manifest_bytes(updated))
    return updated.fingerprint


def verified_without_calibration(artifact: Path) -> Manifest:
    """The artifact verified but for its calibration (listed or not), once the temporaries an
    interrupted calibration may have left are removed."""
    for name in (CALIBRATION_NAME, MANIFEST_NAME):
        for left in artifact.glob(f".{name}.*.tmp"):
            left.unlink()
    return verify_artifact(artifact, ignoring=frozenset({CALIBRATION_NAME}))


def calibration_bytes(calibration: Calibration) -> bytes:
    """Deterministic serialisation of a calibration."""
    return (
        json.dumps(calibration.model_dump(mode="json"), indent=1, sort_keys=True) + "\n"
    ).encode()


def read_calibration(artifact: Path, sha256: str | None = None) -> Calibration | None:
    """The artifact's calibration (None where it has none); a MergeError if it is
    unreadable, of another format, or (given the manifest's `sha256`) not the file the
    manifest lists."""
    path = artifact / CALIBRATION_NAME
    if not path.is_file():
        return None
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        raise MergeError(f"{path}: SHA-256 {actual[:16]}... != manifest {sha256[:16]}...")
    return read_record(path, Calibration, "calibration", FORMAT)
