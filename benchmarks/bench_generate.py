"""Token generation speed (issue 5): SmolLM2-135M with a KV cache, whole model vs vertical plans, prefill and decode.

python benchmarks/bench_generate.py [--repeats 3] [--max-new-tokens 32] [--plan DIR ...] [--tokenizer DIR] [--ray]

Baselines measured in the same run: onnxruntime on the whole model (1 and 2 intra-op threads), then edgesplit's
local executor on 1 and 2 simulated devices with 1 thread per stage (`LocalExecutor(plan, threads=1)`'s setting).
Every `--plan DIR` (e.g. a head/neuron-split plan) is measured the same way. With `--ray`: a head split with
sharded KV caches (`--strategy heads --kv-cache shard`) over 2 simulated devices of 1 core each, on the Ray
executor's peer data plane (one call per device per token) and on actor calls (one per stage), each with the
gather and the exchange synchronisation. Runs are interleaved; medians.
Writes benchmarks/results/generate.json and generate.md. Greedy decoding; EOS is ignored so every run makes
exactly --max-new-tokens tokens, and every configuration must produce the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import edgesplit  # noqa: E402
from edgesplit.bench import transformers_zoo as tz  # noqa: E402
from edgesplit.bench.harness import markdown_table, write_report  # noqa: E402
from edgesplit.plan import Plan  # noqa: E402
from edgesplit.runtime.generate import Decoder, load_tokenizer  # noqa: E402

PROMPT = "Once upon a time, in a small village in the mountains,"


def ray_configs(path: Path) -> dict[str, tuple[Decoder, int]]:
    """The head split with sharded caches over 2 devices x 1 core: in-process and on Ray's two data planes."""
    import ray

    from edgesplit.runtime import raycluster

    ray.init(num_cpus=2, resources={raycluster.resource(f"dev{i}"): 1 for i in range(2)},
             include_dashboard=False, log_to_driver=False, _system_config=raycluster.WORKER_PRIORITY)
    dims = {"batch": 1, "sequence": 6, "past_sequence": 4, "total_sequence": 10}  # byte counts only
    shaped = edgesplit.load(path, dims=dims)
    configs = {}
    for sync in ("gather", "exchange"):
        plan = edgesplit.partition(shaped, edgesplit.Cluster.simulated(2, cores=1), strategy="heads",
                                   kv_cache="shard", dims=dims, sync=sync)
        configs[f"heads, kv shard, sync {sync}, in-process"] = (Decoder(plan, threads=1), 2)
        for plane in ("peer", "tasks"):
            configs[f"heads, kv shard, sync {sync}, ray {plane} ({len(plan.stages)} stages)"] = (
                Decoder(plan, threads=1, backend="ray", dataplane=plane), 2)
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--plan", action="append", type=Path, default=[], help="extra plan directory to measure")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: SmolLM2's)")
    ap.add_argument("--ray", action="store_true", help="also the head split on Ray (2 devices x 1 core)")
    args = ap.parse_args()

    export = tz.smollm2(tz.default_cache_dir(), kv_cache=True)
    tok = load_tokenizer(args.tokenizer or export.tokenizer)
    graph = edgesplit.load(export.path)
    configs: dict[str, tuple[Decoder, int]] = {
        "whole model, onnxruntime, 1 thread": (Decoder(export.path, threads=1), 1),
        "whole model, onnxruntime, 2 threads": (Decoder(export.path, threads=2), 1),
    }
    for n in (1, 2):
        plan = edgesplit.partition(graph, edgesplit.Cluster.simulated(n))
        configs[f"vertical plan, {n} device(s), 1 thread each"] = (Decoder(plan, threads=1), n)
    for d in args.plan:
        plan = Plan.load(d)
        configs[f"plan {d.name}, 1 thread each"] = (Decoder(plan, threads=1), len(plan.devices))
    if args.ray:
        configs.update(ray_configs(export.path))
    del graph

    runs: dict[str, list] = {k: [] for k in configs}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for label, (decoder, _) in configs.items():
            gen = decoder.generate(tok, args.prompt, args.max_new_tokens, stop_at_eos=False)
            tokens[label] = gen.ids()
            runs[label].append(gen.stats)
    reference = tokens["whole model, onnxruntime, 1 thread"]
    rows = []
    for label, stats in runs.items():
        med = lambda f: statistics.median(f(s) for s in stats)  # noqa: E731
        rows.append({
            "config": label,
            "devices": configs[label][1],
            "prompt_tokens": stats[0].prompt_tokens,
            "new_tokens": stats[0].new_tokens,
            "prefill_ms": med(lambda s: s.prefill_seconds) * 1e3,
            "prefill_tokens_per_s": med(lambda s: s.prefill_tokens_per_s),
            "decode_tokens_per_s": med(lambda s: s.decode_tokens_per_s),
            "tokens_per_s": med(lambda s: s.tokens_per_s),
            "wire_bytes_per_decode_token": stats[0].wire_bytes_decode / max(stats[0].decode_steps, 1),
            "same_tokens_as_whole": tokens[label] == reference,
        })
    base = rows[0]["decode_tokens_per_s"]
    for r in rows:
        r["decode_ratio_vs_whole_1_thread"] = r["decode_tokens_per_s"] / base
    data = {"model": "SmolLM2-135M-Instruct (float32, KV cache)", "prompt": args.prompt, "repeats": args.repeats,
            "load_average": os.getloadavg(), "text": tok.decode(reference), "rows": rows}
    table = markdown_table(
        ["configuration", "devices", "prefill ms", "prefill tok/s", "decode tok/s", "decode vs whole (1 thread)",
         "overall tok/s", "bytes between devices per decode token", "same tokens"],
        [[r["config"], r["devices"], r["prefill_ms"], r["prefill_tokens_per_s"], r["decode_tokens_per_s"],
          r["decode_ratio_vs_whole_1_thread"], r["tokens_per_s"], r["wire_bytes_per_decode_token"],
          r["same_tokens_as_whole"]] for r in rows])
    note = (f"Greedy generation of {args.max_new_tokens} tokens after a {rows[0]['prompt_tokens']}-token prompt, "
            f"median of {args.repeats} interleaved runs. The local executor runs the stages one after another in one "
            "process, so a split cannot be faster than one device in-process: those rows show its overhead; on Ray "
            "each device is its own process with 1 core; "
            "the bytes column is what a real network would carry per token (hidden state, mask, rotary tables). "
            f"Load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min).")
    path = write_report("generate", "Token generation: SmolLM2-135M, prefill and decode", data,
                        [("Tokens per second", note + "\n\n" + table)])
    print(path.read_text())


if __name__ == "__main__":
    main()
