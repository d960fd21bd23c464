"""`edgesplit run --stream`: read many requests, stream them through an executor with a progress bar, write answers.

A stream is an .npz whose arrays all share a leading request axis (request i is `{name: array[i]}`), or a
directory of .npz files, one request each, taken in name order. The answers file holds each output stacked over
requests plus `__status__` (0 full, 1 degraded, 2 failed; a failed request's outputs are NaN or 0).
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgesplit.errors import EdgesplitError, InputError, InputWarning, OutputError
from edgesplit.files import check_new_file, save_npz
from edgesplit.layout import Backend
from edgesplit.plan import Plan
from edgesplit.plandir import owned_files
from edgesplit.signing import Key
from edgesplit.runtime.common import RunResult, check_inputs
from edgesplit.runtime.failures import RunReport, Tally

STATUS = {"full": 0, "degraded": 1, "failed": 2}


def read_requests(path: Path) -> list[dict[str, np.ndarray]]:
    if path.is_dir():
        entries = sorted(path.iterdir())
        files = [f for f in entries if f.suffix == ".npz" and f.is_file()]
        if not files:
            raise InputError(f"expected a directory of .npz files (one request each), {str(path)!r} has none")
        if ignored := [f.name for f in entries if f not in files]:
            warnings.warn(InputWarning(f"{path}: ignoring {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} "
                                       f"that are not .npz files: {ignored}"), stacklevel=2)
        return [read_npz(f) for f in files]
    data = read_npz(path)
    counts = {k: v.shape[0] if v.ndim else None for k, v in data.items()}
    if not data or None in counts.values() or len(set(counts.values())) != 1:
        raise InputError(f"expected {path} to hold arrays sharing a leading request axis, got shapes "
                         f"{ {k: list(v.shape) for k, v in data.items()} }")
    n = next(iter(counts.values()))
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def check_requests(plan: Plan, requests: list[dict[str, np.ndarray]]) -> None:
    """Refuse a stream none of whose requests match the model's inputs (an answers file of failures helps no one);
    a stream with some good requests runs, the bad ones failing one by one."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)  # the executor warns when it runs them
        for i, request in enumerate(requests):
            try:
                check_inputs(plan.inputs, request)
            except InputError as exc:
                problems.append(f"request {i}: " + "; ".join(str(exc).split("\n  ")[1:]))
    if problems and len(problems) == len(requests):
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InputError("no request of the stream matches the model's inputs:\n  " + "\n  ".join(problems[:5]) + more)


def check_answers_path(path: Path) -> None:
    """`run -o` may write `path`: a file in an existing folder, and not a file of a plan."""
    check_new_file(path, "-o")
    if path.name in owned_files(path.parent):
        raise OutputError(f"refusing to write {str(path)!r}: it is a file of the plan in {str(path.parent)!r}; "
                          "expected -o to name a new .npz file (or answers written before)")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """One .npz file of arrays keyed by the model's input (or output) names."""
    if not path.is_file():
        raise InputError(f"expected an .npz file keyed by the model's input names, {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds one bare array, expected arrays keyed by name (np.savez)")
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path} is not a readable .npz file: {exc}") from None


def stream_local(plan: Plan, requests: list[dict[str, np.ndarray]], tally: Tally, threads: int | None = None,
                 allow_degraded: bool = False) -> Iterator[RunResult | EdgesplitError]:
    from edgesplit.runtime.local import LocalExecutor

    executor = LocalExecutor(plan, threads=threads, allow_degraded=allow_degraded)
    for inputs in requests:
        try:
            result = executor.run(inputs)
        except EdgesplitError as exc:
            tally.failed += 1
            yield exc
            continue
        tally.answered(result.degraded)
        yield result


