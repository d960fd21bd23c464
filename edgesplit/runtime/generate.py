"""Greedy token generation over a decoder Plan (numpy + onnxruntime; `tokenizers` for text).

The decoder interface (what `edgesplit.bench.transformers_zoo` exports):
  inputs  input_ids [batch, sequence]; optional attention_mask [batch, past + sequence], position_ids
          [batch, sequence], token_type_ids; optional past_<X> tensors (the KV cache); output logits
          [batch, sequence, vocab] and, with a cache, present_<X> tensors.

KV rule: a stage input named `past_<X>` is fed from the same stage's output `present_<X>` of the previous step
(empty, length 0 along every symbolic axis but the batch, at prefill). So each stage keeps its own cache: its
past/present tensors never leave its device; only the hidden states (and the small int feeds) cross devices.
A stage that reads `past_<X>` only through Shape nodes (as dynamo exports do) gets a zero stand-in of the right
shape. A plan whose `past_<X>` is otherwise read by a stage that does not produce `present_<X>` is refused.
A placement that cuts between a cache's Concat and the attention reading it runs correctly, but then that
present crosses devices every step: `GenerationStats.crossed` names every tensor that did.

With a cache: prefill runs the whole prompt once, then each step feeds one token. Without: every step re-runs the
whole sequence. The first new token comes from prefill; `decode` times the steps after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from edgesplit.errors import EdgesplitError, InputError, PlanError
from edgesplit.layout import Backend, Dataplane
from edgesplit.plan import Plan
from edgesplit.runtime.common import session_options
from edgesplit.runtime.kvstage import PAST, PRESENT, KVStage

if TYPE_CHECKING:
    from edgesplit.runtime.raykv import PeerDecoder  # Ray is an optional dependency

FEEDS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
TOKENIZER_FILE = "tokenizer.json"
NO_TOKENIZER = "generate needs a tokenizer (a TextTokenizer or a directory with tokenizer.json); got none"


class TokenizerError(EdgesplitError):
    """No usable tokenizer for `generate`."""


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json) and its end-of-sequence id."""

    tokenizer: Any
    eos_token_id: int | None = None
    source: str = ""

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A directory holding tokenizer.json (and optionally tokenizer_config.json naming eos_token), or the file."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"expected a tokenizer directory containing {TOKENIZER_FILE} (or the file), got {str(path)!r}")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{file} is not a readable tokenizer.json: {exc}") from None
    return TextTokenizer(tok, _eos_id(tok, file.parent / "tokenizer_config.json"), str(file))


def _eos_id(tok: Any, config: Path) -> int | None:
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def find_tokenizer(plan_dir: str | Path, plan: Plan, given: str | Path | None = None) -> Path:
    """--tokenizer if given; else tokenizer.json in the plan directory, then next to the plan's source model."""
    if given is not None:
        return Path(given)
    places = [Path(plan_dir)]
    if plan.model_path:
        places.append(Path(plan.model_path).parent)
    for place in places:
        if (place / TOKENIZER_FILE).is_file():
            return place
    raise TokenizerError(
        f"generate needs a tokenizer ({TOKENIZER_FILE}); none was given with --tokenizer and none is in "
        + " or ".join(repr(str(p)) for p in places) + "; give --tokenizer DIR"
    )


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the text this token adds to the decoded output
    seconds: float  # time of the step that produced it


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_cache: bool
    wire_bytes_prefill: int  # bytes crossing between devices during prefill
    wire_bytes_decode: int  # bytes crossing between devices during all decode steps
    crossed: frozenset[str] = frozenset()  # names of the tensors that crossed devices

    @property
    def decode_steps(self) -> int:
        return max(self.new_tokens - 1, 0)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.prefill_seconds + self.decode_seconds:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s (prefill {self.prompt_tokens} tokens in "
                f"{self.prefill_seconds:.3f} s, "
                f"{self.prefill_tokens_per_s:.1f} tokens/s; decode {self.decode_tokens_per_s:.1f} tokens/s"
                f"{', KV cache' if self.kv_cache else ', no KV cache'})")


