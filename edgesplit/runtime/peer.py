"""The peer data plane: each device runs its own stages of a request and pushes every tensor it makes straight to
the devices that read it, one TCP connection per ordered pair of devices; the driver only sends each device the
request inputs it reads and collects the outputs. One request costs one call per device, and every exchange
between two devices one hop, instead of a call per stage relayed by the driver.

Nothing here knows Ray: `PeerNode` is what a device holds (its listener, its connections, a mailbox of tensors
received), `programs` says what each device does with a request, and `run_program` does it with any stage runner.
The Ray executor drives it from its device actors; the benchmarks drive it from bare processes (the bound).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgesplit.errors import EdgesplitError

INPUT = "@input"
HANDSHAKE = 32  # bytes of the listener's secret a connecting peer must present
_HEADER = struct.Struct("<QIBBH")  # exchange id, request index, dtype text length, rank, name length
_NAME = struct.Struct("<H")


class PeerError(EdgesplitError):
    """A request could not finish on the peer data plane (a peer's connection closed, or the driver gave up on it)."""


@dataclass(frozen=True)
class Step:
    """One stage of a device's program, and which device each of its outputs is pushed to."""

    stage: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sends: tuple[tuple[str, tuple[str, ...]], ...]  # output -> the devices that read it


@dataclass(frozen=True)
class Program:
    """What one device does with a request: its steps in order, the request inputs it is given, the tensors it
    waits for from which peer, and the model outputs it hands back."""

    device: str
    steps: tuple[Step, ...]
    feeds: tuple[str, ...]
    waits: tuple[tuple[str, str], ...]  # tensor -> the device that sends it
    returns: tuple[str, ...]


class StageLike(Protocol):
    name: str
    device: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def programs(stages: Sequence[StageLike], inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, Program]:
    """Every device's program for stages in an order where producers come first (a route's stages)."""
    producer = {t: INPUT for t in inputs}
    for s in stages:
        producer.update(dict.fromkeys(s.outputs, s.device))
    readers: dict[str, dict[str, None]] = {}
    for s in stages:
        for t in s.inputs:
            if producer[t] not in (INPUT, s.device):
                readers.setdefault(t, {})[s.device] = None
    devices = dict.fromkeys(s.device for s in stages)
    result = {}
    for d in devices:
        mine = [s for s in stages if s.device == d]
        steps = tuple(Step(s.name, s.inputs, s.outputs,
                           tuple((t, tuple(readers[t])) for t in s.outputs if t in readers)) for s in mine)
        read = dict.fromkeys(t for s in mine for t in s.inputs)
        feeds = tuple(t for t in read if producer[t] == INPUT)
        waits = tuple((t, producer[t]) for t in read if producer[t] not in (INPUT, d))
        returns = tuple(t for t in outputs if producer.get(t) == d)
        result[d] = Program(d, steps, feeds, waits, returns)
    return result


# ---- the wire ----

def send_tensor(sock: socket.socket, xid: int, index: int, name: str, array: np.ndarray) -> None:
    a = np.asarray(array, order="C")  # ascontiguousarray would make a 0-d array 1-d
    dtype, label = a.dtype.str.encode(), name.encode()
    header = _HEADER.pack(xid, index, len(dtype), a.ndim, len(label)) + dtype + label
    header += struct.pack(f"<{a.ndim}q", *a.shape)
    sock.sendall(header)
    if a.nbytes:
        sock.sendall(memoryview(a).cast("B"))


def recv_tensor(sock: socket.socket) -> tuple[int, int, str, np.ndarray]:
    xid, index, ndtype, ndim, nlabel = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    rest = recv_exact(sock, ndtype + nlabel + 8 * ndim)
    dtype = np.dtype(rest[:ndtype].decode())
    name = rest[ndtype:ndtype + nlabel].decode()
    shape = struct.unpack(f"<{ndim}q", rest[ndtype + nlabel:])
    array = np.empty(shape, dtype=dtype)
    if array.nbytes:
        recv_into(sock, memoryview(array).cast("B"))
    return xid, index, name, array


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def no_delay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ---- a device's end ----

class PeerNode:
    """A device's listener, its connections to the other devices and the tensors received from them.

    Requests run one at a time, in the order the driver numbered them for this device (`seq`), so that two
    devices never wait on each other's later request; a mesh rebuilt after a loss starts a new `epoch`, and calls
    of an older one give up at once."""

    def __init__(self, device: str, host: str) -> None:
        self.device = device
        self.secret = secrets.token_bytes(HANDSHAKE)
        self._listener = socket.create_server((host, 0))
        self.address = (host, self._listener.getsockname()[1])
        self._out: dict[str, socket.socket] = {}
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._box: dict[tuple[int, int, str], np.ndarray] = {}
        self._gone: set[str] = set()  # peers whose connection to us closed
        self._aborted: set[int] = set()
        self._epoch = 0
        self._next = 0
        self.programs: dict[str, Program] = {}
        self.bytes_in = 0  # every tensor that arrived
        self.bytes_taken = 0  # the tensors the stages read (runs go one at a time: a run's share is a difference)
        self._doing: dict[int, tuple[str, str]] = {}  # exchange -> ("turn" | "run" stage | "wait" sender)
        threading.Thread(target=self._accept, daemon=True).start()

    def connect(self, epoch: int, peers: Mapping[str, tuple[str, int, bytes]]) -> None:
        """(Re)connect to every other device (`peers`: device -> host, port, secret) for mesh `epoch`."""
        with self._send_lock:
            for sock in self._out.values():
                sock.close()
            self._out = {}
            for device, (host, port, secret) in peers.items():
                if device == self.device:
                    continue
                sock = no_delay(socket.create_connection((host, port), timeout=10.0))
                sock.settimeout(None)
                label = self.device.encode()
                sock.sendall(secret + _NAME.pack(len(label)) + label)
                self._out[device] = sock
        with self._cond:
            self._epoch, self._next = epoch, 0
            self._gone.clear()
            self._aborted.clear()
            self._box.clear()
            self.programs.clear()
            self._cond.notify_all()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(no_delay(conn),), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            offered = recv_exact(conn, HANDSHAKE)
            if not hmac.compare_digest(offered, self.secret):
                conn.close()  # not a device of this mesh
                return
            (n,) = _NAME.unpack(recv_exact(conn, _NAME.size))
            peer = recv_exact(conn, n).decode()
        except (OSError, ConnectionError):
            conn.close()
            return
        try:
            while True:
                xid, index, name, array = recv_tensor(conn)
                with self._cond:
                    self.bytes_in += array.nbytes
                    if xid not in self._aborted:
                        self._box[(xid, index, name)] = array
                        self._cond.notify_all()
        except (OSError, ConnectionError, ValueError, struct.error):
            with self._cond:
                self._gone.add(peer)
                self._cond.notify_all()
        finally:
            conn.close()

    def doing(self, xid: int) -> tuple[str, str]:
        """What this device does for exchange `xid`: ("run", stage), ("wait", the device it waits for), ("turn", "")
        while an earlier exchange runs, or ("", "") when it holds none."""
        return self._doing.get(xid, ("", ""))

    def abort(self, xid: int) -> None:
        """Give up on exchange `xid`: its waits end and its tensors are dropped."""
        with self._cond:
            self._aborted.add(xid)
            for key in [k for k in self._box if k[0] == xid]:
                del self._box[key]
            self._cond.notify_all()

    def run(self, epoch: int, seq: int, key: str, xid: int, requests: Sequence[Mapping[str, np.ndarray]],
            runner: Callable[[str, dict[str, np.ndarray]], Sequence[np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Run program `key` on a chunk of requests once it is this call's turn; returns each request's outputs
        that this device hands back."""
        with self._cond:
            self._doing[xid] = ("turn", "")
            self._cond.wait_for(lambda: self._epoch != epoch or self._next == seq)
            if self._epoch != epoch:
                del self._doing[xid]
                raise PeerError(f"device {self.device!r}: the peer mesh was rebuilt; exchange {xid} dropped")
        try:
            program = self.programs[key]
            return [self._one(program, xid, i, feeds, runner) for i, feeds in enumerate(requests)]
        finally:
            with self._cond:
                self._doing.pop(xid, None)
                if self._epoch == epoch:
                    self._next = seq + 1
                for k in [k for k in self._box if k[0] == xid]:
                    del self._box[k]
                self._cond.notify_all()

    def _one(self, program: Program, xid: int, index: int, feeds: Mapping[str, np.ndarray],
             runner: Callable[[str, dict[str, np.ndarray]], Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
        values = dict(feeds)
        sender = dict(program.waits)
        for step in program.steps:
            for t in step.inputs:
                if t not in values:
                    values[t] = self._take(xid, index, t, sender[t])
            self._doing[xid] = ("run", step.stage)
            results = runner(step.stage, {t: values[t] for t in step.inputs})
            values.update(zip(step.outputs, results))
            for t, devices in step.sends:
                for d in devices:
                    self._send(d, xid, index, t, values[t])
        return {t: values[t] for t in program.returns}

    def _take(self, xid: int, index: int, tensor: str, sender: str) -> np.ndarray:
        key = (xid, index, tensor)
        epoch = self._epoch
        with self._cond:
            self._doing[xid] = ("wait", sender)
            self._cond.wait_for(lambda: key in self._box or xid in self._aborted or sender in self._gone
                                or self._epoch != epoch)
            if key in self._box:
                array = self._box.pop(key)
                self.bytes_taken += array.nbytes
                return array
            why = (f"device {sender!r} went away" if sender in self._gone else
                   "the driver gave up on it" if xid in self._aborted else "the peer mesh was rebuilt")
        raise PeerError(f"device {self.device!r}: waiting for {tensor!r} of exchange {xid}: {why}")

    def _send(self, device: str, xid: int, index: int, tensor: str, array: np.ndarray) -> None:
        try:
            with self._send_lock:
                send_tensor(self._out[device], xid, index, tensor, array)
        except (OSError, KeyError) as exc:
            raise PeerError(f"device {self.device!r}: cannot send {tensor!r} to {device!r}: {exc}") from None

    def close(self) -> None:
        self._listener.close()
        with self._send_lock:
            for sock in self._out.values():
                sock.close()
