"""Outputs against reference outputs: the one error measure of `verify`, the tests and the rewrites' self-checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    output: str
    max_abs: float
    max_rel: float  # max |a-b| / max(|b|) over the output: robust to near-zero elements
    ok: bool


def compare(plan_outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            rtol: float) -> list[Difference]:
    """Every reference output against the same-named one of `plan_outputs`: a shape or dtype mismatch is an
    infinite error, integer outputs count the elements that differ."""
    diffs = []
    for name, ref in reference.items():
        got = plan_outputs[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            diffs.append(Difference(name, float("inf"), float("inf"), False))
            continue
        if ref.dtype.kind not in "fc":
            bad = float(np.count_nonzero(got != ref))
            diffs.append(Difference(name, bad, bad, bad == 0))
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        scale = float(np.max(np.abs(ref), initial=0.0))
        rel = err / scale if scale > 0 else err
        diffs.append(Difference(name, err, rel, rel <= rtol))
    return diffs
