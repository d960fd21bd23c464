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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="one repeat, stalls of 1 and 3 s")
    ap.add_argument("--only-failover", action="store_true", help="skip the stalls; keep their last results")
    args = ap.parse_args()
    lengths = STALLS[:2] if args.quick else STALLS
    repeats = 1 if args.quick else args.repeats
    resources = {raycluster.resource(d): 1 for d in DEVICES}
    ray.init(num_cpus=len(DEVICES), resources=resources, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    previous = RESULTS / "failures.json"
    kept = json.loads(previous.read_text()) if args.only_failover and previous.is_file() else None
    stall_rows = kept["stalls"] if kept else stalls(args.deadline, args.margin, repeats, lengths)
    stalls_date = kept.get("stalls_measured", kept["machine"]["date"]) if kept else machine()["date"]
    fail = failover(max(3, repeats), 40)
    ray.shutdown()
    data = {"machine": machine(), "model": "split_conv 32 channels 64x64, conv1 split over dev1/dev2, "
            "part A replicated (standby) on dev3", "repeats": repeats, "stalls": stall_rows, "stalls_measured": stalls_date,
            "failover": fail}

    def table(rows: list[dict]) -> str:
        return markdown_table(list(rows[0]), [list(r.values()) for r in rows])

    fail_note = ("The first answer after the kill: the device's loss detected (DeviceLost) plus the time to the "
                 "next answer, re-routed to the standby; worst_answer_gap_after_kill_ms: the longest wait for an "
                 "answer from the kill on (median of the kills), against the median gap between answers before it.")
    note = (f"Part A's device (dev1) is stopped with SIGSTOP mid-stream (a request every {PACE * 1e3:.0f} ms, 4 in "
            f"flight) and continued after the stall. worst_answer_gap_s: the longest wait for an answer from the "
            f"stop on (median of {repeats}); no_stall_worst_gap_s: the same stream's longest gap with no stall. "
            "Answers are full: the standby replica on dev3 stands in while dev1 is late. Counts are of the last "
            f"repeat. Measured {stalls_date}.")
    sections = [("Worst answer time under a stall (deadline bound)", table(stall_rows) + "\n\n" + note),
                ("Vertical failover to standby stages: kill to first answer", table([fail]) + "\n\n" + fail_note)]
    path = write_report("failures", "Failures on the Ray executor", data, sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
