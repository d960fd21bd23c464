"""Issue 14, points 4, 5, 6, 9 and 10: nothing overwritten or deleted, no tracebacks, messages exactly as written,
suspect inputs warned about, token files private."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import edgesplit
from conftest import write_tiny_cnn
from edgesplit.cli import main
from edgesplit.cluster import Cluster
from edgesplit import errors
from edgesplit.errors import ClusterError, EdgesplitError
from edgesplit.runtime import raynodes

TWO = "devices:\n  - {name: a, cores: 1, memory: 1GiB}\n  - {name: b, cores: 1, memory: 1GiB}\n"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny_cnn(tmp_path / "tiny.onnx")


@pytest.fixture()
def plan_dir(tiny: Path, tmp_path: Path) -> Path:
    assert _cli("partition", tiny, "--devices", 2, "-o", tmp_path / "plan").exit_code == 0
    np.savez(tmp_path / "x.npz", x=np.ones((1, 3, 8, 8), np.float32))
    return tmp_path / "plan"


# ---- 4: nothing overwritten or deleted ---------------------------------------------------------------------------

def test_partition_onto_a_plan_needs_force_and_keeps_other_files(tiny, plan_dir):
    (plan_dir / "my_notes.txt").write_text("keep me")
    before = _snapshot(plan_dir)
    again = _cli("partition", tiny, "--devices", 3, "-o", plan_dir)
    assert again.exit_code == 2 and "already holds a plan; pass --force" in again.output, again.output
    assert _snapshot(plan_dir) == before
    forced = _cli("partition", tiny, "--devices", 1, "-o", plan_dir, "--force")
    assert forced.exit_code == 0, forced.output
    plan = edgesplit.Plan.load(plan_dir)
    assert [s.file for s in plan.stages] == ["s0_dev0.onnx"]  # the old plan's second stage file is gone
    assert sorted(p.name for p in plan_dir.iterdir()) == ["my_notes.txt", "plan.json", "plan.sig", "s0_dev0.onnx"]
    assert (plan_dir / "my_notes.txt").read_text() == "keep me"


def test_a_new_plan_never_overwrites_a_file_its_directory_does_not_name(tiny, plan_dir):
    plan = edgesplit.Plan.load(plan_dir)
    listed = json.loads((plan_dir / "plan.json").read_text())
    listed["stages"] = listed["stages"][:1]  # the second stage file is now someone else's
    (plan_dir / "plan.json").write_text(json.dumps(listed))
    with pytest.raises(EdgesplitError, match=r"would overwrite \['s1_dev1.onnx'\], which the plan there does not"):
        plan.save(plan_dir, force=True)


@pytest.mark.parametrize("how", ["--input", "--stream"])
def test_run_refuses_to_overwrite_a_plan_or_write_into_nowhere(plan_dir, tmp_path, how):
    before = _snapshot(tmp_path)
    for target, expected in ((plan_dir / "plan.json", "it is a file of the plan"),
                             (plan_dir / "s0_dev0.onnx", "it is a file of the plan"),
                             (tmp_path, "which is a directory"),
                             (tmp_path / "nowhere" / "y.npz", "does not exist (create it first)")):
        result = _cli("run", plan_dir, how, tmp_path / "x.npz", "-o", target)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback" not in result.output
    assert _snapshot(tmp_path) == before  # no .tmp.npz, nothing replaced


def test_run_writes_its_answers_whole_and_next_to_the_plan_is_fine(plan_dir, tmp_path):
    result = _cli("run", plan_dir, "--input", tmp_path / "x.npz", "-o", plan_dir / "y.npz")
    assert result.exit_code == 0, result.output
    with np.load(plan_dir / "y.npz") as y:
        assert y["y"].shape == (1, 2)
    assert not [p for p in plan_dir.iterdir() if ".tmp" in p.name]
    edgesplit.Plan.load(plan_dir)


# ---- 5: no tracebacks ----------------------------------------------------------------------------------------

def test_an_op_onnxruntime_lacks_is_refused_at_partition(tmp_path):
    model = write_tiny_cnn(tmp_path / "softplus64.onnx", unsupported=True)
    result = _cli("partition", model, "--devices", 2, "-o", tmp_path / "plan")
    assert result.exit_code == 2, result.output
    assert "cannot be loaded by onnxruntime" in result.output and "Softplus" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "plan").exists()
    plan = edgesplit.partition(edgesplit.load(model), Cluster.simulated(2))  # the library still cuts it
    plan.save(tmp_path / "made-elsewhere")
    np.savez(tmp_path / "x.npz", x=np.ones((1, 3, 8, 8), np.float32))
    for args in (("run", tmp_path / "made-elsewhere", "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz"),
                 ("verify", tmp_path / "made-elsewhere")):
        result = _cli(*args)
        assert result.exit_code == 2 and "'s1_dev1' (device 'dev1') cannot be loaded" in result.output, result.output
    assert not (tmp_path / "y.npz").exists()


@pytest.mark.parametrize("cluster, expected", [
    (TWO + "links:\n  - {between: [a, b], bandwidth: 1gbit}\n", "links: expected a mapping with 'default"),
    ("devices:\n  - {name: a, cores: 1, memory: .inf}\n", "devices[0].memory: expected a size like 4GiB"),
    ("devices:\n  - {name: a, cores: 1, memory: '.'}\n", "devices[0].memory: expected a size like 4GiB"),
    (TWO + "links:\n  default: {bandwidth: ., latency: 1ms}\n", "links.default.bandwidth: expected a rate"),
    (TWO + "links: {pairs: {between: [a, b]}}\n", "links: expected a mapping"),
])
def test_malformed_clusters_are_one_clear_error(tiny, tmp_path, cluster, expected):
    (tmp_path / "c.yaml").write_text(cluster)
    result = _cli("partition", tiny, "--cluster", tmp_path / "c.yaml", "-o", tmp_path / "plan")
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "plan").exists()


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """What the console script does (`from edgesplit.cli import main`), with Ctrl-C arriving while onnx loads."""
    code = ("import sys\n"
            "class CtrlC:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'onnx':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, CtrlC())\n"
            "sys.argv = ['edgesplit', 'inspect', 'model.onnx']\n"
            "from edgesplit.cli import main\n"
            "sys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(edgesplit.__file__).parents[1])})
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines() == [
        "edgesplit: interrupted (Ctrl-C) while starting; nothing was done"]


def test_ctrl_c_in_a_command_is_one_line(plan_dir, tmp_path, monkeypatch):
    def interrupted(directory, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgesplit.Plan, "load", staticmethod(interrupted))
    result = _cli("run", plan_dir, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 130 and result.output.strip() == "interrupted: stopped by Ctrl-C", result.output


# ---- 6: messages exactly as written ----------------------------------------------------------------------------

def test_bracketed_text_reaches_the_user_as_written(plan_dir, tmp_path, monkeypatch):
    np.savez(tmp_path / "bad.npz", x=np.ones((1, 3, 7, 8), np.float32))
    result = _cli("run", plan_dir, "--input", tmp_path / "bad.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 2
    assert "input 'x': expected shape [batch, 3, 8, 8], got [1, 3, 7, 8] (axis 2)" in result.output, result.output
    message = "expected shape [1, 3, 224, 224], got [1, 3, 100, 224]; [bold]not bold[/bold] [link=x]y[/link] \\[z]"

    def refuse(directory, **_):
        raise EdgesplitError(message)

    monkeypatch.setattr(edgesplit.Plan, "load", staticmethod(refuse))
    result = _cli("inspect", plan_dir)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


# ---- 9: suspect inputs, every cluster problem, exact sizes, links ----------------------------------------------

def test_nan_or_inf_inputs_get_a_warning(plan_dir, tmp_path):
    x = np.ones((1, 3, 8, 8), np.float32)
    x[0, 0, 0, :2] = [np.nan, np.inf]
    np.savez(tmp_path / "nan.npz", x=x)
    result = _cli("run", plan_dir, "--input", tmp_path / "nan.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    assert "warning: input 'x' holds NaN and infinite values; the outputs will probably be NaN" in result.output
    with pytest.warns(errors.InputWarning, match="input 'x' holds NaN and infinite values"):
        edgesplit.LocalExecutor(edgesplit.Plan.load(plan_dir)).run({"x": x})


def test_every_cluster_problem_is_listed_at_once():
    text = ("devices:\n  - {name: a, cores: -1, memory: 1GiB, speed: -2}\n  - {name: b, cores: 1, memory: 1GiB}\n"
            "links:\n  default: {bandwidth: -100mbit, latency: 1ms}\n")
    with pytest.raises(ClusterError) as exc:
        Cluster.from_dict(yaml.safe_load(text))
    for expected in ("device 'a': expected cores >= 1, got -1", "device 'a': expected speed > 0, got -2",
                     "links.default.bandwidth: expected a rate like 100mbit or 1gbit, got '-100mbit'"):
        assert expected in str(exc.value)


def test_decimal_and_binary_sizes_round_trip_exactly_through_a_saved_plan(tiny, tmp_path):
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: a, cores: 1, memory: 3GB}\n"
                                     "  - {name: b, cores: 1, memory: 3GiB}\n  - {name: c, cores: 1, memory: 1536MiB}\n")
    assert _cli("partition", tiny, "--cluster", tmp_path / "c.yaml", "-o", tmp_path / "plan").exit_code == 0
    cluster = edgesplit.Plan.load(tmp_path / "plan").cluster
    assert [d.memory for d in cluster.devices] == [3 * 10**9, 3 * 2**30, 1536 * 2**20]
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())["cluster"]["devices"]
    assert [d["memory"] for d in saved] == ["3GB", "3GiB", "1536MiB"]


@pytest.mark.parametrize("pairs, expected", [
    ("[{between: [a, a], bandwidth: 1gbit}]", "link a-a: a device cannot have a link to itself"),
    ("[{between: [a, b], bandwidth: 1gbit}, {between: [b, a], bandwidth: 10mbit}]",
     "the link b-a is given twice, with different values (1000 Mbit/s, 0 ms and 10 Mbit/s, 0 ms)"),
    ("[{between: [a, b], bandwidth: 1gbit}, {between: [a, b], bandwidth: 1gbit, latency: 5ms}]",
     "the link a-b is given twice, with different values"),
])
def test_self_links_and_contradictory_links_are_refused(pairs, expected):
    with pytest.raises(ClusterError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Cluster.from_dict(yaml.safe_load(TWO + f"links:\n  pairs: {pairs}\n"))
    same_twice = TWO + "links:\n  pairs: [{between: [a, b], bandwidth: 1gbit}, {between: [b, a], bandwidth: 1gbit}]\n"
    assert Cluster.from_dict(yaml.safe_load(same_twice)).link("b", "a").bandwidth == 1e9 / 8


def test_a_stream_folder_names_the_files_it_ignores(plan_dir, tmp_path):
    requests = tmp_path / "requests"
    requests.mkdir()
    for i in range(2):
        np.savez(requests / f"{i}.npz", x=np.ones((1, 3, 8, 8), np.float32))
    (requests / "README.txt").write_text("not a request")
    (requests / "later").mkdir()
    result = _cli("run", plan_dir, "--stream", requests, "-o", tmp_path / "answers.npz")
    assert result.exit_code == 0, result.output
    assert "ignoring 2 entries that are not .npz files: ['README.txt', 'later']" in result.output
    with np.load(tmp_path / "answers.npz") as answers:
        assert answers["__status__"].tolist() == [0, 0]


# ---- 10: token files at mode 600 -------------------------------------------------------------------------------

@pytest.fixture()
def no_token(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / ".ray" / "auth_token"


def test_a_local_ray_instance_leaves_its_token_at_mode_600(no_token, monkeypatch):
    """ray.init() for a new local instance is replaced by the part of it that writes the token (Ray's own code)."""
    import ray
    from ray._private.authentication import authentication_token_setup as setup
    from ray._raylet import AuthenticationTokenLoader, Config

    from edgesplit.runtime import raycluster

    def ray_init(**_):
        AuthenticationTokenLoader.instance().reset_cache()
        setup.enable_token_auth_by_default()
        setup.ensure_token_if_auth_enabled(None, create_token_if_missing=True)

    node = {"Alive": True, "NodeID": "n1", "NodeManagerAddress": "127.0.0.1", "Resources": {"edgesplit_device:dev0": 1}}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    try:
        assert raycluster.connect(Cluster.simulated(1), ["dev0"]) is True
        assert no_token.is_file() and stat.S_IMODE(no_token.stat().st_mode) == 0o600
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)  # set by Ray's code above
        monkeypatch.undo()  # Ray's view must be rebuilt from the session's environment, not this test's: a Ray
        Config.initialize("")  # instance of the session would otherwise refuse this process's next connection
        AuthenticationTokenLoader.instance().reset_cache()


def test_a_token_file_edgesplit_writes_is_mode_600_and_the_cli_says_so(no_token, tmp_path, monkeypatch):
    monkeypatch.setattr(raynodes, "_ray_start", lambda *a, **k: None)
    monkeypatch.setattr(raynodes, "_local_ip", lambda: "10.0.0.1")
    result = _cli("device", "head")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(no_token.stat().st_mode) == 0o600
    assert f"auth token: {no_token} (mode 600: only you can read it;" in result.output, result.output
    empty = tmp_path / "lab_token"
    empty.touch(mode=0o644)
    raynodes.ensure_token(empty)  # an empty token file is filled, and made private
    assert stat.S_IMODE(empty.stat().st_mode) == 0o600 and len(empty.read_text()) == 64
    no_token.chmod(0o644)  # one the user made readable: said, not changed
    result = _cli("device", "head")
    assert f"(mode 644: other users can read it; run `chmod 600 {no_token}`" in result.output, result.output
