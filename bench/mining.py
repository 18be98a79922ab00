"""Benchmark tripletctl.train.mining: forward+backward time and peak memory per mode.

    python bench/mining.py --device cpu --sizes 500,1000,2000 --repeats 5

For each batch size B and two class structures (2 classes of B/2, B/4 classes
of 4), every mining mode is timed beside

* ``naive batch-all``: the textbook batch-all that builds B×B×B tensors (only
  where one B³ float32 tensor fits under ``--naive-limit-gb``);
* ``st semi-hard``: sentence-transformers' ``BatchSemiHardTripletLoss``, its loss
  function called directly on the embeddings (skipped when not installed).

Time: median over ``--repeats`` of one forward+backward, after one warm-up; all
methods of one case run round-robin so that load changes on a shared machine hit
them alike (the naive reference on its own afterwards).  Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the
inputs; on CPU torch's allocations are invisible to tracemalloc, so each method
runs once in a fresh subprocess and we report the growth of the process's peak
resident set (Linux ``VmHWM``, reset just before) over its resident set before
that first forward+backward: a real, allocator-inclusive measurement (Linux
only), noisy below a few MiB.

Target: at B=2000 with two classes every mode takes at most the time of
sentence-transformers' semi-hard on the same machine in the same run.

With ``--memory 0,4096,16384`` it instead reports the cost of a cross-batch memory:
every mode at each batch size with M memory rows as extra candidates (classes of 4,
the memory's first classes shared with the batch), each M's time and peak memory
beside the M = 0 figure of the same run:

    python bench/mining.py --memory 0,4096,16384 --sizes 128,512,2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tripletctl.config.choices import MINING_MODES as MODES
from tripletctl.model.distances import pairwise_distances
from tripletctl.train.mining import mine

MARGIN = 0.2
ST = "st semi-hard"
NAIVE = "naive batch-all"


def naive_batch_all(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-all the textbook way: every (a, p, n) as one B×B×B tensor."""
    d = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = (same & ~eye)[:, :, None] & (~same)[:, None, :]
    loss = torch.relu(d[:, :, None] - d[:, None, :] + margin) * valid
    return loss.sum() / (loss > 0).sum().clamp(min=1)


def st_semi_hard():
    """sentence-transformers' semi-hard loss as a plain function, or None when not installed."""
    try:
        from sentence_transformers.sentence_transformer.losses import BatchSemiHardTripletLoss
    except ImportError:
        try:
            from sentence_transformers.losses import BatchSemiHardTripletLoss
        except ImportError:
            return None
    loss = BatchSemiHardTripletLoss(model=None, margin=MARGIN)  # the model is only used by forward()
    return lambda e, y: loss.batch_semi_hard_triplet_loss(y, e)


def methods(b: int, naive_limit_gb: float, only: str | None = None) -> dict:
    """name -> fn(embeddings, labels) returning the loss; ``only`` skips importing the others."""
    out = {
        mode: (lambda e, y, mode=mode: mine(e, y, mode, MARGIN, generator=_gen(e))[0])
        for mode in MODES
        if only in (None, mode)
    }
    if b**3 * 4 <= naive_limit_gb * 2**30 and only in (None, NAIVE):
        out[NAIVE] = lambda e, y: naive_batch_all(e, y, MARGIN)
    st = st_semi_hard() if only in (None, ST) else None
    if st is not None:
        out[ST] = st
    return out


def _gen(e: torch.Tensor) -> torch.Generator:
    return torch.Generator(device=e.device).manual_seed(0)


def inputs(b: int, classes: int, dim: int, device: str):
    g = torch.Generator().manual_seed(b + classes)
    e = F.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    y = (torch.arange(b) % classes).to(device)
    return e, y


