"""Training data: synthetic path-loss spectrograms or a dataset directory on disk.

On-disk format (a directory, written by `write_dataset`, read by `load_dataset`):

- `inputs.npy`: float32 `[N, R, M, F]`, per sample and receiver an `M x F` map in
  dB above the receiver's noise floor, divided by 20 (so values stay in about -1..5);
- `positions.npy`: float64 `[N, 2]`, the transmitter's (lat, lon) in degrees;
- `receivers.json`: a list of R `{"name": str, "lat": float, "lon": float}`;
- `dataset.json` (optional, not read): the generator's parameters.

Positions are learned normalised over the receivers' region (their bounding box plus a
margin): (lat, lon) minus its centre, divided by its half-size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.config import FilesDataset, SyntheticDataset

FloatArray = NDArray[np.float64]
EARTH_RADIUS_M = 6_371_008.8
DB_SCALE = 20.0
INPUTS_FILE, POSITIONS_FILE, RECEIVERS_FILE = "inputs.npy", "positions.npy", "receivers.json"


@dataclass(frozen=True)
class Receiver:
    name: str
    lat: float
    lon: float


# WebSDR sites of north-west Italy; a config with `receivers: N` uses the first N.
RECEIVERS: tuple[Receiver, ...] = (
    Receiver("Aquila di Giaveno", 45.0335, 7.3185),
    Receiver("Montanaro", 45.2336, 7.8561),
    Receiver("Torino", 45.0703, 7.6869),
    Receiver("Coazze", 45.0522, 7.2994),
    Receiver("Passo del Giovi", 44.5597, 8.9469),
    Receiver("Genova", 44.4056, 8.9463),
    Receiver("Milano", 45.4642, 9.1900),
)

# Radio model: a 5 W VHF transmitter, log-distance path loss, a -125 dBm noise floor.
TX_POWER_DBM, TX_POWER_SPREAD_DB = 37.0, 3.0
PATH_LOSS_1KM_DB, PATH_LOSS_EXPONENT = 76.0, 3.2
NOISE_FLOOR_DBM, SHADOWING_DB, FADING_DB = -125.0, 4.0, 2.0
_CHUNK = 256


@dataclass(frozen=True)
class RFData:
    """Inputs `[N, R, M, F]`, positions `[N, 2]` (lat, lon) and the normalisation."""

    inputs: NDArray[np.float32]
    positions: FloatArray
    receivers: FloatArray
    receiver_names: tuple[str, ...]
    centre: tuple[float, float]
    scale: tuple[float, float]

    def normalise(self, positions: FloatArray) -> FloatArray:
        """Positions in degrees to about -1..1 across the receivers' region."""
        normalised: FloatArray = (positions - np.asarray(self.centre)) / np.asarray(self.scale)
        return normalised

    def sites(self) -> list[dict[str, str | float]]:
        """The receivers as `receivers.json` lists them."""
        rows = zip(self.receiver_names, self.receivers.tolist(), strict=True)
        return [{"name": name, "lat": lat, "lon": lon} for name, (lat, lon) in rows]


def haversine_m(a: FloatArray, b: FloatArray) -> FloatArray:
    """Great-circle metres between (lat, lon) degree pairs on the last axis."""
    lat1, lon1, lat2, lon2 = (np.radians(v) for v in (a[..., 0], a[..., 1], b[..., 0], b[..., 1]))
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    distance: FloatArray = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    return distance


