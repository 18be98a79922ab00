"""What one training step costs: chunked gradient caching against a naive full-batch step.

For each batch size this runs the step tripletctl runs (embed in chunks → mine the whole batch →
replay chunks with backward → AdamW) and, in the same invocation, the naive step (one forward with
graph over the whole batch) where it fits, so chunking's cost reads as a ratio. Every configuration
runs in a fresh subprocess (`--worker`): peak RSS (`ru_maxrss`) and CUDA's allocator peak are then
per configuration, and one configuration's caches cannot help or hurt the next.

    python bench/train_step.py                                 # tiny BERT, CPU, batches 250 and 2000
    python bench/train_step.py --model bert-base-config --seq-len 128 \\
        --batch-sizes 512,2000 --chunk-size 256 --steps 10     # H100/H200: bf16 autocast, TF32, SDPA

Throughput is samples/s over the median step. MFU uses the plain 6·N·T convention: N = all
parameters (embedding tables included), T = tokens per step; the re-forward of gradient caching and
attention's own FLOPs are not counted, so MFU measures useful work per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"
BERT_BASE = dict(  # bert-base-uncased's config.json, so `bert-base-config` needs no download
    model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))  # dense, no sparsity
PER_CLASS = 4  # rows per class in the synthetic batch, as data.samples_per_class defaults to
TARGET_MEMORY_RATIO = 1.25
TARGET_OVERHEAD = 1.45
TARGET_MFU = 0.40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(TINY_BERT),
                   help="config directory, hub name, or bert-base-config (random weights: speed only)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-sizes", default="250,2000", help="comma-separated")
    p.add_argument("--chunk-size", default="250", help="rows per chunk, or auto")
    p.add_argument("--mining", default="batch-hard")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (as train.precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak; default by device name")
    p.add_argument("--no-naive", action="store_true", help="skip the naive full-batch step")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_model(name: str, device):
    """A TripletEncoder with random weights from a config: weights do not change the speed."""
    from transformers import AutoConfig, AutoModel, BertConfig

    from tripletctl.model import TripletEncoder

    config = BertConfig(**BERT_BASE) if name == "bert-base-config" else AutoConfig.from_pretrained(name)
    try:
        encoder = AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    except TypeError:  # architectures without a pooler
        encoder = AutoModel.from_config(config, attn_implementation="sdpa")
    return TripletEncoder(encoder, pooling="mean").to(device).train(), config


def worker(cfg: dict) -> dict:
    """One configuration: build, warm up, time `steps` steps, report the median and the peaks."""
    import torch

    from tripletctl import mining
    from tripletctl.chunking import embed_and_backward, resolve_chunk_size

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg["device"] == "auto" else cfg["device"]))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if bf16 else None
    torch.manual_seed(0)
    model, config = build_model(cfg["model"], device)
    if cfg["seq_len"] > config.max_position_embeddings:
        raise SystemExit(f"--seq-len {cfg['seq_len']} > max_position_embeddings {config.max_position_embeddings}")
    params = sum(p.numel() for p in model.parameters())
    embedding_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    batch = cfg["batch"]
    naive = cfg["naive"]
    chunk = batch if naive else resolve_chunk_size(cfg["chunk_size"], batch, model, device, cfg["seq_len"],
                                                   autocast_dtype=autocast_dtype)
    step_model = torch.compile(model) if cfg["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000 if config.vocab_size > 2000 else 1, config.vocab_size, (batch, cfg["seq_len"]),
                        generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = (torch.arange(batch) % max(1, batch // PER_CLASS)).to(device)
    loss_fn = partial(mining.mine, mode=cfg["mining"], margin=0.2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(cfg["warmup"] + cfg["steps"]):
            sync()
            start = time.perf_counter()
            embed_and_backward(step_model, ids, mask, labels, loss_fn, chunk, autocast_dtype=autocast_dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "chunk": chunk}
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        device_name = f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    step_s = statistics.median(times)
    return {"oom": False, "chunk": chunk, "step_s": step_s, "samples_per_s": batch / step_s,
            "peak_mb": peak_mb, "base_mb": base_mb, "params": params, "embedding_params": embedding_params,
            "tokens": batch * cfg["seq_len"], "device": device_name, "device_type": device.type,
            "torch": torch.__version__}


def run_worker(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"oom": False, "error": f"worker exited {proc.returncode}", "chunk": cfg.get("chunk_size")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    common = {"model": args.model, "seq_len": args.seq_len, "chunk_size": args.chunk_size, "mining": args.mining,
              "steps": args.steps, "warmup": args.warmup, "device": args.device, "precision": args.precision,
              "compile": args.compile, "threads": args.threads}
    rows = []  # (batch, kind, result)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        chunked = run_worker({**common, "batch": batch, "naive": False})
        single = not chunked.get("error") and chunked["chunk"] >= batch
        rows.append((batch, "single pass" if single else "chunked", chunked))
        if not single and not args.no_naive:
            rows.append((batch, "naive", run_worker({**common, "batch": batch, "naive": True})))

    first = next((r for _, _, r in rows if "device" in r), None)
    if first is None:
        print("every configuration failed")
        return 1
    peak = peak_tflops(first["device"], args.peak_tflops) if first["device_type"] == "cuda" else None
    mem_label = "peak MiB (CUDA max allocated)" if first["device_type"] == "cuda" else "peak RSS MiB"
    print(f"device: {first['device']}   torch {first['torch']}   model: {args.model}   "
          f"params: {first['params'] / 1e6:.2f} M ({first['embedding_params'] / 1e6:.2f} M embeddings)   "
          f"seq-len {args.seq_len}   mining {args.mining}   compile {args.compile}")
    print(f"{'batch':>6} {'kind':>12} {'chunk':>6} {'step s':>8} {'samples/s':>10} {mem_label:>30} "
          f"{'above start MiB':>16} {'MFU':>6}")
    for batch, kind, r in rows:
        if r.get("oom") or r.get("error"):
            print(f"{batch:>6} {kind:>12} {r['chunk']!s:>6}   {'OOM' if r.get('oom') else r['error']}")
            continue
        mfu = 6 * r["params"] * r["tokens"] / r["step_s"] / (peak * 1e12) if peak else None
        r["mfu"] = mfu
        print(f"{batch:>6} {kind:>12} {r['chunk']:>6} {r['step_s']:>8.3f} {r['samples_per_s']:>10.1f} "
              f"{r['peak_mb']:>30.0f} {r['peak_mb'] - r['base_mb']:>16.0f} "
              f"{f'{mfu:.1%}' if mfu is not None else 'n/a':>6}")
    print("MFU: 6·N·T / step time / peak, N = all parameters, re-forward and attention FLOPs not counted"
          + (f"; peak {peak:.0f} TFLOPS" if peak else "; no GPU peak known (pass --peak-tflops)"))

    ok = [(b, k, r) for b, k, r in rows if not r.get("oom") and not r.get("error")]
    failed = False
    by_batch = sorted((b, r) for b, k, r in ok if k != "naive")
    if len(by_batch) >= 2 and by_batch[0][1]["chunk"] == by_batch[-1][1]["chunk"]:
        (small_b, small), (large_b, large) = by_batch[0], by_batch[-1]
        ratio = large["peak_mb"] / small["peak_mb"]
        delta = (large["peak_mb"] - large["base_mb"]) / max(small["peak_mb"] - small["base_mb"], 1e-9)
        verdict = "PASS" if ratio <= TARGET_MEMORY_RATIO else "FAIL"
        failed |= verdict == "FAIL"
        print(f"{verdict} memory: peak at batch {large_b} = {ratio:.2f}x peak at batch {small_b} with chunk "
              f"{small['chunk']} (target <= {TARGET_MEMORY_RATIO}x; above-start ratio {delta:.2f}x)")
    for batch in sorted({b for b, _, _ in ok}):
        chunked = next((r for b, k, r in ok if b == batch and k == "chunked"), None)
        naive = next((r for b, k, r in ok if b == batch and k == "naive"), None)
        if chunked and naive:
            ratio = chunked["step_s"] / naive["step_s"]
            verdict = "PASS" if ratio <= TARGET_OVERHEAD else "FAIL"
            failed |= verdict == "FAIL"
            print(f"{verdict} overhead: chunked step = {ratio:.2f}x naive at batch {batch} "
                  f"(target <= {TARGET_OVERHEAD}x; ~1.33x expected: one extra forward)")
    if peak:
        best = max((r for _, k, r in ok if k != "naive"), key=lambda r: r["tokens"], default=None)
        if best is not None:
            verdict = "PASS" if best["mfu"] >= TARGET_MFU else "FAIL"
            failed |= verdict == "FAIL"
            print(f"{verdict} MFU: {best['mfu']:.1%} at {best['tokens']} tokens/step (target >= {TARGET_MFU:.0%})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
