"""Re-planning when a device leaves for good (issue 11), on one machine (Ray's local instance simulates devices).

python benchmarks/bench_replan.py [--repeats 3] [--grace 1] [--quick]
A vertical plan of ResNet-18 (224², `partition`'s balance) on 3 simulated 1-core devices streams paced requests;
the last stage's device is killed mid-stream and stays down. After `grace` seconds `Replanning` searches the two
devices left (population 60 × 60 generations, seeded with the current plan), deploys the picked plan and sends the
held requests again. Per repeat: the search, the new plan's start, the time from the loss's detection to the first
answer of the new plan (which includes the grace period), requests sent again, and every request's answer
checked against the whole model. Writes benchmarks/results/replan.json and replan.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesplit.bench import zoo  # noqa: E402
from edgesplit.bench.harness import markdown_table, write_report  # noqa: E402
from edgesplit.cluster import Cluster  # noqa: E402
from edgesplit.graph import load  # noqa: E402
from edgesplit.planner import partition  # noqa: E402
from edgesplit.runtime.common import RunResult, random_inputs  # noqa: E402
from edgesplit.runtime.local import run_whole_model  # noqa: E402
from edgesplit.runtime.ray import RayExecutor  # noqa: E402
from edgesplit.runtime.replan import Replanning  # noqa: E402
from edgesplit.search.replan import Replanner  # noqa: E402

PACE = 0.02  # seconds between requests
KILL_AFTER = 15  # answers before the kill


def paced(requests: list[dict]) -> Iterator[dict]:
    for x in requests:
        yield x
        time.sleep(PACE)


def one_run(plan, graph, replanner: Replanner, requests: list[dict], grace: float) -> dict:
    make = lambda p: RayExecutor(p, dataplane="tasks", rejoin_interval=None)  # noqa: E731
    stream = Replanning(make(plan), replanner, grace, make, max_in_flight=4)
    victim = plan.stages[-1].device
    answers = []
    try:
        for i, answer in enumerate(stream.stream(paced(requests))):
            answers.append(answer)
            if i == KILL_AFTER - 1:
                ray.kill(stream.ex.actors[victim])
    finally:
        stream.ex.close()
    wrong = 0
    for answer, x in zip(answers, requests):
        expected = run_whole_model(graph.model, x)
        if not isinstance(answer, RunResult) or answer.degraded or any(
                not np.allclose(answer.outputs[k], v, rtol=1e-4, atol=1e-5) for k, v in expected.items()):
            wrong += 1
    report = stream.report()
    (switch,) = stream.switches
    return {"lost": list(switch.lost), "new_devices": list(switch.plan.devices), "stages": len(switch.plan.stages),
            "planning_s": switch.planning_seconds, "deploy_s": switch.deploy_seconds,
            "loss_to_first_answer_s": switch.first_answer_seconds,
            "after_grace_s": switch.first_answer_seconds - grace, "resent": switch.resent,
            "answers": len(answers), "requests": len(requests), "not_identical": wrong,
            "full": report.full, "degraded": report.degraded, "failed": report.failed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grace", type=float, default=1.0, help="seconds a device stays down before the re-plan")
    ap.add_argument("--quick", action="store_true", help="96² inputs and one repeat (a smoke run)")
    args = ap.parse_args()
    size, repeats = (96, 1) if args.quick else (224, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = zoo.export(zoo.resnet18(), (1, 3, size, size), Path(tmp) / "r18.onnx", keep_batchnorm=False)
        graph = load(path)
        cluster = Cluster.simulated(3)
        plan = partition(graph, cluster)
        t0 = time.perf_counter()
        replanner = Replanner(graph, cluster)
        profile_s = time.perf_counter() - t0
        requests = [random_inputs(plan.inputs, {"batch": 1}, seed=i) for i in range(3 * KILL_AFTER)]
        runs = [one_run(plan, graph, replanner, requests, args.grace) for _ in range(repeats)]
    keys = ("planning_s", "deploy_s", "loss_to_first_answer_s", "after_grace_s")
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    rows = [[i, ", ".join(r["lost"]), ", ".join(r["new_devices"]), r["stages"], r["planning_s"], r["deploy_s"],
             r["loss_to_first_answer_s"], r["after_grace_s"], r["resent"], f"{r['answers']}/{r['requests']}",
             r["not_identical"]] for i, r in enumerate(runs)]
    rows.append(["median", "", "", "", *(median[k] for k in keys), "", "", ""])
    body = (f"ResNet-18 {size}² on 3 simulated 1-core devices, `partition`'s balance; the last stage's device killed "
            f"after {KILL_AFTER} answers, grace {args.grace:g} s, requests every {PACE * 1e3:.0f} ms. Profiling "
            f"before the stream (not part of a loss): {profile_s:.1f} s. `after grace`: loss to first answer "
            "less the grace period (search + start + the first request through the new plan). `wrong`: answers "
            "not identical to the whole model's (degraded or failed included).\n\n"
            + markdown_table(["run", "lost", "new plan on", "stages", "search s", "start s", "loss → first answer s",
                              "after grace s", "sent again", "answered", "wrong"], rows))
    path = write_report("replan", "Re-planning after a device leaves for good",
                        {"model": f"ResNet-18 {size}²", "grace_s": args.grace, "profile_s": profile_s, "runs": runs,
                         "median": median}, [("Loss to the first answer of the new plan", body)])
    print(path.read_text())


if __name__ == "__main__":
    main()
