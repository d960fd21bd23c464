"""DATA.npz for `edgesplit robustness`: the model's inputs with a leading sample axis, plus optional `labels`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgesplit.errors import InputError
from edgesplit.graph import TensorInfo
from edgesplit.robust.evaluate import Samples
from edgesplit.runtime.common import check_inputs
from edgesplit.runtime.streamio import read_npz

LABELS = "labels"
CALIBRATION_SHARE = 0.1  # of DATA, when no --calibration is given and the importance needs data
CALIBRATION_MAX = 256


def read_samples(path: Path, declared: Sequence[TensorInfo], with_labels: bool = True) -> Samples:
    """The arrays of `path`, checked against the model's inputs (names, dtypes, shapes, one sample count)."""
    arrays = read_npz(path)
    labels = arrays.pop(LABELS, None) if with_labels else None
    if not with_labels:
        arrays.pop(LABELS, None)
    inputs = check_inputs(declared, arrays)
    counts = {k: (v.shape[0] if v.ndim else None) for k, v in inputs.items()}
    if None in counts.values() or len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(f"{path}: expected every input to share one leading sample axis of at least one sample, "
                         f"got shapes { {k: list(v.shape) for k, v in inputs.items()} }")
    n = next(iter(counts.values()))
    if labels is not None:
        _check_labels(path, labels, n)
    return Samples(inputs, labels)


def _check_labels(path: Path, labels: np.ndarray, n: int) -> None:
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise InputError(f"{path}: expected 'labels' to be {n} integers (one per sample), got dtype "
                         f"{labels.dtype.name} shape {list(labels.shape)}")


def split_calibration(samples: Samples) -> tuple[Samples, Samples]:
    """(calibration, evaluated): the first slice of the samples calibrates, the rest is evaluated, no overlap."""
    if len(samples) < 2:
        raise InputError(f"expected at least 2 samples to keep a calibration slice apart from the evaluated ones, "
                         f"got {len(samples)}; give --calibration CAL.npz")
    size = min(CALIBRATION_MAX, max(1, math.ceil(len(samples) * CALIBRATION_SHARE)))
    return samples.take(slice(0, size)), samples.take(slice(size, None))


def parse_list(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what}: expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise InputError(f"{what}: expected at least one value, got {text!r}")
    return values


def check_sizes(sizes: Sequence[int], devices: int) -> None:
    bad = [k for k in sizes if not 1 <= k < devices]
    if bad:
        raise InputError(f"--failures: expected sizes from 1 to {devices - 1} (fewer than the {devices} devices), "
                         f"got {bad}")


def check_rs(rs: Sequence[float]) -> None:
    bad = [r for r in rs if not 0.0 <= r <= 1.0]
    if bad:
        raise InputError(f"--r: expected fractions in [0, 1], got {bad}")

