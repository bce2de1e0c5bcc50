"""The private explanation round, after the last training round.

If the federation's :class:`~sepals.common.explain_spec.ExplanationSpec` asks for one,
the server samples nodes as for training and sends each the current (encrypted) global
model with the signed round config and the plan's explanation fields
(:data:`~sepals.common.explain_spec.EXPLAIN`). Each client replies with its clipped,
noised attribution sum, encrypted with the update codec; each reply is checked like a
training update (sampled node, once, its roster name, ``num-examples`` within its cap and
the plan's ``max_examples``, a payload of the explanation's length that was never seen
before) and the valid ones are added as ciphertexts.

The server holds no key, so up to :data:`OPENERS` of the contributing clients open the
sum (:data:`~sepals.common.explain_spec.EXPLAIN_OPEN`): each checks the sum's tag and
range and returns the plaintext release. The release is adopted only when more than
half of the openers asked return the very same values (at least two when two or more
were asked), as :mod:`~sepals.server.serverapp.strategy.verify` decides on models. The
release is a DP release (every contribution is (epsilon_e, delta)-DP on its own), so
the operator may read it; the example count reported beside it is the sum of the
``num-examples`` the clients send in the clear anyway.

This round is not masked: each contribution is DP on its own by construction, so the
sum needs no masks for its guarantee (see ``docs/explain.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from sepals.common.explain_spec import EXPLAIN, EXPLAIN_OPEN, KEY_RELEASE, ExplanationSpec
from sepals.common.log import log
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_UPDATE,
    RoundConfig,
)
from sepals.common.records import KEY_PAYLOAD, global_record, payload_from_array
from sepals.server.serverapp.replies import ReplyRejected
from sepals.server.serverapp.strategy.core import StrategyCore
from sepals.server.serverapp.strategy.grid_io import exchange
from sepals.server.serverapp.strategy.intake import error_of, reason_of, src_node

#: Clients asked to open the sum (fewer when fewer contributed).
OPENERS = 3


@dataclass
class ExplanationRecord:
    """What the explanation round did and released.

    Attributes:
        release: The plaintext DP release (sum over clients of their noisy sums,
            ``targets * features`` values, targets first), or ``None`` if none was adopted.
        examples: Examples attributed in total (the contributors' ``num-examples``).
        clients: Per contributor: name, examples, epsilon and sigma it reports.
        sampled, declined, excluded: Nodes sampled, declining (budget) and excluded.
        openers_asked, openers_agreeing: The opening step.
        seconds: Wall time of the round.
        upload_bytes: Bytes of the accepted contributions.

    """

    spec: ExplanationSpec
    release: npt.NDArray[np.float64] | None = None
    examples: int = 0
    clients: list[dict[str, Any]] = field(default_factory=list)
    sampled: int = 0
    declined: list[tuple[int, str]] = field(default_factory=list)
    excluded: list[tuple[int, str]] = field(default_factory=list)
    openers_asked: int = 0
    openers_agreeing: int = 0
    seconds: float = 0.0
    upload_bytes: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the spec, the release as ``(targets, features)`` sums, the counts."""
        spec = self.spec
        release = self.release
        return {
            "spec": spec.to_dict(),
            "released": release is not None,
            "sum": None if release is None else release.reshape(spec.targets, -1).tolist(),
            "examples": self.examples,
            "clients": self.clients,
            "declined": [{"node": n, "reason": r} for n, r in self.declined],
            "excluded": [{"node": n, "reason": r} for n, r in self.excluded],
            "openers": {"asked": self.openers_asked, "agreeing": self.openers_agreeing},
            "seconds": self.seconds,
            "note": self.note,
        }


class ExplanationPhase(StrategyCore):
    """The explanation round of the encrypted strategy (see the module docstring)."""

    def _explain_messages(
        self, spec: ExplanationSpec, arrays: ArrayRecord, nodes: list[int], message_type: str
    ) -> list[Message]:
        server_round = self._last_round or self.federation.rounds
        cfg = RoundConfig.build(
            self.federation,
            server_round,
            self.codec.name,
            self.codec.fingerprint_hex,
            self.vector_length,
        )
        config = cfg.to_record_dict() | spec.record(1)
        if self.round_signer is not None:
            config = self.round_signer(message_type, config, arrays)
        signed = ConfigRecord(config)
        return [
            Message(
                RecordDict({KEY_GLOBAL: arrays, KEY_CONFIG: signed}),
                dst_node_id=n,
                message_type=message_type,
            )
            for n in nodes
        ]

    def explain(self, grid: Grid) -> ExplanationRecord | None:
        """Run the federation's explanation round; ``None`` if it has none."""
        spec = self.federation.explanation
        if spec is None:
            return None
        t0 = time.perf_counter()
        record = ExplanationRecord(spec=spec)
        nodes = self._sample(grid, self.federation.fraction_train, 1)
        record.sampled = len(nodes)
        log(INFO, "explanation: %s nodes attribute the global model", len(nodes))
        arrays = self.latest_global if self.latest_global is not None else ArrayRecord()
        messages = self._explain_messages(spec, arrays, nodes, EXPLAIN)
        replies = exchange(grid, messages, self.federation.round_timeout)
        loaded, names = self._explain_intake(spec, replies, set(nodes), record)
        if loaded:
            total = self.codec.aggregate_loaded(loaded, spec.payload_length, None)
            candidate = global_record(total, float(record.examples), summands=len(loaded))
            self._open(grid, spec, candidate, names, record)
        else:
            record.note = "no valid contribution"
        record.seconds = time.perf_counter() - t0
        log(
            INFO if record.release is not None else WARNING,
            "explanation: %s contributions (%s declined, %s excluded), %s",
            len(record.clients),
            len(record.declined),
            len(record.excluded),
            "released" if record.release is not None else f"nothing released: {record.note}",
        )
        return record

    def _explain_intake(
        self,
        spec: ExplanationSpec,
        replies: list[Message],
        sampled: set[int],
        record: ExplanationRecord,
    ) -> tuple[list[list[Any]], list[int]]:
        loaded: list[list[Any]] = []
        nodes: list[int] = []
        seen: set[int] = set()
        for msg in replies:
            node = src_node(msg)
            try:
                error = error_of(msg)
                if error is not None:
                    code, reason = error
                    target = record.declined if code == ERR_BUDGET_EXHAUSTED else record.excluded
                    target.append((node, reason))
                    continue
                if node not in sampled or node in seen or node in self.search.excluded:
                    raise ReplyRejected("reply from a node that was not sampled, or a second one")
                seen.add(node)
                item, info, nbytes = self._admit_explanation(spec, msg, node)
            except Exception as exc:
                record.excluded.append((node, reason_of(exc)))
                log(WARNING, "explanation: excluding node %s: %s", node, reason_of(exc))
                continue
            loaded.append(item)
            nodes.append(node)
            record.clients.append(info)
            record.examples += int(info["num_examples"])
            record.upload_bytes += nbytes
        return loaded, nodes

    def _admit_explanation(
        self, spec: ExplanationSpec, msg: Message, node: int
    ) -> tuple[list[Any], dict[str, Any], int]:
        content = msg.content
        if KEY_UPDATE not in content.array_records or KEY_METRICS not in content.metric_records:
            raise ReplyRejected("reply lacks the 'update' or 'metrics' record")
        name = self._name_of(node, content.config_records.get(KEY_CLIENT))
        metrics = content.metric_records[KEY_METRICS]
        count = metrics.get("num-examples")
        cap = min(self.roster.cap_of(name), spec.max_examples)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= cap:
            raise ReplyRejected(f"num-examples must be an integer in [1, {cap}]")
        info: dict[str, Any] = {"client": name, "num_examples": count}
        for key in ("epsilon", "explain-sigma"):
            value = metrics.get(key)
            if value is not None:
                if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                    raise ReplyRejected(f"{key} must be a finite number >= 0")
                info[key.replace("-", "_")] = float(value)
        update = content.array_records[KEY_UPDATE]
        if KEY_PAYLOAD not in update:
            raise ReplyRejected("update record lacks 'payload'")
        payload = payload_from_array(update[KEY_PAYLOAD])
        try:
            checked = self.codec.validate_upload(payload, spec.payload_length)
        except Exception as exc:
            raise ReplyRejected("malformed payload") from exc
        # Refused as any upload is: a ciphertext seen before, however it is encoded.
        if self._seen.any_of(checked.replay_keys):
            raise ReplyRejected("duplicate ciphertext")
        self._seen.add(checked.replay_keys)
        return checked.loaded, info, len(payload)

    def _open(
        self,
        grid: Grid,
        spec: ExplanationSpec,
        candidate: ArrayRecord,
        contributors: list[int],
        record: ExplanationRecord,
    ) -> None:
        """Ask up to :data:`OPENERS` contributors to open the sum; adopt what most return."""
        pick = np.random.default_rng([self.federation.seed, 0xE5A1])
        count = min(OPENERS, len(contributors))
        chosen = sorted(
            int(contributors[i]) for i in pick.choice(len(contributors), count, replace=False)
        )
        record.openers_asked = count
        messages = self._explain_messages(spec, candidate, chosen, EXPLAIN_OPEN)
        answers: list[npt.NDArray[np.float64]] = []
        for msg in exchange(grid, messages, self.federation.round_timeout):
            if msg.has_error():
                continue
            try:
                values = msg.content.array_records[KEY_RELEASE][KEY_RELEASE].numpy()
            except Exception:
                continue
            if values.shape == (spec.length,) and np.all(np.isfinite(values)):
                answers.append(np.asarray(values, dtype=np.float64))
        best, agreeing = None, 0
        for values in answers:
            same = sum(1 for other in answers if np.array_equal(values, other))
            if same > agreeing:
                best, agreeing = values, same
        record.openers_agreeing = agreeing
        if best is not None and agreeing * 2 > count and (agreeing >= 2 or count == 1):
            record.release = best
        else:
            record.note = f"{agreeing} of {count} opening clients agreed on the release"
