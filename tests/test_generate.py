"""Greedy token generation over split plans: the same tokens as the unsplit model, KV caches stay on their stage."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: F401  (the test extra installs it: a broken install fails here)
import torch  # noqa: F401  (the test extra installs it: a broken install fails here)
import tokenizers

from edgesplit.bench import transformers_zoo as tz  # noqa: E402
from edgesplit.cli import main  # noqa: E402
from edgesplit.cluster import Cluster  # noqa: E402
from edgesplit.errors import EdgesplitError, InputError, PlanError  # noqa: E402
from edgesplit.graph import load  # noqa: E402
from edgesplit.planner import partition  # noqa: E402
from edgesplit.plan import Plan  # noqa: E402
from edgesplit.runtime.generate import (  # noqa: E402
    Decoder,
    TextTokenizer,
    TokenizerError,
    find_tokenizer,
    generate,
    load_tokenizer,
)

from tests.conftest import GPT2_VOCAB as VOCAB  # noqa: E402
PROMPT = "Once upon a time, in a small village in the mountains,"


@pytest.fixture(scope="session")
def cache():
    return tz.default_cache_dir()


@pytest.fixture(scope="session")
def gpt2(cache):
    return {kv: tz.gpt2(cache, kv_cache=kv) for kv in (False, True)}


@pytest.fixture(scope="session")
def gpt2_plans(gpt2):
    plans = {}
    for kv in (False, True):
        for n in (1, 2, 3, 4):
            plans[kv, n] = tz.vertical_plan(gpt2[kv].path, n)
    return plans


@pytest.fixture(scope="session")
def smollm2(cache):
    return tz.smollm2(cache, kv_cache=True)


@pytest.fixture(scope="session")
def smollm2_plan_dir(smollm2, tmp_path_factory):
    """SmolLM2 with a KV cache on 2 devices, saved so the CLI can read it (the tokenizer sits next to the model)."""
    directory = tmp_path_factory.mktemp("plans") / "smollm2-2"
    tz.vertical_plan(smollm2.path, 2).save(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_split(smollm2_plan_dir):
    return Plan.load(smollm2_plan_dir)


def test_word_tokenizer_round_trips(word_tokenizer):
    tok = load_tokenizer(word_tokenizer)
    assert tok.encode("w3 w17 w5") == [3, 17, 5]
    assert tok.decode([3, 17]) == "w3 w17"
    assert tok.eos_token_id == VOCAB - 1


@pytest.mark.parametrize("devices", [1, 2, 3, 4])
def test_gpt2_split_generation_matches_whole_model(gpt2, gpt2_plans, word_tokenizer, devices):
    tok = load_tokenizer(word_tokenizer)
    prompt = "w1 w200 w33 w4"
    reference = generate(gpt2[False].path, tok, prompt, 20, stop_at_eos=False).ids()
    assert len(reference) == 20
    assert len(set(reference)) > 1  # not a degenerate constant stream
    for kv in (False, True):
        gen = generate(gpt2_plans[kv, devices], tok, prompt, 20, stop_at_eos=False)
        assert gen.ids() == reference, (kv, devices)
        assert gen.stats.new_tokens == 20 and gen.stats.kv_cache is kv
        # only activations cross devices, never a KV cache
        assert not any(t.startswith(("past_", "present_")) for t in gen.stats.crossed)
        assert (gen.stats.wire_bytes_decode > 0) == (devices > 1)


@pytest.fixture(scope="session")
def gpt2_dynamo(cache):
    return tz.gpt2(cache, kv_cache=True, dynamo=True)


def test_dynamo_export_generates_across_devices(gpt2, gpt2_dynamo, word_tokenizer):
    """The dynamo exporter reads every past tensor's shape (Shape nodes, possibly on other stages): those stages
    get a stand-in of the right shape, the cache itself stays on its stage, and the tokens are the same."""
    graph = tz.graph(gpt2_dynamo.path)
    consumers = graph.consumers()
    assert any(graph.layer(c).op_type == "Shape" for t in graph.inputs if t.startswith("past_") for c in consumers[t])
    tok = load_tokenizer(word_tokenizer)
    reference = generate(gpt2[True].path, tok, "w1 w200 w33 w4", 12, stop_at_eos=False).ids()
    assert generate(gpt2_dynamo.path, tok, "w1 w200 w33 w4", 12, stop_at_eos=False).ids() == reference
    stand_ins = 0
    for n in (2, 3, 4):
        decoder = Decoder(tz.vertical_plan(gpt2_dynamo.path, n))
        stand_ins += sum(len(s.shape_only) for s in decoder.states)
        gen = decoder.generate(tok, "w1 w200 w33 w4", 12, stop_at_eos=False)
        assert gen.ids() == reference, n
        # (a balanced cut may fall between a cache's Concat and its attention MatMul: that present then crosses
        # and is counted; a past tensor is never sent)
        assert not any(t.startswith("past_") for t in gen.stats.crossed)
    assert stand_ins > 0  # some plan does put a Shape reader away from its cache


def test_kv_decode_feeds_one_token_per_step(gpt2_plans, word_tokenizer):
    """With a cache, the bytes crossing devices per decode step are those of one position, not of the sequence."""
    tok = load_tokenizer(word_tokenizer)
    prompt = "w1 w2 w3 w4 w5 w6 w7 w8"
    gens = {kv: generate(gpt2_plans[kv, 2], tok, prompt, 9, stop_at_eos=False) for kv in (False, True)}
    for g in gens.values():
        g.ids()
    per_step = {kv: g.stats.wire_bytes_decode / g.stats.decode_steps for kv, g in gens.items()}
    assert per_step[True] * 8 <= per_step[False]


def test_generation_streams_tokens(gpt2_plans, word_tokenizer):
    gen = generate(gpt2_plans[True, 2], load_tokenizer(word_tokenizer), "w1 w2", 5, stop_at_eos=False)
    first = next(gen)
    assert isinstance(first.id, int) and first.text.strip().startswith("w")
    assert gen.stats is not None and gen.stats.new_tokens == 1  # produced before the rest is asked for
    rest = list(gen)
    assert len(rest) == 4 and gen.stats.new_tokens == 5
    assert gen.stats.prefill_seconds > 0 and gen.stats.decode_seconds > 0


def test_generation_stops_at_eos(gpt2, word_tokenizer):
    tok = load_tokenizer(word_tokenizer)
    ids = generate(gpt2[True].path, tok, "w1 w200 w33 w4", 20, stop_at_eos=False).ids()
    eos = ids[5]
    stopped = generate(gpt2[True].path, tok, "w1 w200 w33 w4", 20, eos_token_id=eos).ids()
    assert stopped == ids[: ids.index(eos) + 1]


@pytest.mark.slow
def test_smollm2_split_generation_matches_unsplit_and_transformers(cache, smollm2, smollm2_split):
    tok = load_tokenizer(smollm2.tokenizer)
    prompt_ids = tok.encode(PROMPT)
    assert prompt_ids == [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 281, 260, 8718, 28]  # as transformers'
    reference = tz.smollm2_greedy(cache, prompt_ids, 32)  # transformers' greedy generate, cached
    whole = generate(smollm2.path, tok, PROMPT, 32).ids()
    gen = generate(smollm2_split, tok, PROMPT, 32)
    split = gen.ids()
    assert len(reference) == 32  # no end-of-sequence before 32 tokens for this prompt
    assert split == whole == reference
    assert not any(t.startswith(("past_", "present_")) for t in gen.stats.crossed)
    assert tok.decode(split).startswith(" there was a wise old woman")


@pytest.mark.slow
def test_smollm2_generate_cli(smollm2_plan_dir):
    result = CliRunner().invoke(main, ["generate", str(smollm2_plan_dir), "--prompt", PROMPT, "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "Once upon a time" in result.output and " there was a" in result.output
    assert "tokens/s" in result.output and "prefill" in result.output and "decode" in result.output


def test_cli_generate_with_explicit_tokenizer(gpt2_plans, word_tokenizer, tmp_path):
    plan_dir = gpt2_plans[True, 2].save(tmp_path / "gpt2-2")
    args = ["generate", str(plan_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "3",
            "--tokenizer", str(word_tokenizer)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 tokens" in result.output


# ---------------------------------------------------------------------------------------------------- bad input


def test_cli_generate_without_tokenizer_names_what_is_missing(gpt2_plans, tmp_path):
    plan_dir = gpt2_plans[True, 2].save(tmp_path / "gpt2-2")
    result = CliRunner().invoke(main, ["generate", str(plan_dir), "--prompt", "w1", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert "tokenizer.json" in result.output and "--tokenizer" in result.output
    assert "Traceback" not in result.output


def test_missing_tokenizer_errors(gpt2_plans, tmp_path):
    plan = gpt2_plans[True, 2]
    with pytest.raises(TokenizerError, match="tokenizer"):
        generate(plan, None, "w1", 2)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="--tokenizer"):
        find_tokenizer(tmp_path, plan)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="not a readable"):
        load_tokenizer(tmp_path)


def test_bad_generation_arguments(gpt2_plans, word_tokenizer):
    tok = load_tokenizer(word_tokenizer)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(gpt2_plans[True, 2], tok, "w1", 0)
    with pytest.raises(InputError, match="at least one token"):
        generate(gpt2_plans[True, 2], tok, "", 3)


def test_non_decoder_plan_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    plan = partition(load(model), Cluster.simulated(1))
    tok = TextTokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")))
    with pytest.raises(PlanError, match="expected a decoder.*input_ids.*logits"):
        generate(plan, tok, [0], 2)
    with pytest.raises(EdgesplitError, match="expected a Plan or an ONNX model file"):
        generate(tmp_path / "missing.onnx", tok, [0], 2)
    assert onnx.checker.check_model(model) is None


def test_kv_cache_that_would_cross_devices_is_refused(gpt2, word_tokenizer):
    """A placement that puts the Concat of a past tensor away from the stage reading it is named, not run."""
    graph = tz.graph(gpt2[True].path)
    consumers = graph.consumers()
    cat = consumers["past_key_1"][0]
    # past_key_1's Concat alone on dev1: its stage reads past_key_1 and makes present_key_1, so the plan runs, but
    # the attention reading present_key_1 is on dev0, so that cache crosses devices every step, and says so
    mapping = {"dev0": [layer.name for layer in graph.layers if layer.name != cat], "dev1": [cat]}
    plan = partition(graph, Cluster.simulated(2), mapping)
    tok = load_tokenizer(word_tokenizer)
    gen = generate(plan, tok, "w1 w2", 4, stop_at_eos=False)
    assert gen.ids() == generate(gpt2[True].path, tok, "w1 w2", 4, stop_at_eos=False).ids()
    assert "present_key_1" in gen.stats.crossed
    # the same plan with present_key_1 made elsewhere (as a careless rewrite could): refused, with the names
    stage = next(s for s in plan.stages if "past_key_1" in s.inputs)
    bad_stage = type(stage)(**{**stage.__dict__, "outputs": tuple(o for o in stage.outputs if o != "present_key_1")})
    bad = Plan(**{**plan.__dict__, "stages": tuple(bad_stage if s is stage else s for s in plan.stages)})
    with pytest.raises(PlanError, match="past_key_1.*present_key_1.*cross devices"):
        generate(bad, load_tokenizer(word_tokenizer), "w1 w2", 2)
