"""The GPU check's step measurements (bench/gpu_check.py, sections perf and st): bench/train_step.py's
worker and a sentence-transformers step on the same model, batch and rows, each configuration in its
own process on CUDA, and the PASS/FAIL rows made from what they measured."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import train_step
from gpu_check_base import (
    REPO,
    TARGET_LONG_SPEEDUP,
    TARGET_MFU,
    TARGET_PADDING,
    TARGET_VS_ST,
    TINY_BERT,
    Clock,
    Row,
    Sizes,
    one_line,
    run_logged,
)

GPU_CHECK = REPO / "bench" / "gpu_check.py"  # its --st-worker and --run-configs run these in a child process


def _st_model(cfg: dict, device):
    """The same random encoder as train_step's (saved once) as a SentenceTransformer with mean pooling
    and normalisation, and the configuration's loss on it."""
    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    torch.manual_seed(0)
    model_dir = Path(cfg["model_dir"])
    if not (model_dir / "config.json").exists():  # the same random encoder as train_step's, saved once
        triplet, _ = train_step.build_model(cfg["model"], "cpu", "sdpa")
        triplet.encoder.save_pretrained(model_dir)
        shutil.copy(TINY_BERT / "vocab.txt", model_dir / "vocab.txt")
        shutil.copy(TINY_BERT / "tokenizer_config.json", model_dir / "tokenizer_config.json")
    transformer = models.Transformer(str(model_dir), max_seq_length=cfg["max_length"])
    hidden = transformer.get_word_embedding_dimension()
    model = SentenceTransformer(modules=[transformer, models.Pooling(hidden, "mean"), models.Normalize()])
    model = model.to(device).train()
    if cfg["loss"] == "batch-hard":
        loss_fn = losses.BatchHardTripletLoss(model, margin=0.2)
    else:
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=cfg["mini_batch"])
    return model, loss_fn


