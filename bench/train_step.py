"""What one training step costs on long-tailed text: padding to the batch max, row chunks, token chunks.

Real short texts are long-tailed (median ~12 tokens, a few up to max_length), so how rows are grouped
into forward chunks decides how many padding tokens the encoder computes. For each batch size this
runs, in one invocation, the step tripletctl runs (plan chunks → embed → mine the whole batch →
backward, gradient-cached when the activations do not fit → AdamW) with three groupings:

  (a) padded  one chunk padded to the batch's longest row (an unchunked step, graph kept)
  (b) rows    length-sorted chunks of --chunk-size rows, each padded to its own longest row
  (c) tokens  length-sorted chunks packed into a --chunk-tokens budget (tripletctl's `auto`)

The batches are synthetic texts: random token ids whose lengths follow a log-normal distribution
(median --median, shape --sigma) clipped to [3, --max-length], generated here with a fixed seed, the
same for every grouping. `--lengths fixed` makes every row --max-length long (the old benchmark:
chunked against naive at equal padding). Every configuration runs in a fresh subprocess (`--worker`):
peak RSS (`ru_maxrss`) and CUDA's allocator peak are then per configuration. `--jobs N` runs N
configurations at once, each pinned to its own --threads cores (for a machine with many quiet cores).

    python bench/train_step.py --device cpu --threads 2 --jobs 7   # MiniLM-size, batches 128, 512, 2000
    python bench/train_step.py --device cuda --steps 10 --warmup 3 --attn sdpa,eager,flex_attention

Throughput is samples/s over the median step. MFU (CUDA) uses 6·N·T with T = real tokens: padding
and the re-forward of gradient caching count as waste, not work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"
BERT_BASE = dict(  # bert-base-uncased's config.json, so `bert-base-config` needs no download
    model_type="bert",
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
MINILM = {
    **BERT_BASE,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
}  # all-MiniLM-L6-v2's shape
CONFIGS = {"minilm-config": MINILM, "bert-base-config": BERT_BASE}
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))  # dense, no sparsity
PER_CLASS = 4  # rows per class in the synthetic batch, as data.samples_per_class defaults to
MODES = ("padded", "rows", "tokens")
TARGET_PADDING = 1.15  # padded / real tokens with token chunks
TARGET_SPEEDUP = 1.8  # token chunks vs (a) at batch 512, CPU
SPEEDUP_BATCH = 512
TARGET_MEMORY_RATIO = 1.25  # peak at the largest batch vs --memory-batch, token chunks
TARGET_OVERHEAD = 1.45  # --lengths fixed: gradient-cached rows vs one padded pass
TARGET_MFU = 0.40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="minilm-config",
        help="minilm-config, bert-base-config (random weights from a config: speed only), or a config dir",
    )
    p.add_argument("--lengths", default="lognormal", choices=("lognormal", "fixed"))
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="every row this long: the same as --lengths fixed --max-length N (the pre-issue-14 option)",
    )
    p.add_argument("--median", type=float, default=12.0, help="median tokens per row (lognormal)")
    p.add_argument("--sigma", type=float, default=0.5, help="log-normal shape: the tail's weight")
    p.add_argument("--batch-sizes", default="128,512,2000", help="comma-separated")
    p.add_argument(
        "--memory-batch",
        type=int,
        default=250,
        help="also run token chunks at this batch: the memory target compares the largest batch to it",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--chunk-size", type=int, default=32, help="rows per chunk for (b)")
    p.add_argument("--chunk-tokens", default="auto", help="token budget for (c), or auto (as chunk_size: auto)")
    p.add_argument(
        "--overhead-tokens",
        default="",
        help="comma-separated per-chunk overheads to try for (c); default: the device's constant",
    )
    p.add_argument("--attn", default="sdpa", help="comma-separated transformers attn_implementation values")
    p.add_argument("--mining", default="batch-hard")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--padded-quick-above",
        type=int,
        default=1000,
        help="(a) at batches above this: 1 step, no warm-up (its step is several times the others')",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast on CUDA, fp32 on CPU (as train.precision)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak; default by device name")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads per configuration (0: torch default)")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once, each on its own --threads cores")
    p.add_argument("--json", default=None, help="also write every result to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(name: str, device, attn: str, unpadded: bool = False):
    """A TripletEncoder with random weights from a config: weights do not change the speed."""
    from transformers import AutoConfig, AutoModel, BertConfig

    from tripletctl.model.encoder import TripletEncoder

    config = BertConfig(**CONFIGS[name]) if name in CONFIGS else AutoConfig.from_pretrained(name)
    try:
        encoder = AutoModel.from_config(config, attn_implementation=attn, add_pooling_layer=False)
    except TypeError:  # architectures without a pooler
        encoder = AutoModel.from_config(config, attn_implementation=attn)
    return TripletEncoder(encoder, pooling="mean", unpadded=unpadded).to(device).train(), config


def synthetic_lengths(cfg: dict, batch: int, step: int) -> list[int]:
    """Token counts of one batch: log-normal (median, sigma), clipped to [3, max_length]; seeded."""
    import numpy as np

    if cfg["lengths"] == "fixed":
        return [cfg["max_length"]] * batch
    rng = np.random.default_rng([batch, step])
    raw = np.exp(math.log(cfg["median"]) + cfg["sigma"] * rng.standard_normal(batch))
    return np.clip(np.round(raw), 3, cfg["max_length"]).astype(int).tolist()


def synthetic_batches(cfg: dict, batch: int, vocab_size: int) -> list:
    """`warmup + steps` batches of random token ids between [CLS] and [SEP], ragged (ids back to back +
    lengths, as BatchStream hands them over), lengths from `synthetic_lengths`; seeded."""
    import torch

    batches = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        lengths = torch.tensor(synthetic_lengths(cfg, batch, step))
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(min(1000, vocab_size // 2), vocab_size, (int(lengths.sum()),), generator=g)
        ends = torch.cumsum(lengths, 0)
        ids[ends - lengths], ids[ends - 1] = 101, 102  # [CLS] ... [SEP]
        batches.append((ids, lengths))
    return batches


def _device(cfg: dict):
    import torch

    device = torch.device(
        "cuda"
        if cfg["device"] == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg["device"] == "auto" else cfg["device"])
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _chunking(cfg: dict, model, device, autocast_dtype):
    """(a) one chunk of the whole batch, (b) `chunk_size` rows, (c) a token budget; and the per-chunk
    overhead the token packing charges."""
    from tripletctl.model.chunking import CHUNK_OVERHEAD_TOKENS, Chunking, resolve_chunking

    batch, mode = cfg["batch"], cfg["mode"]
    overhead = cfg.get("overhead") or CHUNK_OVERHEAD_TOKENS.get(device.type, CHUNK_OVERHEAD_TOKENS["cpu"])
    if mode == "padded":
        return Chunking(rows=batch), overhead
    if mode == "rows":
        return Chunking(rows=min(cfg["chunk_size"], batch)), overhead
    resolved = resolve_chunking(
        "auto", cfg["chunk_tokens"], batch, model, device, cfg["max_length"], autocast_dtype=autocast_dtype
    )
    return Chunking(tokens=resolved.tokens, overhead_tokens=overhead), overhead


def _peak_and_name(device) -> tuple[float, str]:
    """The peak memory of this process's steps (CUDA allocated, or the peak RSS) and the device's name."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.get_device_name(device)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak_mb, f"CPU ({torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores usable)"


def worker(cfg: dict) -> dict:
    """One configuration: build, warm up, time `steps` steps, report the median and the peaks."""
    import torch

    from tripletctl.data.stream import pad_ragged
    from tripletctl.model.chunking import embed_and_backward, plan_chunks
    from tripletctl.train import mining

    if cfg.get("cpus"):
        os.sched_setaffinity(0, cfg["cpus"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = _device(cfg)
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if bf16 else None
    torch.manual_seed(0)
    try:
        model, config = build_model(cfg["model"], device, cfg["attn"], unpadded=cfg.get("unpadded", False))
    except (ImportError, ValueError) as error:  # an attention implementation this machine lacks
        return {"error": " ".join(str(error).split())[:160]}
    if cfg["max_length"] > config.max_position_embeddings:
        raise SystemExit(f"--max-length {cfg['max_length']} > max_position_embeddings {config.max_position_embeddings}")
    params = sum(p.numel() for p in model.parameters())
    batch, mode = cfg["batch"], cfg["mode"]
    chunking, overhead = _chunking(cfg, model, device, autocast_dtype)
    step_model = torch.compile(model) if cfg["compile"] else model
    # cfg "fused" / "keep_graph" (default on): the switches bench/gpu_check.py measures on and off
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" and cfg.get("fused", True))
    labels = (torch.arange(batch) % max(1, batch // PER_CLASS)).to(device)
    loss_fn = partial(mining.mine, mode=cfg["mining"], margin=0.2)
    batches = synthetic_batches(cfg, batch, config.vocab_size)  # ragged, on the host, as BatchStream hands them over

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, real, padded, chunks, kept = [], 0, 0, 0, 0
    try:
        for i, (ids, lengths) in enumerate(batches):
            sync()
            start = time.perf_counter()
            plan = plan_chunks(lengths, chunking)
            if not cfg.get("keep_graph", True):
                plan = dataclasses.replace(plan, keep_graph=False)  # always gradient caching
            input_ids, mask = pad_ragged(ids.to(device), lengths.to(device))
            embed_and_backward(step_model, input_ids, mask, labels, loss_fn, plan, autocast_dtype=autocast_dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                real, padded = real + plan.real_tokens, padded + plan.padded_tokens
                chunks, kept = chunks + len(plan.chunks), kept + plan.keep_graph
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    peak_mb, device_name = _peak_and_name(device)
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "peak_mb": peak_mb,
        "base_mb": base_mb,
        "params": params,
        "real_tokens": real / len(times),
        "padded_ratio": padded / real,
        "chunks": chunks / len(times),
        "kept": kept / len(times),
        "budget": chunking.tokens,
        "rows": chunking.rows,
        "overhead": overhead if mode == "tokens" else None,
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
    }


def run_worker(cfg: dict, slots: queue.Queue | None = None) -> dict:
    slot = slots.get() if slots is not None else None
    try:
        if slot is not None:
            cfg = {**cfg, "cpus": slot}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=cfg.get("timeout_s"),
        )
    except subprocess.TimeoutExpired:
        proc = None
    finally:
        if slot is not None:
            slots.put(slot)
    if proc is None:
        result = {"error": f"timed out after {cfg['timeout_s']:.0f} s"}
    elif proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        result = {"error": f"worker exited {proc.returncode}"}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        "done:",
        json.dumps({k: v for k, v in {**cfg, **result}.items() if k not in ("cpus",)}),
        file=sys.stderr,
        flush=True,
    )  # a run cut short still shows what finished
    return result


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seq_len is not None:
        args.lengths, args.max_length = "fixed", args.seq_len
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    configs = _configs(args)
    rows = list(zip(configs, _run_all(configs, args)))
    if args.json:
        Path(args.json).write_text(json.dumps([{**c, **r} for c, r in rows], indent=1))
    first = next((r for _, r in rows if "device" in r), None)
    if first is None:
        print("every configuration failed")
        return 1
    on_cuda = first["device_type"] == "cuda"
    peak = peak_tflops(first["device"], args.peak_tflops) if on_cuda else None
    _print_table(rows, args, first, peak)
    return 1 if _print_verdicts(rows, args, on_cuda, peak) else 0


def _overheads(args: argparse.Namespace) -> list[int | None]:
    return [int(o) for o in args.overhead_tokens.split(",") if o] or [None]


def _configs(args: argparse.Namespace) -> list[dict]:
    """One configuration per attention, batch, mode (and per-chunk overhead for token chunks)."""
    common = {
        "model": args.model,
        "lengths": args.lengths,
        "max_length": args.max_length,
        "median": args.median,
        "sigma": args.sigma,
        "chunk_size": args.chunk_size,
        "chunk_tokens": int(args.chunk_tokens) if args.chunk_tokens.isdigit() else args.chunk_tokens,
        "mining": args.mining,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "threads": args.threads,
    }
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    configs = []
    for attn in args.attn.split(","):
        for batch in batches:
            for mode in modes:
                for overhead in _overheads(args) if mode == "tokens" else [None]:
                    quick = mode == "padded" and batch > args.padded_quick_above
                    configs.append(
                        {
                            **common,
                            "attn": attn,
                            "batch": batch,
                            "mode": mode,
                            "overhead": overhead,
                            **({"steps": 1, "warmup": 0} if quick else {}),
                        }
                    )
        if "tokens" in modes and args.memory_batch and args.memory_batch not in batches:
            configs.append({**common, "attn": attn, "batch": args.memory_batch, "mode": "tokens", "overhead": None})
    return configs


def _run_all(configs: list[dict], args: argparse.Namespace) -> list[dict]:
    """Every configuration in a worker process, `--jobs` at a time (each pinned to its own cores)."""
    slots = None
    if args.jobs > 1:
        slots = queue.Queue()
        per = max(args.threads, 1)
        usable = sorted(os.sched_getaffinity(0))
        for j in range(min(args.jobs, max(1, len(usable) // per))):
            slots.put(usable[j * per : (j + 1) * per])
    # Longest first, so the slowest configuration does not start last.
    cost = [c["batch"] * (4 if c["mode"] == "padded" else 1) for c in configs]
    order = sorted(range(len(configs)), key=lambda i: -cost[i])
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {i: pool.submit(run_worker, configs[i], slots) for i in order}
        return [futures[i].result() for i in range(len(configs))]


def _print_table(rows: list[tuple[dict, dict]], args: argparse.Namespace, first: dict, peak: float | None) -> None:
    """The header and one line per configuration; each result gets its `mfu`."""
    mem_label = "peak MiB (CUDA alloc)" if first["device_type"] == "cuda" else "peak RSS MiB"
    lengths = (
        f"log-normal lengths (median {args.median:g}, sigma {args.sigma:g}, max {args.max_length})"
        if args.lengths == "lognormal"
        else f"fixed lengths {args.max_length}"
    )
    print(
        f"device: {first['device']}   torch {first['torch']}   model: {args.model}   "
        f"params: {first['params'] / 1e6:.2f} M   {lengths}   mining {args.mining}   "
        f"jobs {args.jobs} x {args.threads or 'default'} threads   compile {args.compile}"
    )
    print(
        f"{'attn':>14} {'batch':>6} {'kind':>12} {'chunking':>18} {'chunks':>7} {'graph':>6} {'padded/real':>12} "
        f"{'step s':>8} {'samples/s':>10} {mem_label:>22} {'MFU':>6}"
    )
    for c, r in rows:
        kind = {"padded": "(a) padded", "rows": "(b) rows", "tokens": "(c) tokens"}[c["mode"]]
        if r.get("oom") or r.get("error"):
            print(f"{c['attn']:>14} {c['batch']:>6} {kind:>12}   {'OOM' if r.get('oom') else r['error']}")
            continue
        how = f"{r['rows']} rows" if r["rows"] else f"{r['budget']} tok (+{r['overhead']})"
        how += " 1 step" if c["steps"] == 1 and c["warmup"] == 0 else ""
        graph = "kept" if r["kept"] == 1 else ("cached" if r["kept"] == 0 else f"{r['kept']:.0%}")
        mfu = 6 * r["params"] * r["real_tokens"] / r["step_s"] / (peak * 1e12) if peak else None
        r["mfu"] = mfu
        print(
            f"{c['attn']:>14} {c['batch']:>6} {kind:>12} {how:>18} {r['chunks']:>7.1f} {graph:>6} "
            f"{r['padded_ratio']:>12.2f} {r['step_s']:>8.3f} {r['samples_per_s']:>10.1f} {r['peak_mb']:>22.0f} "
            f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>6}"
        )


def _print_verdicts(rows: list[tuple[dict, dict]], args: argparse.Namespace, on_cuda: bool, peak: float | None) -> bool:
    """The PASS/FAIL lines of the targets the run can judge; True when one FAILs."""
    failed = False

    def verdict(ok: bool) -> str:
        nonlocal failed
        failed |= not ok
        return "PASS" if ok else "FAIL"

    batches = [int(b) for b in args.batch_sizes.split(",")]
    first_attn, first_overhead = args.attn.split(",")[0], _overheads(args)[0]
    default_overhead = [
        (c, r) for c, r in rows if "device" in r and c["attn"] == first_attn and c["overhead"] == first_overhead
    ]

    def find(batch: int, mode: str) -> dict | None:
        return next((r for c, r in default_overhead if c["batch"] == batch and c["mode"] == mode), None)

    if args.lengths == "lognormal":
        for batch in batches:
            tokens = find(batch, "tokens")
            if tokens:
                print(
                    f"{verdict(tokens['padded_ratio'] <= TARGET_PADDING)} padding: token chunks compute "
                    f"{tokens['padded_ratio']:.3f}x the real tokens at batch {batch} (target <= {TARGET_PADDING}x)"
                )
        tokens, padded = find(SPEEDUP_BATCH, "tokens"), find(SPEEDUP_BATCH, "padded")
        if tokens and padded:
            speedup = tokens["samples_per_s"] / padded["samples_per_s"]
            if on_cuda:
                print(f"info speed: token chunks = {speedup:.2f}x (a) at batch {SPEEDUP_BATCH} (the target is for CPU)")
            else:
                print(
                    f"{verdict(speedup >= TARGET_SPEEDUP)} speed: token chunks = {speedup:.2f}x the samples/s of "
                    f"(a) at batch {SPEEDUP_BATCH} (target >= {TARGET_SPEEDUP}x)"
                )
    small, large = find(args.memory_batch, "tokens"), find(max(batches), "tokens")
    if small and large and max(batches) > args.memory_batch:
        ratio = large["peak_mb"] / small["peak_mb"]
        print(
            f"{verdict(ratio <= TARGET_MEMORY_RATIO)} memory: token chunks peak at batch {max(batches)} = "
            f"{ratio:.2f}x the peak at batch {args.memory_batch} (budget {large['budget']} tokens; "
            f"target <= {TARGET_MEMORY_RATIO}x)"
        )
    if args.lengths == "fixed":
        for batch in batches:
            rows_r, padded = find(batch, "rows"), find(batch, "padded")
            if rows_r and padded and rows_r["kept"] == 0:
                ratio = rows_r["step_s"] / padded["step_s"]
                print(
                    f"{verdict(ratio <= TARGET_OVERHEAD)} overhead: gradient-cached step = {ratio:.2f}x the "
                    f"one-pass step at batch {batch} (target <= {TARGET_OVERHEAD}x; ~1.33x expected: one extra forward)"
                )
    if peak:
        best = max(
            (r for _, r in default_overhead if r.get("mfu") is not None), key=lambda r: r["real_tokens"], default=None
        )
        if best is not None:
            print(
                f"{verdict(best['mfu'] >= TARGET_MFU)} MFU: {best['mfu']:.1%} at {best['real_tokens']:.0f} real "
                f"tokens/step (target >= {TARGET_MFU:.0%})"
            )
    return failed


if __name__ == "__main__":
    sys.exit(main())
