"""What `reward` means on this server: raw logits, and, for a calibrated artifact, their
z-score or quantile among the calibration's reference responses (`merger.calibration`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from merger.calibration import Calibration
from service.errors import ErrorType, ServiceError
from service.protocol import CalibrationCard, Normalize, Scale

UNCALIBRATED = (
    "normalize {how!r}: the served model has no calibration (run `warm-merge calibrate` on "
    "the artifact); only 'none' (raw rewards) is available"
)


def available(how: Normalize, calibration: Calibration | None) -> Calibration:
    """The calibration a normalisation other than 'none' needs (422 without one)."""
    if calibration is None:
        raise ServiceError(ErrorType.INVALID_REQUEST, UNCALIBRATED.format(how=how))
    return calibration


def normalize(
    rewards: Sequence[float], how: Normalize, calibration: Calibration | None
) -> list[float]:
    """`rewards` as `how` asks: unchanged ('none'), z-scored or mapped to their quantile in
    [0, 1]; a 422 ServiceError for a normalisation an uncalibrated model cannot give."""
    if how == "none":
        return list(rewards)
    stats = available(how, calibration).rewards
    raw = np.asarray(rewards, dtype=np.float64)
    mapped = stats.zscore(raw) if how == "zscore" else stats.quantile(raw)
    return [float(x) for x in mapped]


def scale_of(calibration: Calibration | None, default: Normalize = "none") -> Scale:
    """The scale card: raw logits, what responses carry by `default`, and the calibration's
    statistics and temperature if any."""
    if calibration is None:
        return Scale(default_normalize=default)
    return Scale(
        default_normalize=default,
        calibration=CalibrationCard(
            mean=calibration.rewards.mean,
            std=calibration.rewards.std,
            quantiles=calibration.rewards.quantiles,
            temperature=calibration.temperature.value,
            responses=calibration.rewards.count,
            data_sha256=calibration.data.sha256,
        ),
    )
