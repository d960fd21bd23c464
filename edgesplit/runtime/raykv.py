"""Token generation on Ray: each device's actor holds its stages' sessions and their KV caches.

Only the tensors between stages (hidden states, masks) cross devices; the past/present tensors of a stage never
leave the actor that runs it. The driver runs the generation loop of `edgesplit.runtime.generate` unchanged: a
`RemoteStage` has the face of a local `KVStage`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import ray

from edgesplit.errors import EdgesplitError
from edgesplit.plan import Plan
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import session_options
from edgesplit.runtime.kvstage import PRESENT, KVStage
from edgesplit.signing import Key, Seal, check_stages, find_key


@ray.remote(num_cpus=0, max_restarts=0)
class KVWorker:
    """One device's stages for generation; `step` runs one stage with that stage's own cache. Like the stage
    actors, it checks the plan's signature with its own node's key before it parses a stage."""

    def __init__(self, device: str, stages: list[tuple[str, tuple[str, ...], tuple[str, ...], bytes]],
                 threads: int, seal: Seal | None = None, trust_unsigned: bool = False) -> None:
        self.refusal: EdgesplitError | None = None
        try:
            check_stages(device, seal, {name: model for name, _, _, model in stages}, find_key(), trust_unsigned)
        except EdgesplitError as exc:
            self.refusal = exc  # raised by `ping`, so that the driver gets it whole
            return
        opts = session_options(threads)
        self.states = {name: KVStage(name, device,
                                     ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]), ins, outs)
                       for name, ins, outs, model in stages}

    def step(self, stage: str, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        results = self.states[stage].step(feeds, batch)
        return {k: v for k, v in results.items() if not k.startswith(PRESENT)}  # caches stay on the device

    def reset(self) -> None:
        for state in self.states.values():
            state.reset()

    def ping(self) -> str:
        if self.refusal is not None:
            raise self.refusal
        return "ok"


@dataclass
class RemoteStage:
    """A stage running in its device's KVWorker, with the interface of a local `KVStage`."""

    name: str
    device: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    actor: Any
    shape_only: frozenset[str] = frozenset()

    def step(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        return ray.get(self.actor.step.remote(self.name, dict(feeds), batch))

    def reset(self) -> None:
        ray.get(self.actor.reset.remote())


def remote_stages(plan: Plan, address: str | None = None, threads: int | None = None, key: Key | None = None,
                  trust_unsigned: bool = False) -> list[RemoteStage]:
    """One KVWorker per device of the plan, pinned by its `edgesplit_device:NAME` resource; each refuses stages
    that are not the ones the plan's signature covers (`signing.check_stages`)."""
    raycluster.connect(plan.cluster, plan.devices, address)
    seal = plan.device_seal(key)
    actors = {}
    for device in plan.devices:
        stages = [(s.name, s.inputs, s.outputs, plan.stage_models[s.name]) for s in plan.device_stages(device)]
        cores = threads or plan.cluster.device(device).cores
        pinned = KVWorker.options(resources={raycluster.resource(device): 0.001})
        actors[device] = pinned.remote(device, stages, cores, seal, trust_unsigned)
    try:
        ray.get([a.ping.remote() for a in actors.values()])
    except ray.exceptions.RayTaskError as exc:
        for actor in actors.values():
            ray.kill(actor)
        cause = exc.cause if isinstance(exc.cause, EdgesplitError) else None
        raise cause or EdgesplitError(str(exc).strip().splitlines()[-1]) from None
    return [RemoteStage(s.name, s.device, s.inputs, tuple(o for o in s.outputs if not o.startswith(PRESENT)),
                        actors[s.device]) for s in plan.order()]
