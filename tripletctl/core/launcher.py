"""How this process was launched: alone, or as one rank under torchrun. Read from the environment
only (no torch), so the CLI's last-resort error path and the resume hints can use it even when the
machine is out of memory or file descriptors.

torchrun sets TORCHELASTIC_RUN_ID, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE
(nodes) in every rank it starts; a hint that says "continue with `tripletctl train ... --resume`"
must then repeat the launcher, or the user resumes a multi-GPU run on one process.
"""

from __future__ import annotations

import os
import shlex


def _int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun (torch.distributed.run / elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (_int("LOCAL_RANK") is not None and (_int("WORLD_SIZE") or 1) > 1)


def rank_prefix() -> str:
    """ "rank N: " under torchrun (each surviving rank prints its own line), else ""."""
    rank = _int("RANK")
    return f"rank {rank}: " if under_torchrun() and rank is not None else ""


def launcher_prefix() -> list[str]:
    """The words that start the command again the same way: `torchrun --nnodes N --nproc-per-node M
    -m tripletctl` under torchrun (the rendezvous arguments of a multi-node run are the user's to
    add: they name machines), else `tripletctl`."""
    if not under_torchrun():
        return ["tripletctl"]
    per_node = _int("LOCAL_WORLD_SIZE") or _int("WORLD_SIZE") or 1
    nodes = _int("GROUP_WORLD_SIZE") or max((_int("WORLD_SIZE") or per_node) // per_node, 1)
    words = ["torchrun"]
    if nodes > 1:
        words += [f"--nnodes={nodes}", "--rdzv-endpoint=HOST:PORT"]
    return [*words, f"--nproc-per-node={per_node}", "-m", "tripletctl"]


def command_line(arguments: list[str]) -> str:
    """`arguments` (what follows the program: `train CURRICULUM OVERRIDES... --resume`) as a shell
    command, with the launcher in front."""
    return shlex.join([*launcher_prefix(), *arguments])
