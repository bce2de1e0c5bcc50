"""A privacy audit anyone can run: gradient canaries and a one-run epsilon lower bound.

``sepals-sim --audit M`` (or :func:`run_audit`) draws ``M`` white-box gradient canaries
(:mod:`sepals.client.canaries`): canary ``i`` is a fixed unit direction ``u_i`` in
parameter space (the unit vector of one of the ``M`` parameters with the weakest
round-0 training gradient, :func:`quiet_coordinates`). Every canary is one extra row
of a uniformly random client's training data; it is included with probability 1/2
(independently): an included canary's per-sample gradient is ``C * u_i`` whenever
Poisson sampling picks its row, a left-out canary's row is a null example (zero
gradient). Inclusion thus changes no example count, sample rate or sigma: the audit
tests the zero-out relation the claim is stated for. The run is the ordinary
simulation with the same settings (real ClientApps, encryption as configured, secret
DP randomness); only the clients' training data gains the canary rows.

Scoring: ``score_i = <theta_0 - theta_final, u_i>``, the global model's total movement
along the canary (``theta_0`` the shared seeded round-0 model, ``theta_final`` the model
the evaluator decrypted and saved). The auditor guesses "in" for the ``k`` highest
scores and "out" for the ``k`` lowest and abstains on the rest (``r = 2k`` guesses).

Bound (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, Theorem 3.1 and their reference code): if training is (eps, delta)-DP in
each canary, the probability of ``v`` or more correct guesses out of ``r`` is at most
``P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha`` with
``alpha = max_i P[v > Binomial(r, e^eps/(1+e^eps)) >= v - i] / i``. ``eps_lb`` is the
largest eps that this p-value rejects at level ``1 - confidence``, found by bisection.
``k`` is chosen from :data:`GUESS_FRACTIONS` (of ``m``) after seeing the scores, so
each choice is tested at level ``(1 - confidence) / len(GUESS_FRACTIONS)``
(Bonferroni) and ``eps_lb`` is the largest of them: the reported bound holds at the
stated confidence.

That bound cannot exceed about 3.7 with 300 canaries, whatever the run does, so it can
never refute the default claim of 8. The same scores therefore also give the one-shot
estimate of Andrew et al. (:mod:`sepals.simulations.one_shot`), which has no such
ceiling but is an estimate (it fits Gaussians to the scores), not a proof. A claim is
reported *refuted* only when the proven bound exceeds it; the estimate is reported
beside it, and flagged when it exceeds the claim.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import stats
from torch.utils.data import ConcatDataset, DataLoader

from sepals.client.canaries import CanarySpec, markable_pairs
from sepals.common.log import log
from sepals.common.models import build_seeded, get_flat, num_parameters, set_flat
from sepals.simulations.app_data import app_client_data
from sepals.simulations.harness import run_experiment, simulated_app_source
from sepals.simulations.one_shot import one_shot_estimate

#: Canaries per audit (Dirac canaries on the quietest of the digits MLP's 2,410
#: parameters: see the README).
DEFAULT_CANARIES = 300
#: The audit's confidence level.
CONFIDENCE = 0.95
#: Candidate guess counts per side, as fractions of the canaries (k = round(f * m)).
GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
_BISECTION_STEPS = 40


def p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= ``v`` correct of ``r`` guesses] under (``eps``, ``delta``)-DP, ``m`` canaries.

    Steinke, Nasr and Jagielski (NeurIPS 2023), Theorem 3.1, as in their code.

    Raises:
        ValueError: the counts or parameters are out of range.

    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha = max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i (0 when v = 0)
    alpha = 0.0
    if v > 0:
        i = np.arange(1, v + 1)
        partial = np.cumsum(stats.binom.pmf(v - i, r, q))
        alpha = float(np.max(partial / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE
) -> float:
    """The largest eps that ``v`` correct of ``r`` guesses refute at ``confidence``.

    0 when the guesses are no better than chance allows under eps = 0.

    Raises:
        ValueError: ``confidence`` is not in (0, 1), or the counts are out of range.

    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value_dp_audit(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value_dp_audit(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def canary_scores(
    theta_0: npt.NDArray[np.floating],  # type: ignore[type-arg]
    theta_final: npt.NDArray[np.floating],  # type: ignore[type-arg]
    directions: npt.NDArray[np.floating],  # type: ignore[type-arg]
) -> npt.NDArray[np.float64]:
    """``<theta_0 - theta_final, u_i>`` per canary (rows of ``directions``)."""
    moved = np.asarray(theta_0, dtype=np.float64) - np.asarray(theta_final, dtype=np.float64)
    return np.asarray(directions, dtype=np.float64) @ moved


def count_correct(
    scores: npt.NDArray[np.floating],  # type: ignore[type-arg]
    included: npt.NDArray[np.bool_],
    k: int,
) -> int:
    """Correct guesses when the ``k`` highest scores say "in" and the ``k`` lowest "out"."""
    if not 0 <= 2 * k <= len(scores):
        raise ValueError(f"cannot make {k} guesses per side among {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    out_guess, in_guess = order[:k], order[len(order) - k :]
    return int(included[in_guess].sum() + (~included[out_guess]).sum())


@dataclass(frozen=True)
class AuditResult:
    """What an audit found (``report.json``'s ``audit``)."""

    epsilon_lower_bound: float
    claimed_epsilon: float | None
    delta: float
    confidence: float
    canaries: int
    canaries_included: int
    guesses: int
    correct: int
    guesses_per_side: int
    candidates: list[dict[str, float]]
    one_shot_epsilon: float = 0.0
    one_shot: dict[str, Any] | None = None
    seconds: float | None = None
    broken_no_noise_for_tests: bool = False
    method: str = (
        "white-box gradient canaries (Dirac: u_i is the unit vector of one of the m "
        "parameters with the weakest round-0 training gradient; each canary one extra "
        "row of a random client, with per-sample gradient C*u_i if included (probability "
        "1/2) and zero if left out); "
        "score_i = <theta_0 - theta_final, u_i>; guess 'in' for the k highest and "
        "'out' for the k lowest scores, k from GUESS_FRACTIONS of m"
    )
    formula: str = (
        "Steinke, Nasr & Jagielski (NeurIPS 2023), Thm 3.1: under (eps, delta)-DP, "
        "P[correct >= v] <= P[Binomial(r, e^eps/(1+e^eps)) >= v] + 2*m*delta*alpha, "
        "alpha = max_i P[v > Binomial(r, e^eps/(1+e^eps)) >= v-i]/i; eps_lb = largest eps "
        "whose p-value is below 1 - confidence (bisection, scipy.stats.binom)"
    )
    confidence_method: str = (
        "one-sided p-value of the one-run theorem; the guess count k is chosen among "
        "len(GUESS_FRACTIONS) candidates, each tested at (1 - confidence)/len(GUESS_FRACTIONS) "
        "(Bonferroni), so eps_lb holds at the stated confidence"
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self) | {
            "refuted": self.refuted,
            "estimate_exceeds_claim": self.estimate_exceeds_claim,
        }

    @property
    def refuted(self) -> bool | None:
        """Whether the proven lower bound exceeds the claim (``None``: no claim)."""
        if self.claimed_epsilon is None:
            return None
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def estimate_exceeds_claim(self) -> bool | None:
        """Whether the one-shot estimate (not a proof) exceeds the claim."""
        if self.claimed_epsilon is None:
            return None
        return self.one_shot_epsilon > self.claimed_epsilon

    def summary(self) -> str:
        """One line: the bound and the estimate beside the claim."""
        claimed = "n/a" if self.claimed_epsilon is None else f"{self.claimed_epsilon:.3f}"
        verdict = {None: "", True: " | CLAIM REFUTED", False: " | claim not refuted"}
        estimate = (
            " | the one-shot ESTIMATE exceeds the claim (an estimate, not a proof)"
            if self.estimate_exceeds_claim
            else ""
        )
        return (
            f"audit: eps_lb {self.epsilon_lower_bound:.3f} (one-run bound, at "
            f"{100 * self.confidence:g}% confidence), one-shot estimate "
            f"{self.one_shot_epsilon:.3f} vs claimed eps {claimed} | m={self.canaries} "
            f"canaries ({self.canaries_included} in), r={self.guesses} guesses, "
            f"{self.correct} correct{verdict[self.refuted]}{estimate}"
            + (" | BROKEN MECHANISM (test only)" if self.broken_no_noise_for_tests else "")
        )


def assess(
    scores: npt.NDArray[np.floating],  # type: ignore[type-arg]
    included: npt.NDArray[np.bool_],
    delta: float,
    claimed_epsilon: float | None,
    confidence: float = CONFIDENCE,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> AuditResult:
    """The audit's bound from the canaries' scores and the truth of their inclusion.

    Each ``k = max(1, round(f * m))`` for ``f`` in ``fractions`` is tested at confidence
    ``1 - (1 - confidence) / len(fractions)``; the best bound is reported.
    """
    m = len(scores)
    per_choice = 1.0 - (1.0 - confidence) / len(fractions)
    candidates: list[dict[str, float]] = []
    for f in fractions:
        k = min(max(1, round(f * m)), m // 2)
        v = count_correct(scores, included, k)
        eps = epsilon_lower_bound(m, 2 * k, v, delta, per_choice)
        candidates.append({"k": k, "guesses": 2 * k, "correct": v, "epsilon_lower_bound": eps})
    best = max(candidates, key=lambda c: (c["epsilon_lower_bound"], -c["k"]))
    shot = one_shot_estimate(scores, included, delta, confidence)
    return AuditResult(
        epsilon_lower_bound=best["epsilon_lower_bound"],
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        confidence=confidence,
        canaries=m,
        canaries_included=int(np.sum(included)),
        guesses=int(best["guesses"]),
        correct=int(best["correct"]),
        guesses_per_side=int(best["k"]),
        candidates=candidates,
        one_shot_epsilon=shot.epsilon,
        one_shot=shot.to_dict(),
    )


def make_canary_spec(
    seed: int,
    count: int,
    dimension: int,
    clients: int,
    *,
    coordinates: tuple[int, ...] = (),
    broken_no_noise: bool = False,
) -> Any:
    """``count`` canaries, each a row of a uniform random client; each in with probability 1/2.

    A left-out canary keeps its row as a null example (zero gradient), so inclusion
    changes no client's example count, sample rate or sigma.

    ``coordinates`` makes them Dirac canaries on those parameters (one each); without,
    they are random unit directions.

    Raises:
        ValueError: fewer than 2 canaries or no client.

    """
    if count < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {count}")
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA0D17]))
    included = rng.random(count) < 0.5
    holders = tuple(int(h) for h in rng.integers(0, clients, size=count))
    inclusion = tuple(bool(b) for b in included)
    return CanarySpec(seed, dimension, holders, inclusion, coordinates, broken_no_noise)


def quiet_coordinates(
    factory: Any,
    weights: npt.NDArray[np.floating],  # type: ignore[type-arg]
    data: Any,
    count: int,
    seed: int,
    loss_fn: Any = None,
) -> tuple[int, ...]:
    """The ``count`` parameters whose loss gradient on ``data`` is weakest at ``weights``.

    The gradient energy of each parameter is the sum of its squared mini-batch (64)
    gradients of the loss (``loss_fn``, default cross-entropy) over ``data``; ties (e.g.
    the weights of an input feature that is always zero) are broken at random from
    ``seed``. Canaries there compete with the least real training signal (as the
    gradient canaries of Nasr et al., IEEE S&P 2021); the choice is made before
    training and independently of which canaries are included, so the bound stays
    valid.

    Raises:
        ValueError: ``count`` exceeds the number of parameters.

    """
    model = factory()
    set_flat(model, np.asarray(weights))
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if not 1 <= count <= dim:
        raise ValueError(f"cannot place {count} Dirac canaries among {dim} parameters")
    energy = np.zeros(dim)
    for x, y in DataLoader(data, batch_size=64):
        model.zero_grad(set_to_none=True)
        (loss_fn or torch.nn.functional.cross_entropy)(model(x), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        energy += grads.detach().double().numpy() ** 2
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD17AC]))
    order = np.lexsort((rng.random(dim), energy))
    return tuple(int(c) for c in order[:count])


