"""Token generation on the Ray executor: same tokens as in-process, caches never leave their device."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import ray
from edgesplit.bench import transformers_zoo as tz  # noqa: E402

from edgesplit.runtime import raycluster  # noqa: E402
from edgesplit.runtime.generate import generate, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_devices():
    """A local Ray instance hosting dev0..dev2 for this module only (other modules start their own)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, resources={raycluster.resource(f"dev{i}"): 1 for i in range(3)}, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 _system_config=raycluster.WORKER_PRIORITY)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("dataplane", ["tasks", "peer"])
@pytest.mark.parametrize("devices", [2, 3])
def test_ray_generation_matches_local_and_keeps_caches_on_devices(ray_devices, word_tokenizer, devices, dataplane):
    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    plan = tz.vertical_plan(export.path, devices)
    tok = load_tokenizer(word_tokenizer)
    prompt = "w1 w200 w33 w4"
    local = generate(plan, tok, prompt, 16, stop_at_eos=False)
    expected = local.ids()
    remote = generate(plan, tok, prompt, 16, stop_at_eos=False, backend="ray", dataplane=dataplane)
    assert remote.ids() == expected
    assert remote.stats.kv_cache and remote.stats.new_tokens == 16
    assert remote.stats.crossed and not any(t.startswith(("past_", "present_")) for t in remote.stats.crossed)
    if dataplane == "tasks":  # a stage call per reading stage
        assert remote.stats.wire_bytes_decode == local.stats.wire_bytes_decode > 0
    else:  # what the devices received: each tensor once per device that reads it
        assert 0 < remote.stats.wire_bytes_decode <= local.stats.wire_bytes_decode
    again = generate(plan, tok, "w7 w8", 5, stop_at_eos=False, backend="ray", dataplane=dataplane)
    assert again.ids() == generate(plan, tok, "w7 w8", 5, stop_at_eos=False).ids()  # caches reset between prompts


@pytest.mark.parametrize("dataplane", ["tasks", "peer"])
def test_ray_head_split_generation_matches_local(ray_devices, word_tokenizer, dataplane):
    """A head split with sharded caches: each token's parts run on both devices; tokens as the local executor's."""
    import edgesplit

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    dims = {"batch": 1, "sequence": 6, "past_sequence": 4, "total_sequence": 10}
    plan = edgesplit.partition(edgesplit.load(export.path, dims=dims), edgesplit.Cluster.simulated(2),
                               strategy="heads", kv_cache="shard", dims=dims)
    tok = load_tokenizer(word_tokenizer)
    local = generate(plan, tok, "w5 w6 w7", 12, stop_at_eos=False)
    remote = generate(plan, tok, "w5 w6 w7", 12, stop_at_eos=False, backend="ray", dataplane=dataplane)
    assert remote.ids() == local.ids()
    assert not any(t.startswith(("past_", "present_")) for t in remote.stats.crossed)


def test_generation_refuses_compiled_graphs(word_tokenizer):
    from edgesplit.errors import InputError

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    with pytest.raises(InputError, match="peer or tasks data plane"):
        generate(tz.vertical_plan(export.path, 2), load_tokenizer(word_tokenizer), "w1", 2, backend="ray",
                 dataplane="compiled")


def test_ray_backend_needs_a_plan(word_tokenizer):
    from edgesplit.errors import InputError

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    with pytest.raises(InputError, match="the ray backend runs a Plan"):
        generate(export.path, load_tokenizer(word_tokenizer), "w1", 2, backend="ray")
    with pytest.raises(InputError, match=r"backend: expected one of \['local', 'ray'\], got 'gpu'"):
        generate(export.path, load_tokenizer(word_tokenizer), "w1", 2, backend="gpu")


def test_cli_head_split_with_sharded_cache_generates_on_ray(ray_devices, word_tokenizer, tmp_path):
    """partition --strategy heads --kv-cache shard, then generate on Ray: each device keeps its heads' cache."""
    from click.testing import CliRunner

    from edgesplit.cli import main

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    dims = ["--dim", "batch=1", "--dim", "sequence=6", "--dim", "past_sequence=4", "--dim", "total_sequence=10"]
    result = CliRunner().invoke(main, ["partition", str(export.path), "--devices", "2", "--strategy", "heads",
                                       "--kv-cache", "shard", *dims, "-o", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    args = ["generate", str(tmp_path / "plan"), "--prompt", "w1 w200 w33 w4", "--max-new-tokens", "8",
            "--tokenizer", str(word_tokenizer)]
    local = CliRunner().invoke(main, args)
    remote = CliRunner().invoke(main, [*args, "--backend", "ray"])
    assert local.exit_code == 0 and remote.exit_code == 0, (local.output, remote.output)
    text = lambda out: out.split("\n")[0]  # noqa: E731  the prompt and the generated words
    whole = generate(export.path, load_tokenizer(word_tokenizer), "w1 w200 w33 w4", 8, stop_at_eos=False)
    assert text(local.output) == text(remote.output) == "w1 w200 w33 w4" + "".join(t.text for t in whole)


def test_kv_devices_check_the_plan_signature_before_they_load_a_stage(ray_devices, tmp_path):
    """The KV-cache actors refuse, as the stage actors do (issue 14, point 2): a plan signed with a key the devices
    lack, and a stage swapped after the plan was signed."""
    import dataclasses

    from edgesplit.errors import EdgesplitError
    from edgesplit.plan import Plan
    from edgesplit.runtime.raykv import remote_stages
    from test_signing import _other_key

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    plan = tz.vertical_plan(export.path, 2)
    other = _other_key(tmp_path)
    with pytest.raises(EdgesplitError, match=f"device 'dev[01]' refuses its stages: the plan is signed with key id "
                                             f"{other.key_id}, but this device's key is key id "):
        remote_stages(plan, key=other)
    signed = Plan.load(plan.save(tmp_path / "plan"))
    first, second = signed.stages[0].name, signed.stages[1].name
    swapped = dataclasses.replace(signed, stage_models={**signed.stage_models,
                                                        first: signed.stage_models[second]})
    with pytest.raises(EdgesplitError, match=f"refuses its stages: stage '{first}' is not the signed one"):
        remote_stages(swapped)
    assert len(remote_stages(signed)) == 2


def test_a_device_lost_during_peer_generation_is_a_clear_error(ray_devices, word_tokenizer):
    """A device actor killed between two tokens: the next step fails with a message, no device waits forever."""
    from edgesplit.errors import EdgesplitError
    from edgesplit.runtime.generate import Decoder

    export = tz.gpt2(tz.default_cache_dir(), kv_cache=True)
    decoder = Decoder(tz.vertical_plan(export.path, 2), backend="ray", dataplane="peer")
    gen = decoder.generate(load_tokenizer(word_tokenizer), "w1 w2", 8, stop_at_eos=False)
    next(gen)
    ray.kill(decoder.runner.actors["dev1"])
    with pytest.raises(EdgesplitError, match="generation on the peer data plane failed"):
        list(gen)
