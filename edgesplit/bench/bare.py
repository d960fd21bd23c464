"""The bound of the peer data plane: a plan's stages in bare processes (no Ray), one per device, each pinned to its
own cores, exchanging tensors over the same local sockets (`runtime.peer`), driven through pipes. The Ray
executor's peer path can at best match it on the same machine."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgesplit.plan import Plan
from edgesplit.runtime.common import session_options
from edgesplit.runtime.failures import Router
from edgesplit.runtime.peer import PeerNode, Program, programs

HOST = "127.0.0.1"


def _device(conn: Any, device: str, stages: list[tuple[str, tuple[str, ...], bytes]], threads: int,
            cpus: tuple[int, ...]) -> None:
    import onnxruntime as ort

    if cpus:
        os.sched_setaffinity(0, cpus)
    opts = session_options(threads)
    sessions = {name: ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
                for name, _, model in stages}
    outputs = {name: list(outs) for name, outs, _ in stages}
    node = PeerNode(device, HOST)
    conn.send((*node.address, node.secret))
    peers, progs = conn.recv()
    node.connect(1, peers)
    node.programs.update(progs)
    conn.send("ready")
    seq = 0
    while True:
        message = conn.recv()
        if message is None:
            break
        xid, requests = message
        conn.send(node.run(1, seq, "all", xid, requests, lambda s, feeds: sessions[s].run(outputs[s], feeds)))
        seq += 1
    node.close()


class BareMesh:
    """The plan's all-up route on one bare process per device; `run` answers one request."""

    def __init__(self, plan: Plan, threads: int = 1, cpus: Mapping[str, tuple[int, ...]] | None = None) -> None:
        router = Router(plan)
        route = router.route()
        self.outputs = router.outputs
        self.programs: dict[str, Program] = programs(route.stages, router.inputs, router.outputs)
        ctx = mp.get_context("spawn")
        self._pipes: dict[str, Any] = {}
        self._procs: list[Any] = []
        for d in self.programs:
            stages = [(s.name, s.outputs, s.model) for s in route.stages if s.device == d]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_device, args=(child, d, stages, threads, (cpus or {}).get(d, ())), daemon=True)
            proc.start()
            self._pipes[d] = parent
            self._procs.append(proc)
        peers = {d: pipe.recv() for d, pipe in self._pipes.items()}
        for d, pipe in self._pipes.items():
            pipe.send((peers, {"all": self.programs[d]}))
        for pipe in self._pipes.values():
            pipe.recv()
        self._xid = 0

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._xid += 1
        for d, pipe in self._pipes.items():
            pipe.send((self._xid, [{t: inputs[t] for t in self.programs[d].feeds}]))
        merged: dict[str, np.ndarray] = dict(inputs)
        for pipe in self._pipes.values():
            merged.update(pipe.recv()[0])
        return {t: merged[t] for t in self.outputs}

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.send(None)
        for proc in self._procs:
            proc.join(10)

    def __enter__(self) -> BareMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exchanger(conn: Any, device: str, other: str, nbytes: int, rounds: int, cpus: tuple[int, ...]) -> None:
    """One end of the synchronisation benchmark: each round sends `nbytes` to the other device and waits for
    its `nbytes` (an all-gather between two devices), on the peer node's own path (reader thread, mailbox)."""
    import time

    from edgesplit.runtime.peer import Step

    if cpus:
        os.sched_setaffinity(0, cpus)
    node = PeerNode(device, HOST)
    conn.send((*node.address, node.secret))
    node.connect(1, conn.recv())
    mine, theirs = f"{device}/part", f"{other}/part"
    node.programs["x"] = Program(device, (Step("make", (), (mine,), ((mine, (other,)),)),
                                          Step("use", (theirs,), (), ())), (), ((theirs, other),), ())
    part = np.ones(nbytes // 4, dtype=np.float32)
    conn.send("ready")
    conn.recv()
    seconds = []
    for i in range(rounds):
        t0 = time.perf_counter()
        node.run(1, i, "x", i, [{}], lambda s, feeds: [part] if s == "make" else [])
        seconds.append(time.perf_counter() - t0)
    conn.send(seconds)
    node.close()


def exchange_seconds(nbytes: int, rounds: int = 400, cpus: Sequence[tuple[int, ...]] = ((), ())) -> list[float]:
    """Seconds of each synchronisation between two bare processes exchanging `nbytes` each way (device a's)."""
    ctx = mp.get_context("spawn")
    ends = []
    for me, other, c in (("a", "b", cpus[0]), ("b", "a", cpus[1])):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_exchanger, args=(child, me, other, nbytes, rounds, c), daemon=True)
        proc.start()
        ends.append((me, parent, proc))
    peers = {me: pipe.recv() for me, pipe, _ in ends}
    for _, pipe, _ in ends:
        pipe.send(peers)
    for _, pipe, _ in ends:
        pipe.recv()
    for _, pipe, _ in ends:
        pipe.send("go")
    results = [pipe.recv() for _, pipe, _ in ends]
    for _, _, proc in ends:
        proc.join(10)
    return results[0]
