"""PNG plots of a simulation report: accuracy and epsilon against round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``accuracy.png`` and ``epsilon.png`` into ``out`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    written: list[Path] = []
    cfg = report["config"]
    title = f"{cfg['dataset']}, {cfg['clients']} clients, {cfg['partition']}, codec {cfg['codec']}"

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [100 * r["accuracy"] for r in report["rounds"]], marker="o", ms=3)
    ax.set_ylabel("test accuracy (%), held-out split")
    written.append(_save(plt, fig, ax, title, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [r["epsilon"] for r in report["rounds"]]
    if any(e is not None for e in eps):
        ax.plot(rounds, [e if e is not None else float("nan") for e in eps], marker="o", ms=3)
        target = cfg["privacy"]["target_epsilon"]
        if target is not None:
            ax.axhline(target, color="red", ls="--", lw=1, label=f"target epsilon = {target:g}")
            ax.legend()
        ax.set_ylabel(f"max client epsilon (delta = {cfg['privacy']['delta']:g})")
    else:
        ax.text(0.5, 0.5, "DP off", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("epsilon")
    written.append(_save(plt, fig, ax, title, out / "epsilon.png"))
    return written


def _save(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Label the round axis, title and grid the plot, write it to ``path`` and close it."""
    ax.set_xlabel("round")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
