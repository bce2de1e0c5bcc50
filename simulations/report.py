"""The report of a simulation run (``report.json``) and its one-paragraph summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sepals.common.fairness import client_spread, format_spread
from sepals.simulations.config import (
    LEDGER_DIR,
    SimulationConfig,
)
from sepals.simulations.evaluator import PerClient
from sepals.simulations.reasons import (
    REPORT_REASON_CHARS,
    clean_reason,
)


def spread_of(per_client: PerClient | None, higher_is_better: bool) -> dict[str, Any] | None:
    """The spread (``ClientSpread.to_dict()``) of per-client values, ``None`` without any."""
    if not per_client:
        return None
    return client_spread(per_client.values(), higher_is_better=higher_is_better).to_dict()


def named_reasons(
    pairs: list[tuple[int, str]], names: Callable[[int], str], limit: int = REPORT_REASON_CHARS
) -> list[dict[str, str]]:
    """``(node, reason)`` pairs as ``{"client": name, "reason": cleaned}`` rows of a report."""
    return [{"client": names(n), "reason": clean_reason(reason, limit)} for n, reason in pairs]


def final_fairness(
    spread: dict[str, Any] | None, per_client: PerClient, metric_name: str
) -> dict[str, Any] | None:
    """``report["final"]["fairness"]``: the final model on the clients' own test splits.

    The spread (see :class:`sepals.common.fairness.ClientSpread`), the metric's name and
    every client's value (``clients``, client id -> value); ``None`` without test data.
    """
    if spread is None or not per_client:
        return None
    ordered = sorted(per_client.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[-1]))
    return {**spread, "metric": metric_name, "clients": dict(ordered)}


def build_report(
    config: SimulationConfig,
    rows: list[dict[str, Any]],
    history: list[Any],
    vector_length: int,
    wall_seconds: float,
    codec: str,
) -> dict[str, Any]:
    """Assemble ``report.json`` from the harness rows and the server's round records."""
    clients: dict[str, dict[str, Any]] = {}
    for record in history:
        for c in record.clients:
            clients[c.client_id] = {
                "id": c.client_id,
                "rounds_participated": c.rounds_participated,
                "epsilon": c.epsilon,
                "epsilon_replace_one": c.epsilon_replace_one,
                "delta": c.delta,
                "noise_multiplier": c.noise_multiplier,
                "sample_rate": c.sample_rate,
                "steps": c.total_steps,
                "num_examples": c.num_examples,
                "accountant": c.accountant if c.epsilon is not None else None,
            }
    last = rows[-1] if rows else {}
    eps_values = [c["epsilon"] for c in clients.values() if c["epsilon"] is not None]
    eps_r1 = [
        c["epsilon_replace_one"] for c in clients.values() if c["epsilon_replace_one"] is not None
    ]
    return {
        "config": {**config.to_dict(), "codec": codec, "model_parameters": vector_length},
        "rounds": rows,
        "final": {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": max(eps_values) if eps_values else None,
            "epsilon_replace_one": max(eps_r1) if eps_r1 else None,
            "noise_source": (
                None
                if not config.privacy.enabled
                else "seeded from the run's seed (reproducible tests only: predictable noise)"
                if config.reproducible_noise
                else "os.urandom: each DP-SGD step's generator seeded afresh"
            ),
            "federated_evaluation": config.federation.evaluation_disclosure,
            "ledgers": LEDGER_DIR,
            **_noise_shares_summary(config, list(clients.values())),
            "delta": config.privacy.delta if config.privacy.enabled else None,
            "wall_seconds": wall_seconds,
            "upload_bytes": int(sum(r["upload_bytes"] for r in rows)),
            "download_bytes": int(sum(r["download_bytes"] for r in rows)),
            "codec": codec,
            "max_quant_error": max(
                (r["quant_error"] for r in rows if r.get("quant_error") is not None),
                default=None,
            ),
        },
        "clients": sorted(clients.values(), key=lambda c: int(c["id"].rsplit("-", 1)[-1])),
        "server_log": [r.to_dict() for r in history],
    }


def _noise_shares_summary(
    config: SimulationConfig, clients: list[dict[str, Any]]
) -> dict[str, Any]:
    """Under distributed noise: ``m`` and the largest epsilon of one client's lone update.

    The reported epsilon holds for aggregates of at least ``m`` honest clients; a lone
    update carries ``sigma / sqrt(m)`` only. Its epsilon is composed with RDP (an upper
    bound, and fast at the small sigma where PLD is slow).
    """
    shares = config.federation.noise_shares
    if shares == 1 or not config.privacy.enabled:
        return {}
    # Opacus' accountant loads only for a report that has noise shares to compare.
    from sepals.client.privacy import compute_epsilon

    lone = [
        compute_epsilon(
            "rdp",
            ((c["noise_multiplier"] / math.sqrt(shares), c["sample_rate"], c["steps"]),),
            config.privacy.delta,
        )
        for c in clients
        if c["epsilon"] is not None and c["steps"]
    ]
    return {"noise_shares": shares, "lone_update_epsilon": max(lone, default=None)}


def summarize(report: dict[str, Any]) -> str:
    """One line about a finished run."""
    f = report["final"]
    eps = f["epsilon"]
    qerr = f.get("max_quant_error")
    name = f.get("metric_name", "accuracy")
    value = f.get("metric", f.get("accuracy"))
    if value is None:
        shown = f"final {name} n/a"
    elif name == "accuracy":
        shown = f"final accuracy {100 * value:.2f}%"
    else:
        shown = f"final {name} {value:.4f}"
    if eps is not None and f.get("noise_shares"):
        lone = f.get("lone_update_epsilon")
        shown_eps = (
            f"{eps:.3f} for sums of >= {f['noise_shares']} clients (a lone update: "
            f"{'n/a' if lone is None else f'{lone:.1f}'})"
        )
    else:
        shown_eps = "off" if eps is None else f"{eps:.3f}"
    replace_one = f.get("epsilon_replace_one")
    if eps is not None and replace_one is not None:
        shown_eps += f" (replace-one {replace_one:.3f})"
    fairness = format_spread(f.get("fairness"), name)
    if fairness:
        shown += f" | {fairness}"
    return (
        f"{shown} | epsilon {shown_eps} | {f['wall_seconds']:.1f} s | "
        f"up {f['upload_bytes'] / 1e6:.2f} MB, down {f['download_bytes'] / 1e6:.2f} MB | "
        f"codec {f.get('codec', '?')}, max quantization error "
        f"{'n/a' if qerr is None else f'{qerr:.1e}'}{_masking_summary(f.get('masking'))}"
    )


def _masking_summary(masking: dict[str, Any] | None) -> str:
    if not masking:
        return ""
    return (
        f" | masking k={masking['neighbours']} T={masking['threshold']}, masks removed in "
        f"{masking['rounds_masks_removed']} rounds"
    )
