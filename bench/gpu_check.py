"""The GPU check: one command that proves tripletctl's GPU path end to end and measures it, in one table.

    python bench/gpu_check.py            # on a CUDA machine: about 8 minutes on one H100 / H200
    python bench/gpu_check.py --smoke    # anywhere (CPU): the same script at tiny sizes, about a minute

It installs nothing from the network: wheels the device image lacks travel in the git-ignored `.whl/`
folder (`bench/fetch_gpu_wheels.sh` fills it) and are installed with
`pip install --no-index --no-deps --target /tmp/site` when present. It prints ONE PASS/FAIL table:

  (a) cuda     the `cuda` pytest tests (tests/test_cuda.py): bf16 mining, chunked gradient caching under
               autocast, the chunk probe, kept graphs, memory flat in the batch, fused AdamW, compile,
               resume equality on the device;
  (b) e2e      `tripletctl train` of a facenet-shaped curriculum (semi-hard -> hard-negative -> batch-hard,
               batches 500 -> 1000 -> 2000) on a corpus generated here, with a BERT-base-sized encoder
               built from a config, `kill -9` mid-phase, `--resume`, then `tripletctl eval` and
               `tripletctl inspect-collapse`: every exit code and the resumed metrics checked;
  (c) perf     MFU (6*N*T, as bench/train_step.py) at batch 2000 on fixed 128-token rows and samples/s
               on long-tailed (log-normal) rows, each beside the padded one-chunk step, and each speed
               switch (torch.compile, fused AdamW, kept graphs) on and off;
  (d) st       samples/s beside sentence-transformers' BatchHardTripletLoss and
               CachedMultipleNegativesRankingLoss on the same model, batch and rows.

Sections run in that order under one time budget (`--budget-s`); what the budget leaves no time for is a
SKIP row, never a hang. The step measurements run bench/train_step.py's worker (each configuration in
its own process on CUDA, so peaks and OOMs stay per configuration). Exit code 1 when any row FAILs.
The table and every figure also go to --out (default $OUT when set, else /tmp/gpu_check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the check's parts, train_step

from gpu_check_base import (  # noqa: E402
    CHECK_WIDTH,
    REPO,
    SITE,
    WHEELS,
    Clock,
    Row,
    Sizes,
    one_line,
    run_logged,
    sizes_for,
)
from gpu_check_e2e import end_to_end  # noqa: E402
from gpu_check_steps import measure_named, performance, run_configs_here, st_worker, step_configs  # noqa: E402

# ------------------------------------------------------------------------------- environment


def install_wheels(rows: list[Row]) -> dict[str, str]:
    """pip-install the carried wheels into /tmp/site (no index, no deps) and put it first on the path."""
    env = dict(os.environ)
    wheels = sorted(WHEELS.glob("*.whl"))
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = proc.returncode == 0
        rows.append(
            Row(
                "PASS" if ok else "FAIL",
                "env",
                f"install {len(wheels)} carried wheels into {SITE}",
                ", ".join(w.name.split("-")[0] for w in wheels) if ok else one_line(proc.stderr),
            )
        )
        if ok:
            sys.path.insert(0, str(SITE))
            env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def environment(rows: list[Row], env: dict[str, str]) -> dict:
    """Versions and the device, read in a child process (this one never touches CUDA)."""
    probe = (
        "import json, importlib.metadata as m, torch\n"
        "out = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
        "out['device'] = torch.cuda.get_device_name(0) if out['cuda'] else 'CPU'\n"
        "for name in ('transformers', 'datasets', 'sentence-transformers', 'pyarrow', 'tokenizers'):\n"
        "    try:\n"
        "        out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[name] = None\n"
        "for module in ('datasets', 'sentence_transformers', 'tripletctl.cli'):\n"
        "    try:\n"
        "        __import__(module)\n"
        "    except Exception as e:\n"
        "        out['import ' + module] = type(e).__name__ + ': ' + str(e)[:200]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        rows.append(Row("FAIL", "env", "python, torch and the packages import", one_line(proc.stderr)))
        return {"cuda": False, "device": "unknown"}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    broken = {k: v for k, v in info.items() if k.startswith("import ")}
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "datasets", "sentence-transformers"))
    rows.append(
        Row(
            "FAIL" if broken else "PASS",
            "env",
            f"device {info['device']}; tripletctl, datasets, sentence-transformers import",
            "; ".join(broken.values()) if broken else versions,
        )
    )
    return info


# ------------------------------------------------------------------------------- (a) the cuda tests


def cuda_tests(rows: list[Row], sizes: Sizes, env: dict, work: Path, clock: Clock, on_cuda: bool) -> None:
    if not on_cuda and not sizes.smoke:
        rows.append(Row("SKIP", "cuda", "tests/test_cuda.py", "no CUDA device (run with --smoke on a CPU)"))
        return
    xml = work / "cuda-tests.xml"
    test_env = dict(env)
    if not on_cuda:
        test_env["TRIPLETCTL_CUDA_TESTS_ON_CPU"] = "1"  # --smoke: what can run on the CPU runs there
        test_env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    cmd += ["-o", "addopts=", f"--junitxml={xml}"]
    limit = min(clock.left() - 60, sizes.cuda_tests_s)
    code, output = run_logged(cmd, work / "cuda-tests.log", test_env, timeout=limit)
    if code is not None and xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "?")
            seconds = float(case.get("time") or 0)
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if failed is not None:
                verdict, figure = "FAIL", one_line(failed.get("message") or failed.text or "")
            elif skipped is not None:
                verdict, figure = "SKIP", one_line(skipped.get("message") or "")
            else:
                verdict, figure = "PASS", f"{seconds:.1f} s"
            rows.append(Row(verdict, "cuda", name.removeprefix("test_"), figure))
        return
    # timed out (or pytest died): what the verbose log says finished, then the reason
    done = re.findall(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, flags=re.M)
    for name, outcome in done:
        verdict = {"PASSED": "PASS", "SKIPPED": "SKIP"}.get(outcome, "FAIL")
        rows.append(Row(verdict, "cuda", name.removeprefix("test_"), outcome.lower()))
    why = f"timed out after {limit:.0f} s" if code is None else f"pytest exited {code}: {one_line(output)}"
    rows.append(Row("FAIL", "cuda", f"tests/test_cuda.py ({len(done)} tests finished)", why))


# ------------------------------------------------------------------------------- the table


def print_table(rows: list[Row], header: str) -> str:
    width = min(CHECK_WIDTH, max(len(r.check) for r in rows))

    def cut(text: str, limit: int) -> str:
        return text if len(text) <= limit else text[: limit - 3] + "..."

    lines = [header, f"{'':4}  {'part':4}  {'check':{width}}  figure  [target]"]
    for r in rows:
        target = f"  [{r.target}]" if r.target else ""
        lines.append(f"{r.verdict:4}  {r.section:4}  {cut(r.check, width):{width}}  {cut(r.figure, 150)}{target}")
    counts = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "FAIL", "SKIP", "INFO")}
    lines.append(
        " ".join(f"{n} {v}" for v, n in counts.items()) + f"   overall: {'FAIL' if counts['FAIL'] else 'PASS'}"
    )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--sections", default="cuda,e2e,perf", help="comma-separated, of cuda, e2e, perf (perf holds st)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 460 s, --smoke 420 s)")
    p.add_argument("--out", default=None, help="where the table and figures go (default $OUT, else /tmp/gpu_check)")
    p.add_argument(
        "--e2e-compile", action="store_true", help="the end-to-end run with train.compile: auto (the CUDA default)"
    )
    p.add_argument("--e2e-tiny", action="store_true", help="without --smoke: the GPU-sized e2e with the tiny BERT")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (corpus, run, logs)")
    p.add_argument("--no-install", action="store_true", help="do not install the carried .whl/ wheels")
    p.add_argument("--st-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-configs", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.st_worker is not None:
        print(json.dumps(st_worker(json.loads(args.st_worker))))
        return 0
    if args.run_configs is not None:
        return run_configs_here(Path(args.run_configs))
    sizes = sizes_for(args.smoke, args.budget_s)
    if args.e2e_tiny:  # the GPU run's corpus, batches and steps with the tiny BERT: the e2e's data path on a CPU
        sizes = dataclasses.replace(sizes, bert=sizes_for(True, None).bert, lr=1e-3)
    if args.e2e_compile:
        sizes = dataclasses.replace(sizes, e2e_compile="auto")
    clock = Clock(sizes.budget_s)
    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check-work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    install = not args.no_install and not args.smoke
    env = install_wheels(rows) if install else _plain_env()
    info = environment(rows, env)
    on_cuda = bool(info.get("cuda"))
    if not on_cuda and not args.smoke:
        rows.append(Row("FAIL", "env", "a CUDA device", "none found: run with --smoke on a CPU"))
    sections = set(args.sections.split(","))
    named = step_configs(sizes, on_cuda, work) if "perf" in sections else []
    got: dict[str, dict] = {}
    e2e_reserve = (sizes.e2e_reserve_s if "e2e" in sections else 0) + 10

    def steps(extra: bool, reserve_s: float) -> None:
        part = [(n, c) for n, c in named if bool(c.get("extra")) == extra]
        measure_named(part, env, clock, on_cuda, work, reserve_s, got)

    # What matters most first: the tests, the core figures, the end-to-end run, then the switches.
    for name, label, run in (
        ("cuda", "cuda", lambda: cuda_tests(rows, sizes, env, work, clock, on_cuda)),
        ("perf", "perf (core)", lambda: steps(extra=False, reserve_s=e2e_reserve)),
        ("e2e", "e2e", lambda: end_to_end(rows, sizes, env, work, clock)),
        ("perf", "perf (switches)", lambda: steps(extra=True, reserve_s=0)),
        ("perf", "perf rows", lambda: performance(rows, sizes, named, got, info)),
    ):
        if name not in sections:
            continue
        if clock.left() < 30 and label != "perf rows":
            rows.append(Row("SKIP", name, f"{label}: the whole section", f"time budget ({clock.left():.0f} s left)"))
            continue
        started = time.monotonic()
        try:
            run()
        except Exception as e:  # a bug in this script: say so in the table, keep the other sections
            rows.append(Row("FAIL", name, f"{label}: the section raised", f"{type(e).__name__}: {one_line(str(e))}"))
        print(f"[gpu_check] {label} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: ("env", "cuda", "e2e", "perf", "st").index(r.section))
    header = (
        f"tripletctl GPU check{' --smoke' if args.smoke else ''}   {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"   device {info.get('device')}   torch {info.get('torch')}   transformers {info.get('transformers')}"
        f"   sentence-transformers {info.get('sentence-transformers')}   {clock.elapsed():.0f} s"
    )
    table = print_table(rows, header)
    (out / "gpu_check.txt").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    for name in ("steps.json", "cuda-tests.log", "e2e/collapse.png"):  # at most 8 files come back from $OUT
        if (work / name).exists():
            shutil.copy(work / name, out / Path(name).name)
    logs = sorted((work / "e2e").glob("*.log"), key=lambda p: p.stat().st_mtime) if (work / "e2e").exists() else []
    (out / "e2e-logs.txt").write_text("".join(f"===== {p.name}\n{p.read_text(errors='replace')}\n" for p in logs))
    if args.keep_work:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


def _plain_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


if __name__ == "__main__":
    sys.exit(main())
