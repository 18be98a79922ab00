"""Pictures: a whole training run (`tripletctl plot RUN_DIR`) and the inspect-collapse figure.

matplotlib with the Agg backend (no display needed, works on servers and in CI). Input is only
what the runner writes to disk (run.json and each phase's metrics.jsonl), so a run can be plotted
while it trains, after it crashed, or on another machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tripletctl.config.loss_rules import DEFAULT_LOSS, LOSS_RULES
from tripletctl.core.errors import CheckpointError, TripletctlError, one_line, write_failure
from tripletctl.core.faults import fault_point
from tripletctl.core.folders import refuse_escapes
from tripletctl.outputs.checkpoint_find import PHASE_DIR_RE, phase_dir
from tripletctl.outputs.metrics_log import METRICS_FILE, MetricsLog
from tripletctl.outputs.run_file import read_run, run_file

EVAL_KEYS = (("recall@1", "recall@1"), ("map@r", "MAP@R"))


# --------------------------------------------------------------------------------------------
# reading a run


def png_path(path: Path | str, default_name: str) -> Path:
    """Where a picture asked for at `path` goes: inside it when it is a directory, else `path` with a
    `.png` suffix added when it has none (what matplotlib would do silently; we say the real name)."""
    path = Path(path)
    if path.is_dir():
        return path / default_name
    return path if path.suffix else path.with_name(path.name + ".png")


def load_run(run_dir: Path | str) -> list[dict[str, Any]]:
    """Phases of a run, in order: [{"index", "name", "margin", "records"}].

    Uses run.json when present, else globs phase-*/metrics.jsonl (sorted by index).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    refuse_escapes(run_dir, "the run")  # run.json or a metrics.jsonl linked from elsewhere is never read
    phases: list[dict[str, Any]] = []
    run_json = run_file(run_dir)
    meta = read_run(run_dir)
    if meta is not None:
        listed = meta.get("phases")
        if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
            raise CheckpointError(
                f"{run_json} is not a tripletctl run index: expected an object whose 'phases' is a list of objects"
            )
        for position, phase in enumerate(listed):
            index = phase.get("index", position)
            index = index if isinstance(index, int) and not isinstance(index, bool) else position
            name = str(phase.get("name", f"phase {index}"))
            directory = run_dir / Path(str(phase.get("dir") or phase_dir(run_dir, index, name))).name
            phases.append(
                {
                    "index": index,
                    "name": name,
                    "margin": phase.get("margin"),
                    "records": MetricsLog(directory).records(strict_text=True),
                }
            )
    else:
        for path in run_dir.glob(f"phase-*/{METRICS_FILE}"):
            match = PHASE_DIR_RE.match(path.parent.name)
            if match:
                phases.append(
                    {
                        "index": int(match.group(1)),
                        "name": match.group(2),
                        "margin": None,
                        "records": MetricsLog(path.parent).records(strict_text=True),
                    }
                )
    phases.sort(key=lambda p: p["index"])
    _fill_margins(run_dir, phases)
    if not any(p["records"] for p in phases):
        raise CheckpointError(
            f"no metrics to plot in {run_dir}: expected run.json or phase-*/metrics.jsonl "
            "(is this the curriculum's train.output_dir?)"
        )
    return phases


def _fill_margins(run_dir: Path, phases: list[dict[str, Any]]) -> None:
    """Margins not in run.json, and each phase's loss, come from the run's curriculum.yaml copy, when
    there is one (a phase of unknown loss is drawn as a margin loss)."""
    for phase in phases:
        phase.setdefault("loss", DEFAULT_LOSS)
    path = run_dir / "curriculum.yaml"
    if not path.is_file():
        return
    try:
        from tripletctl.config.yaml_io import read_yaml_file, safe_yaml_load

        plan = safe_yaml_load(read_yaml_file(path)) or {}
        listed = plan.get("phases") or []
    except Exception:
        return
    if not isinstance(listed, list):
        return
    for phase in phases:
        if not (0 <= phase["index"] < len(listed) and isinstance(listed[phase["index"]], dict)):
            continue
        saved = listed[phase["index"]]
        if saved.get("loss") in LOSS_RULES:
            phase["loss"] = saved["loss"]
        if not isinstance(phase["margin"], (int, float)):
            margin = saved.get("margin", 0.2)
            phase["margin"] = float(margin) if isinstance(margin, (int, float)) else None


def eval_limits(values: list[float]) -> tuple[float, float]:
    """The held-out panel's range: the values with a margin, at least 0.05 wide, inside [0, 1], so
    0.82 -> 0.83 shows as a step, not a flat line across a 0-1 axis."""
    low, high = min(values), max(values)
    pad = max((high - low) * 0.15, (0.05 - (high - low)) / 2, 0.005)
    return max(0.0, low - pad), min(1.0, high + pad)


