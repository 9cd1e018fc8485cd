"""What simple estimators reach on a job's validation split, so a model's figures have context.

Each reads only what the maps hold. A receiver's power is read from its `M x F` map
(dB above its noise floor, divided by DB_SCALE): in linear units the noise averages 1,
so the mean over frames of the strongest mel band (the band summed over receivers,
since every receiver hears the same transmitter), minus 1, is the signal's power above
the noise floor. It is floored at POWER_FLOOR_DB, where the signal is lost in noise.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from services.trainer.dataset import DB_SCALE, FloatArray, RFData, haversine_m

POWER_FLOOR_DB = -10.0
KNN_NEIGHBOURS = 5
KNN_MAX_REFERENCE = 20_000  # training samples a kNN searches at most (the first ones)
MAX_VALIDATION = 5_000  # validation samples a job's baselines are measured on at most
BASELINE_QUANTILES = (0.5, 0.68, 0.95)
BASELINES = ("centre", "centroid", "knn")


def receiver_powers_db(
    inputs: NDArray[np.float32], rows: NDArray[np.int64] | None = None
) -> FloatArray:
    """Each receiver's signal power in dB above its noise floor, `[N, R]`, from the
    `[N, R, M, F]` maps (those of `rows` when given; see the module doc); at least
    POWER_FLOOR_DB. Reads 256 maps at a time."""
    picked = np.arange(len(inputs)) if rows is None else rows
    parts = [_powers(inputs[picked[i : i + 256]]) for i in range(0, len(picked), 256)]
    return np.concatenate(parts) if parts else np.zeros((0, inputs.shape[1]))


def _powers(inputs: NDArray[np.float32]) -> FloatArray:
    linear = np.power(10.0, inputs.astype(np.float64) * (DB_SCALE / 10)).mean(axis=3)  # [N,R,M]
    band = linear.sum(axis=1).argmax(axis=1)  # [N]
    at_band = np.take_along_axis(linear, band[:, None, None], axis=2)[..., 0]  # [N, R]
    floor = 10 ** (POWER_FLOOR_DB / 10)
    powers: FloatArray = 10 * np.log10(np.maximum(at_band - 1.0, floor))
    return powers


def centre_guess(data: RFData, n: int) -> FloatArray:
    """Predict the region's centre, (lat, lon) degrees `[n, 2]`."""
    return np.tile(np.asarray(data.centre, dtype=np.float64), (n, 1))


def power_centroid(data: RFData, powers_db: FloatArray) -> FloatArray:
    """The receivers' positions averaged with their linear signal powers as weights, `[N, 2]`
    degrees (the centre where no receiver hears anything)."""
    weights = np.power(10.0, powers_db / 10) - 10 ** (POWER_FLOOR_DB / 10)
    total = weights.sum(axis=1, keepdims=True)
    guess: FloatArray = (weights @ data.receivers) / np.maximum(total, 1e-12)
    silent = total[:, 0] <= 0
    guess[silent] = np.asarray(data.centre)
    return guess


def knn(
    train_db: FloatArray, train_positions: FloatArray, query_db: FloatArray, k: int = KNN_NEIGHBOURS
) -> FloatArray:
    """Mean (lat, lon) of the `k` training samples nearest in receiver powers (Euclidean, dB),
    `[Q, 2]` degrees, from `[T, R]` and `[Q, R]` powers and `[T, 2]` training positions."""
    ref, where = torch.from_numpy(train_db), torch.from_numpy(train_positions)
    k = min(k, len(ref))
    rows = []
    for start in range(0, len(query_db), 256):
        query = torch.from_numpy(query_db[start : start + 256])
        nearest = torch.cdist(query, ref).topk(k, largest=False).indices  # [q, k]
        rows.append(where[nearest].mean(dim=1))
    if not rows:
        return np.zeros((0, 2))
    guess: FloatArray = torch.cat(rows).numpy()
    return guess


def distance_quantiles(predicted: FloatArray, truth: FloatArray) -> dict[str, float]:
    """p50, p68 and p95 of the great-circle errors, metres (keys `p50_m`, ...)."""
    errors = haversine_m(predicted, truth)
    values = np.quantile(errors, BASELINE_QUANTILES)
    pairs = zip(BASELINE_QUANTILES, values, strict=True)
    return {f"p{round(q * 100)}_m": float(v) for q, v in pairs}


def baseline_fields(
    data: RFData, train_idx: NDArray[np.int64], val_idx: NDArray[np.int64]
) -> dict[str, float]:
    """`baseline_metrics` as the epoch metrics' fields: `baseline_knn_p68_m` and the like.
    Measured on at most MAX_VALIDATION validation samples."""
    found = baseline_metrics(data, train_idx, val_idx[:MAX_VALIDATION])
    return {f"baseline_{name}_{q}": v for name, row in found.items() for q, v in row.items()}


def baseline_metrics(
    data: RFData, train_idx: NDArray[np.int64], val_idx: NDArray[np.int64]
) -> dict[str, dict[str, float]]:
    """Validation error quantiles, metres, of each of BASELINES (the kNN fitted on
    `train_idx`): `{"knn": {"p50_m": ..., "p68_m": ..., "p95_m": ...}, ...}`; `{}` without
    validation or training samples."""
    if len(val_idx) == 0 or len(train_idx) == 0:
        return {}
    train_idx = train_idx[:KNN_MAX_REFERENCE]
    train_db, val_db = (receiver_powers_db(data.inputs, rows) for rows in (train_idx, val_idx))
    truth = data.positions[val_idx]
    guesses = {
        "centre": centre_guess(data, len(val_idx)),
        "centroid": power_centroid(data, val_db),
        "knn": knn(train_db, data.positions[train_idx], val_db),
    }
    return {name: distance_quantiles(guess, truth) for name, guess in guesses.items()}
