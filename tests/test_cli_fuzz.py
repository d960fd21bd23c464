"""Mutated cluster files, mappings, plan.json files and input archives, fed to every CLI command.

A seeded generator (no extra dependency) makes each mutation; every case must end with exit 0 or 2, print no
traceback, and on exit 2 write nothing. A failing case prints its seed and arguments, so it can be rerun alone.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import write_tiny_cnn
from edgesplit.cli import main
from edgesplit.runtime import raynodes

SEED = 14
ODD = [None, True, -1, 0, 2**70, 1e308, float("inf"), float("nan"), "", ".", "-3GiB", "1e3GiB", "[bold]x[/]",
       "../../etc/passwd", "/", [], {}, [1, "a"], {"between": 1}, "dev0", "x"]
CLUSTER = {"devices": [{"name": "dev0", "cores": 1, "memory": "1GiB", "speed": 1.0, "power": {"idle_w": 1, "busy_w": 2}},
                       {"name": "dev1", "cores": 2, "memory": "512MiB"}],
           "links": {"default": {"bandwidth": "100mbit", "latency": "2ms"},
                     "pairs": [{"between": ["dev0", "dev1"], "bandwidth": "1gbit", "latency": "0.5ms"}]}}
MAPPING = {"dev0": ["conv1", "act1"], "dev1": ["conv2", "pool", "flatten", "fc"]}


def _paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every position in a JSON-like value, as a tuple of keys and indices."""
    found = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*here, i))
    return found


def mutate(value: Any, rng: random.Random) -> Any:
    """One structural change somewhere in `value`: a position replaced by an odd value, deleted or duplicated."""
    value = copy.deepcopy(value)
    where = rng.choice(_paths(value)[1:] or [()])
    if not where:
        return rng.choice(ODD)
    parent = value
    for key in where[:-1]:
        parent = parent[key]
    key, action = where[-1], rng.choice(("odd", "odd", "delete", "duplicate"))
    if action == "delete":
        del parent[key]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    else:
        parent[key] = rng.choice(ODD)
    return value


def mangle(data: bytes, rng: random.Random) -> bytes:
    """A byte-level change: truncated, one byte flipped, or a run of bytes duplicated."""
    if not data:
        return b"\x00"
    i = rng.randrange(len(data))
    return rng.choice((data[:i], data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:], data[:i] + data[i:i + 9] + data[i:]))


def _text(value: Any, rng: random.Random, as_yaml: bool) -> bytes:
    text = (yaml.safe_dump(value) if as_yaml else json.dumps(value)).encode()
    return mangle(text, rng) if rng.random() < 0.25 else text


