"""PNG plots of a simulation report: the model's metric and epsilon against round.

The metric is accuracy for the built-in datasets (``accuracy.png``) or an app's own
metric (``<name>.png``, e.g. ``r2.png``), as ``report["config"]["metric"]`` names it.
Rounds are integers and start at round 0, the evaluation of the initial model (a row
with ``"round": 0`` in ``report["rounds"]``, or ``report["initial"]``); no privacy is
spent before round 1, so with DP on round 0's epsilon is plotted as 0. The title names
the dataset, clients, fraction sampled per round, partition, privacy target and codec.
``<metric>_clients.png`` (e.g. ``accuracy_clients.png``) shows the metric of the global
model on every client's own test split over rounds: the min-max band, the median and
the mean of the worst 10% of clients (written when the rows carry a ``fairness`` spread).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def metric_name(report: dict[str, Any]) -> str:
    """The name of the report's metric (``accuracy`` unless the app brought its own)."""
    metric = report.get("config", {}).get("metric")
    name = metric.get("name") if isinstance(metric, dict) else None
    return str(name) if name else "accuracy"


def _metric(row: dict[str, Any], name: str) -> float | None:
    value = row.get("metric")
    if value is None and name == "accuracy":
        value = row.get("accuracy")
    return None if value is None else float(value)


def plot_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's round rows, sorted, with round 0 first when the report has it."""
    rows = sorted(report.get("rounds", []), key=lambda r: int(r["round"]))
    initial = report.get("initial")
    has_zero = any(int(r["round"]) == 0 for r in rows)
    name = metric_name(report)
    if not has_zero and isinstance(initial, dict) and _metric(initial, name) is not None:
        rows.insert(0, {"round": 0, "epsilon": None, **initial})
    return rows


def plot_title(report: dict[str, Any]) -> str:
    """The plots' title: dataset, clients, fraction, partition, epsilon and codec."""
    cfg = report.get("config", {})
    fraction = cfg.get("federation", {}).get("fraction_train")
    target = cfg.get("privacy", {}).get("target_epsilon")
    delta = cfg.get("privacy", {}).get("delta")
    dp = "DP off" if target is None else f"epsilon {target:g}, delta {delta:g}"
    frac = "" if fraction is None else f", fraction {fraction:g}"
    # An app is named by its spec, often an absolute path: keep the file name and attr.
    dataset = str(cfg.get("dataset", "?")).rsplit("/", 1)[-1]
    return (
        f"{dataset}, {cfg.get('clients', '?')} clients{frac}, "
        f"{cfg.get('partition', '?')}\n{dp}, codec {cfg.get('codec', '?')}"
    )


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the metric, epsilon and per-client plots into ``out``.

    ``<metric>.png`` (``accuracy.png`` by default), ``epsilon.png`` and, when the rows
    carry per-client spreads, ``<metric>_clients.png``.

    Returns:
        The paths written.

    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = plot_rows(report)
    rounds = [int(r["round"]) for r in rows]
    written: list[Path] = []
    cfg = report.get("config", {})
    title = plot_title(report)
    target = cfg.get("privacy", {}).get("target_epsilon")

    fig, ax = plt.subplots(figsize=(6, 4))
    name = metric_name(report)
    values = [_metric(r, name) for r in rows]
    scale = 100.0 if name == "accuracy" else 1.0
    ax.plot(rounds, [float("nan") if v is None else scale * v for v in values], marker="o", ms=3)
    ax.set_ylabel(
        "test accuracy (%), held-out split" if name == "accuracy" else f"test {name}, held-out"
    )
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "metric"
    written.append(_save(plt, fig, ax, title, out / f"{safe}.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    eps: list[float | None] = [r.get("epsilon") for r in rows]
    if target is not None and rounds and rounds[0] == 0 and eps[0] is None:
        eps[0] = 0.0
    if target is not None or any(e is not None for e in eps[1:]):
        ax.plot(rounds, [e if e is not None else float("nan") for e in eps], marker="o", ms=3)
        if target is not None:
            ax.axhline(target, color="red", ls="--", lw=1, label=f"target epsilon = {target:g}")
            ax.legend()
        if not any(e is not None for e in eps[1:]):
            ax.text(
                0.5,
                0.5,
                "no client reported epsilon",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_ylabel(f"max client epsilon (delta = {cfg.get('privacy', {}).get('delta', 0):g})")
    else:
        ax.text(0.5, 0.5, "DP off", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("epsilon")
    written.append(_save(plt, fig, ax, title, out / "epsilon.png"))
    fairness = _fairness_plot(plt, rows, name, title, out / f"{safe}_clients.png")
    if fairness is not None:
        written.append(fairness)
    return written


def _fairness_plot(
    plt: Any, rows: list[dict[str, Any]], name: str, title: str, path: Path
) -> Path | None:
    """The per-client metric over rounds: min-max band, median and worst-10% mean.

    Each round's values come from its row's ``fairness`` spread (the global model on
    every client's own test split); ``None`` (no plot) when no row has one.
    """
    points = [(int(r["round"]), r["fairness"]) for r in rows if r.get("fairness")]
    if not points:
        return None
    scale = 100.0 if name == "accuracy" else 1.0
    rounds = [p for p, _ in points]

    def series(key: str) -> list[float]:
        return [scale * float(s[key]) for _, s in points]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(rounds, series("min"), series("max"), alpha=0.25, label="min to max")
    ax.plot(rounds, series("median"), marker="o", ms=3, label="median")
    ax.plot(rounds, series("worst10_mean"), ls="--", label="mean of the worst 10%")
    ax.legend(fontsize=8)
    unit = " (%)" if name == "accuracy" else ""
    ax.set_ylabel(f"per-client {name}{unit}, own test split")
    return _save(plt, fig, ax, title, path)


def _save(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Label the round axis (integer ticks), title and grid the plot, write and close it."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
