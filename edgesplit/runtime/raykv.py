"""Token generation on Ray: each device's actor holds its stages' sessions and their KV caches.

Only the tensors between stages (hidden states, masks) cross devices; the past/present tensors of a stage never
leave the actor that runs it. The driver runs the generation loop of `edgesplit.runtime.generate` unchanged, on one
of two data planes: `tasks`, one actor call per stage (a `RemoteStage` has the face of a local `KVStage`), or
`peer` (`PeerDecoder`), one call per device per token, each device running its stages of the step as soon as its
inputs arrive and pushing what it makes straight to the devices that read it (`runtime.peer`), so a head split's
parts run on all devices at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnxruntime as ort
import ray

from edgesplit.errors import EdgesplitError
from edgesplit.plan import Plan
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import session_options
from edgesplit.runtime.failures import Route
from edgesplit.runtime.kvstage import PAST, PRESENT, KVStage
from edgesplit.runtime.peer import PeerError, PeerNode, Program, programs
from edgesplit.runtime.raypeer import PeerMesh
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
        self.device = device
        self.states = {name: KVStage(name, device,
                                     ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]), ins, outs)
                       for name, ins, outs, model in stages}
        self.sent = {name: tuple(o for o in outs if not o.startswith(PRESENT)) for name, _, outs, _ in stages}
        self.peer: PeerNode | None = None
        self.batch = 1

    def step(self, stage: str, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        results = self.states[stage].step(feeds, batch)
        return {k: v for k, v in results.items() if not k.startswith(PRESENT)}  # caches stay on the device

    def _peer_step(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.states[stage].step(feeds, self.batch)
        return [results[o] for o in self.sent[stage]]

    def peer_open(self) -> tuple[str, int, bytes]:
        if self.peer is None:
            from ray.util import get_node_ip_address

            self.peer = PeerNode(self.device, get_node_ip_address())
        return (*self.peer.address, self.peer.secret)

    def peer_connect(self, epoch: int, peers: dict[str, tuple[str, int, bytes]]) -> None:
        assert self.peer is not None
        self.peer.connect(epoch, peers)

    def peer_program(self, key: str, program: Program) -> None:
        assert self.peer is not None
        self.peer.programs[key] = program

    def peer_run(self, epoch: int, seq: int, key: str, xid: int, requests: list[dict[str, np.ndarray]],
                 batch: int = 1) -> tuple[list[dict[str, np.ndarray]], int] | PeerError:
        """This device's part of one step (of `batch` sequences): the outputs it hands back, and the bytes its
        stages read from its peers."""
        assert self.peer is not None
        self.batch, before = batch, self.peer.bytes_taken
        try:
            return self.peer.run(epoch, seq, key, xid, requests, self._peer_step), self.peer.bytes_taken - before
        except PeerError as exc:
            return exc

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


class PeerDecoder:
    """The generation loop's runner on the peer data plane: one call per device per step."""

    def __init__(self, stages: Sequence[RemoteStage], inputs: Sequence[str], timeout: float = 120.0) -> None:
        self.actors = {s.device: s.actor for s in stages}
        # past_* inputs come from each stage's own cache, never from the request or a peer
        shown = tuple(replace(s, inputs=tuple(t for t in s.inputs if not t.startswith(PAST))) for s in stages)
        self.route = Route(shown, {}, ())  # type: ignore[arg-type]  # RemoteStage has the StageLike face
        feeds = [t for t in inputs if not t.startswith(PAST)]
        self.mesh = PeerMesh(feeds, ("logits",), timeout)
        self.crossed = {t for p in programs(shown, feeds, ("logits",)).values() for step in p.steps
                        for t, _ in step.sends}

    def step(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
        try:  # a lost device fails the mesh's (re)build as well as the step
            call = self.mesh.dispatch(self.actors, self.route, [dict(feeds)], batch=int(feeds["input_ids"].shape[0]))
            answers = ray.get(list(call.refs.values()))
        except ray.exceptions.RayError as exc:
            self.mesh.invalidate()
            raise EdgesplitError(f"generation on the peer data plane failed: {str(exc).strip().splitlines()[-1]}") \
                from None
        failed = [a for a in answers if isinstance(a, PeerError)]
        if failed:
            self.mesh.invalidate()
            raise EdgesplitError(f"generation on the peer data plane failed: {failed[0]}")
        logits = next(values[0]["logits"] for values, _ in answers if "logits" in values[0])
        return logits, sum(nbytes for _, nbytes in answers)
