"""A client's side of the private explanation round: contribute a noisy sum, open the total.

**Contribute** (:func:`contribute`, message :data:`~sepals.common.explain_spec.EXPLAIN`).
The client checks the round against its plan (the operator's signature, every config
field, the plan's explanation settings, a release the plan allows and it has not made),
checks that one more Gaussian release fits its budget, decrypts the global model and
attributes it on up to ``max_examples`` of its own training examples. Each example's
vector (every target output's attributions) is clipped to L2 norm ``C_e``, each
target's part to ``C_e / sqrt(targets)`` (:func:`~sepals.common.explain.clip_rows`); the sum
moves by at most ``C_e`` when one example is replaced by a null one, so adding
``N(0, (sigma_e C_e)^2)`` to every value, drawn from the CSPRNG
(:func:`~sepals.client.secret_random.secure_gaussian`), makes the sum (epsilon_e,
delta)-DP on its own: the ledger entry ``(sigma_e, 1.0, 1)``, recorded before anything
leaves. The noisy sum is scaled by :func:`release_unit` (so that a client's largest
possible sum meets the codec's ``update_bound``), quantized, and encrypted with the
update codec, followed by a tag.

**Open** (:func:`open_release`, message :data:`~sepals.common.explain_spec.EXPLAIN_OPEN`).
A few clients decrypt the server's sum and return the plaintext release; the server
never holds a key. A client only opens a sum that carries a valid tag: a linear MAC
``sum_j a_j q_j`` of the quantized values, with 40-bit coefficients ``a_j`` derived
(HKDF) from the clients' secret key, which the server does not hold. Its limbs ride in
:data:`~sepals.common.explain_spec.TAG_FIELDS` extra fields, so a sum of tagged
contributions carries the tag of the sum. A global model, an update or any ciphertext
the server builds from them carries no valid tag (the server cannot compute one
without the coefficients), so an opening client is never a decryption oracle for them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch.utils.data import DataLoader, Dataset, Subset

from sepals.client.core import SepalsClient
from sepals.client.epsilon import release_noise_multiplier
from sepals.client.privacy import PrivacyLedger
from sepals.client.secret_random import DpRandomness, aes_generator, secure_gaussian
from sepals.client.training import resolve_device
from sepals.common.bfv import BfvCodec
from sepals.common.codec import UpdateCodec
from sepals.common.errors import ExplanationRejectedError, MalformedPayloadError
from sepals.common.explain import attribution_rows, clip_rows
from sepals.common.explain_spec import TAG_FIELDS, ExplanationSpec, split_record
from sepals.common.models import set_flat
from sepals.common.plan import PlanViolationError
from sepals.common.protocol import RoundConfig
from sepals.common.records import GlobalModel
from sepals.common.round_signature import global_model_digest, verify_round_signature

#: Bits of each tag coefficient.
TAG_COEFFICIENT_BITS = 40


def admit_explanation(
    client: SepalsClient,
    message_type: str,
    config: Mapping[str, Any] | None,
    global_model: GlobalModel | tuple[bytes, float] | None,
) -> tuple[RoundConfig, ExplanationSpec, int]:
    """Check an explanation message against the plan; return its round, spec and release.

    Raises:
        PlanViolationError: the plan has no explanation round, the message is not the
            operator's, or a field departs from the plan.

    """
    plan = client.plan
    spec = plan.explanation
    if spec is None:
        raise PlanViolationError("plan mismatch: explanation", "the plan has no explanation")
    if config is None:
        raise PlanViolationError("malformed round config", "no config record")
    values = dict(config.items())
    verify_round_signature(plan, message_type, values, global_model_digest(global_model))
    mine, rest = split_record(values)
    release = mine.get("explain-release")
    if not isinstance(release, int) or isinstance(release, bool):
        raise PlanViolationError("plan mismatch: explain-release", f"got {release!r}")
    if not 1 <= release <= spec.releases:
        raise PlanViolationError(
            "plan mismatch: explain-release", f"release {release} of {spec.releases}"
        )
    expected = spec.record(release)
    if set(mine) != set(expected) or any(
        type(mine[k]) is not type(v) or mine[k] != v for k, v in expected.items()
    ):
        raise PlanViolationError("plan mismatch: explanation", "settings differ from the plan")
    return RoundConfig.admitted(plan, rest), spec, release


def release_unit(codec: UpdateCodec, spec: ExplanationSpec) -> float:
    """What one encoded unit is worth: the largest possible sum maps to the codec's bound.

    A client's sum of at most ``max_examples`` vectors of norm ``C_e`` has no value
    beyond ``max_examples * C_e``; noise past the bound is clamped (post-processing).
    """
    bound = codec.value_bound
    if bound is None:
        return 1.0
    return spec.clip * spec.max_examples / bound


def chosen_examples(data: Dataset[Any], limit: int, randomness: DpRandomness) -> torch.Tensor:
    """The inputs of at most ``limit`` examples (a CSPRNG-drawn subset when there are more)."""
    n = len(data)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("this client has no training examples to explain")
    if n > limit:
        order = randomness.generator("explain-subset").permutation(n)[:limit]
        data = Subset(data, sorted(int(i) for i in order))
    batch = next(iter(DataLoader(data, batch_size=min(n, limit))))
    inputs = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(inputs, torch.Tensor):
        raise ValueError("explanations need examples whose input is one tensor")
    return inputs


def noisy_sum(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    spec: ExplanationSpec,
    sigma: float,
    randomness: DpRandomness,
) -> npt.NDArray[np.float64]:
    """The clipped attribution sum of ``inputs`` plus ``N(0, (sigma C_e)^2)`` per value."""
    rows = attribution_rows(model, inputs, spec.targets, method=spec.method, steps=spec.steps)
    if rows.shape[1] != spec.length:
        raise ValueError(
            f"this client's examples give {rows.shape[1]} attribution values, the plan "
            f"says {spec.length} ({spec.targets} targets x {spec.features} features)"
        )
    total = clip_rows(rows, spec.clip, spec.targets).sum(axis=0)
    noise = secure_gaussian(randomness.generator("explain-noise"), spec.length, sigma * spec.clip)
    return np.asarray(total + noise, dtype=np.float64)


class _Centred:
    """Rounding offsets of 1/2: values already on the grid are encoded exactly."""

    def random(self, size: int) -> npt.NDArray[np.float64]:
        return np.full(size, 0.5)


def tag_coefficients(secret_context: bytes, federation_id: str, length: int) -> Any:
    """The tag's secret coefficients (Python ints below 2**40), from the clients' key."""
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=16,
        salt=None,
        info=b"sepals explanation tag/" + federation_id.encode(),
    ).derive(secret_context)
    draws = aes_generator(int.from_bytes(key, "little")).integers(
        0, 1 << TAG_COEFFICIENT_BITS, size=length, dtype=np.int64
    )
    return draws.astype(object)


def _tag_base(codec: BfvCodec) -> int:
    config = codec.encryption
    levels = config.max_quantized if config is not None else 256
    return 1 << min(12, math.floor(math.log2(levels)))


def tag_limbs(values: npt.NDArray[np.int64], coefficients: Any, base: int) -> list[int]:
    """The tag ``sum_j a_j q_j`` as :data:`TAG_FIELDS` signed base-``base`` digits."""
    tag = int(np.dot(values.astype(object), coefficients))
    sign, rest = (-1 if tag < 0 else 1), abs(tag)
    limbs = []
    for _ in range(TAG_FIELDS):
        limbs.append(sign * (rest % base))
        rest //= base
    if rest:
        raise ValueError("explanation tag does not fit its fields")
    return limbs


def encode_release(
    client: SepalsClient, noisy: npt.NDArray[np.float64], spec: ExplanationSpec, rounding: Any
) -> tuple[bytes, int]:
    """The payload of a noisy sum (scaled, clamped, quantized, tagged) and the clamped count."""
    codec = client.codec
    scaled = noisy / release_unit(codec, spec)
    bound = codec.value_bound
    clamped = 0
    if bound is not None:
        clamped = int(np.count_nonzero(np.abs(scaled) > bound))
        np.clip(scaled, -bound, bound, out=scaled)
    if not isinstance(codec, BfvCodec):
        payload, _ = codec.encode_update(np.concatenate([scaled, np.zeros(TAG_FIELDS)]))
        return payload, clamped
    secret = client.runtime.secret_context or b""
    q, _ = codec.quantize(scaled, rounding)
    coefficients = tag_coefficients(secret, client.plan.federation_id, spec.length)
    limbs = tag_limbs(q, coefficients, _tag_base(codec))
    grid = np.concatenate([q, np.asarray(limbs, dtype=np.int64)]).astype(np.float64)
    step = codec.encryption.quant_step if codec.encryption is not None else 1.0
    # A value on the grid at the bound may land one ulp past it in floating point.
    limit = math.inf if bound is None else bound
    on_grid = np.clip(grid * step, -limit, limit)
    payload, _ = codec.encode_update(on_grid, _Centred())  # type: ignore[arg-type]
    return payload, clamped


@functools.lru_cache(maxsize=64)
def release_sigma(epsilon: float, delta: float, accountant: str) -> float:
    """``sigma_e`` of a release costing ``epsilon`` (memoised per process)."""
    return release_noise_multiplier(epsilon, delta, accountant)


def contribute(
    client: SepalsClient,
    cfg: RoundConfig,
    spec: ExplanationSpec,
    release: int,
    global_model: GlobalModel | tuple[bytes, float] | None,
    ledger: PrivacyLedger,
) -> tuple[bytes, dict[str, int | float | list[int] | list[float]], PrivacyLedger]:
    """An admitted explanation round: the payload, its metrics and the ledger after it.

    Raises:
        PlanViolationError: this client already made that release.
        BudgetExhaustedError: the release would exceed the budget (nothing is computed).

    """
    rt = client.runtime
    if release in ledger.explanations:
        raise PlanViolationError("explanation already released", f"release {release}")
    sigma = release_sigma(spec.epsilon, rt.privacy.delta, rt.privacy.accountant)
    ledger.check_release(sigma)
    weights = client.global_weights(cfg, global_model)
    model = client.factory()
    set_flat(model, weights)
    device = resolve_device(rt.device)  # where the client trains; sums come back on the CPU
    model.to(device)
    randomness = DpRandomness(rt.reproducible_seed).child(rt.client_id, "explain", release)
    inputs = chosen_examples(rt.train_data, spec.max_examples, randomness).to(device)
    noisy = noisy_sum(model, inputs, spec, sigma, randomness)
    payload, clamped = encode_release(client, noisy, spec, randomness.generator("rounding"))
    after = ledger.record_release(release, sigma)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": int(inputs.shape[0]),
        "explain-sigma": sigma,
        "clamped-values": clamped,
    }
    if after.epsilon is not None:
        metrics["epsilon"] = after.epsilon
        metrics["delta"] = after.delta
    return payload, metrics, after


def open_release(
    client: SepalsClient, spec: ExplanationSpec, aggregate: GlobalModel | None
) -> npt.NDArray[np.float64]:
    """Decrypt a sum of explanation contributions and return the plaintext release.

    Raises:
        MalformedPayloadError: there is no sum to open.
        GlobalModelRejectedError: the sum is out of range, or its tag is not the tag of
            its values (:class:`ExplanationRejectedError`).

    """
    if aggregate is None:
        raise MalformedPayloadError("no explanation sum to open")
    codec = client.codec
    values = codec.decode_aggregate(aggregate.payload, aggregate.summands)
    if values.shape != (spec.payload_length,):
        raise ExplanationRejectedError(
            f"sum has {values.size} values, an explanation {spec.payload_length}"
        )
    if isinstance(codec, BfvCodec) and codec.encryption is not None:
        check_tag(client, spec, values / codec.encryption.quant_step)
    return values[: spec.length] * release_unit(codec, spec)


def check_tag(client: SepalsClient, spec: ExplanationSpec, grid: npt.NDArray[np.float64]) -> None:
    """Refuse a sum whose tag fields are not the tag of its values."""
    codec = client.codec
    if not isinstance(codec, BfvCodec):
        raise ExplanationRejectedError("only BFV sums carry a tag")
    q = np.rint(grid).astype(np.int64)
    coefficients = tag_coefficients(
        client.runtime.secret_context or b"", client.plan.federation_id, spec.length
    )
    base = _tag_base(codec)
    want = int(np.dot(q[: spec.length].astype(object), coefficients))
    got = sum(int(limb) * base**i for i, limb in enumerate(q[spec.length :]))
    if got != want:
        raise ExplanationRejectedError("the sum's tag does not match: not an explanation sum")
