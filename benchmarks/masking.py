"""Pairwise masking under BFV: its cost against unmasked BFV, in the same run.

Measures, in this process, the masking targets and prints one row per target with the
measured figure, its ratio against the unmasked baseline, and ``met`` or ``MISSED``
(never asserted):

1. **Client time** (target: masking adds at most :data:`TARGET_CLIENT_ADDED` of a
   client's round). The unmasked round of one client is what
   :meth:`sepals.client.core.SepalsClient.train` does for ``python -m benchmarks.million``'s
   app: DP-SGD (epsilon 8) of :func:`benchmarks.million.make_model` (the ~1M-parameter
   MLP) for one round on the client's IID share of digits (the share it gets among the
   round's sampled clients, as the simulation harness splits an own app's data), then
   the BFV encode of the weighted update. Torch runs on one thread, as in a simulated
   client. The added time is the client's four masking stages on the ``k``-regular graph
   of :func:`~sepals.common.masking.resolve_mask_params` (for 100 clients ``k = 20``,
   ``T = 14``): ``start_round``, ``share_secrets`` (over all members), ``open_and_mask``
   and the extra cost of encoding with a slot mask, ``reveal_shares``. The other
   clients' keys and sealed shares come from the same functions; that setup is not
   counted.
2. **Server time** (target: removing the masks of 10% dropouts takes at most
   :data:`TARGET_SERVER_SECONDS`). :meth:`~sepals.server.serverapp.masking.MaskRound.slot_offset`
   (Shamir reconstruction and PRG expansion) plus the extra cost of adding the offset
   in ``aggregate_loaded``, against the plain ``aggregate_loaded`` of the survivors'
   payloads. The sum adds real ciphertexts (a few distinct encrypted updates, repeated
   to the survivors' count). The output also checks, in the slot domain, that the
   offset cancels the survivors' masks exactly.
3. **Bytes** (target: the masked upload is at most :data:`TARGET_UPLOAD_RATIO` times the
   unmasked one), plus the bytes of each masking message of one client in one round,
   estimated from its records (``bytes`` values by length, an int as 8 bytes).
4. **Wall time** (target: at most :data:`TARGET_WALL_RATIO`): :func:`run_wall` runs the
   default simulation (the README's main job) with and without masking, and checks that
   both reach the same accuracy; ``--skip-wall`` skips it.

Usage: ``python -m benchmarks.masking [--quick] [--json PATH] [--repeats R] [--seed S]``

The machine may be shared: timings are medians of ``--repeats`` runs and indicative.
Importing this module starts nothing heavy: torch and sepals load when a run starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from sepals.client.masking import MaskState
    from sepals.common.bfv import BfvCodec
    from sepals.common.mask_prg import SlotVector
    from sepals.common.masking import MaskParams
    from sepals.common.plan import FederationPlan
    from sepals.server.serverapp.masking import MaskRound

P = ParamSpec("P")
R = TypeVar("R")

TARGET_CLIENT_ADDED = 0.10
TARGET_SERVER_SECONDS = 0.5
TARGET_UPLOAD_RATIO = 1.05
TARGET_WALL_RATIO = 1.15
DROPOUT_FRACTION = 0.1
FEDERATION_ID = "5e9a1c0d" * 4
#: An operator key that parses; nothing in this benchmark is signed.
OPERATOR_KEY = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
SERVER_ROUND = 1
#: Distinct encrypted updates behind the server's sum (repeated to the survivors' count).
DISTINCT_PAYLOADS = 3
INT_BYTES = 8


@dataclass(frozen=True)
class Sizes:
    """The benchmark's scale.

    Attributes:
        parameters: Model parameters (the MLP's hidden width is chosen to match).
        clients: Clients sampled in the round (members of the mask graph).
        dropout_fraction: Share of them that drop after sharing, before uploading.

    """

    parameters: int = 1_000_000
    clients: int = 100
    dropout_fraction: float = DROPOUT_FRACTION

    def __post_init__(self) -> None:
        if self.parameters < 100:
            raise ValueError(f"parameters must be >= 100, got {self.parameters}")
        if self.clients < 3:
            raise ValueError(f"clients must be >= 3, got {self.clients}")
        if not 0.0 <= self.dropout_fraction < 0.5:
            raise ValueError(f"dropout_fraction must lie in [0, 0.5), got {self.dropout_fraction}")

    @property
    def dropouts(self) -> int:
        """Clients that drop: ``round(fraction * clients)``."""
        return round(self.dropout_fraction * self.clients)


QUICK = Sizes(parameters=20_000, clients=10)


def verdict(value: float, target: float) -> str:
    """``met`` when ``value`` is at most ``target``, else ``MISSED``.

    Raises:
        ValueError: ``value`` is negative or not finite, or ``target`` is not positive.

    """
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"value must be a finite number >= 0, got {value!r}")
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive finite number, got {target!r}")
    return "met" if value <= target else "MISSED"


def hidden_width(parameters: int) -> int:
    """Hidden width of the 64 -> H -> 10 MLP with the parameter count closest below."""
    from benchmarks import million

    return max(
        1, (parameters - million.NUM_CLASSES) // (million.IN_FEATURES + 1 + million.NUM_CLASSES)
    )


def model_factory(parameters: int) -> Callable[[], nn.Module]:
    """:func:`benchmarks.million.make_model` at 1M parameters, else the same MLP resized."""
    from benchmarks import million

    if parameters == million.TARGET_PARAMETERS:
        return million.make_model
    hidden = hidden_width(parameters)

    def make() -> nn.Module:
        from sepals.common.models import MLP

        return MLP(million.IN_FEATURES, million.NUM_CLASSES, hidden=(hidden,))

    return make


def record_bytes(value: Any) -> int:
    """Estimated wire bytes of a record's values: bytes by length, an int as 8 bytes.

    Lists, tuples and mappings are summed over their items (mapping keys by their UTF-8
    length); floats count 8 bytes and strings their UTF-8 length.

    Raises:
        TypeError: a value of another type.

    """
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, bool | int | float):
        return INT_BYTES
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        return sum(len(str(k).encode()) + record_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(record_bytes(v) for v in value)
    raise TypeError(f"cannot size a record value of type {type(value).__name__}")


def node_ids(count: int) -> list[int]:
    """``count`` distinct, deterministic node ids (spread like Flower's random ones)."""
    rng = np.random.default_rng(20_251_127)
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(int(rng.integers(1, 2**63, dtype=np.int64)))
    return sorted(ids)


def make_plan(codec: BfvCodec, length: int, params: MaskParams) -> FederationPlan:
    """A plan with masking on for ``codec``'s key and ``length`` parameters."""
    from sepals.common.plan import FederationPlan

    return FederationPlan(
        federation_id=FEDERATION_ID,
        rounds=3,
        fraction_train=1.0,
        local_epochs=1,
        batch_size=32,
        learning_rate=0.05,
        lr_schedule="cosine",
        momentum=0.9,
        model_seed=0,
        codec=codec.name,
        key_fingerprint=codec.fingerprint_hex,
        vector_length=length,
        operator_key=OPERATOR_KEY,
        mask_neighbours=params.neighbours,
        mask_threshold=params.threshold,
    )


def pick_dropouts(nodes: Sequence[int], count: int, keep: int, seed: int) -> tuple[int, ...]:
    """``count`` of ``nodes`` (never ``keep``) that drop, chosen by ``seed``.

    Raises:
        ValueError: ``count`` is negative or more than the nodes other than ``keep``.

    """
    others = [n for n in nodes if n != keep]
    if not 0 <= count <= len(others):
        raise ValueError(f"cannot drop {count} of the {len(others)} clients other than {keep}")
    picked = np.random.default_rng(seed).choice(len(others), size=count, replace=False)
    return tuple(sorted(others[int(i)] for i in picked))


@dataclass
class StageTimes:
    """Seconds of one client's masking stages (``mask`` is its ``open_and_mask``)."""

    keys: float = 0.0
    shares: float = 0.0
    mask: float = 0.0
    reveal: float = 0.0

    @property
    def total(self) -> float:
        """All four stages."""
        return self.keys + self.shares + self.mask + self.reveal


@dataclass
class MaskedRoundRun:
    """One round of the masking protocol with every client played in this process.

    Attributes:
        server: The server's round, after the survivors' reveals.
        me: The client whose stages were timed (a survivor).
        mask: Its total slot mask.
        survivors: The clients that uploaded (``me`` among them).
        dropped: The sharers that did not upload.
        times: ``me``'s stage seconds.
        messages: Estimated bytes of ``me``'s masking messages (see :func:`record_bytes`).
        survivors_mask_sum: Sum of every survivor's mask modulo t (``None`` unless asked).

    """

    server: MaskRound
    me: int
    mask: SlotVector
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    times: StageTimes
    messages: dict[str, int] = field(default_factory=dict)
    survivors_mask_sum: SlotVector | None = None


def _timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    """``fn(*args, **kwargs)`` and its wall seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_mask_round(
    plan: FederationPlan,
    params: MaskParams,
    nodes: Sequence[int],
    me: int,
    dropped: Sequence[int],
    slots: int,
    modulus: int,
    *,
    sum_survivor_masks: bool = False,
) -> MaskedRoundRun:
    """Play the four masking stages for every client; time only ``me``'s.

    The other clients run the very same client functions (their cost is setup, not
    ``me``'s). Clients other than ``me`` build their masks with ``slots`` only when
    ``sum_survivor_masks`` asks for the survivors' sum; otherwise with one slot, which
    leaves their protocol state identical.

    Raises:
        ValueError: ``me`` is not a node or is among ``dropped``.

    """
    from sepals.client import masking as cm
    from sepals.server.serverapp.masking import MaskRound

    if me not in nodes or me in dropped:
        raise ValueError("the timed client must be a node that does not drop")
    times = StageTimes()
    messages: dict[str, int] = {}
    server = MaskRound(params, plan.federation_id, SERVER_ROUND)
    states: dict[int, MaskState] = {}
    for node in nodes:
        (state, reply), seconds = _timed(cm.start_round, SERVER_ROUND, node)
        states[node] = state
        server.admit_keys(node, reply)
        if node == me:
            times.keys = seconds
            messages["keys reply"] = record_bytes(reply)
    members = server.members_record()
    messages["members message"] = record_bytes(members)
    for node in nodes:
        (state, reply), seconds = _timed(
            cm.share_secrets, plan, states[node], SERVER_ROUND, members
        )
        states[node] = state
        server.admit_shares(node, reply)
        if node == me:
            times.shares = seconds
            messages["shares reply"] = record_bytes(reply)
    server.close_sharing()
    gone = set(dropped)
    mask_sum: SlotVector | None = np.zeros(slots, dtype=np.uint64) if sum_survivor_masks else None
    mask: SlotVector | None = None
    for node in nodes:
        if node in gone:
            continue  # it drops before uploading: it never needs its mask
        record = server.train_record(node)
        width = slots if node == me or sum_survivor_masks else 1
        (state, vec), seconds = _timed(
            cm.open_and_mask, plan, states[node], SERVER_ROUND, record, width, modulus
        )
        states[node] = state
        if node == me:
            times.mask = seconds
            mask = vec
            messages["train message mask part"] = record_bytes(record)
        if mask_sum is not None:
            from sepals.common.mask_prg import add_mod

            add_mod(mask_sum, vec, modulus)
    survivors = tuple(n for n in server.sharers if n not in gone)
    unmask = server.unmask_record(survivors)
    messages["unmask message"] = record_bytes(unmask)
    for node in survivors:
        (state, reply), seconds = _timed(cm.reveal_shares, plan, states[node], SERVER_ROUND, unmask)
        states[node] = state
        server.admit_reveal(node, reply)
        if node == me:
            times.reveal = seconds
            messages["reveal reply"] = record_bytes(reply)
    if mask is None:  # me is a sharer unless the graph left it too few neighbours
        raise ValueError(f"client {me} was left out of the round's sharers")
    return MaskedRoundRun(
        server=server,
        me=me,
        mask=mask,
        survivors=survivors,
        dropped=tuple(n for n in server.sharers if n in gone),
        times=times,
        messages=messages,
        survivors_mask_sum=mask_sum,
    )


def prg_vectors(server: MaskRound) -> int:
    """How many PRG vectors :meth:`MaskRound.slot_offset` expands.

    The survivors' self masks plus the pairwise masks between every dropped client and
    its surviving neighbours.
    """
    alive = set(server.survivors)
    return len(server.survivors) + sum(
        sum(1 for j in server.graph[d] if j in alive) for d in server.dropped
    )


def reconstruct_all(server: MaskRound) -> float:
    """Seconds to rebuild and check every secret ``slot_offset`` needs, as it does.

    Mirrors :meth:`MaskRound.slot_offset`'s reconstruction: one ``combine_secrets`` batch
    of every revealed share set, each secret checked against the owner's commitment or
    mask public key.

    Raises:
        ValueError: a secret does not rebuild to what its owner published.

    """
    from sepals.common.mask_shares import combine_secrets
    from sepals.common.masking import mask_public_key, self_mask_commitment
    from sepals.server.serverapp.masking import KIND_PAIR, KIND_SELF

    jobs = [(n, KIND_SELF) for n in server.survivors] + [(d, KIND_PAIR) for d in server.dropped]
    t0 = time.perf_counter()
    secrets = combine_secrets([server.revealed[job] for job in jobs], server.params.threshold)
    for (node, kind), secret in zip(jobs, secrets, strict=True):
        if kind == KIND_SELF and self_mask_commitment(secret) != server.keys[node][2]:
            raise ValueError(f"self-mask seed of {node} does not rebuild")
        if kind == KIND_PAIR and mask_public_key(secret) != server.keys[node][0]:
            raise ValueError(f"mask key of {node} does not rebuild")
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return statistics.median(_timed(fn)[1] for _ in range(repeats))


def _train_one_client(
    factory: Callable[[], nn.Module], clients: int, seed: int
) -> tuple[Callable[[], tuple[np.ndarray[Any, Any], int]], int]:
    """A callable running one client's DP round (as ``SepalsClient.train``), and its size.

    The returned callable gives the weighted update and the example count. The noise
    multiplier is calibrated once here (a client does it once per federation).
    """
    import torch
    from torch.utils.data import Subset

    from benchmarks import million
    from sepals.client.privacy import PrivacyLedger, planned_participation
    from sepals.client.secret_random import DpRandomness
    from sepals.client.training import TrainSettings, dp_schedule, make_dp_compatible, train_round
    from sepals.common.config import PrivacyConfig
    from sepals.common.federation import FederationConfig
    from sepals.common.models import get_flat
    from sepals.common.partition import PartitionSpec, partition_indices
    from sepals.common.protocol import encode_contribution

    torch.set_num_threads(1)  # as a simulated client (one CPU per client)
    app = million.make_app(seed)
    train = app.train_dataset
    labels = np.asarray(train.tensors[1], dtype=np.int64)  # type: ignore[union-attr]
    part = partition_indices(labels, clients, PartitionSpec("iid"), seed)[0]
    data = Subset(train, part.tolist())  # type: ignore[arg-type]
    fed = FederationConfig(
        rounds=3, batch_size=million.BATCH_SIZE, learning_rate=million.LEARNING_RATE
    )
    privacy = PrivacyConfig(target_epsilon=million.EPSILON)
    settings = TrainSettings(
        epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        learning_rate=fed.learning_rate,
        momentum=fed.momentum,
        randomness=DpRandomness(seed=seed),
    )
    fixed = make_dp_compatible(factory)
    rate, steps = dp_schedule(len(data), settings)
    ledger = PrivacyLedger.empty(privacy).calibrated(
        privacy, rate, steps, planned_participation(fed.rounds, fed.fraction_train)
    )

    anchor = get_flat(fixed())

    def run() -> tuple[np.ndarray[Any, Any], int]:
        ledger.check_budget(steps)
        out = train_round(fixed, None, data, settings, privacy, ledger, SERVER_ROUND, device="cpu")
        # What a client encodes: its change from the round-0 model, at full weight.
        change, _ = encode_contribution(out.weights, anchor, out.num_examples, len(data), None)
        return change, out.num_examples

    return run, len(data)


@dataclass(frozen=True)
class Row:
    """One printed row: a target, what was measured and the verdict."""

    target: str
    measured: str
    ratio: str
    verdict: str


@dataclass
class MaskingResult:
    """Every figure of the benchmark (seconds, bytes, counts)."""

    parameters: int
    clients: int
    dropouts: int
    neighbours: int
    threshold: int
    slots: int
    client_examples: int
    client_train_seconds: float
    client_encode_seconds: float
    client_decode_seconds: float
    client_unmasked_seconds: float
    client_stage_seconds: dict[str, float]
    client_masked_encode_extra_seconds: float
    client_added_seconds: float
    client_added_ratio: float
    server_offset_seconds: float
    server_first_reconstruct_seconds: float
    server_reconstruct_seconds: float
    server_prg_seconds: float
    server_prg_vectors: int
    server_prg_vector_ms_single_thread: float
    server_add_mod_ms: float
    server_add_offset_extra_seconds: float
    server_aggregate_seconds: float
    server_unmask_seconds: float
    server_unmask_ratio: float
    offset_cancels_masks: bool
    upload_bytes_unmasked: int
    upload_bytes_masked: int
    upload_ratio: float
    message_bytes: dict[str, int]
    wall: dict[str, Any] | None = None

    def rows(self) -> list[Row]:
        """The printed table's rows, one per target."""
        rows = [
            Row(
                f"client: masking adds <= {TARGET_CLIENT_ADDED:.0%} of a round",
                f"+{self.client_added_seconds:.3f} s on {self.client_unmasked_seconds:.3f} s",
                f"{1 + self.client_added_ratio:.3f}x (+{self.client_added_ratio:.1%})",
                verdict(self.client_added_ratio, TARGET_CLIENT_ADDED),
            ),
            Row(
                f"server: unmask {self.dropouts}/{self.clients} dropped <= "
                f"{TARGET_SERVER_SECONDS:g} s",
                f"{self.server_unmask_seconds:.3f} s "
                f"(aggregate {self.server_aggregate_seconds:.3f} s)",
                f"{self.server_unmask_ratio:.2f}x of aggregate",
                verdict(self.server_unmask_seconds, TARGET_SERVER_SECONDS),
            ),
            Row(
                f"bytes: upload <= {TARGET_UPLOAD_RATIO:g}x",
                f"{self.upload_bytes_masked:,} vs {self.upload_bytes_unmasked:,} B",
                f"{self.upload_ratio:.4f}x",
                verdict(self.upload_ratio, TARGET_UPLOAD_RATIO),
            ),
        ]
        if self.wall is None:
            rows.append(
                Row(f"wall: simulation <= {TARGET_WALL_RATIO:g}x", "not run", "-", "not run")
            )
        else:
            ratio = float(self.wall["ratio"])
            gap = 100 * abs(self.wall["accuracy_masked"] - self.wall["accuracy_unmasked"])
            rows.append(
                Row(
                    f"wall: simulation <= {TARGET_WALL_RATIO:g}x",
                    f"{self.wall['seconds_masked']:.1f} vs {self.wall['seconds_unmasked']:.1f} s",
                    f"{ratio:.3f}x",
                    verdict(ratio, TARGET_WALL_RATIO),
                )
            )
            rows.append(
                Row(
                    "accuracy: masked within 0.1 points",
                    f"{100 * self.wall['accuracy_masked']:.2f}% vs "
                    f"{100 * self.wall['accuracy_unmasked']:.2f}%",
                    f"{gap:.2f} points",
                    verdict(gap, 0.1),
                )
            )
        return rows


def run_wall(repeats: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Target 4: wall time of the default simulation (``sepals-sim``), masked against not.

    Runs the README's main job ``repeats`` times each way in this process, alternating
    which goes first, and returns the medians of the whole runs' wall seconds (start-up
    included), their ratio, and both final accuracies. Both runs draw their DP noise from
    the seed (``--insecure-reproducible``): the sums are exact, so with the same noise the
    masked and unmasked models must agree within 0.1 points, which isolates the masking's
    effect on accuracy from the CSPRNG noise's run-to-run spread.
    """
    from sepals.simulations.cli import build_parser, config_from_args
    from sepals.simulations.harness import run_experiment

    seconds: dict[str, list[float]] = {"masked": [], "unmasked": []}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sepals-maskwall-") as tmp:
        for i in range(repeats):
            order = ("masked", "unmasked") if i % 2 == 0 else ("unmasked", "masked")
            for kind in order:
                argv = ["--out", str(Path(tmp) / f"{kind}-{i}"), "--insecure-reproducible"]
                if kind == "unmasked":
                    argv.append("--no-masking")
                report = run_experiment(config_from_args(build_parser().parse_args(argv)))
                final = report["final"]
                seconds[kind].append(float(final["wall_seconds"]))
                accuracy[kind] = float(final["accuracy"])
                if progress is not None:
                    progress(
                        f"simulation {kind} {i + 1}/{repeats}: {seconds[kind][-1]:.1f} s, "
                        f"accuracy {100 * accuracy[kind]:.2f}%"
                    )
    masked, unmasked = statistics.median(seconds["masked"]), statistics.median(seconds["unmasked"])
    return {
        "seconds_masked": masked,
        "seconds_unmasked": unmasked,
        "ratio": masked / unmasked,
        "accuracy_masked": accuracy["masked"],
        "accuracy_unmasked": accuracy["unmasked"],
        "runs": seconds,
    }


def run_benchmark(
    sizes: Sizes = Sizes(),
    *,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> MaskingResult:
    """Measure targets 1-3 (see the module docstring) at ``sizes``.

    Raises:
        ValueError: ``repeats`` below 1, or sizes the data cannot be split into.

    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    say = progress if progress is not None else (lambda _text: None)
    from sepals.common.bfv import BfvCodec
    from sepals.common.config import EncryptionConfig
    from sepals.common.mask_prg import add_mod, mask_vector
    from sepals.common.masking import resolve_mask_params
    from sepals.common.models import num_parameters
    from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    factory = model_factory(sizes.parameters)
    length = num_parameters(factory())
    config = EncryptionConfig(scheme="bfv", max_clients=sizes.clients)
    bundle = generate_bfv_bundle(config)
    client_codec = BfvCodec.for_client(bundle, config)
    server_codec = BfvCodec.for_server(public_bfv_bundle(bundle), config)
    params = resolve_mask_params(sizes.clients)
    plan = make_plan(client_codec, length, params)
    slots = client_codec.slot_count(length)
    t = client_codec.plain_modulus

    # ---- 1. the client's unmasked round: DP training + BFV encode of the weighted update
    say(f"training one client's DP round ({length:,} parameters, {sizes.clients} clients)")
    train, examples = _train_one_client(factory, sizes.clients, seed)
    train()  # warm-up (first Opacus wrap, allocator)
    train_runs = [_timed(train) for _ in range(repeats)]
    train_seconds = statistics.median(s for _, s in train_runs)
    update = train_runs[0][0][0]
    gen = np.random.default_rng(seed)
    say("encoding with and without a slot mask")
    nodes = node_ids(sizes.clients)
    me = nodes[0]
    dropped = pick_dropouts(nodes, sizes.dropouts, me, seed)
    rnd = run_mask_round(plan, params, nodes, me, dropped, slots, t, sum_survivor_masks=True)
    plain_payload, _ = client_codec.encode_update(update, gen)
    masked_payload, _ = client_codec.encode_update(update, gen, slot_mask=rnd.mask)
    encode_plain: list[float] = []
    encode_masked: list[float] = []
    for _ in range(repeats):  # interleaved, so that load drifts hit both alike
        encode_plain.append(_timed(lambda: client_codec.encode_update(update, gen))[1])
        encode_masked.append(
            _timed(lambda: client_codec.encode_update(update, gen, slot_mask=rnd.mask))[1]
        )
    encode_seconds = statistics.median(encode_plain)
    decode_seconds = median_seconds(lambda: client_codec.decode(plain_payload), repeats)
    encode_extra = max(0.0, statistics.median(encode_masked) - encode_seconds)
    # Stages again, ``repeats`` times, for medians (each a fresh round; setup untimed).
    stage_runs = [rnd.times] + [
        run_mask_round(plan, params, nodes, me, dropped, slots, t).times for _ in range(repeats - 1)
    ]
    stages = {
        name: statistics.median(getattr(s, name) for s in stage_runs)
        for name in ("keys", "shares", "mask", "reveal")
    }
    unmasked = train_seconds + encode_seconds
    added = sum(stages.values()) + encode_extra

    # ---- 2. the server: offset (reconstruction + PRG) and adding it to a real sum
    say(f"server: offset for {len(rnd.survivors)} survivors, {len(rnd.dropped)} dropped")
    server = rnd.server
    first_reconstruct = reconstruct_all(server)  # galois' import and field, once a process
    offset_runs = [_timed(lambda: server.slot_offset(slots, t)) for _ in range(repeats)]
    offset = offset_runs[0][0]
    offset_seconds = statistics.median(s for _, s in offset_runs)
    reconstruct = statistics.median(reconstruct_all(server) for _ in range(repeats))
    prg_one = median_seconds(lambda: mask_vector(bytes(16), slots, t), repeats)
    acc = np.zeros(slots, dtype=np.uint64)

    def accumulate() -> None:
        nonlocal acc
        acc += offset  # what MaskSum does per vector (it reduces only at the end)

    add_one = median_seconds(accumulate, repeats)
    cancels = False
    if rnd.survivors_mask_sum is not None:
        check = rnd.survivors_mask_sum.copy()
        add_mod(check, offset, t)
        cancels = bool(not check.any())
    distinct = [
        server_codec.validate(
            client_codec.encode_update(update * (1 + i), gen, slot_mask=rnd.mask)[0], length
        )
        for i in range(min(DISTINCT_PAYLOADS, len(rnd.survivors)))
    ]
    loaded = [distinct[i % len(distinct)] for i in range(len(rnd.survivors))]
    say(f"server: summing {len(loaded)} payloads with and without the offset")
    agg_plain: list[float] = []
    agg_offset: list[float] = []
    for _ in range(repeats):
        agg_plain.append(_timed(lambda: server_codec.aggregate_loaded(loaded, length))[1])
        agg_offset.append(_timed(lambda: server_codec.aggregate_loaded(loaded, length, offset))[1])
    aggregate = statistics.median(agg_plain)
    add_extra = max(0.0, statistics.median(agg_offset) - aggregate)
    unmask = offset_seconds + add_extra

    # ---- 3. bytes
    return MaskingResult(
        parameters=length,
        clients=sizes.clients,
        dropouts=len(rnd.dropped),
        neighbours=params.degree(sizes.clients),
        threshold=params.threshold,
        slots=slots,
        client_examples=examples,
        client_train_seconds=train_seconds,
        client_encode_seconds=encode_seconds,
        client_decode_seconds=decode_seconds,
        client_unmasked_seconds=unmasked,
        client_stage_seconds=stages,
        client_masked_encode_extra_seconds=encode_extra,
        client_added_seconds=added,
        client_added_ratio=added / unmasked,
        server_offset_seconds=offset_seconds,
        server_first_reconstruct_seconds=first_reconstruct,
        server_reconstruct_seconds=reconstruct,
        server_prg_seconds=prg_vectors(server) * (prg_one + add_one),
        server_prg_vectors=prg_vectors(server),
        server_prg_vector_ms_single_thread=1000 * prg_one,
        server_add_mod_ms=1000 * add_one,
        server_add_offset_extra_seconds=add_extra,
        server_aggregate_seconds=aggregate,
        server_unmask_seconds=unmask,
        server_unmask_ratio=unmask / aggregate,
        offset_cancels_masks=cancels,
        upload_bytes_unmasked=len(plain_payload),
        upload_bytes_masked=len(masked_payload),
        upload_ratio=len(masked_payload) / len(plain_payload),
        message_bytes=dict(rnd.messages),
    )


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table with a header."""
    head = Row("target", "measured", "ratio", "verdict")
    cells = [head, *rows]
    widths = [max(len(getattr(r, f)) for r in cells) for f in ("target", "measured", "ratio")]
    lines = []
    for r in cells:
        lines.append(
            f"{r.target:<{widths[0]}} | {r.measured:<{widths[1]}} | {r.ratio:<{widths[2]}} | "
            f"{r.verdict}"
        )
        if r is head:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_result(r: MaskingResult) -> str:
    """Everything the CLI prints after the runs: details, then the table."""
    st = r.client_stage_seconds
    lines = [
        f"{r.parameters:,} parameters ({r.slots:,} BFV slots); {r.clients} clients, graph "
        f"degree k={r.neighbours}, threshold T={r.threshold}; {r.dropouts} dropped",
        f"client ({r.client_examples} examples, 1 torch thread): unmasked round "
        f"{r.client_unmasked_seconds:.3f} s = DP training {r.client_train_seconds:.3f} s + "
        f"BFV encode {r.client_encode_seconds:.3f} s",
        f"  (informational: from round 2 on a client also decrypts the global model, "
        f"{r.client_decode_seconds:.3f} s; with it masking adds "
        f"{r.client_added_seconds / (r.client_unmasked_seconds + r.client_decode_seconds):.1%})",
        f"client masking: keys {st['keys'] * 1e3:.1f} ms, shares {st['shares'] * 1e3:.1f} ms, "
        f"open+mask {st['mask'] * 1e3:.1f} ms, masked-encode extra "
        f"{r.client_masked_encode_extra_seconds * 1e3:.1f} ms, reveal "
        f"{st['reveal'] * 1e3:.1f} ms: +{r.client_added_seconds:.3f} s",
        f"server unmask: offset {r.server_offset_seconds:.3f} s, of which one thread would "
        f"spend {r.server_reconstruct_seconds:.3f} s on Shamir reconstruction "
        f"({r.clients - r.dropouts} self seeds + {r.dropouts} mask keys) and "
        f"{r.server_prg_seconds:.3f} s on {r.server_prg_vectors} PRG vectors (AES-CTR "
        f"{r.server_prg_vector_ms_single_thread:.1f} ms + add {r.server_add_mod_ms:.1f} ms "
        "each, expanded separately); slot_offset rebuilds all secrets in one batch, then "
        f"expands chunk by chunk into its sums; adding it to the sum "
        f"+{r.server_add_offset_extra_seconds:.3f} s; first reconstruction in a process "
        f"(galois import and field set-up, once) {r.server_first_reconstruct_seconds:.3f} s",
        "server offset cancels the survivors' masks exactly: "
        + ("yes" if r.offset_cancels_masks else "NO"),
        "masking messages of one client per round (estimated bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in r.message_bytes.items())
        + f"; total {sum(r.message_bytes.values()):,}",
        "",
        format_table(r.rows()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: measure, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.masking", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: 20k params, 10 clients")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-wall",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="skip target 4, the default simulation's wall time masked against not (~4 min)",
    )
    p.add_argument("--wall-repeats", type=int, default=2, help="simulation runs each way (median)")
    p.add_argument("--verbose", action="store_true", help="show sepals' and Flower's log")
    args = p.parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.json is not None and not Path(args.json).parent.is_dir():
        print(f"error: --json: folder {Path(args.json).parent} does not exist", file=sys.stderr)
        return 2

    from sepals.simulations.cli import configure_logging

    configure_logging(args.verbose)
    sizes = QUICK if args.quick else Sizes()
    print(
        f"masking benchmark: {sizes.parameters:,} parameters, {sizes.clients} clients, "
        f"{sizes.dropouts} dropouts, {args.repeats} repeats",
        flush=True,
    )
    result = run_benchmark(
        sizes, repeats=args.repeats, seed=args.seed, progress=lambda s: print("..", s, flush=True)
    )
    if not args.skip_wall:
        result.wall = run_wall(args.wall_repeats, progress=lambda s: print("..", s, flush=True))
    print(format_result(result), flush=True)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
