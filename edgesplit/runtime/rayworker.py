"""The ray executor's actor: one per device, holding only that device's stages in lean onnxruntime sessions.

Its memory is measured in steps (Ray's worker, onnxruntime's fixed cost, the stages' share) and handed back to
the OS as it goes, so `RayExecutor.stats()` shows what each device really uses.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
import ray

from edgesplit.errors import EdgesplitError
from edgesplit.runtime.common import device_providers
from edgesplit.runtime.failures import StandIn
from edgesplit.runtime.lean import lean_session, start_onnxruntime, trim
from edgesplit.runtime.peer import PeerError, PeerNode, Program
from edgesplit.signing import Seal, check_stages, find_key

# a thread per peer call in flight (more than raysession.MAX_IN_FLIGHT): a call waiting for its turn must never keep
# the call whose turn it is from starting
PEER_CALLS = 40


# Out of order: a stage call runs once its inputs are ready, so a re-routed request never waits behind a call
# still blocked on a tensor from a silent device; the driver restores the order of the answers.
@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"health": 1, "peer": PEER_CALLS},
            allow_out_of_order_execution=True)
class DeviceWorker:
    """One device: its own stages only, onnxruntime threads = the device's cores. `ping`/`stats` never queue behind
    a running stage (own concurrency group), so a busy device is told apart from a silent one. The `peer_*`
    methods run the peer data plane (`runtime.peer`): whole requests, tensors pushed device to device."""

    def __init__(self, device: str, stage_files: list[ray.ObjectRef], threads: int, cpus: tuple[int, ...] = (),
                 providers: tuple[str, ...] = (), seal: Seal | None = None, trust_unsigned: bool = False) -> None:
        """`stage_files`: one ObjectRef (in a list, so that Ray does not resolve it first) to this device's
        (name, inputs, outputs, model bytes) stages, fetched after the memory baselines: the files, freed once the
        sessions are made, are in neither, so `uss - uss_runtime` is the stages' own memory."""
        import psutil

        self.device = device
        self.refusal: EdgesplitError | None = None
        if cpus:
            _pin(cpus)
        self.process = psutil.Process()
        self.uss_start = self.process.memory_full_info().uss
        start_onnxruntime(threads)
        self.uss_runtime = self.process.memory_full_info().uss  # onnxruntime's fixed cost, before any stage
        stages = ray.get(stage_files[0])
        # with this node's own key, before any stage is parsed; `ping` raises a refusal, so that the driver gets
        # it whole (Ray keeps only the text of an error raised here)
        try:
            check_stages(device, seal, {name: model for name, _, _, model in stages}, find_key(), trust_unsigned)
        except EdgesplitError as exc:
            self.refusal = exc
            return
        self.inputs = {name: ins for name, ins, _, _ in stages}
        self.outputs = {name: list(outs) for name, _, outs, _ in stages}
        chosen = device_providers(device, providers)
        self.sessions = {name: lean_session(model, threads, chosen) for name, _, _, model in stages}
        del stages
        trim()
        self.uss_loaded = self.process.memory_full_info().uss
        self.bytes_in: dict[str, int] = defaultdict(int)  # "stage/tensor" -> bytes received
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.peer: PeerNode | None = None

    def _stage(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in feeds.items():
            self.bytes_in[f"{stage}/{name}"] += value.nbytes
        t0 = time.perf_counter()
        out = self.sessions[stage].run(self.outputs[stage], feeds)
        self.seconds[stage] += time.perf_counter() - t0
        self.calls[stage] += 1
        return out

    def run(self, stage: str, *args: list[Any], size: int = 1) -> Any:
        """Runs `stage` on a chunk of requests, one after the other: each argument is a list with one value per
        request, and so is each output (a tuple of them when the stage has several). `size` counts the requests of
        a stage without inputs."""
        size = len(args[0]) if args else size
        answers = [self._stage(stage, {name: values[i] for name, values in zip(self.inputs[stage], args)})
                   for i in range(size)]
        per_output = tuple(list(values) for values in zip(*answers)) if answers else tuple(
            [] for _ in self.outputs[stage])
        return per_output[0] if len(per_output) == 1 else per_output

    def rebuild(self, stand_in: StandIn, dims: list[dict[str, int]], names: list[str],
                *values: list[np.ndarray]) -> list[np.ndarray]:
        """A lost part's output for each request of a chunk, from the tensors `names` (one list of values each):
        the replicas' pieces, or a live sibling part that gives the shape."""
        return [stand_in.array({n: v[i] for n, v in zip(names, values)}, dims[i]) for i in range(len(dims))]

    @ray.method(concurrency_group="health")
    def peer_open(self) -> tuple[str, int, bytes]:
        """This device's peer listener (opened on first call): host, port and the secret peers must present."""
        if self.peer is None:
            from ray.util import get_node_ip_address

            self.peer = PeerNode(self.device, get_node_ip_address())
        return (*self.peer.address, self.peer.secret)

    @ray.method(concurrency_group="health")
    def peer_connect(self, epoch: int, peers: dict[str, tuple[str, int, bytes]]) -> None:
        assert self.peer is not None
        self.peer.connect(epoch, peers)

    @ray.method(concurrency_group="health")
    def peer_program(self, key: str, program: Program) -> None:
        assert self.peer is not None
        self.peer.programs[key] = program

    @ray.method(concurrency_group="peer")
    def peer_run(self, epoch: int, seq: int, key: str, xid: int,
                 requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | PeerError:
        """Each request's outputs this device hands back; a PeerError is returned, not raised: the driver reads
        only the calls of exchanges it still waits for, and Ray would log every unread error."""
        assert self.peer is not None
        try:
            return self.peer.run(epoch, seq, key, xid, requests, self._stage)
        except PeerError as exc:
            return exc

    @ray.method(concurrency_group="health")
    def peer_doing(self, xid: int) -> tuple[str, str]:
        return self.peer.doing(xid) if self.peer is not None else ("", "")

    @ray.method(concurrency_group="health")
    def peer_abort(self, xid: int) -> None:
        if self.peer is not None:
            self.peer.abort(xid)

    @ray.method(concurrency_group="health")
    def ping(self) -> str:
        if self.refusal is not None:
            raise self.refusal
        return self.device

    def set_channel_bytes(self, nbytes: int) -> None:
        """The buffer of the compiled-graph channels this process creates (Ray sizes some from its own default)."""
        from ray.dag import DAGContext

        DAGContext.get_current().buffer_size_bytes = nbytes

    @ray.method(concurrency_group="health")
    def stats(self) -> dict[str, Any]:
        from ray.dag import DAGContext

        mem = self.process.memory_full_info()
        return {"device": self.device, "pid": self.process.pid, "rss": mem.rss, "uss": mem.uss,
                "channel_bytes": DAGContext.get_current().buffer_size_bytes,
                "uss_start": self.uss_start, "uss_runtime": self.uss_runtime, "uss_loaded": self.uss_loaded,
                "cpus": sorted(os.sched_getaffinity(0)), "bytes_in": dict(self.bytes_in),
                "peer_bytes_in": self.peer.bytes_in if self.peer else 0,
                "seconds": dict(self.seconds), "calls": dict(self.calls)}


def _pin(cpus: tuple[int, ...]) -> None:
    """Every thread of this process (Ray's included) on `cpus`; threads started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