def st_worker(cfg: dict) -> dict:
    """One sentence-transformers step configuration on the same model, batch and rows as train_step's."""
    import resource

    import torch

    threads = cfg.get("threads") or 0
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model, loss_fn = _st_model(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = cfg["batch"]
    labels = (torch.arange(batch) % max(1, batch // train_step.PER_CLASS)).to(device)
    vocab = model[0].auto_model.config.vocab_size
    batches = train_step.synthetic_batches(cfg, batch, vocab)

    def features(ids, lengths, rows=None):
        """Padded to the longest row, as sentence-transformers' collator does."""
        width = int(lengths.max())
        padded = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        padded[mask] = ids
        if rows is not None:
            padded, mask = padded[rows], mask[rows]
        return {"input_ids": padded.to(device), "attention_mask": mask.long().to(device)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, real = [], 0
    try:
        for i, (ids, lengths) in enumerate(batches):
            sync()
            start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if cfg["loss"] == "batch-hard":
                    loss = loss_fn([features(ids, lengths)], labels)
                else:  # B texts as B/2 (anchor, positive) pairs: the same texts per step
                    rows = torch.arange(batch)
                    anchors, positives = features(ids, lengths, rows[0::2]), features(ids, lengths, rows[1::2])
                    loss = loss_fn([anchors, positives], labels[: batch // 2])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                real += int(lengths.sum())
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "peak_mb": peak_mb,
        "params": params,
        "real_tokens": real / len(times),
        "device_type": device.type,
    }


def measure(configs: list[dict], env: dict, clock: Clock, separate: bool, work: Path) -> list[dict]:
    """Run each configuration (in its own process when `separate`, else all in one helper process);
    a configuration the budget leaves no time for gets {"skipped": ...}."""
    results: list[dict] = []
    if not separate:
        script = work / "configs.json"
        script.write_text(json.dumps(configs))
        cmd = [sys.executable, str(GPU_CHECK), "--run-configs", str(script)]
        code, output = run_logged(cmd, work / "configs.log", env, timeout=clock.left() - 10)
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        results = [json.loads(line[len("RESULT ") :]) for line in lines]
        if code != 0:
            error = "timed out" if code is None else f"exited {code}: {one_line(output)}"
            results += [{"error": error}] * (len(configs) - len(results))
        return results
    for cfg in configs:
        left = clock.left() - 20
        if left < cfg.get("needs_s", 30):
            results.append({"skipped": f"time budget ({max(left, 0):.0f} s left)"})
            continue
        cfg = {**cfg, "timeout_s": left}
        if cfg["kind"] == "st":
            cmd = [sys.executable, str(GPU_CHECK), "--st-worker", json.dumps(cfg)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=left)
                if proc.returncode == 0:
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    results.append({"error": f"exited {proc.returncode}: {one_line(proc.stderr)}"})
            except subprocess.TimeoutExpired:
                results.append({"error": f"timed out after {left:.0f} s"})
        else:
            saved = dict(os.environ)
            os.environ.update(env)  # run_worker starts its subprocess with this process's environment
            try:
                results.append(train_step.run_worker(cfg))
            finally:
                os.environ.clear()
                os.environ.update(saved)
    return results


def run_configs_here(path: Path) -> int:
    """--run-configs: every configuration of the file in this process, one RESULT line each (smoke)."""
    for cfg in json.loads(path.read_text()):
        try:
            result = st_worker(cfg) if cfg["kind"] == "st" else train_step.worker(cfg)
        except Exception as e:  # reported in the table, not a traceback that hides the rest
            result = {"error": f"{type(e).__name__}: {one_line(str(e))}"}
        print("RESULT " + json.dumps(result), flush=True)
    return 0


def step_configs(sizes: Sizes, on_cuda: bool, work: Path) -> list[tuple[str, dict]]:
    """(name, cfg) in priority order: what the budget cuts first comes last."""
    base = {
        "kind": "tripletctl",
        "model": sizes.step_model,
        "attn": "sdpa",
        "device": "auto",
        "precision": "auto",
        "threads": 1 if sizes.smoke else 0,
        "mining": "batch-hard",
        "steps": sizes.timed_steps,
        "warmup": sizes.warmup,
        "chunk_size": 32,
        "chunk_tokens": "auto",
        "median": 12.0,
        "sigma": 0.5,
        "overhead": None,
        "compile": on_cuda,  # tripletctl's default on CUDA (train.compile: auto)
        "fused": True,
        "keep_graph": True,
        "needs_s": 30,
    }
    fixed = {"lengths": "fixed", "max_length": sizes.fixed_len}
    long = {"lengths": "lognormal", "max_length": sizes.long_max}
    big, small = sizes.big_batch, sizes.small_batch
    st = {
        **base,
        **fixed,
        "kind": "st",
        "model_dir": str(work / "st-model"),
        "mini_batch": sizes.st_mini_batch,
        "compile": False,
    }
    configs = [
        ("fixed-padded", {**base, **fixed, "batch": big, "mode": "padded", "compile": False}),
        ("fixed-default", {**base, **fixed, "batch": big, "mode": "tokens", "needs_s": 120}),
        ("long-padded", {**base, **long, "batch": big, "mode": "padded", "compile": False}),
        ("long-tokens", {**base, **long, "batch": big, "mode": "tokens", "compile": False}),
        ("st-batch-hard-small", {**st, "batch": small, "loss": "batch-hard"}),
        ("st-batch-hard-big", {**st, "batch": big, "loss": "batch-hard"}),
        ("small-default", {**base, **fixed, "batch": small, "mode": "tokens", "needs_s": 90}),
        ("st-cached-mnrl-big", {**st, "batch": big, "loss": "cached-mnrl"}),
        ("st-cached-mnrl-small", {**st, "batch": small, "loss": "cached-mnrl", "extra": True}),
    ]
    if on_cuda:  # the switches, each off against the default run above
        extra = {**base, "extra": True, "batch": big, "mode": "tokens"}
        configs += [
            ("fixed-no-compile", {**extra, **fixed, "compile": False}),
            ("fixed-no-fused", {**extra, **fixed, "fused": False, "needs_s": 60}),
            ("fixed-no-keep", {**extra, **fixed, "keep_graph": False, "needs_s": 60}),
            ("long-tokens-compiled", {**extra, **long, "needs_s": 120}),
            ("long-unpadded", {**extra, **long, "compile": False, "unpadded": True}),
        ]
    return configs


def mfu(result: dict, peak_tflops: float | None) -> float | None:
    if not peak_tflops or "step_s" not in result:
        return None
    return 6 * result["params"] * result["real_tokens"] / result["step_s"] / (peak_tflops * 1e12)


def describe(result: dict | None) -> str:
    if result is None:
        return "not run"
    if result.get("oom"):
        return "OOM"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result['samples_per_s']:,.0f} samples/s"


def measure_named(
    named: list[tuple[str, dict]], env: dict, clock: Clock, on_cuda: bool, work: Path, reserve_s: float, got: dict
) -> None:
    """Measure `named` configurations into `got`, leaving `reserve_s` of the budget for what follows."""
    if not named:
        return
    inner = Clock(clock.left() - reserve_s)
    results = measure([c for _, c in named], env, inner, separate=on_cuda, work=work)
    got.update(zip([n for n, _ in named], results))
    steps = work / "steps.json"
    saved = json.loads(steps.read_text()) if steps.exists() else []
    saved += [{"name": n, **c, **r} for (n, c), r in zip(named, results)]
    steps.write_text(json.dumps(saved, indent=1))


class _Measured:
    """What the perf and st rows read: the results by configuration name, the device's peak, and how a
    target is judged (on a CPU, --smoke, a target row only says the measurement ran)."""

    def __init__(self, got: dict, info: dict):
        self.got = got
        self.on_cuda = bool(info.get("cuda"))
        self.peak = train_step.peak_tflops(info.get("device", ""), None) if self.on_cuda else None
        self.note = "" if self.on_cuda else " (smoke: ran)"

    def ran(self, name: str) -> dict | None:
        r = self.got.get(name)
        return r if r and "step_s" in r else None

    def judged(self, ok: bool) -> str:
        return ("PASS" if ok else "FAIL") if self.on_cuda else "PASS"  # --smoke: it ran; targets are for the GPU


def performance(rows: list[Row], sizes: Sizes, named: list[tuple[str, dict]], got: dict, info: dict) -> None:
    """The (c) perf and (d) st rows from the measured configurations `got`."""
    measured = _Measured(got, info)
    for name, cfg in named:
        r = got.get(name)
        if not measured.ran(name):
            baseline = cfg["kind"] == "st" or cfg["mode"] == "padded"  # may run out of memory: that is a figure
            if r is None or "skipped" in r:
                verdict = "SKIP"
            else:
                verdict = "INFO" if r.get("oom") and baseline else "FAIL"
            rows.append(Row(verdict, "perf", f"step {name}", describe(r)))
    _mfu_row(rows, sizes, measured)
    _long_tailed_rows(rows, sizes, measured)
    _switch_rows(rows, sizes, measured)
    _st_rows(rows, sizes, measured)


def _mfu_row(rows: list[Row], sizes: Sizes, m: _Measured) -> None:
    """(c) MFU at the big batch, fixed rows, beside the padded one-chunk step."""
    default, padded = m.ran("fixed-default"), m.ran("fixed-padded")
    if not default:  # the padded one-chunk step may run out of memory at this batch: then it says OOM
        return
    mfu_default, mfu_padded = mfu(default, m.peak), mfu(padded, m.peak) if padded else None
    figure = (
        f"tripletctl {default['samples_per_s']:,.0f} samples/s"
        + (f" MFU {mfu_default:.1%}" if mfu_default is not None else "")
        + f" (chunks {default['chunks']:.0f}, graph {'kept' if default['kept'] == 1 else 'cached'}); "
        f"padded one-chunk eager {describe(m.got.get('fixed-padded'))}"
        + (f" MFU {mfu_padded:.1%}" if mfu_padded is not None else "")
    )
    rows.append(
        Row(
            m.judged(mfu_default is not None and mfu_default >= TARGET_MFU),
            "perf",
            f"MFU at batch {sizes.big_batch}, {sizes.fixed_len}-token rows (6*N*T, peak {m.peak or 'n/a'} TFLOPS)",
            figure,
            f">= {TARGET_MFU:.0%}" + m.note,
        )
    )


def _long_tailed_rows(rows: list[Row], sizes: Sizes, m: _Measured) -> None:
    """(c) long-tailed rows: computed tokens and samples/s against the padded one-chunk step; then
    compiled and unpadded (varlen) token chunks, for information."""
    big = sizes.big_batch
    tokens, long_padded = m.ran("long-tokens"), m.ran("long-padded")
    if tokens and long_padded:
        speedup = tokens["samples_per_s"] / long_padded["samples_per_s"]
        rows.append(
            Row(
                m.judged(tokens["padded_ratio"] <= TARGET_PADDING),
                "perf",
                f"long-tailed rows, batch {big}: computed / real tokens with token chunks",
                f"{tokens['padded_ratio']:.3f}x ({long_padded['padded_ratio']:.2f}x padded to the batch max)",
                f"<= {TARGET_PADDING}x" + m.note,
            )
        )
        rows.append(
            Row(
                m.judged(speedup >= TARGET_LONG_SPEEDUP),
                "perf",
                f"long-tailed rows, batch {big}: token chunks vs the padded one-chunk step (both eager)",
                f"{speedup:.2f}x ({tokens['samples_per_s']:,.0f} vs {long_padded['samples_per_s']:,.0f} samples/s)",
                f">= {TARGET_LONG_SPEEDUP}x" + m.note,
            )
        )
    compiled = m.ran("long-tokens-compiled")
    if tokens and compiled:
        rows.append(
            Row(
                "INFO",
                "perf",
                "switch compile on long-tailed rows (changing chunk widths)",
                f"{compiled['samples_per_s'] / tokens['samples_per_s']:.2f}x eager",
            )
        )
    unpadded = m.ran("long-unpadded")
    if tokens and unpadded:
        rows.append(
            Row(
                "INFO",
                "perf",
                f"model.unpadded (varlen) on long-tailed rows, batch {big}: vs token chunks, both eager",
                f"{unpadded['samples_per_s'] / tokens['samples_per_s']:.2f}x "
                f"({unpadded['samples_per_s']:,.0f} vs {tokens['samples_per_s']:,.0f} samples/s)",
            )
        )


def _switch_rows(rows: list[Row], sizes: Sizes, m: _Measured) -> None:
    """Each speed switch off against the default step, for information."""
    default = m.ran("fixed-default")
    for name, what in (
        ("fixed-no-compile", "torch.compile on / off"),
        ("fixed-no-fused", "fused AdamW on / off"),
        ("fixed-no-keep", "kept graphs on / off (off: gradient caching's re-forward)"),
    ):
        off = m.ran(name)
        if default and off:
            rows.append(
                Row(
                    "INFO",
                    "perf",
                    f"switch {what}, batch {sizes.big_batch}",
                    f"{default['samples_per_s'] / off['samples_per_s']:.2f}x "
                    f"({default['samples_per_s']:,.0f} vs {off['samples_per_s']:,.0f} samples/s)",
                )
            )


def _st_rows(rows: list[Row], sizes: Sizes, m: _Measured) -> None:
    """(d) sentence-transformers on the same model, batch and rows."""
    small, fixed_len, note = sizes.small_batch, sizes.fixed_len, m.note
    for batch, mine_name, bh_name, cm_name in (
        (small, "small-default", "st-batch-hard-small", "st-cached-mnrl-small"),
        (sizes.big_batch, "fixed-default", "st-batch-hard-big", "st-cached-mnrl-big"),
    ):
        mine = m.ran(mine_name)
        bh, cm = m.got.get(bh_name), m.got.get(cm_name)
        if mine is None or bh is None:
            continue
        figure = f"tripletctl {describe(mine)}; BatchHardTripletLoss {describe(bh)}; CachedMNRL {describe(cm)}"
        if batch == small:
            ok = "step_s" in bh and mine["samples_per_s"] >= TARGET_VS_ST * bh["samples_per_s"]
            ratio = f" = {mine['samples_per_s'] / bh['samples_per_s']:.2f}x" if "step_s" in bh else ""
            rows.append(
                Row(
                    m.judged(ok),
                    "st",
                    f"batch {batch}, {fixed_len}-token rows: tripletctl vs BatchHardTripletLoss{ratio}",
                    figure,
                    f">= {TARGET_VS_ST}x" + note,
                )
            )
        else:
            rows.append(
                Row(
                    m.judged(True),
                    "st",
                    f"batch {batch}, {fixed_len}-token rows: tripletctl runs (ST's plain loss: {describe(bh)})",
                    figure,
                    "runs" + note,
                )
            )
        if not ("step_s" in bh or bh.get("oom")) or (cm is not None and not ("step_s" in cm or cm.get("oom"))):
            rows.append(Row("FAIL", "st", f"batch {batch}: a sentence-transformers step did not run", figure))
