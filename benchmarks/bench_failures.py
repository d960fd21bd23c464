"""Failures on the Ray executor (issue 14), on one machine (Ray's local instance simulates the devices).

python benchmarks/bench_failures.py [--repeats 3] [--deadline 2] [--quick]
Writes benchmarks/results/failures.json and failures.md: the worst answer time while part A's device is stopped
(SIGSTOP) for 1, 3, 8 and 20 s under `deadline` (its replica stands in), against the worst gap of the same stream
with no stall and against the bound (deadline + margin); and the failover of a vertical plan with standby stages
(`--standby auto`): the time from killing a device mid-stream to the first answer after, against the stream's
median time between answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator

import ray

from edgesplit.bench import zoo
from edgesplit.bench.harness import RESULTS, machine, markdown_table, write_report
from edgesplit.cluster import Cluster
from edgesplit.runtime import raycluster
from edgesplit.runtime.common import RunResult, random_inputs
from edgesplit.runtime.failures import DeviceCaughtUp, DeviceLate, DeviceLost
from edgesplit.runtime.ray import RayExecutor

DEVICES = ("dev0", "dev1", "dev2", "dev3")
STALLS = (1.0, 3.0, 8.0, 20.0)
PACE = 0.02  # seconds between requests
AFTER = 3.0  # seconds of stream after the stall ends


def horizontal_plan():
    rest = dict.fromkeys(("stem_conv", "stem_relu", "relu1", "conv2", "relu2", "gap", "flatten", "fc"), "dev0")
    plan, _ = zoo.replicated_split_conv(("dev1", "dev2"), "dev3", rest, "dev0", Cluster.simulated(4), channels=32,
                                        size=64, batch=1)
    return plan


def paced(x: dict, until: list[float]) -> Iterator[dict]:
    """Requests every PACE seconds until the time in `until` (moved on by the stall) has passed."""
    while time.monotonic() < until[0]:
        yield x
        time.sleep(PACE)


def worst_gap(ex: RayExecutor, x: dict, stall: float | None, device: str = "dev1") -> dict:
    """The longest wait between answers from the stall on (or over the whole stream, with no stall)."""
    pid = ex.stats()[device]["pid"]
    session = ex.session(4)
    list(session.stream([x] * 8))
    start = time.monotonic()
    until = [start + 2.0 + (stall or 0.0) + AFTER]
    stopped_at = start + 1.0
    if stall:
        threading.Timer(1.0, os.kill, (pid, signal.SIGSTOP)).start()
        threading.Timer(1.0 + stall, os.kill, (pid, signal.SIGCONT)).start()
    times, kinds = [stopped_at if stall else start], {"full": 0, "degraded": 0, "failed": 0}
    for answer in session.stream(paced(x, until)):
        times.append(time.monotonic())
        kind = "failed" if not isinstance(answer, RunResult) else "degraded" if answer.degraded else "full"
        kinds[kind] += 1
    times = [t for t in times if t >= times[0]]
    events = session.report().events
    settle(ex)
    return {"worst_s": max(b - a for a, b in itertools.pairwise(times)), **kinds,
            "late": sum(isinstance(e, DeviceLate) for e in events),
            "caught_up": sum(isinstance(e, DeviceCaughtUp) for e in events),
            "lost": sum(isinstance(e, DeviceLost) for e in events)}


def settle(ex: RayExecutor, timeout: float = 60.0) -> None:
    """Wait until no device is down or late, so that the next run starts with every device in use."""
    end = time.monotonic() + timeout
    ex.rejoin(timeout=timeout)
    while ex.late and time.monotonic() < end:
        ex.probe(force=True)
        time.sleep(0.05)


def stalls(deadline: float, margin: float, repeats: int, lengths: tuple[float, ...]) -> list[dict]:
    plan = horizontal_plan()
    x = random_inputs(plan.inputs, seed=0)
    rows = []
    with RayExecutor(plan, dataplane="tasks", deadline=deadline, margin=margin, rejoin_interval=0.2) as ex:
        for stall in lengths:
            runs = [(worst_gap(ex, x, None), worst_gap(ex, x, stall)) for _ in range(repeats)]
            base = statistics.median(r[0]["worst_s"] for r in runs)
            worst = statistics.median(r[1]["worst_s"] for r in runs)
            last = runs[-1][1]
            rows.append({"stall_s": stall, "deadline_s": deadline, "bound_s": deadline + margin,
                         "worst_answer_gap_s": worst, "max_over_repeats_s": max(r[1]["worst_s"] for r in runs),
                         "no_stall_worst_gap_s": base, "ratio_to_no_stall": worst / base if base else float("nan"),
                         "full": last["full"], "degraded": last["degraded"], "failed": last["failed"],
                         "late_events": last["late"], "caught_up": last["caught_up"], "lost": last["lost"]})
    return rows


def failover(kills: int, requests: int) -> dict:
    """A 3-device vertical plan of the zoo ResNet with a standby of every stage: kill the middle device after
    answer 10; the time from the kill to the first answer after it (every answer full)."""
    import tempfile
    from pathlib import Path

    import edgesplit
    from edgesplit.planner import partition

    with tempfile.TemporaryDirectory() as tmp:
        graph = edgesplit.load(zoo.build("resnet", Path(tmp)))
    plan = partition(graph, Cluster.simulated(3), standby=["auto"])
    xs = [random_inputs(plan.inputs, {"batch": 1}, seed=i) for i in range(requests)]
    dead = plan.stages[1].device
    to_answer, worst, gaps, not_full = [], [], [], 0
    with RayExecutor(plan, dataplane="tasks", rejoin_interval=None) as ex:
        for _ in range(kills):
            session = ex.session(4)
            list(session.stream(xs[:8]))
            killed_at, times = 0.0, []
            for i, a in enumerate(session.stream(xs)):
                times.append(time.monotonic())
                not_full += not isinstance(a, RunResult) or a.degraded
                if i == 10:
                    ray.kill(ex.actors[dead])
                    killed_at = time.monotonic()
            report = session.report()
            lost = next(e for e in report.events if isinstance(e, DeviceLost))
            to_answer.append(lost.at - killed_at + report.recovery_seconds[0])  # the first answer after detection
            after = [killed_at] + [t for t in times if t > killed_at]
            worst.append(max(b - a for a, b in itertools.pairwise(after)))
            gaps.append(statistics.median(b - a for a, b in itertools.pairwise(times[:11])))
            ex.rejoin(timeout=60)
    median_gap = statistics.median(gaps)
    return {"plan": f"zoo resnet, vertical over 3 devices, standby of every stage ({len(plan.standbys)})",
            "killed": dead, "kills": kills, "requests_per_stream": requests,
            "kill_to_first_answer_ms": statistics.median(to_answer) * 1e3,
            "max_kill_to_first_answer_ms": max(to_answer) * 1e3,
            "worst_answer_gap_after_kill_ms": statistics.median(worst) * 1e3, "no_kill_answer_gap_ms": median_gap * 1e3,
            "ratio_to_answer_gap": statistics.median(to_answer) / median_gap if median_gap else float("nan"),
            "answers_not_full": not_full}


def robust_plan(mode: str):
    """The shipped MNIST CNN over 4 devices, k-of-n at r = 1 (every part's units also on the next device), its
    replicas hot or standby."""
    from edgesplit.datasets import shipped_model
    from edgesplit.graph import load
    from edgesplit.layout import ReplicaMode
    from edgesplit.planner import layout, plan, with_replicas
    from edgesplit.robust.importance import importance
    from edgesplit.robust.policies import Policy, replicas

    cluster = Cluster.simulated(4)
    rewritten, placement = layout(load(shipped_model("mnist_cnn")), cluster, strategy="horizontal")
    asked = replicas(rewritten, Policy.K_OF_N, importance(rewritten, "weight"), 1.0, mode=ReplicaMode(mode))
    graph, placed = with_replicas(rewritten, placement, asked)
    return plan(graph, cluster, placed)


def latencies_around_a_kill(ex: RayExecutor, xs: list[dict], dead: str, after: int = 10) -> tuple[list, list, int]:
    """Each answer's latency (its request handed to the stream until its answer) before and after killing
    `dead` once answer `after` arrived; and how many answers were not full."""
    handed: list[float] = []

    def timed_requests():
        for x in xs:
            handed.append(time.monotonic())
            yield x

    session = ex.session(4)
    list(session.stream(xs[:8]))
    latency, killed_at, not_full = [], 0.0, 0
    for i, a in enumerate(session.stream(timed_requests())):
        now = time.monotonic()
        latency.append((now, now - handed[i]))
        not_full += not isinstance(a, RunResult) or a.degraded
        if i == after:
            ray.kill(ex.actors[dead])
            killed_at = time.monotonic()
    before = [lat for _, lat in latency[2:after + 1]]
    return before, [lat for t, lat in latency if t > killed_at], not_full


def replica_modes(kills: int, requests: int, first: int = 4) -> list[dict]:
    """Hot against standby replicas: the latency of the first answers after a kill against fault-free latency."""
    from edgesplit.datasets import mnist_split

    images = mnist_split().test.images
    xs = [{"input": images[i:i + 8]} for i in range(0, 8 * requests, 8)]
    rows = []
    for mode in ("hot", "standby"):
        plan = robust_plan(mode)
        dead = "dev2"
        before, after, not_full = [], [], 0
        with RayExecutor(plan, dataplane="tasks", rejoin_interval=None) as ex:
            for _ in range(kills):
                b, a, n = latencies_around_a_kill(ex, xs, dead)
                before += b
                after += a[:first]
                not_full += n
                ex.rejoin(timeout=60)
        free = statistics.median(before)
        rows.append({"replicas": mode, "kills": kills, "fault_free_latency_ms": free * 1e3,
                     f"first_{first}_after_kill_median_ms": statistics.median(after) * 1e3,
                     f"first_{first}_after_kill_max_ms": max(after) * 1e3,
                     "ratio_median_to_fault_free": statistics.median(after) / free,
                     "answers_not_full": not_full})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="one repeat, stalls of 1 and 3 s")
    ap.add_argument("--only-failover", action="store_true", help="vertical failover only, keeping the other sections")
    ap.add_argument("--only-replicas", action="store_true", help="hot against standby replicas only, keeping the "
                    "other sections of results/failures.json")
    args = ap.parse_args()
    lengths = STALLS[:2] if args.quick else STALLS
    repeats = 1 if args.quick else args.repeats
    resources = {raycluster.resource(d): 1 for d in DEVICES}
    ray.init(num_cpus=len(DEVICES), resources=resources, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config=raycluster.WORKER_PRIORITY)
    previous = RESULTS / "failures.json"
    data = json.loads(previous.read_text()) if (args.only_failover or args.only_replicas) and previous.is_file() \
        else {"machine": machine(), "repeats": repeats}
    data["model"] = ("split_conv 32 channels 64x64, conv1 split over dev1/dev2, part A replicated (standby) on dev3")
    if not (args.only_failover or args.only_replicas) or "stalls" not in data:
        data["stalls"] = stalls(args.deadline, args.margin, repeats, lengths)
        data["stalls_measured"] = machine()["date"]
    if not args.only_replicas or "failover" not in data:
        data["failover"] = failover(max(3, repeats), 40)
    if not args.only_failover or "replica_modes" not in data:
        data["replica_modes"] = {"machine": machine(), "rows": replica_modes(max(3, repeats), 30)}
    ray.shutdown()
    path = write_report("failures", "Failures on the Ray executor", data, sections(data))
    print(path.read_text())


def sections(data: dict) -> list[tuple[str, str]]:
    def table(rows: list[dict]) -> str:
        return markdown_table(list(rows[0]), [list(r.values()) for r in rows])

    note = (f"Part A's device (dev1) is stopped with SIGSTOP mid-stream (a request every {PACE * 1e3:.0f} ms, 4 in "
            f"flight) and continued after the stall. worst_answer_gap_s: the longest wait for an answer from the "
            f"stop on (median of {data['repeats']}); no_stall_worst_gap_s: the same stream's longest gap with no "
            "stall. Answers are full: the standby replica on dev3 stands in while dev1 is late. Counts are of the "
            f"last repeat. Measured {data.get('stalls_measured', data['machine']['date'])}.")
    fail_note = ("The first answer after the kill: the device's loss detected (DeviceLost) plus the time to the "
                 "next answer, re-routed to the standby; worst_answer_gap_after_kill_ms: the longest wait for an "
                 "answer from the kill on (median of the kills), against the median gap between answers before it.")
    modes = data["replica_modes"]
    modes_note = (f"The shipped MNIST CNN over 4 devices, k-of-n at r = 1 (every part's units also on the next "
                  f"device), batches of 8 digits, 4 in flight; dev2 killed after answer 10, once per stream "
                  f"({modes['rows'][0]['kills']} streams). Latency: a request handed to the stream until its answer; "
                  f"fault-free: the median of answers 2-10; after the kill: the first 4 answers after it. Measured "
                  f"{modes['machine']['date']}. Standby is the default: a hot replica costs its compute on every "
                  f"request (MACs vs plain in results/robustness.md count standby copies as a device's worst case).")
    return [("Worst answer time under a stall (deadline bound)", table(data["stalls"]) + "\n\n" + note),
            ("Vertical failover to standby stages: kill to first answer", table([data["failover"]]) + "\n\n"
             + fail_note),
            ("Hot against standby replicas: latency of the first answers after a kill",
             table(modes["rows"]) + "\n\n" + modes_note)]


if __name__ == "__main__":
    main()