class _Runner:
    """Runs the stages in order for one step, routing tensors by name and counting bytes between devices."""

    def __init__(self, states: Sequence[KVStage]) -> None:
        self.states = list(states)
        self.producer = {o: s for s in self.states for o in s.outputs}
        self.crossed: set[str] = set()

    def _stand_in(self, name: str, batch: int) -> np.ndarray:
        owner = self.producer[PRESENT + name[len(PAST):]]
        cached = owner.kv.get(PRESENT + name[len(PAST):])
        return np.zeros_like(cached) if cached is not None else owner.empty_past(name, batch)

    def step(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
        values = dict(feeds)
        batch = int(feeds["input_ids"].shape[0])
        wire = 0
        for state in self.states:
            ins = {}
            for name in state.inputs:
                if name in state.shape_only:  # a stand-in of the right shape: only the shape crosses, not the cache
                    ins[name] = self._stand_in(name, batch)
                    wire += 8 * ins[name].ndim
                if name.startswith(PAST):
                    continue
                ins[name] = values[name]
                src = self.producer.get(name)
                if src is not None and src.device != state.device:
                    wire += values[name].nbytes
                    self.crossed.add(name)
            values.update(state.step(ins, batch))
        return values["logits"], wire


def _check_decoder(inputs: Sequence[str], outputs: Sequence[str], stages: Sequence[KVStage],
                   stage_models: Mapping[str, bytes]) -> None:
    """Refuse what is not a decoder; mark past_* inputs that a stage reads only through Shape nodes (dynamo
    exports read every past tensor's shape), so that those stages get a stand-in and the cache stays put."""
    feeds = [n for n in inputs if not n.startswith(PAST)]
    unknown = [n for n in feeds if n not in FEEDS]
    if "input_ids" not in feeds or "logits" not in outputs or unknown:
        raise PlanError(
            f"expected a decoder: inputs input_ids (and optionally {', '.join(FEEDS[1:])}, {PAST}* KV tensors), "
            f"output logits; got inputs {list(inputs)}, outputs {list(outputs)}"
        )
    owners = {o for s in stages for o in s.outputs if o.startswith(PRESENT)}
    for s in stages:
        foreign = [n for n in s.inputs if n.startswith(PAST) and PRESENT + n[len(PAST):] not in s.outputs]
        if not foreign:
            continue
        graph = onnx.load_from_string(stage_models[s.name]).graph
        readers = {n: {node.op_type for node in graph.node if n in node.input} for n in foreign}
        s.shape_only = frozenset(n for n, ops in readers.items() if ops == {"Shape"}
                                 and PRESENT + n[len(PAST):] in owners)
        for name in foreign:
            if name not in s.shape_only:
                raise PlanError(
                    f"stage {s.name!r} reads {name!r} but does not produce {PRESENT + name[len(PAST):]!r}: "
                    "its KV cache would have to cross devices; place the Concat that makes it on the same stage"
                )


Model = Plan | str | Path | onnx.ModelProto


def _states(model: Model, threads: int | None) -> tuple[list[KVStage], list[str], list[str]]:
    opts = session_options(threads)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, Plan):
        states = [KVStage(s.name, s.device,
                              ort.InferenceSession(model.stage_models[s.name], opts, providers=providers),
                              s.inputs, s.outputs) for s in model.order()]
        return states, [t.name for t in model.inputs], [t.name for t in model.outputs]
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto) and not Path(source).is_file():
        raise InputError(f"expected a Plan or an ONNX model file, got {source!r}")
    sess = ort.InferenceSession(source, opts, providers=providers)
    ins, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    return [KVStage("whole", "local", sess, tuple(ins), tuple(outs))], ins, outs


def _feeds(names: Sequence[str], tokens: Sequence[int], past: int) -> dict[str, np.ndarray]:
    ids = np.asarray(tokens[past:], dtype=np.int64)[None, :]
    all_feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
        "position_ids": np.arange(past, len(tokens), dtype=np.int64)[None, :],
        "token_type_ids": np.zeros_like(ids),
    }
    return {n: all_feeds[n] for n in names if n in all_feeds}


class Generation:
    """An iterator of `Token`s; `stats` is set once it is exhausted."""

    def __init__(self, tokens: Iterator[Token]) -> None:
        self._tokens = tokens
        self.stats: GenerationStats | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Token:
        return next(self._tokens)

    def ids(self) -> list[int]:
        return [t.id for t in self]