def region(receivers: FloatArray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre and half-size (degrees) of the receivers' bounding box plus a margin."""
    lo, hi = receivers.min(axis=0), receivers.max(axis=0)
    half = (hi - lo) / 2 * 1.2 + 0.15
    centre = (lo + hi) / 2
    return (float(centre[0]), float(centre[1])), (float(half[0]), float(half[1]))


def synthesise(cfg: SyntheticDataset, draw: int = 0, samples: int | None = None) -> RFData:
    """Deterministic transmitters and the maps their receivers see.

    Draw 0 is the dataset itself (`cfg.samples`, from `cfg.seed`); draw k > 0 is another
    `samples` independent ones from (`cfg.seed`, k), such as epoch k's fresh training set.
    """
    n = cfg.samples if samples is None else samples
    rng = np.random.default_rng(cfg.seed if draw == 0 else [cfg.seed, draw])
    sites = RECEIVERS[: cfg.receivers]
    rx = np.array([(r.lat, r.lon) for r in sites], dtype=np.float64)
    centre, half = region(rx)
    positions = rng.uniform(-1.0, 1.0, (n, 2)) * half + centre
    distance_km = np.maximum(haversine_m(positions[:, None, :], rx[None, :, :]) / 1000, 0.1)
    tx_power = TX_POWER_DBM + rng.uniform(-TX_POWER_SPREAD_DB, TX_POWER_SPREAD_DB, n)
    path_loss = PATH_LOSS_1KM_DB + 10 * PATH_LOSS_EXPONENT * np.log10(distance_km)
    shadowing = rng.normal(0.0, SHADOWING_DB, distance_km.shape)
    snr_db = tx_power[:, None] - path_loss + shadowing - NOISE_FLOOR_DBM
    band = rng.uniform(0.2, 0.8, n) * cfg.n_mels
    chunks = [
        _maps(rng, snr_db[i : i + _CHUNK], band[i : i + _CHUNK], cfg.n_mels, cfg.frames)
        for i in range(0, n, _CHUNK)
    ]
    names = tuple(r.name for r in sites)
    return RFData(np.concatenate(chunks), positions, rx, names, centre, half)


def _maps(
    rng: np.random.Generator, snr_db: FloatArray, band: FloatArray, n_mels: int, frames: int
) -> NDArray[np.float32]:
    """Noise plus a signal centred on mel band `band`, fading over the frames."""
    n, r = snr_db.shape
    width = max(n_mels / 24, 0.75)
    profile = np.exp(-0.5 * ((np.arange(n_mels)[None, :] - band[:, None]) / width) ** 2)
    fading = rng.normal(0.0, FADING_DB, (n, r, frames))
    signal = 10 ** ((snr_db[:, :, None] + fading) / 10)
    noise = rng.exponential(1.0, (n, r, n_mels, frames))
    power = noise + profile[:, None, :, None] * signal[:, :, None, :]
    return (10 * np.log10(power) / DB_SCALE).astype(np.float32)


def write_dataset(path: Path, cfg: SyntheticDataset) -> Path:
    """Generate a synthetic dataset and write it to directory `path` (see module doc)."""
    data = synthesise(cfg)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / INPUTS_FILE, data.inputs)
    np.save(path / POSITIONS_FILE, data.positions)
    (path / RECEIVERS_FILE).write_text(json.dumps(data.sites(), indent=2) + "\n")
    (path / "dataset.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    return path


def read_dataset(path: Path) -> RFData:
    """Read a dataset directory, refusing anything off the documented format."""
    if not path.is_dir():
        raise ValueError(f"dataset {path}: not a directory")
    inputs = _load_array(path / INPUTS_FILE, ndim=4).astype(np.float32, copy=False)
    positions = _load_array(path / POSITIONS_FILE, ndim=2).astype(np.float64, copy=False)
    names, rx = _load_receivers(path / RECEIVERS_FILE)
    if positions.shape != (len(inputs), 2):
        raise ValueError(
            f"{path / POSITIONS_FILE}: shape {positions.shape}, want ({len(inputs)}, 2)"
        )
    if inputs.shape[1] != len(names):
        raise ValueError(
            f"{path / INPUTS_FILE}: {inputs.shape[1]} receivers, receivers.json has {len(names)}"
        )
    if len(inputs) < 2:
        raise ValueError(f"{path / INPUTS_FILE}: needs at least 2 samples, has {len(inputs)}")
    _check_degrees(path / POSITIONS_FILE, positions)
    centre, half = region(rx)
    return RFData(inputs, positions, rx, names, centre, half)


def _load_array(file: Path, ndim: int) -> NDArray[Any]:
    try:
        array: NDArray[Any] = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{file}: cannot read a .npy array ({error})") from error
    if array.ndim != ndim or array.dtype.kind != "f":
        raise ValueError(f"{file}: want a {ndim}-d float array, got {array.ndim}-d {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{file}: holds NaN or infinite values")
    return array


def _load_receivers(file: Path) -> tuple[tuple[str, ...], FloatArray]:
    try:
        sites = json.loads(file.read_text())
        names = tuple(str(s["name"]) for s in sites)
        rx = np.array([(float(s["lat"]), float(s["lon"])) for s in sites], dtype=np.float64)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{file}: want a list of {{name, lat, lon}} ({error!r})") from error
    if not names:
        raise ValueError(f"{file}: lists no receivers")
    _check_degrees(file, rx)
    return names, rx


def _check_degrees(file: Path, points: FloatArray) -> None:
    if (np.abs(points[:, 0]) > 90).any() or (np.abs(points[:, 1]) > 180).any():
        raise ValueError(f"{file}: latitude/longitude out of range (degrees expected)")


def load_dataset(cfg: SyntheticDataset | FilesDataset) -> RFData:
    """The data a job config names."""
    if isinstance(cfg, FilesDataset):
        return read_dataset(Path(cfg.path))
    return synthesise(cfg)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps an epoch over `n` samples takes: full batches only (the last partial
    batch is dropped), and one batch of all when `n` < `batch_size`."""
    return n // min(batch_size, n)


def split_indices(
    n: int, validation_split: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Deterministic (train, validation) indices; no validation when the split is 0."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_val = min(max(round(n * validation_split), 1), n - 1) if validation_split > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])
