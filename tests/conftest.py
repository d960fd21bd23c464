"""Shared fixtures: the zoo of small CNNs, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ZOO = ("resnet", "densenet", "vgg", "mobilenet", "inception")


def _session_key() -> Path:
    """The suite's plan-signing key: every plan a test saves is signed with it and loads checked against it
    ($EDGESPLIT_KEY_FILE, set before any Ray instance starts, so device actors have it too)."""
    import atexit
    import os
    import secrets
    import shutil
    import tempfile

    existing = os.environ.get("EDGESPLIT_KEY_FILE", "")
    if "edgesplit-test-key-" in existing and Path(existing).is_file():  # conftest imported again by a test module
        return Path(existing)
    directory = Path(tempfile.mkdtemp(prefix="edgesplit-test-key-"))
    atexit.register(shutil.rmtree, directory, True)
    path = directory / "plan.key"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["EDGESPLIT_KEY_FILE"] = str(path)
    return path


SESSION_KEY = _session_key()


def resign(plan_dir: Path) -> Path:
    """Sign a plan a test changed on purpose, so that Plan.load reaches the check the test is about."""
    from edgesplit.signing import find_key, sign_directory

    return sign_directory(Path(plan_dir), find_key())  # the key $EDGESPLIT_KEY_FILE names, as Plan.load uses
PLAN_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "plan.schema.json"


def schema_problems(plan_json: Path) -> list[str]:
    """Where a written plan.json breaks docs/plan.schema.json (empty: it follows the documented format)."""
    import json

    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(PLAN_SCHEMA.read_text()))
    data = json.loads(plan_json.read_text())
    return [f"{plan_json}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


@pytest.fixture(scope="session", autouse=True)
def every_written_plan_follows_the_schema():
    """Every plan a test writes (Plan.save, also under the CLI) validates against docs/plan.schema.json."""
    from edgesplit.plan import Plan

    save = Plan.save

    def checked(self, directory, *args, **kwargs):
        written = save(self, directory, *args, **kwargs)
        problems = schema_problems(Path(written) / "plan.json")
        assert not problems, "the written plan breaks docs/plan.schema.json:\n" + "\n".join(problems[:20])
        return written

    Plan.save = checked
    yield
    Plan.save = save


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgesplit.bench.zoo import build

    directory = tmp_path_factory.mktemp("zoo")
    for name in ZOO:
        build(name, directory)
    return directory


@pytest.fixture(scope="session")
def zoo_graphs(zoo_dir: Path) -> dict:
    import edgesplit

    return {name: edgesplit.load(zoo_dir / f"{name}.onnx") for name in ZOO}


GPT2_VOCAB = 512  # the random GPT-2 of edgesplit.bench.transformers_zoo


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over the random GPT-2's ids: w0 .. w511, w511 is end-of-sequence."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(GPT2_VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{GPT2_VOCAB - 1}"}))
    return d


def assert_plan_matches(plan, graph, batch: int = 2, rtol: float = 1e-5) -> None:
    """The plan's outputs equal the whole model's (one onnxruntime session) within `rtol` of the largest value."""
    import edgesplit
    from edgesplit.runtime import random_inputs, run_whole_model

    x = random_inputs(plan.inputs, {"batch": batch}, seed=batch)
    got = edgesplit.LocalExecutor(plan, threads=1).run(x).outputs
    ref = run_whole_model(graph.model, x, threads=1)
    for name, want in ref.items():
        assert got[name].shape == want.shape
        err = np.max(np.abs(got[name] - want)) / max(np.max(np.abs(want)), 1e-30)
        assert err <= rtol, f"{name}: relative error {err:.2e}"


def write_tiny_cnn(path: Path, unsupported: bool = False) -> Path:
    """A small CNN on [batch, 3, 8, 8] inputs, built with onnx.helper in milliseconds (for fast CLI tests);
    `unsupported`: its activation is a Softplus on float64, valid ONNX that onnxruntime does not implement."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)), "w2": rng.standard_normal((4, 4, 3, 3)),
               "fc_w": rng.standard_normal((4, 2)), "fc_b": np.zeros(2)}
    act = [helper.make_node("Relu", ["c1"], ["a1"], name="act1")]
    if unsupported:
        act = [helper.make_node("Cast", ["c1"], ["c1d"], name="to_double", to=TensorProto.DOUBLE),
               helper.make_node("Softplus", ["c1d"], ["a1d"], name="softplus"),
               helper.make_node("Cast", ["a1d"], ["a1"], name="to_float", to=TensorProto.FLOAT)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), *act,
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", elem, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", elem, ["batch", 2])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="session")
def big_first_stage(tmp_path_factory: pytest.TempPathFactory):
    """ResNet-18 (10 classes, 32²: 43 MiB of weights) with dev0 holding two stages, the first nearly every weight
    and the second only the classifier, dev1 the pooling between them: a device's memory must count both."""
    from edgesplit.bench import zoo
    from edgesplit.cluster import Cluster
    from edgesplit.graph import load
    from edgesplit.planner import plan

    path = zoo.export(zoo.resnet18(classes=10), (1, 3, 32, 32), tmp_path_factory.mktemp("r18") / "r18.onnx",
                      keep_batchnorm=False)
    graph = load(path)
    n = len(graph.layers)
    placement = {layer.name: "dev1" if n - 3 <= i < n - 1 else "dev0" for i, layer in enumerate(graph.layers)}
    made = plan(graph, Cluster.simulated(2), placement)
    assert [s.device for s in made.order()] == ["dev0", "dev1", "dev0"]
    return graph, made