def memory_inputs(m: int, dim: int, device: str):
    """M memory rows in classes of 4: the first B/4 classes are the batch's, the rest are new."""
    g = torch.Generator().manual_seed(m)
    e = F.normalize(torch.randn(m, dim, generator=g), dim=1).to(device)
    return e, (torch.arange(m) // 4).to(device)


def with_memory(mode: str, mem: tuple | None):
    kwargs = {} if mem is None else {"memory_embeddings": mem[0], "memory_labels": mem[1]}
    return lambda e, y: mine(e, y, mode, MARGIN, generator=_gen(e), **kwargs)[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(fn, e, y, device) -> float:
    leaf = e.clone().requires_grad_(True)
    _sync(device)
    t = time.perf_counter()
    fn(leaf, y).backward()
    _sync(device)
    return time.perf_counter() - t


def peak_memory_mib(name: str, b: int, classes: int, args) -> float | None:
    if args.device.startswith("cuda"):
        e, y = inputs(b, classes, args.dim, args.device)
        fn = methods(b, args.naive_limit_gb, only=name)[name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, e, y, args.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--_memory", json.dumps([name, b, classes, args.dim, args.naive_limit_gb])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return float(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_child(spec: str) -> None:
    """Peak RSS growth of this process during one forward+backward, in MiB.

    ru_maxrss would be wrong here: Linux carries it over from the parent across
    fork+exec.  VmHWM is per address space, and writing 5 to clear_refs resets it.
    """
    name, b, classes, dim, limit, *memory = json.loads(spec)
    if memory:  # a memory-table entry: name is the mode, memory[0] = M
        e, y = inputs(b, b // 4, dim, "cpu")
        fn = with_memory(name, memory_inputs(memory[0], dim, "cpu") if memory[0] else None)
    else:
        e, y = inputs(b, classes, dim, "cpu")
        fn = methods(b, limit, only=name)[name]
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step(fn, e, y, "cpu")
    print((_status_kib("VmHWM") - before) / 1024)


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="500,1000,2000", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument(
        "--naive-limit-gb",
        type=float,
        default=0.5,
        help="run the naive B×B×B reference only where one B³ float32 tensor fits",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument(
        "--memory",
        default=None,
        help="comma-separated memory sizes M (e.g. 0,4096,16384): report the cross-batch memory's cost",
    )
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = _parse_args()
    if args._memory:
        _memory_child(args._memory)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory is not None:
        memory_table(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"# torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, dim {args.dim}, margin {MARGIN}, "
        f"median of {args.repeats} after 1 warm-up"
    )
    mem_what = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS growth of a fresh process"
    if st_semi_hard() is None:
        print("# sentence-transformers: not installed, skipped")
    print(f"| B | classes | method | fwd+bwd ms | peak MiB ({mem_what}) | vs st semi-hard |")
    print("|---:|---:|---|---:|---:|---|")
    verdicts = []
    for b in sizes:
        for classes in (2, b // 4):
            fns, med, oom = _time_case(b, classes, args)
            verdicts += _print_case(b, classes, fns, med, oom, args)
    if verdicts:
        print(
            "\ntarget (B=2000, 2 classes, mode time <= st semi-hard time): "
            + ", ".join(f"{n} {v}" if r is None else f"{n} {r:.2f}x {v}" for n, r, v in verdicts)
        )
    elif 2000 in sizes and st_semi_hard() is None:
        print("\ntarget not checked: sentence-transformers not installed, skipped")


def _time_case(b: int, classes: int, args) -> tuple[dict, dict[str, float], set[str]]:
    """Every method on one batch: its median milliseconds, and the methods that ran out of memory."""
    e, y = inputs(b, classes, args.dim, args.device)
    fns = methods(b, args.naive_limit_gb)
    times = {name: [] for name in fns}
    # Round-robin so load changes on a shared machine hit every method alike; the
    # naive reference runs on its own afterwards, since its gigabytes of short-lived
    # tensors (page faults, evicted caches) would slow down whichever method runs next.
    fast = [n for n in fns if n != NAIVE]
    oom = set()
    for name in list(fast):  # warm-up; a method that runs out of memory is reported as OOM
        try:
            step(fns[name], e, y, args.device)
        except torch.OutOfMemoryError:
            oom.add(name)
            fast.remove(name)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    for _ in range(args.repeats):
        for name in fast:
            times[name].append(step(fns[name], e, y, args.device))
    if NAIVE in fns:
        step(fns[NAIVE], e, y, args.device)
        times[NAIVE] = [step(fns[NAIVE], e, y, args.device) for _ in range(args.repeats)]
    return fns, {name: statistics.median(t) * 1e3 for name, t in times.items() if t}, oom


def _print_case(b: int, classes: int, fns: dict, med: dict[str, float], oom: set[str], args) -> list[tuple]:
    """One table line per method (with its memory); the target's verdicts at B = 2000, two classes."""
    verdicts = []
    for name in fns:
        if name in oom:
            print(f"| {b} | {classes} | {name} | OOM | | |", flush=True)
            continue
        mem = None if args.no_memory else peak_memory_mib(name, b, classes, args)
        ratio = ""
        if ST in oom and name != ST:
            ratio = "st OOM, PASS"
            if b == 2000 and classes == 2 and name in MODES:
                verdicts.append((name, None, "PASS (st OOM)"))
        elif ST in med and name != ST:
            r = med[name] / med[ST]
            verdict = "PASS" if r <= 1.0 else "FAIL"
            ratio = f"{r:.2f}x {verdict}"
            if b == 2000 and classes == 2 and name in MODES:
                verdicts.append((name, r, verdict))
        mem_s = "-" if mem is None else f"{mem:.0f}"
        print(f"| {b} | {classes} | {name} | {med[name]:.1f} | {mem_s} | {ratio} |", flush=True)
    skipped = [m for m in (NAIVE,) if m not in fns]
    if skipped:
        print(f"| {b} | {classes} | {NAIVE} | skipped: B³·4 bytes > {args.naive_limit_gb} GiB | | |")
    return verdicts


def memory_table(args) -> None:
    """Every mode at each B with each M, time and peak memory beside M = 0 (classes of 4)."""
    sizes = [int(s) for s in args.sizes.split(",")]
    memories = [int(m) for m in args.memory.split(",")]
    if 0 not in memories:
        memories = [0, *memories]
    print(
        f"# torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, dim {args.dim}, margin {MARGIN}, classes of 4, "
        f"median of {args.repeats} after 1 warm-up; cross-batch memory M rows (classes of 4, the first B/4 "
        f"classes shared with the batch)"
    )
    mem_what = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS growth of a fresh process"
    head = " | ".join(f"M={m} ms" + ("" if m == 0 else " (× M=0)") for m in memories)
    mem_head = " | ".join(f"M={m} MiB" for m in memories)
    print(f"| B | mode | {head} | {mem_head} ({mem_what}) |")
    print("|---:|---|" + "---:|" * (2 * len(memories)))
    for b in sizes:
        e, y = inputs(b, b // 4, args.dim, args.device)
        mems = {m: memory_inputs(m, args.dim, args.device) if m else None for m in memories}
        fns = {(mode, m): with_memory(mode, mems[m]) for mode in MODES for m in memories}
        times = {key: [] for key in fns}
        oom = set()
        for key in fns:  # warm-up, and out-of-memory detection
            try:
                step(fns[key], e, y, args.device)
            except torch.OutOfMemoryError:
                oom.add(key)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        for _ in range(args.repeats):  # round-robin, as above
            for key in fns:
                if key not in oom:
                    times[key].append(step(fns[key], e, y, args.device))
        for mode in MODES:
            cells, mem_cells = [], []
            base = statistics.median(times[(mode, 0)]) * 1e3 if times[(mode, 0)] else None
            for m in memories:
                if (mode, m) in oom:
                    cells.append("OOM")
                    mem_cells.append("")
                    continue
                ms = statistics.median(times[(mode, m)]) * 1e3
                cells.append(f"{ms:.1f}" if m == 0 or base is None else f"{ms:.1f} ({ms / base:.1f}×)")
                peak = None if args.no_memory else _memory_peak(mode, b, m, args)
                mem_cells.append("-" if peak is None else f"{peak:.0f}")
            print(f"| {b} | {mode} | " + " | ".join(cells) + " | " + " | ".join(mem_cells) + " |", flush=True)


def _memory_peak(mode: str, b: int, m: int, args) -> float | None:
    if args.device.startswith("cuda"):
        e, y = inputs(b, b // 4, args.dim, args.device)
        fn = with_memory(mode, memory_inputs(m, args.dim, args.device) if m else None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, e, y, args.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--_memory", json.dumps([mode, b, b // 4, args.dim, 0, m])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None


if __name__ == "__main__":
    main()