def _draw_losses(ax_loss, steps: list[dict[str, Any]], phases: list[dict[str, Any]]):
    """Margin-type mining losses and the batch-hard loss on the left axis; InfoNCE's (a log of the batch
    size, ~4-8) on its own right-hand axis, so it does not flatten the margin curves. Returns that axis."""
    infonce = {p["index"] for p in phases if not LOSS_RULES.get(p.get("loss"), LOSS_RULES[DEFAULT_LOSS]).distance_scale}
    ax_info = ax_loss.twinx() if infonce else None
    labelled = set()
    for phase in phases:
        records = [r for r in phase["records"] if "event" not in r]
        on_info = phase["index"] in infonce
        label = "InfoNCE loss (right axis)" if on_info else "mining loss"
        (ax_info if on_info else ax_loss).plot(
            *_series(records, "loss"),
            lw=1,
            color="tab:cyan" if on_info else "tab:blue",
            label=None if label in labelled else label,
        )
        labelled.add(label)
    ax_loss.plot(*_series(steps, "batch_hard_loss"), lw=1, color="tab:red", label="batch-hard loss")
    if ax_info is not None:
        ax_info.set_ylabel("InfoNCE loss")
    return ax_info


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value, step = r.get(key), r.get("global_step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            xs.append(step)
            ys.append(value)
    return xs, ys


def _untrained_eval(run_dir: Path) -> dict[str, Any] | None:
    try:
        found = (read_run(run_dir) or {}).get("eval_untrained")
    except CheckpointError:
        return None
    return found if isinstance(found, dict) else None


# --------------------------------------------------------------------------------------------
# run figure


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Draw losses (with phase boundaries and margins), active fraction, spread and eval metrics."""
    run_dir = Path(run_dir)
    phases = load_run(run_dir)
    out = png_path(out, "run.png") if out is not None else run_dir / "run.png"

    steps = [r for p in phases for r in p["records"] if "event" not in r]
    evals = [r for p in phases for r in p["records"] if r.get("event") == "eval"]
    untrained = _untrained_eval(run_dir)
    if untrained:  # measured before the first step: the baseline every later point is read against
        evals = [{**untrained, "global_step": 0}, *evals]
    collapses = [r for p in phases for r in p["records"] if r.get("event") == "collapse"]

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True, gridspec_kw={"height_ratios": [3, 1.4, 1.4, 1.8]})
    ax_loss, ax_active, ax_spread, ax_eval = axes

    ax_info = _draw_losses(ax_loss, steps, phases)
    _draw_margins_and_collapses(ax_loss, phases, collapses)
    ax_loss.set_ylabel("margin loss" if ax_info is not None else "loss")
    ax_loss.set_title(f"{run_dir.resolve().name}: loss per step (margin dashed)", loc="left")
    handles, labels = ax_loss.get_legend_handles_labels()
    if ax_info is not None:
        more = ax_info.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax_loss.legend(handles, labels, loc="upper right", fontsize=8)

    ax_active.plot(*_series(steps, "active_fraction"), lw=1, color="tab:green")
    ax_active.set_ylabel("active\ntriplets")
    ax_active.set_ylim(-0.02, 1.02)

    ax_spread.plot(*_series(steps, "embedding_spread"), lw=1, color="tab:purple")
    ax_spread.set_ylabel("embedding\nspread")
    ax_spread.set_ylim(bottom=0)

    _draw_evals(ax_eval, evals)
    _mark_phases(axes, phases)
    fig.tight_layout()
    _save(fig, out)
    return out


def _draw_margins_and_collapses(ax_loss, phases: list[dict[str, Any]], collapses: list[dict[str, Any]]) -> None:
    """Each phase's margin, dashed (a loss pinned to it means collapse), and where collapse was detected."""
    labelled = False
    for phase in phases:
        xs = [r["global_step"] for r in phase["records"] if isinstance(r.get("global_step"), (int, float))]
        if xs and isinstance(phase["margin"], (int, float)):
            ax_loss.hlines(
                phase["margin"],
                min(xs),
                max(xs),
                colors="gray",
                linestyles="dashed",
                lw=1,
                label=None if labelled else "margin α",
            )
            labelled = True
    for r in collapses:
        if isinstance(r.get("global_step"), (int, float)):
            ax_loss.axvline(r["global_step"], color="magenta", ls="-.", lw=1.5)
    if collapses:
        ax_loss.plot([], [], color="magenta", ls="-.", lw=1.5, label="collapse detected")


def _draw_evals(ax_eval, evals: list[dict[str, Any]]) -> None:
    """The held-out metrics (the untrained model's at step 0), on a range that shows small steps."""
    drawn: list[float] = []
    for (key, label), colour in zip(EVAL_KEYS, ("tab:orange", "tab:brown")):
        xs, ys = _series(evals, key)
        if xs:
            ax_eval.plot(xs, ys, marker="o", lw=1.2, color=colour, label=label)
            drawn += ys
    if drawn:
        ax_eval.legend(loc="lower right", fontsize=8)
        ax_eval.set_ylim(*eval_limits(drawn))
    else:
        ax_eval.text(0.5, 0.5, "no eval records", ha="center", va="center", transform=ax_eval.transAxes, color="gray")
    ax_eval.set_ylabel("held-out")
    ax_eval.set_xlabel("global step")


def _mark_phases(axes, phases: list[dict[str, Any]]) -> None:
    """A vertical line where each phase starts, its name at the top of the first panel."""
    for position, phase in enumerate(phases):
        xs = [r["global_step"] for r in phase["records"] if isinstance(r.get("global_step"), (int, float))]
        if not xs:
            continue
        start = min(xs)
        if position:  # the first phase starts at the left edge: no boundary to mark
            for ax in axes:
                ax.axvline(start - 0.5, color="black", lw=0.8, ls=":", alpha=0.7)
        axes[0].annotate(
            f"{phase['index']}: {phase['name']}",
            xy=(start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="black",
        )


# --------------------------------------------------------------------------------------------
# collapse figure


def plot_collapse(report, path: Path | str) -> Path:
    """d(a,p) vs d(a,n) histograms (margin marked) and the singular-value spectrum (log scale).
    Returns the file written (see `png_path`: a directory gets collapse.png inside)."""
    path = png_path(path, "collapse.png")
    fig, (ax_hist, ax_sv) = plt.subplots(1, 2, figsize=(12, 4.5))

    if report.hist_edges:
        edges = report.hist_edges
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        # densities, so thousands of negatives and a few positives share one axis
        for counts, colour, what in ((report.ap_hist, "tab:blue", "d(a,p)"), (report.an_hist, "tab:red", "d(a,n)")):
            total = max(sum(counts), 1)
            ax_hist.bar(
                edges[:-1],
                [c / total for c in counts],
                width=widths,
                align="edge",
                alpha=0.55,
                color=colour,
                label=f"{what}  ({total} pairs)",
            )
    p50 = report.ap_quantiles.get("p50")
    if p50 is not None:
        ax_hist.axvline(p50, color="tab:blue", ls=":", lw=1)
        ax_hist.axvline(
            p50 + report.margin, color="black", ls="--", lw=1.2, label=f"median d(a,p) + margin ({report.margin})"
        )
    ax_hist.set_xlabel(f"{report.distance} distance")
    ax_hist.set_ylabel("fraction of pairs")
    ax_hist.set_title("positive vs negative distances", loc="left")
    ax_hist.legend(fontsize=8, loc="upper right")

    sv = [float(s) for s in report.singular_values if s > 0]
    if sv:
        ax_sv.semilogy(range(1, len(sv) + 1), sv, marker=".", lw=1, color="tab:purple")
    else:
        ax_sv.text(
            0.5,
            0.5,
            "all singular values are 0\n(every embedding identical)",
            ha="center",
            va="center",
            transform=ax_sv.transAxes,
            color="red",
        )
    ax_sv.set_xlabel("index")
    ax_sv.set_ylabel("singular value (centred)")
    ax_sv.set_title(f"spectrum: effective rank {report.effective_rank:.2f} of {report.dim}", loc="left")

    colour = {"healthy": "green", "at risk": "darkorange", "collapsed": "red"}.get(report.verdict, "black")
    fig.suptitle(
        f"verdict: {report.verdict}   (mean cosine {report.mean_cosine:.3f}, "
        f"batch-hard loss {report.batch_hard_loss:.3f})",
        color=colour,
    )
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    """Write the figure to a temporary file beside `path`, then rename it into place: a full disk
    leaves no 0-byte picture behind; an unknown image suffix or an unwritable place is one line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
        fault_point("plot-write", str(path))  # tests: a disk that fills while the picture is written
        os.replace(tmp, path)
    except (OSError, ValueError) as error:
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, error) if isinstance(error, OSError) else None
        raise (failure or TripletctlError(f"cannot write the picture {path}: {one_line(error)}")) from None
    finally:
        plt.close(fig)
