"""Progress lines of ``sepals-sim``: one line per round, safe to print."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from sepals.common.accounting import epsilon_pair
from sepals.common.fairness import format_spread
from sepals.common.model_changes import describe_replacements
from sepals.simulations.reasons import LINE_REASON_CHARS, clean_reason

if TYPE_CHECKING:
    from sepals.simulations.config import SimulationConfig


def _who(entries: list[dict[str, str]]) -> str:
    """``client-3 (reason)`` per entry: what the client itself logged, when the run has it."""
    return ", ".join(
        f"{e['client']} ({clean_reason(e.get('detail') or e['reason'], LINE_REASON_CHARS)})"
        for e in entries
    )


def format_metric(name: str, value: float | None) -> str:
    """``acc  93.10%`` for accuracy, ``NAME 0.1234`` for an app's own metric."""
    if value is None:
        return f"{'acc' if name == 'accuracy' else name} n/a"
    if name == "accuracy":
        return f"acc {100 * value:6.2f}%"
    return f"{name} {value:.4f}"


def progress_line(
    row: dict[str, Any], rounds: int, metric_name: str = "accuracy", *, private: bool = False
) -> None:
    """Print one round's line: metric, epsilon, clients, masking, bytes and seconds.

    ``private``: DP is on, so a round in which no client released anything says so
    instead of printing ``off``.
    """
    eps = row["epsilon"]
    qerr = row.get("quant_error")
    loss = row["loss"]
    value = row.get("metric", row.get("accuracy"))
    extra = _mask_text(row)
    if row.get("fairness"):
        extra = f" | {format_spread(row['fairness'], metric_name)}{extra}"
    if row.get("declined"):
        extra += f" | declined: {_who(row['declined'])}"
    if row.get("excluded"):
        extra += f" | excluded: {_who(row['excluded'])}"
    if row.get("rejected"):
        extra += f" | candidate model rejected ({row['rejected']}); the last good one stays"
    if row.get("clamped"):
        counts = ", ".join(f"{name} ({n})" for name, n in row["clamped"].items())
        extra += f" | values clamped to --update-bound: {counts}"
    print(
        f"round {row['round']:>3}/{rounds} | {format_metric(metric_name, value)} | "
        f"loss {'n/a' if loss is None else f'{loss:.4f}'} | "
        f"eps {_epsilon_text(eps, row.get('epsilon_replace_one'), private)} | "
        f"up {row['upload_bytes'] / 1e3:8.1f} kB{_per_client(row)} | "
        f"down {row['download_bytes'] / 1e3:8.1f} kB | "
        f"{row['seconds']:5.2f} s | {row.get('codec', '?')} q-err "
        f"{'n/a' if qerr is None else f'{qerr:.1e}'}{extra}",
        flush=True,
    )


def _epsilon_text(eps: float | None, replace_one: float | None, private: bool) -> str:
    """``7.99 zero-out, 13.63 replace-one``: the round's largest epsilons, or ``off``."""
    if eps is None and private:
        return "none released this round (DP on)"
    return epsilon_pair(eps, replace_one, digits=2)


def _per_client(row: dict[str, Any]) -> str:
    """`` (4.1 kB/client, 650/20,394 params)``: one update's size and what it carries."""
    per = row.get("upload_bytes_per_client")
    if not per:
        return ""
    return (
        f" ({per / 1e3:.1f} kB/client, {row['trainable_parameters']:,}/"
        f"{row['total_parameters']:,} params)"
    )


def model_text(model: dict[str, Any] | None) -> str:
    """The start line's model part: what is trained, of how much, and the upload's size."""
    if not model:
        return ""
    counts = model["parameters"]
    start = "pretrained model" if model.get("pretrained") else "seeded model"
    supplied = model.get("checkpoint_supplied")
    if supplied:
        start += (
            f" ({supplied['supplied']:,} of {supplied['total']:,} parameters from the checkpoint)"
        )
    if model.get("replaced_layers"):
        start += f" (for DP-SGD: {describe_replacements(model['replaced_layers'])})"
    ring = model.get("he_ring")
    ring_text = (
        f" | HE ring N={ring['poly_modulus_degree']}, {ring['ciphertexts_per_update']} "
        "ciphertext(s) per update"
        if ring
        else ""
    )
    return (
        f" | {start}, training {counts['trainable']:,} of {counts['total']:,} "
        f"parameters ({model['trainable']}; {counts['trainable_fp32_bytes'] / 1e3:.1f} kB "
        f"fp32 per update){ring_text}"
    )


def _mask_text(row: dict[str, Any]) -> str:
    """The round line's masking part: survivors, dropouts, and whether masks came off."""
    mask = row.get("mask")
    if not mask:
        return ""
    if mask.get("abandoned"):
        return f" | masking abandoned: {mask['abandoned'][:80]}"
    state = "masks removed" if mask.get("removed") else "masks kept"
    return (
        f" | masked {mask['survivors']}/{mask['members']} (T={mask['threshold']}, "
        f"{mask['dropouts']} dropped) {state}"
    )


def start_line(config: SimulationConfig) -> str:
    """The line printed before a run starts: who, what, how private, where the output goes."""
    fed, pc = config.federation, config.privacy
    dp = f"eps={pc.target_epsilon:g} delta={pc.delta:g}" if pc.enabled else "off"
    ray_text = (
        "starting Ray"
        if config.ray_address is None
        else f"joining the Ray cluster at {config.ray_address}"
    )
    return (
        f"starting: {config.clients} clients, {config.label}, {config.partition}, "
        f"{fed.rounds} rounds, fraction {fed.fraction_train:g}, DP {dp}, encryption "
        f"{config.encryption.scheme}, device {config.device}; provisioning keys, "
        f"{ray_text}; output in {os.path.abspath(config.out)}"
    )


def started_line(info: dict[str, Any], metric_name: str = "accuracy") -> str:
    """The line printed once the run is up: start-up time, round 0's metric, the model."""
    return (
        f"started in {info['startup_seconds']:.1f} s | round 0: "
        f"{format_metric(metric_name, info.get('metric'))}{model_text(info.get('model'))}"
    )
