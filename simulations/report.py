"""The report of a simulation run (``report.json``) and its one-paragraph summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sepals.common.accounting import NEIGHBOURING_RELATION, summary_epsilon
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


def mask_row(rec: Any) -> dict[str, Any] | None:
    """A round row's ``mask``: who shared, survived and dropped, and whether masks came off."""
    if not rec.masking:
        return None
    return {
        "threshold": rec.mask_threshold,
        "members": rec.mask_members,
        "survivors": rec.mask_survivors,
        "dropouts": rec.mask_dropouts,
        "removed": rec.masks_removed,
        "abandoned": rec.mask_abandoned,
        "server_seconds": rec.mask_seconds,
    }


def spread_of(per_client: PerClient | None, higher_is_better: bool) -> dict[str, Any] | None:
    """The spread (``ClientSpread.to_dict()``) of per-client values, ``None`` without any."""
    if not per_client:
        return None
    return client_spread(per_client.values(), higher_is_better=higher_is_better).to_dict()


def named_reasons(
    pairs: list[tuple[int, str]],
    names: Callable[[int], str],
    limit: int = REPORT_REASON_CHARS,
    detail_of: Callable[[int], str | None] | None = None,
) -> list[dict[str, str]]:
    """``(node, reason)`` pairs as ``{"client": name, "reason": cleaned}`` rows of a report.

    ``detail_of`` gives what the client itself logged (a simulation's clients only); a
    row then also holds ``detail``, cleaned the same way.
    """
    rows = []
    for node, reason in pairs:
        row = {"client": names(node), "reason": clean_reason(reason, limit)}
        detail = detail_of(node) if detail_of is not None else None
        if detail:
            row["detail"] = clean_reason(detail, limit)
        rows.append(row)
    return rows


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
            "neighbouring_relation": NEIGHBOURING_RELATION if config.privacy.enabled else None,
            "dp_randomness": dp_randomness(config),
            "epsilon_holds": (
                None if not config.privacy.enabled else not config.insecure_reproducible
            ),
            "federated_evaluation": config.federation.evaluation_disclosure,
            "ledgers": LEDGER_DIR,
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


def dp_randomness(config: SimulationConfig) -> str | None:
    """Where the clients' DP sampling and noise came from (``None`` without DP)."""
    if not config.privacy.enabled:
        return None
    if config.insecure_reproducible:
        return (
            "SEEDED from the run's seed (--insecure-reproducible, tests only): anyone who "
            "knows the seed can replay every batch and subtract the noise; the epsilon "
            "does NOT hold"
        )
    return (
        "secret: AES-128-CTR under a fresh 128-bit key from os.urandom per DP-SGD step, "
        "for the Poisson sampling and for the noise (sum of four Gaussians, halved)"
    )


def summarize(report: dict[str, Any]) -> str:
    """One line about a finished run."""
    f = report["final"]
    qerr = f.get("max_quant_error")
    name = f.get("metric_name", "accuracy")
    value = f.get("metric", f.get("accuracy"))
    if value is None:
        shown = f"final {name} n/a"
    elif name == "accuracy":
        shown = f"final accuracy {100 * value:.2f}%"
    else:
        shown = f"final {name} {value:.4f}"
    shown_eps = summary_epsilon(f)
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


def explanation_line(entry: dict[str, Any]) -> str:
    """The closing line of a run with an explanation round."""
    if not entry.get("released"):
        return f"explanation: nothing released ({entry.get('reason', 'no contribution')})"
    cosine = (entry.get("cosine_to_central") or {}).get("mean")
    total = entry.get("max_epsilon_total")
    return (
        f"explanation: {entry['method']}, {entry['clients']} clients, {entry['examples']} "
        f"examples, epsilon {entry['epsilon']:g} each"
        + (f" (total with training at most {total:.3f})" if total is not None else "")
        + (f", mean cosine to the central map {cosine:.3f}" if cosine is not None else "")
        + f", {entry['seconds']:.2f} s"
    )
