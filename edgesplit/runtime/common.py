"""What every executor shares: input checking, results, session options."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgesplit.errors import InputError, InputWarning
from edgesplit.graph import TensorInfo

CPU = "CPUExecutionProvider"
log = logging.getLogger("edgesplit")


@dataclass(frozen=True)
class RunResult:
    """Outputs keyed by the model's output names; `missing_devices` non-empty means a degraded answer."""

    outputs: dict[str, np.ndarray]
    missing_devices: tuple[str, ...] = ()
    stage_seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.missing_devices)


def check_inputs(declared: Sequence[TensorInfo], given: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes against the model's inputs; every problem is reported at once."""
    problems = []
    names = [t.name for t in declared]
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing:
        problems.append(f"missing input(s) {missing}; the model expects {names}")
    if extra:
        problems.append(f"unexpected input(s) {extra}; the model expects {names}")
    arrays: dict[str, np.ndarray] = {}
    bound: dict[str, int] = {}
    for t in declared:
        if t.name not in given:
            continue
        a = np.asarray(given[t.name])
        if a.dtype.name != t.dtype:
            problems.append(f"input {t.name!r}: expected dtype {t.dtype}, got {a.dtype.name}")
        if a.ndim != len(t.shape):
            problems.append(f"input {t.name!r}: expected shape {_fmt(t.shape)} (rank {len(t.shape)}), got {list(a.shape)}")
        else:
            for axis, (want, got) in enumerate(zip(t.shape, a.shape)):
                if isinstance(want, int) and want != got:
                    problems.append(f"input {t.name!r}: expected shape {_fmt(t.shape)}, got {list(a.shape)} (axis {axis})")
                    break
                if isinstance(want, str) and want != "?":
                    if bound.setdefault(want, got) != got:
                        problems.append(f"input {t.name!r}: dimension {want!r} is {got} here but {bound[want]} in another input")
        arrays[t.name] = a
    if problems:
        raise InputError("invalid inputs:\n  " + "\n  ".join(problems))
    _warn_not_finite(arrays)
    return arrays


def _warn_not_finite(arrays: Mapping[str, np.ndarray]) -> None:
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            what = " and ".join(w for w, found in (("NaN", np.isnan(a).any()), ("infinite", np.isinf(a).any())) if found)
            # no counts in the text: a stream of such requests then warns once, not once per request
            warnings.warn(InputWarning(f"input {name!r} holds {what} values; the outputs will probably be NaN or "
                                       "meaningless"), stacklevel=3)


def _fmt(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def random_inputs(declared: Sequence[TensorInfo], dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes; symbolic dims take `dims` (default 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in declared:
        shape = [d if isinstance(d, int) else (dims or {}).get(d, 1) for d in t.shape]
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[t.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[t.name] = np.ones(shape, dtype=dtype)
        else:
            raise InputError(f"input {t.name!r}: cannot make random data of dtype {t.dtype}; give --input")
    return out


def session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # idle threads spinning for work steal the cores other stages (and other sessions) need
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def device_providers(device: str, wanted: Sequence[str]) -> list[str]:
    """The execution providers a device's sessions use: those it asks for that this onnxruntime has, in its order,
    and CPU last. Providers it lacks are named in one warning (its stages run on what is left)."""
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("device %r: execution provider%s %s not available in this onnxruntime (it has %s); falling back "
                    "to %s", device, "s" if len(missing) > 1 else "", ", ".join(missing),
                    ", ".join(available), ", ".join([p for p in wanted if p in available and p != CPU] + [CPU]))
    return [p for p in wanted if p in available and p != CPU] + [CPU]