def run_stream(plan: Plan, requests: list[dict[str, np.ndarray]], console: Console, backend: str = "local",
               address: str | None = None, threads: int | None = None, allow_degraded: bool = False,
               deadline: float = 30.0, dataplane: str = "auto", chunk: int = 1, start_timeout: float = 180.0,
               key: Key | None = None, trust_unsigned: bool = False, replanner: Callable | None = None,
               replan_after: float | None = None) -> tuple[list[RunResult | EdgesplitError], RunReport]:
    """Answers in request order and the run's report; a progress bar while it runs. On Ray with a `replanner`,
    a device down for `replan_after` seconds is re-planned around (`edgesplit.runtime.replan`)."""
    answers: list[RunResult | EdgesplitError] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{backend} {plan.model_name}", total=len(requests), rate="")
        if Backend.parse(backend, "backend") is Backend.RAY:
            from edgesplit.runtime.ray import RayExecutor
            from edgesplit.runtime.replan import Replanning

            def deploy(p: Plan) -> RayExecutor:
                return RayExecutor(p, address=address, threads=threads, allow_degraded=allow_degraded,
                                   deadline=deadline, dataplane=dataplane, ready_timeout=start_timeout, key=key,
                                   trust_unsigned=trust_unsigned)

            replanning = None
            with deploy(plan) as ex:
                if replanner is None:
                    session = ex.session(chunk=chunk)
                    tally, stream = session.tally, session.stream(requests)
                else:
                    replanning = Replanning(ex, replanner, replan_after or 0.0, deploy, chunk=chunk)
                    tally, stream = replanning.tally, replanning.stream(requests)
                try:
                    for answer in stream:
                        answers.append(answer)
                        progress.update(task, advance=1, rate=_rate(len(answers), tally))
                finally:
                    if replanning is not None and replanning.ex is not ex:
                        replanning.ex.close()
            for s in replanning.switches if replanning else ():
                console.print(f"re-planned without {', '.join(s.lost)}: {len(s.plan.stages)} stages on "
                              f"{', '.join(s.plan.devices)}; search {s.planning_seconds:.1f} s, start "
                              f"{s.deploy_seconds:.1f} s, first answer {s.first_answer_seconds:.1f} s after the "
                              f"loss; {s.resent} request(s) sent again", markup=False, highlight=False,
                              soft_wrap=True)
            for why in replanning.failed_replans.values() if replanning else ():
                console.print(why, markup=False, highlight=False, soft_wrap=True)
        else:
            tally = Tally()
            for answer in stream_local(plan, requests, tally, threads, allow_degraded):
                answers.append(answer)
                progress.update(task, advance=1, rate=_rate(len(answers), tally))
    return answers, tally.report()


def write_answers(path: Path, plan: Plan, answers: list[RunResult | EdgesplitError], stacked: bool = True) -> None:
    """Stack every output over requests (failed ones NaN, or 0 for integer outputs) plus a status array;
    unstacked (one request): its outputs as they are, nothing written if it failed."""
    example = next((a for a in answers if isinstance(a, RunResult)), None)
    arrays: dict[str, np.ndarray] = {}
    if not stacked:
        if example is None:
            return
        arrays = dict(example.outputs)
    elif example is not None:
        for name, value in example.outputs.items():
            blank = np.full_like(value, np.nan) if value.dtype.kind == "f" else np.zeros_like(value)
            arrays[name] = np.stack([a.outputs[name] if isinstance(a, RunResult) else blank for a in answers])
    if stacked:
        arrays["__status__"] = np.array([_status(a) for a in answers], dtype=np.int8)
    check_answers_path(path)
    save_npz(path, arrays, "-o")


def _status(answer: RunResult | EdgesplitError) -> int:
    if not isinstance(answer, RunResult):
        return STATUS["failed"]
    return STATUS["degraded" if answer.degraded else "full"]


def _rate(done: int, tally: Tally) -> str:
    return f"{done / max(tally.report().seconds, 1e-9):.1f} req/s"


def describe_failures(answers: list[RunResult | EdgesplitError]) -> Mapping[str, int]:
    """Distinct error messages and how many requests got each."""
    counts: dict[str, int] = {}
    for a in answers:
        if isinstance(a, EdgesplitError):
            counts[str(a)] = counts.get(str(a), 0) + 1
    return counts