def run_audit(
    config: Any,
    canaries: int = DEFAULT_CANARIES,
    *,
    progress: Any = None,
    on_start: Any = None,
    confidence: float = CONFIDENCE,
    _broken_no_noise_for_tests: bool = False,
) -> dict[str, Any]:
    """Audit ``config``'s simulation: train it once with canaries, bound epsilon from below.

    The run is :func:`sepals.simulations.harness.run_experiment` with the same settings
    and app (a bundled dataset, ``--app`` or a pretrained job), with every client's
    training data wrapped with the canaries it holds; its ``report.json`` gains an
    ``audit`` section (:class:`AuditResult`).

    Args:
        config: A :class:`~sepals.simulations.harness.SimulationConfig` with DP on.
        canaries: How many canaries to draw (``m``).
        progress: Passed to ``run_experiment`` (each round's row).
        on_start: Passed to ``run_experiment``.
        confidence: The bound's confidence level.
        _broken_no_noise_for_tests: TEST ONLY. The clients still calibrate sigma and
            claim the budget, but their optimizer adds no noise: a broken mechanism the
            audit must catch. Not reachable from the CLI or any deployment config.

    Returns:
        The report, as written to ``report.json``, with ``audit``.

    Raises:
        ValueError: DP is off, ``canaries`` < 2 or more than the trainable parameters,
            or the app's training data is not ``(x, y)`` pairs with class labels.

    """
    if not config.privacy.enabled:
        raise ValueError("the audit checks a DP claim: turn DP on (epsilon > 0)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    t0 = time.perf_counter()
    seed = config.federation.seed
    source = simulated_app_source(config, None)
    app = source.load()
    factory = app.build_model_factory()
    dimension = num_parameters(factory())
    if canaries > dimension:
        raise ValueError(f"at most {dimension} canaries fit this model's trainable parameters")
    theta_0 = get_flat(build_seeded(factory, seed))
    shares = [
        app_client_data(source, config.clients, config.partition, seed, pid)[0]
        for pid in range(config.clients)
    ]
    markable_pairs(shares[0])  # refuses data canaries cannot mark, before any training
    coordinates = quiet_coordinates(
        factory, theta_0, ConcatDataset(shares), canaries, seed, app.loss_fn
    )
    spec = make_canary_spec(
        seed,
        canaries,
        dimension,
        config.clients,
        coordinates=coordinates,
        broken_no_noise=_broken_no_noise_for_tests,
    )
    report = run_experiment(config, progress=progress, on_start=on_start, canaries=spec)
    out = Path(config.out)
    if not report["final"].get("model"):
        raise ValueError("the audited run saved no final model (no round was evaluated)")
    state = torch.load(io.BytesIO((out / report["final"]["model"]).read_bytes()))
    final_model = factory()
    final_model.load_state_dict(state)
    theta_final = get_flat(final_model)
    scores = canary_scores(theta_0, theta_final, spec.directions())
    result = assess(
        scores,
        spec.included(),
        config.privacy.delta,
        report["final"].get("epsilon"),
        confidence,
    )
    result = replace(
        result,
        seconds=time.perf_counter() - t0,
        broken_no_noise_for_tests=_broken_no_noise_for_tests,
    )
    report["audit"] = result.to_dict()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log_line = result.summary()
    log(INFO, "%s", log_line)
    return report


def summarize_audit(report: dict[str, Any]) -> str:
    """The one-line audit summary of a report with ``audit``."""
    derived = ("refuted", "estimate_exceeds_claim")
    fields = {k: v for k, v in report["audit"].items() if k not in derived}
    return AuditResult(**fields).summary()
