"""Distributed training on CPU with gloo and 2 processes: gathered mining equals single-process mining.

One 2-process job (this file run as a script, one subprocess per rank, torchrun's environment
variables) runs every scenario and writes its results; the tests compare them with a single-process
computation on the same global batch in the pytest process. Dropout is off so the two compute the
same function.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults

REPO = Path(__file__).resolve().parent.parent
TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"
QUICKSTART = REPO / "curricula" / "quickstart.yaml"
WORLD = 2
SEED = 0
SEQ_LEN = 12
CHUNK = 3  # smaller than the local batch of 8, and 8 % 3 != 0: an uneven last chunk
# Whole classes per rank, and class 0 on both ranks: labels must be globally consistent.
RANK_LABELS = [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 0, 0, 0, 0]]
# mining modes, and losses other than the margin (their `mine` arguments): the gathered batch is their input too
LOSS_SCENARIOS = {
    "infonce": {"mode": "batch-all", "loss": "infonce"},
    "soft-margin+guard": {"mode": "batch-hard", "loss": "soft-margin", "guard": 1.0},
}
MODES = ("batch-hard", "semi-hard", "batch-all", "hard-negative", *LOSS_SCENARIOS)
MARGIN = 0.2
# Length-sorted token-budget chunks: ranks cut their rows into different numbers of chunks; gradient
# caching (budget below a rank's padded tokens), or several chunks whose graphs are all kept.
TOKEN_CHUNKING = {"tokens-cached": (24, 2), "tokens-kept": (10_000, 0)}  # budget, overhead tokens


def _chunking(how: str):
    from tripletctl.model.chunking import Chunking

    if how == "chunked":
        return CHUNK
    budget, overhead = TOKEN_CHUNKING[how]
    return Chunking(tokens=budget, overhead_tokens=overhead)


# ---------------------------------------------------------------- shared by the ranks and the reference


def _build_model() -> torch.nn.Module:
    """Tiny BERT (dropout off, no pooler) + mean pooling + a 16-wide head + L2 norm, seeded."""
    from transformers import AutoConfig, AutoModel

    from tripletctl.model.encoder import TripletEncoder

    config = AutoConfig.from_pretrained(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(SEED)
    encoder = AutoModel.from_config(config, add_pooling_layer=False)
    torch.manual_seed(SEED)
    return TripletEncoder(encoder, pooling="mean", head=(16,), normalize=True)


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s rows, padded to the longest row *of this rank* (as stream.py pads)."""
    g = torch.Generator().manual_seed(1000 + rank)
    labels = torch.tensor(RANK_LABELS[rank])
    lengths = torch.randint(3, SEQ_LEN + 1 - 2 * rank, (len(labels),), generator=g)  # ranks pad differently
    width = int(lengths.max())
    ids = torch.randint(5, 900, (len(labels), width), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, labels


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [_rank_batch(r) for r in range(WORLD)]
    width = max(p[0].shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return (
        torch.cat([pad(p[0]) for p in parts]),
        torch.cat([pad(p[1]) for p in parts]),
        torch.cat([p[2] for p in parts]),
    )


def _loss_fn(mode: str):
    from tripletctl.train import mining

    kwargs = LOSS_SCENARIOS.get(mode, {"mode": mode})
    return lambda embeddings, labels: mining.mine(embeddings, labels, margin=MARGIN, **kwargs)


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


# ---------------------------------------------------------------- the rank side (this file as a script)


def _worker(out_dir: Path) -> None:
    from functools import partial

    from tripletctl.model.encoder import unwrap
    from tripletctl.train import distributed as D

    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    assert ctx.enabled and ctx.world_size == WORLD and ctx.device.type == "cpu"
    results: dict = {"rank": ctx.rank}

    # Gradient scale of the raw gather: L = sum(w * gather(x)) on every rank, so dL/dx_r = w_r, and
    # x_r.grad = world_size * w_r if the backward sums over ranks (1 * w_r if it averaged).
    # Uneven row counts on purpose (3 rows on rank 0, 2 on rank 1).
    x = torch.full((3 - ctx.rank, 4), float(ctx.rank + 1), requires_grad=True)
    gathered = D.gather_with_grad(x, ctx)
    w = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (gathered * w).sum().backward()
    start = 0 if ctx.rank == 0 else 3
    results["gather_rows"] = gathered[:, 0].tolist()
    results["gather_grad_ratio"] = (
        (x.grad / w[start : start + x.shape[0]].clamp(min=1e-9))[w[start : start + x.shape[0]] > 0].unique().tolist()
    )
    results["labels"] = D.gather_labels(torch.tensor(RANK_LABELS[ctx.rank][: 8 - 3 * ctx.rank]), ctx).tolist()
    results["max"] = D.all_reduce_max(ctx.rank + 1, ctx)
    # the runner's per-step decision: counters summed, a flag raised on one rank seen by all
    results["sums"] = D.all_reduce_sums([ctx.rank + 1, 10, ctx.rank == 1, False], ctx)
    results["objects"] = D.gather_object({"rank": ctx.rank}, ctx)
    results["broadcast"] = D.broadcast_object(f"from {ctx.rank}", ctx)

    # The real thing: DDP + gather + mining, plain forward and chunked gradient caching.
    ids, mask, labels = _rank_batch(ctx.rank)
    global_labels = D.gather_labels(labels, ctx)
    scenarios = []
    scenarios += [(mode, "plain") for mode in MODES]
    scenarios += [(mode, how) for mode in MODES for how in ("chunked", *TOKEN_CHUNKING)]
    results["scenarios"] = {}
    for mode, how in scenarios:
        model = D.wrap_model(_build_model(), ctx)
        model.train()
        loss_fn = _loss_fn(mode)
        if how == "plain":
            loss, _ = loss_fn(D.gather_with_grad(model(ids, mask), ctx), global_labels)
            loss.backward()
        else:
            from tripletctl.model.chunking import embed_and_backward

            loss, _, _ = embed_and_backward(
                model,
                ids,
                mask,
                global_labels,
                loss_fn,
                _chunking(how),
                gather=partial(D.gather_with_grad, ctx=ctx),
                no_sync=D.no_sync_for(model),
            )
        grads = _flat_grads(unwrap(model))
        key = f"{mode}/{how}"
        results["scenarios"][key] = {"losses": D.gather_object(float(loss), ctx)}
        # DDP must leave identical gradients on every rank.
        all_grads = [torch.empty_like(grads) for _ in range(WORLD)]
        torch.distributed.all_gather(all_grads, grads)
        results["scenarios"][key]["rank_grad_diff"] = float((all_grads[0] - all_grads[1]).abs().max())
        if ctx.is_main:
            torch.save(grads, out_dir / f"{mode}-{how}.pt")

    if ctx.is_main:
        (out_dir / "results.json").write_text(json.dumps(results))
    del model  # the last DDP wrapper: freed after cleanup, its reducer's gloo group could hang in its destructor
    D.barrier(ctx)
    D.cleanup(ctx)


# ---------------------------------------------------------------- launching


def free_port() -> int:
    """A TCP port nothing listens on right now (bind port 0 and let the OS choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def launch_ranks(args: list[str], world_size: int = WORLD, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run `python ARGS` once per rank with the environment torchrun would give it."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(world_size)
    ]
    done = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def torchrun_train(
    curriculum: str | Path,
    *overrides: str,
    nproc: int = WORLD,
    resume: bool = False,
    cwd: str | Path = REPO,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=N -m tripletctl train CURRICULUM ...` on a
    free port: the end-to-end launch (e.g. the quickstart with train.output_dir=... overrides)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "tripletctl",
        "train",
        str(curriculum),
        *overrides,
    ]
    if resume:
        cmd.append("--resume")
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dist")
    # one worker pair runs every DDP case (~1 min on 2 idle cores); the limit only catches a hang, so it
    # leaves room for a loaded machine (120 s timed out with a benchmark running beside the suite)
    runs = launch_ranks([str(Path(__file__).resolve()), "--worker", str(out)], timeout=600)
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} failed:\n{run.stdout[-4000:]}"
    return json.loads((out / "results.json").read_text()), out


# ---------------------------------------------------------------- tests


def test_gather_concatenates_in_rank_order_with_uneven_sizes(two_ranks):
    results, _ = two_ranks
    assert results["gather_rows"] == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert results["labels"] == RANK_LABELS[0] + RANK_LABELS[1][:5]


def test_gather_backward_sums_over_ranks(two_ranks):
    """The fact the DDP gradient scale rests on: all_gather's backward sums, it does not average."""
    results, _ = two_ranks
    assert results["gather_grad_ratio"] == [float(WORLD)]


def test_reductions_and_objects(two_ranks):
    results, _ = two_ranks
    assert results["max"] == 2.0
    assert results["sums"] == [3.0, 20.0, 1.0, 0.0]
    assert results["objects"] == [{"rank": 0}, {"rank": 1}]
    assert results["broadcast"] == "from 0"


def _reference(mode: str) -> tuple[float, torch.Tensor]:
    """One process, the whole global batch, one forward, no gather, no DDP."""
    model = _build_model()
    model.train()
    ids, mask, labels = _global_batch()
    loss, _ = _loss_fn(mode)(model(ids, mask), labels)
    loss.backward()
    return float(loss.detach()), _flat_grads(model)


@pytest.mark.parametrize("how", ["plain", "chunked", *TOKEN_CHUNKING])
@pytest.mark.parametrize("mode", MODES)
def test_ddp_gather_equals_single_process(two_ranks, mode, how):
    if how in TOKEN_CHUNKING:
        from tripletctl.model.chunking import plan_chunks

        plans = [plan_chunks(_rank_batch(rank)[1].sum(1), _chunking(how)) for rank in range(WORLD)]
        assert all(len(p.chunks) > 1 and p.keep_graph == (how == "tokens-kept") for p in plans)
        if how == "tokens-cached":
            assert len(plans[0].chunks) != len(plans[1].chunks)  # the ranks run different chunk counts
    results, out = two_ranks
    got = results["scenarios"][f"{mode}/{how}"]
    losses = got["losses"]
    assert losses[0] == losses[1], "every rank must compute the same loss"
    assert got["rank_grad_diff"] == 0.0, "DDP must leave identical gradients on every rank"

    ref_loss, ref_grads = _reference(mode)
    grads = torch.load(out / f"{mode}-{how}.pt")
    assert losses[0] > 0
    assert abs(losses[0] - ref_loss) < 1e-5
    assert ref_grads.abs().max() > 1e-4  # the comparison is not vacuous
    torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_check_world_size():
    from tripletctl.core.errors import TripletctlError
    from tripletctl.train.distributed import DistContext, check_world_size

    two = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    check_world_size(2, two)
    with pytest.raises(TripletctlError) as e:
        check_world_size(8, two)
    message = str(e.value)
    assert "8" in message and "world size 2" in message and "resume with world size 8" in message
    with pytest.raises(TripletctlError, match="single process"):
        check_world_size(1, two)
    check_world_size(None, DistContext(0, 1, 0, torch.device("cpu")))


def test_single_process_is_identity(monkeypatch):
    from tripletctl.train import distributed as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    x = torch.randn(3, 2)
    assert D.gather_with_grad(x, ctx) is x and D.gather_labels(x, ctx) is x
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, ctx) is model and D.no_sync_for(model) is None
    assert D.all_reduce_max(2.5, ctx) == 2.5
    assert D.all_reduce_sums([2, True, False], ctx) == [2.0, 1.0, 0.0]
    assert D.gather_object("a", ctx) == ["a"]
    assert D.local_batch_size(64, 4, ctx) == 64
    D.barrier(ctx)
    D.cleanup(ctx)


def test_local_batch_size_needs_whole_classes_per_rank():
    from tripletctl.core.errors import TripletctlError
    from tripletctl.train import distributed as D

    ctx = D.DistContext(rank=1, world_size=8, local_rank=1, device=torch.device("cpu"))
    assert D.local_batch_size(2048, 4, ctx) == 256
    with pytest.raises(TripletctlError, match="= 32 .*use 1984 or 2016"):
        D.local_batch_size(2000, 4, ctx)


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    from tripletctl.core.errors import TripletctlError
    from tripletctl.train import distributed as D

    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(TripletctlError, match="torchrun"):
        D.init_distributed("cpu")


def test_torchrun_quickstart_runs_and_resumes(tmp_path):
    """torchrun with 2 gloo processes: the quickstart completes, the batch is global, and a run
    stopped mid-phase and resumed ends with the same weights as one that never stopped."""
    from safetensors.torch import load_file

    def short(out: Path) -> list[str]:
        return [
            f"train.output_dir={out}",
            "phases.0.steps=2",
            "phases.1.steps=1",
            "phases.2.steps=2",
            "train.checkpoint_every=1",
            "eval.max_rows=200",
        ]

    def final_weights(out: Path) -> dict:
        model_dir = out / "phase-2-batch-hard" / "checkpoint" / "model"
        return load_file(str(next(model_dir.glob("model*.safetensors"))))

    straight = torchrun_train(QUICKSTART, *short(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    out = tmp_path / "run"
    first = torchrun_train(QUICKSTART, *short(out), "--max-steps", "4")  # stops inside phase 2
    assert first.returncode == 0, first.stdout[-4000:]
    second = torchrun_train(QUICKSTART, *short(out), resume=True)
    assert second.returncode == 0, second.stdout[-4000:]
    state = json.loads((out / "phase-2-batch-hard" / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    records = [
        json.loads(line)
        for line in (out / "phase-2-batch-hard" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [r["step"] for r in records] == [1, 2]
    # batch-hard mines one triplet per anchor: the whole global batch of 256, not 256 / world_size.
    assert all(r["num_triplets"] + r["skipped_anchors"] == 256 for r in records), records
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # A different world size is refused with a clear message (torchrun itself exits 1).
    third = torchrun_train(QUICKSTART, *short(out), "phases.2.steps=3", nproc=1, resume=True)
    assert third.returncode != 0 and "resume with world size 2" in third.stdout, third.stdout[-4000:]


def test_torchrun_ranks_end_phases_on_until_conditions_together(tmp_path):
    """torchrun with 2 gloo processes: `until:` conditions end phases at the same step on every rank.
    The eval plateau is decided on rank 0's held-out numbers (broadcast), the thresholds and plateau
    on the all-reduced step signals; a rank that ended a phase at another step would leave the
    collectives out of step (a hang or an error), and the run would not finish with exit 0."""
    out = tmp_path / "run"
    result = torchrun_train(
        QUICKSTART,
        f"train.output_dir={out}",
        "train.checkpoint_every=0",
        "eval.max_rows=200",
        "eval.every=1",
        "phases.0.steps=4",
        "phases.0.until={eval_plateau: {metric: recall@1, patience: 1, min_delta: 0.9}}",
        "phases.1.steps=3",
        "phases.1.until={loss_below: 1.0, min_steps: 1}",
        "phases.2.steps=3",
        "phases.2.until={plateau: {metric: batch_hard_loss, patience: 1, min_delta: 0.5}, min_steps: 2}",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    index = json.loads((out / "run.json").read_text())
    assert [p["ended_by"] for p in index["phases"]] == ["until", "until", "until"], index["phases"]
    assert [p["steps_done"] for p in index["phases"]] == [2, 1, 2]
    events = [
        json.loads(line)
        for line in (out / "phase-0-semi-hard" / "metrics.jsonl").read_text().splitlines()
        if '"event"' in line
    ]
    assert [e["event"] for e in events] == ["eval", "until", "eval"]
    assert events[1]["condition"] == "eval_plateau" and events[1]["value"] == events[0]["recall@1"]
    state = json.loads((out / "phase-2-batch-hard" / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 5


def test_torchrun_memory_holds_the_global_batch_and_resumes_exactly(tmp_path):
    """With a cross-batch memory under torchrun, every rank queues the gathered global batch, so the
    queue rank 0 checkpoints is every rank's: a resumed run (all ranks load it) ends with the same
    weights as one that never stopped, and the queue grows by the global batch per step."""
    from safetensors.torch import load_file

    def short(out: Path) -> list[str]:
        return [
            f"train.output_dir={out}",
            "phases.0.steps=2",
            "phases.1.steps=1",
            "phases.2.steps=2",
            "train.memory={size: 640, start_step: 1}",
            "eval.max_rows=100",
            "phases.0.until=null",
            "phases.1.until=null",
            "phases.2.until=null",
        ]  # fixed lengths

    straight = torchrun_train(QUICKSTART, *short(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    out = tmp_path / "run"
    first = torchrun_train(QUICKSTART, *short(out), "--max-steps", "4")  # stops inside phase 2
    assert first.returncode == 0, first.stdout[-4000:]
    second = torchrun_train(QUICKSTART, *short(out), resume=True)
    assert second.returncode == 0, second.stdout[-4000:]
    records = [
        json.loads(line)
        for line in (tmp_path / "straight" / "phase-0-semi-hard" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    from tripletctl.config.validate import load_curriculum

    batch = load_curriculum(QUICKSTART).phases[0].batch_size
    assert [r["memory_rows"] for r in records] == [0, batch]  # the global batch, not batch / world_size
    for name in ("model", "memory"):
        if name == "model":
            files = [
                next((o / "phase-2-batch-hard" / "checkpoint" / "model").glob("model*.safetensors"))
                for o in (tmp_path / "straight", out)
            ]
            a, b = (load_file(str(f)) for f in files)
        else:
            a, b = (
                torch.load(o / "phase-2-batch-hard" / "checkpoint" / "memory.pt", weights_only=True)
                for o in (tmp_path / "straight", out)
            )
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_torchrun_neighbour_batches_agree_across_ranks_and_resume_exactly(tmp_path):
    """Neighbour batches under torchrun: every rank feeds its centroids from the gathered global batch,
    so the centroids rank 0 checkpoints are every rank's. A run stopped inside a neighbour phase and
    resumed (every rank loads rank 0's centroids) ends with the weights and centroids of a straight
    run; ranks that disagreed would choose other classes after the resume."""
    from safetensors.torch import load_file

    def short(out: Path) -> list[str]:
        return [
            f"train.output_dir={out}",
            "phases.0.steps=3",
            "phases.1.steps=4",
            "phases.2.steps=1",
            "phases.1.batch_classes=neighbours",
            "phases.2.batch_classes=neighbours",
            "data.neighbour_refresh=2",
            "eval.max_rows=100",
            "phases.0.until=null",
            "phases.1.until=null",
            "phases.2.until=null",
        ]

    straight = torchrun_train(QUICKSTART, *short(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    out = tmp_path / "run"
    first = torchrun_train(QUICKSTART, *short(out), "--max-steps", "5")  # stops inside phase 1
    assert first.returncode == 0, first.stdout[-4000:]
    second = torchrun_train(QUICKSTART, *short(out), resume=True)
    assert second.returncode == 0, second.stdout[-4000:]
    checkpoints = [o / "phase-2-batch-hard" / "checkpoint" for o in (tmp_path / "straight", out)]
    a, b = (load_file(str(next((c / "model").glob("model*.safetensors")))) for c in checkpoints)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    a, b = (torch.load(c / "centroids.pt", weights_only=True) for c in checkpoints)
    assert set(a) == set(b) and len(a["ids"]) > 8
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_torchrun_mined_negatives_agree_across_ranks_and_resume_exactly(tmp_path):
    """mined_negatives under torchrun: rank 0 mines, every rank extends its batches from rank 0's table
    (the one the checkpoint holds). A run stopped inside the mined phase and resumed ends with the
    weights of a straight run; ranks with tables of their own would not."""
    from safetensors.torch import load_file

    def short(out: Path) -> list[str]:
        return [
            f"train.output_dir={out}",
            "phases.0.steps=2",
            "phases.1.steps=4",
            "phases.2.steps=1",
            "phases.1.batch_size=132",  # 22 classes of 4 + 2 mined: 11 on each rank
            "phases.1.mined_negatives={per_class: 2, pool_rows: 400}",
            "eval.max_rows=100",
            "phases.0.until=null",
            "phases.1.until=null",
            "phases.2.until=null",
        ]

    straight = torchrun_train(QUICKSTART, *short(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout[-4000:]
    assert "phase 1: mined 2 negatives for each of" in straight.stdout
    out = tmp_path / "run"
    first = torchrun_train(QUICKSTART, *short(out), "train.checkpoint_every=1", "--max-steps", "4")  # inside phase 1
    assert first.returncode == 0, first.stdout[-4000:]
    assert (out / "phase-1-hard-negative" / "checkpoint" / "mined.pt").exists()
    second = torchrun_train(QUICKSTART, *short(out), "train.checkpoint_every=1", resume=True)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "mined 2 negatives" not in second.stdout  # the checkpoint's table, not a new pass
    checkpoints = [o / "phase-2-batch-hard" / "checkpoint" for o in (tmp_path / "straight", out)]
    a, b = (load_file(str(next((c / "model").glob("model*.safetensors")))) for c in checkpoints)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]))
    else:
        sys.exit("usage: test_distributed.py --worker OUT_DIR (run by the tests, one process per rank)")


@pytest.mark.slow
def test_a_lost_peer_is_one_line_on_the_surviving_rank_with_the_torchrun_resume_command(tmp_path):
    """Rank 1 is SIGKILLed after its second step (TRIPLETCTL_FAULT=step:2 on rank 1 only): rank 0's
    next collective fails; it says so in one line (no gloo traceback), exit 5 (EXIT_WORKER_DIED), and
    the hint repeats the launcher; the checkpoint is kept and a resume finishes the run. (torchrun's
    own ChildFailedError report follows: the launcher's, not tripletctl's.)"""
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "phases.0.steps=6", "train.checkpoint_every=1", "eval.max_rows=200"]
    overrides += ["phases.1.steps=1", "phases.2.steps=1"]
    env = {**_env(), "TRIPLETCTL_FAULT": "step:2", "TRIPLETCTL_FAULT_RANK": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", "-m", "tripletctl", "train", str(QUICKSTART), *overrides]
    done = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    ours = [line for line in done.stdout.splitlines() if line.startswith("error: rank 0:")]
    assert len(ours) == 1, done.stdout[-4000:]
    assert "lost a peer rank" in ours[0] and "torchrun --nproc-per-node=2 -m tripletctl train" in ours[0], ours[0]
    assert ours[0].endswith("--resume`")
    assert (
        "[rank0]" not in done.stdout and "Traceback" not in done.stdout.split("ChildFailedError")[0].split(ours[0])[0]
    )
    assert "exitcode  : 5" in done.stdout, done.stdout[-3000:]
    assert (out / "phase-0-semi-hard" / "checkpoint" / "COMPLETE").is_file()
    resumed = torchrun_train(QUICKSTART, *overrides, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
