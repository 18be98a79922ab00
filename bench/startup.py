"""How long `tripletctl validate` takes to start, beside the same command with datasets and
transformers imported up front (what the CLI did before it quietened them only in the commands that
load models), in the same run.

    python bench/startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMAND = (
    "import sys; sys.argv = ['tripletctl', 'validate', 'quickstart']; {pre}from tripletctl.cli import main; main()"
)
VARIANTS = {
    "validate (now)": "",
    "validate + datasets, transformers imported first (before)": "import datasets, transformers; ",
}


def seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    medians = {}
    for name, pre in VARIANTS.items():
        code = COMMAND.format(pre=pre)
        seconds(code)  # warm the file cache
        times = [seconds(code) for _ in range(args.repeats)]
        medians[name] = statistics.median(times)
        print(f"{name:<60} median {medians[name]:.3f} s  ({', '.join(f'{t:.2f}' for t in times)})")
    now, before = medians.values()
    print(f"speed-up: {before / now:.1f}x")


if __name__ == "__main__":
    main()