class Decoder:
    """A Plan (or a whole model) ready to generate: one session per stage, built once, reused across prompts."""

    def __init__(self, model: Model, threads: int | None = None, backend: Backend | str = Backend.LOCAL,
                 address: str | None = None, trust_unsigned: bool = False,
                 dataplane: Dataplane | str = Dataplane.AUTO) -> None:
        try:
            backend = Backend.parse(backend, "backend")
            dataplane = Dataplane.parse(dataplane, "dataplane")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if dataplane is Dataplane.COMPILED:
            raise InputError("generation runs on the peer or tasks data plane (or auto: peer), not compiled graphs")
        states, self.inputs, outputs = _states(model, threads)
        self.runner: _Runner | PeerDecoder | None = None  # None: the stages one after another
        _check_decoder(self.inputs, outputs, states, model.stage_models if isinstance(model, Plan) else {})
        if backend is Backend.RAY:
            if not isinstance(model, Plan):
                raise InputError("the ray backend runs a Plan; partition the model first")
            if any(s.shape_only for s in states):
                raise PlanError("this plan reads KV caches of other stages through Shape nodes (a dynamo export); "
                                "the ray backend keeps every cache on its device and cannot feed those: "
                                "use --backend local")
            from edgesplit.runtime.raykv import remote_stages  # Ray is an optional dependency

            states = remote_stages(model, address, threads, trust_unsigned=trust_unsigned)
            if dataplane is not Dataplane.TASKS:  # auto: peer, faster on every plan measured (docs/benchmarks.md)
                from edgesplit.runtime.raykv import PeerDecoder

                self.runner = PeerDecoder(states, self.inputs)
        self.states = states
        self.kv_cache = any(n.startswith(PAST) for n in self.inputs)

    def generate(self, tokenizer: TextTokenizer | str | Path | None, prompt: str | Sequence[int], max_new_tokens: int,
                 *, stop_at_eos: bool = True, eos_token_id: int | None = None) -> Generation:
        if tokenizer is None:
            raise TokenizerError(NO_TOKENIZER)
        tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"expected max_new_tokens >= 1, got {max_new_tokens!r}")
        prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise InputError(f"expected a prompt of at least one token, got {prompt!r}")
        for state in self.states:
            state.reset()
        eos = eos_token_id if eos_token_id is not None else tok.eos_token_id
        generation = Generation(iter(()))
        runner = self.runner or _Runner(self.states)
        generation._tokens = _loop(generation, runner, self.inputs, tok, prompt_ids, max_new_tokens,
                                   eos if stop_at_eos else None)
        return generation


def generate(model: Model, tokenizer: TextTokenizer | str | Path | None, prompt: str | Sequence[int],
             max_new_tokens: int, *, threads: int | None = None, stop_at_eos: bool = True,
             eos_token_id: int | None = None, backend: str = "local", address: str | None = None,
             trust_unsigned: bool = False, dataplane: str = "auto") -> Generation:
    """Greedy decoding of up to `max_new_tokens` after `prompt` (text, or token ids) on a Plan or a whole model.

    The returned iterator yields each token as soon as it is produced; `.stats` has timings after the last one.
    On Ray, each device checks the plan's signature before it loads a stage (`trust_unsigned`: an unsigned plan
    is accepted).
    """
    if tokenizer is None:
        raise TokenizerError(NO_TOKENIZER)
    decoder = Decoder(model, threads, backend, address, trust_unsigned, dataplane)
    return decoder.generate(tokenizer, prompt, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id)


def _loop(generation: Generation, runner: _Runner | PeerDecoder, inputs: Sequence[str], tok: TextTokenizer,
          prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> Iterator[Token]:
    kv = any(n.startswith(PAST) for n in inputs)
    feed_names = [n for n in inputs if not n.startswith(PAST)]
    tokens = list(prompt_ids)
    seconds = [0.0, 0.0]
    wire = [0, 0]
    text = tok.decode(tokens)
    past = 0
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        logits, nbytes = runner.step(_feeds(feed_names, tokens, past if kv else 0))
        token = int(np.argmax(logits[0, -1]))
        dt = time.perf_counter() - t0
        seconds[step > 0] += dt
        wire[step > 0] += nbytes
        past = len(tokens)
        tokens.append(token)
        new_text = tok.decode(tokens)
        piece = ""
        if not new_text.endswith("\ufffd"):  # a token may end inside a multi-byte character: wait for the rest
            piece = new_text[len(text):] if new_text.startswith(text) else new_text
            text = new_text
        generation.stats = GenerationStats(len(prompt_ids), step + 1, seconds[0], seconds[1], kv, wire[0], wire[1],
                                           frozenset(runner.crossed))
        yield Token(token, piece, dt)
        if eos is not None and token == eos:
            break
