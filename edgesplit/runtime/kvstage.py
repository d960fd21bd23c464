"""One decoder stage with its own KV cache, run by the local generation loop and by each Ray KVWorker.

It applies the KV rule of `edgesplit.runtime.generate`: input `past_<X>` is this stage's own `present_<X>` of the
previous step, and empty (length 0 along every symbolic axis but the batch) at prefill."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

PAST, PRESENT = "past_", "present_"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(bfloat16)": np.float32}


@dataclass
class KVStage:
    """One stage on its device: its session and its own KV cache (last step's present_* outputs)."""

    name: str
    device: str
    session: ort.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shape_only: frozenset[str] = frozenset()  # past_* inputs this stage reads only through Shape nodes
    kv: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        full = dict(feeds)
        for name in self.inputs:
            if name.startswith(PAST) and name not in self.shape_only:
                full[name] = self.kv.get(PRESENT + name[len(PAST):])
                if full[name] is None:
                    full[name] = self.empty_past(name, batch)
        results = dict(zip(self.outputs, self.session.run(list(self.outputs), full)))
        self.kv.update((n, v) for n, v in results.items() if n.startswith(PRESENT))
        return results

    def reset(self) -> None:
        self.kv.clear()

    def empty_past(self, name: str, batch: int) -> np.ndarray:
        """The prefill value of input `name`: length 0 along every symbolic axis but the batch."""
        meta = next(i for i in self.session.get_inputs() if i.name == name)
        shape = [d if isinstance(d, int) else (batch if axis == 0 else 0) for axis, d in enumerate(meta.shape)]
        return np.zeros(shape, dtype=_DTYPES.get(meta.type, np.float32))