def _archive(rng: random.Random) -> bytes:
    arrays = {"x": np.ones((1, 3, 8, 8), np.float32)}
    change = rng.choice(("dtype", "shape", "extra", "missing", "nan", "bytes", "object", "scalar"))
    if change == "dtype":
        arrays["x"] = arrays["x"].astype(rng.choice((np.float64, np.int32, np.bool_, np.float16)))
    elif change == "shape":
        arrays["x"] = np.ones(rng.choice(((3, 8, 8), (1, 3, 8), (2, 3, 8, 8), (1, 3, 0, 8), (1, 4, 8, 8))), np.float32)
    elif change == "extra":
        arrays["y"] = np.zeros(2)
    elif change == "missing":
        arrays = {"X": arrays["x"]}
    elif change == "nan":
        arrays["x"][0, 0, 0, 0] = rng.choice((np.nan, np.inf, -np.inf))
    elif change == "scalar":
        arrays["x"] = np.float32(1)
    buffer = io.BytesIO()
    if change == "object":
        np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(buffer, **arrays)
    return mangle(buffer.getvalue(), rng) if change == "bytes" else buffer.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A model, a valid plan of it, and valid inputs, shared by every case (each case copies what it mutates)."""
    d = tmp_path_factory.mktemp("fuzz-base")
    model = write_tiny_cnn(d / "tiny.onnx")
    (d / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    result = CliRunner().invoke(main, ["partition", str(model), "--cluster", str(d / "cluster.yaml"), "-o", str(d / "plan")])
    assert result.exit_code == 0, result.output
    np.savez(d / "x.npz", x=np.ones((1, 3, 8, 8), np.float32))
    return d


def _case(base: Path, work: Path, rng: random.Random) -> tuple[list[str], Path]:
    """One mutated input and the command that reads it; returns the arguments and the path it may write."""
    out, plan = work / "out", work / "plan"
    kind = rng.choice(("cluster", "mapping", "plan", "plan", "input", "input", "stream"))
    if kind in ("cluster", "mapping"):
        (work / "cluster.yaml").write_bytes(_text(mutate(CLUSTER, rng) if kind == "cluster" else CLUSTER, rng, True))
        (work / "m.json").write_bytes(_text(mutate(MAPPING, rng) if kind == "mapping" else MAPPING, rng, False))
        command = rng.choice(("partition", "partition", "partition", "demo"))
        if command == "demo":
            return ["demo", "--cluster", str(work / "cluster.yaml")], out
        return ["partition", str(base / "tiny.onnx"), "--cluster", str(work / "cluster.yaml"),
                "--mapping", str(work / "m.json"), "-o", str(out)], out
    shutil.copytree(base / "plan", plan)
    if kind == "plan":
        (plan / "plan.json").write_bytes(_text(mutate(json.loads((plan / "plan.json").read_text()), rng), rng, False))
        command = rng.choice((["inspect", str(plan)], ["inspect", str(plan), "--json"],
                              ["verify", str(plan), "--model", str(base / "tiny.onnx")],
                              ["run", str(plan), "--input", str(base / "x.npz"), "-o", str(out)],
                              ["generate", str(plan), "--prompt", "hi", "--tokenizer", str(work)]))
        return command + ["--trust-unsigned"], out  # past the signature (its own tests), into every other check
    (work / "x.npz").write_bytes(_archive(rng))
    if kind == "stream":
        return ["run", str(plan), "--stream", str(work / "x.npz"), "-o", str(out)], out
    return rng.choice((["run", str(plan), "--input", str(work / "x.npz"), "-o", str(out)],
                       ["verify", str(plan), "--input", str(work / "x.npz")])), out


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def small_demo(monkeypatch):
    """The demo on 20 digits instead of 1000 and without its RSS sampling (its cluster handling is fuzzed here)."""
    from edgesplit import datasets, demo

    split = datasets.mnist_split()
    few = datasets.Digits(*(getattr(split.test, f)[:20] for f in ("images", "labels", "rows")))
    monkeypatch.setattr(demo, "mnist_split", lambda: datasets.Split(split.train, few))
    monkeypatch.setattr(demo, "device_memory", lambda *args: [])


def test_mutated_inputs_give_exit_0_or_2_and_no_traceback(base, tmp_path, small_demo):
    rng = random.Random(SEED)
    for i in range(120):
        work = tmp_path / f"case{i}"
        work.mkdir()
        args, out = _case(base, work, rng)
        before = _files(work)
        result = CliRunner().invoke(main, args)
        where = f"case {i} (seed {SEED}): edgesplit {' '.join(args)}\n{result.output}"
        # verify exits 1 when outputs differ: NaN or Inf inputs make both sides NaN, which it counts as a difference
        nan_verify = args[0] == "verify" and "warning: input 'x' holds" in result.output
        assert result.exit_code in (0, 2) or (result.exit_code == 1 and nan_verify), where
        assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError), where
        if result.exit_code == 2:
            assert "error:" in result.output and not out.exists() and _files(work) == before, where


@pytest.mark.parametrize("i", range(12))
def test_mutated_device_options_give_exit_0_or_2(tmp_path, monkeypatch, i):
    """`device head|join|list` with odd sizes, names, counts and token files; nothing is started."""
    rng = random.Random(SEED * 100 + i)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(raynodes, "_ray_start", lambda *a, **k: None)
    monkeypatch.setattr(raynodes, "_local_ip", lambda: "127.0.0.1")
    monkeypatch.setattr(raynodes, "nodes", lambda *a, **k: [])
    joined = raynodes.NodeDevice("pi", "n1", "127.0.0.1", 1.0, 2**30, 2**28, alive=True, head=False)
    monkeypatch.setattr(raynodes, "wait_for_device", lambda *a, **k: joined)
    token = tmp_path / "token"
    token.write_bytes(mangle(b"0" * 64, rng) if rng.random() < 0.5 else b"")
    odd = [str(x) for x in ODD if x is not None]
    options = ["--memory", rng.choice(odd + ["2GiB"]), "--object-store-memory", rng.choice(odd + ["200MB"]),
               "--token-file", str(rng.choice((token, tmp_path, tmp_path / "missing")))]
    args = rng.choice((["device", "head", *options],
                       ["device", "join", "127.0.0.1:1", "--name", rng.choice(odd), "--timeout", "0.1", *options],
                       ["device", "list", "--address", rng.choice(odd + ["127.0.0.1:1"]), "--timeout", "0.1",
                        "--token-file", str(token)]))
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 2), f"edgesplit {' '.join(args)}\n{result.output}"
    assert "Traceback" not in result.output
