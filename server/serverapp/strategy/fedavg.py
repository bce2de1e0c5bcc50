"""Encrypted federated averaging on Flower's Message API.

:class:`EncryptedFedAvg` is a Flower ``Strategy``: it reuses ``Strategy.start`` (the
round loop) and implements sampling, validation and aggregation itself, because the
server only ever holds ciphertexts. Each client sends ``n_i * w_i`` encrypted; the
server adds the ciphertexts and keeps ``sum(n_i)`` in the clear; clients decrypt the
sum and divide. With the plain codec the very same code runs FedAvg in the clear.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from sepals.common.errors import SepalsError
from sepals.common.federation import update_weight
from sepals.common.log import log
from sepals.common.protocol import (
    ERR_BAD_SHARES,
    ERR_BUDGET_EXHAUSTED,
    KEY_CLIENT,
    KEY_MASK,
    KEY_METRICS,
    KEY_UPDATE,
)
from sepals.common.records import KEY_PAYLOAD, global_record, payload_from_array
from sepals.server.serverapp.replies import (
    ReplyRejected,
    parse_accountant,
    parse_train_metrics,
)
from sepals.server.serverapp.strategy.evaluation import (
    FederatedEvaluation,
)
from sepals.server.serverapp.strategy.explain import ExplanationPhase
from sepals.server.serverapp.strategy.intake import (
    Admitted,
    Intake,
    error_of,
    reason_of,
    src_node,
)
from sepals.server.serverapp.strategy.masked_round import MaskedRounds
from sepals.server.serverapp.strategy.rounds import (
    ClientRoundReport,
    RoundRecord,
)
from sepals.server.serverapp.strategy.suspects import accusations
from sepals.server.serverapp.strategy.verify import AggregateVerification


class EncryptedFedAvg(FederatedEvaluation, MaskedRounds, AggregateVerification, ExplanationPhase):
    """FedAvg over encrypted (or plain) weighted updates.

    Args:
        codec: Server-side codec; for CKKS it must hold only the public context.
        vector_length: Number of model parameters every update must encode.
        federation: Rounds, sampling and local-training settings.
        on_round: Called with each finished :class:`RoundRecord` (metrics sink).
        min_available_nodes: Nodes to wait for before sampling (default: the federation's
            ``min_train_clients``).
        node_wait_timeout: Seconds to wait for them before sampling whoever is there.
        round_offset: Rounds already done before this run (a resumed federation):
            Flower's round ``r`` is federation round ``r + round_offset``.
        round_signer: Adds the operator's federation id and signature to every round
            config (clients refuse unsigned rounds when their plan names a key).
        roster: Names and example caps of the nodes. The default,
            :data:`~sepals.server.serverapp.roster.UNCONFIGURED`, keeps the behaviour from before
            rosters: the ``client-id`` a reply claims is its name, a label with no
            authority (no cap of its own), and every count is capped at
            :data:`~sepals.server.serverapp.roster.DEFAULT_EXAMPLE_CAP`. A deployment passes
            ``node_names`` so that names are authenticated, and a simulation the
            partition sizes as ``caps``.
        max_clients: Most nodes sampled and updates added per round (default: the
            codec's ``EncryptionConfig.max_clients``; no bound for the plain codec). When
            both are set, the smaller one holds.
        node_order: Stable keys to order the connected nodes by before each draw
            (default: by Flower node id; see below).
        metric_higher_is_better: Whether an app's own metric is better when higher
            (the worst 10% of clients are then the lowest values).

    A round changes the global model only if at least ``min_train_clients`` valid updates
    arrive before the round timeout. Sampled nodes that never reply (dropped, killed,
    partitioned) are counted as ``missing`` and the round goes on without them.

    Every reply is checked on its own, and anything wrong with it (any exception while
    handling it, too) excludes that reply alone, with a short reason in the round's
    ``excluded`` (``eval_excluded`` for evaluation); the round goes on with the others.
    A train reply is excluded unless: it comes from a sampled node, once per round, that
    the roster knows; ``num-examples`` is an ``int`` in ``[1, cap]`` of that node;
    every privacy and timing figure is finite and in range; its payload is valid for
    this codec, key and model size, in the one encoding the codec accepts
    (:meth:`~sepals.common.codec.UpdateCodec.validate_upload`: for BFV, uncompressed
    seeded ciphertexts byte for byte), and holds no ciphertext accepted in this round or
    any earlier one (replay keys of the parsed ciphertexts: for BFV, a ciphertext whose
    seed or c0 was accepted before, however it is encoded; kept across restarts in the
    checkpoint); and fewer than ``max_clients`` updates were accepted before it. An
    evaluation reply needs ``num-examples`` in ``[1, cap]``, a finite ``loss >= 0``
    and ``accuracy`` in ``[0, 1]``.

    Every client encodes its weighted change from the shared round-0 model,
    ``a_i * (w_i - w_0)`` with ``a_i = min(n_i, weight_cap) / weight_cap``; the server
    sums the ``a_i`` (from the checked ``num-examples``) into ``weight_total``, and
    clients decode ``w_0 + sum / weight_total``.

    What a registered client that is malicious can still do: send any update the codec
    accepts and claim any count up to its cap. Each value it encodes is bounded only by
    ``update_bound`` (BFV) or ``max_update_magnitude`` (CKKS; the plain codec has no
    bound), so it can move every coordinate of the new global model by up to that bound
    divided by the round's ``weight_total``, and dilute the honest updates by up to
    its weight over ``weight_total``. Nothing proves that a ciphertext was made honestly,
    by DP-SGD on the client's own data: the server checks a payload's form, key and
    length, never its content, and the privacy figures a client reports are its own
    claims. Since all clients share the decryption key, one that obtains another's
    ciphertext can also re-encrypt its contents into a fresh ciphertext, which the
    replay check does not catch (it refuses the same ciphertext, not the same
    plaintext). Its evaluation reports can likewise shift the federated loss and
    accuracy within their ranges, at weight up to its cap.

    Sampling draws from ``numpy.random.default_rng(federation.seed)`` over the connected
    nodes sorted by :attr:`node_order`'s stable keys (default: by Flower node id). Flower
    gives nodes random ids, so a reproducible run (same seed, same clients sampled at
    any fraction) sets :attr:`node_order`; a simulation passes
    :func:`simulation_node_order`.

    """

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the round config and the encrypted global model."""
        server_round += self.round_offset
        self._t_round = time.perf_counter()
        self._grid = grid
        prepared, self._prepared = self._prepared, None
        mask_records: Callable[[int], dict[str, Any]] | None = None
        self._mask_round = None
        if prepared is not None and prepared[0].server_round == server_round:
            # Sampled and set up with the previous round's unmask request.
            setup, record = prepared
            self._current = record
            nodes = setup.sharers
        else:
            record = RoundRecord(round=server_round, codec=self.codec.name)
            self._current = record
            nodes = self._sample(
                grid, self.federation.fraction_train, self.federation.min_train_clients
            )
            record.sampled = len(nodes)
            if self._driver is not None:
                setup = self._driver.setup(grid, server_round, nodes)
                self._note_setup(record, setup)
                nodes = setup.sharers
        if self._driver is not None:
            mask_round = setup.mask_round if nodes else None
            self._mask_round = mask_round
            if mask_round is not None:

                def mask_records(node: int) -> dict[str, Any]:
                    return {KEY_MASK: mask_round.train_record(node)}

        self._train_sampled = (server_round, frozenset(nodes))
        record.download_bytes += self._global_bytes(arrays) * len(nodes)
        log(INFO, "round %s: training on %s nodes", server_round, len(nodes))
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN, mask_records)

    def _admit_train(self, msg: Message, node: int, intake: Intake) -> Admitted:
        """Check one train reply; raise (any exception) to exclude it."""
        if node in self.search.excluded:
            raise ReplyRejected(f"excluded from the run: {self.search.excluded[node]}")
        intake.admit_node(node)
        content = msg.content
        if KEY_UPDATE not in content.array_records or KEY_METRICS not in content.metric_records:
            raise ReplyRejected(
                "reply lacks the 'update' ArrayRecord or the 'metrics' MetricRecord"
            )
        client_rec = content.config_records.get(KEY_CLIENT)
        name = self._name_of(node, client_rec)
        intake.check_name(name)
        metrics = parse_train_metrics(
            content.metric_records[KEY_METRICS], self.roster.cap_of(name), self._quant_step
        )
        accountant = parse_accountant(
            client_rec.get("accountant") if client_rec is not None else None
        )
        update = content.array_records[KEY_UPDATE]
        if KEY_PAYLOAD not in update:
            raise ReplyRejected("update record lacks 'payload'")
        try:
            payload = payload_from_array(update[KEY_PAYLOAD])
        except Exception as exc:
            raise ReplyRejected("update is not a sepals payload array") from exc
        if self._legacy_digests and hashlib.sha256(payload).digest() in self._legacy_digests:
            raise ReplyRejected("duplicate ciphertext: accepted in an earlier round")
        try:
            checked = self.codec.validate_upload(payload, self.vector_length)
        except SepalsError:
            raise
        except Exception as exc:
            raise ReplyRejected("malformed payload") from exc
        if self._seen.any_of(checked.replay_keys):
            raise ReplyRejected("duplicate ciphertext: accepted in an earlier round")
        if not intake.keys.isdisjoint(checked.replay_keys):
            raise ReplyRejected("duplicate ciphertext: accepted earlier in this round")
        if self.max_clients is not None and intake.accepted >= self.max_clients:
            raise ReplyRejected(
                f"max_clients={self.max_clients} updates already accepted this round"
            )
        report = ClientRoundReport(
            node_id=node, client_id=name, accountant=accountant, **asdict(metrics)
        )
        return Admitted(checked.loaded, len(payload), checked.replay_keys, report)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply on its own, exclude bad ones with a reason, add the rest."""
        server_round += self.round_offset
        if self._current is None or self._current.round != server_round:
            self._current = RoundRecord(round=server_round, codec=self.codec.name)
        record = self._current
        intake = self._expected(self._train_sampled, server_round)
        loaded_all: list[list[Any]] = []
        weight_total = 0.0
        for msg in replies:
            record.replied += 1
            node = src_node(msg)
            admitted: Admitted | None = None
            try:
                error = error_of(msg)
                if error is None:
                    admitted = self._admit_train(msg, node, intake)
            except Exception as exc:
                reason = reason_of(exc)
                if not isinstance(exc, SepalsError):
                    log(DEBUG, "round %s: node %s: %s", server_round, node, type(exc).__name__)
                record.excluded.append((node, reason))
                log(WARNING, "round %s: excluding node %s: %s", server_round, node, reason)
                continue
            if admitted is None:
                code, reason = error if error is not None else (None, "malformed reply")
                if code == ERR_BUDGET_EXHAUSTED:
                    record.declined.append((node, reason))
                    log(INFO, "round %s: node %s declined: %s", server_round, node, reason)
                else:
                    record.excluded.append((node, reason))
                    log(WARNING, "round %s: node %s failed: %s", server_round, node, reason)
                    if code == ERR_BAD_SHARES:
                        for accused in accusations(reason):
                            self.search.accused(accused, node)
                continue
            intake.keys.update(admitted.replay_keys)
            intake.accepted += 1
            intake.names.add(admitted.report.client_id)
            loaded_all.append(admitted.loaded)
            weight_total += update_weight(
                admitted.report.num_examples, self.federation.weight_cap
            )
            record.upload_bytes += admitted.nbytes
            record.clients.append(admitted.report)
        # Accepted ciphertexts are refused from now on, whether or not this round adds them.
        self._seen.add(intake.keys)
        record.accepted = len(loaded_all)
        eps = [c.epsilon for c in record.clients if c.epsilon is not None]
        record.max_epsilon = max(eps) if eps else None
        eps_r1 = [
            c.epsilon_replace_one for c in record.clients if c.epsilon_replace_one is not None
        ]
        record.max_epsilon_replace_one = max(eps_r1) if eps_r1 else None
        record.train_seconds = time.perf_counter() - self._t_round
        missing = record.sampled - record.replied
        if missing > 0:
            log(WARNING, "round %s: %s sampled nodes did not reply in time", server_round, missing)
        if len(loaded_all) < max(1, self.federation.min_train_clients):
            log(
                WARNING,
                "round %s: %s valid updates, fewer than the minimum %s; the global model "
                "is unchanged",
                server_round,
                len(loaded_all),
                self.federation.min_train_clients,
            )
            return None, self._train_metrics(record)
        offset = None
        if self.masking is not None:
            accepted_nodes = [c.node_id for c in record.clients]
            offset = self._unmask(server_round, accepted_nodes)
            if offset is None:
                return None, self._train_metrics(record)
        t0 = time.perf_counter()
        try:
            payload = self.codec.aggregate_loaded(loaded_all, self.vector_length, offset)
        except Exception as exc:
            # Every payload passed validation, so this is a server-side fault; the round
            # still completes, without a new model.
            log(
                ERROR,
                "round %s: adding %s validated updates failed (%s); the global model is unchanged",
                server_round,
                len(loaded_all),
                type(exc).__name__,
            )
            return None, self._train_metrics(record)
        record.aggregate_seconds = time.perf_counter() - t0
        record.masks_removed = offset is not None
        candidate = global_record(payload, weight_total, summands=len(loaded_all))
        participants = [c.node_id for c in record.clients]
        verdict = self._verify(server_round, candidate, participants)
        record.verify_accepts, record.verify_rejects = verdict.accepts, verdict.rejects
        if not verdict.adopted:
            record.rejected = verdict.reason
            log(
                WARNING,
                "round %s: %s; the last good global model stays",
                server_round,
                verdict.reason,
            )
            self.search.round_rejected(server_round, participants)
            return None, self._train_metrics(record)
        record.weight_total = weight_total
        record.aggregated = True
        self.latest_global = candidate
        errors = [c.quant_error for c in record.clients]
        if errors and all(e is not None for e in errors):
            # Each client's rounding error is at most e_i on a_i * (w_i - w_0), so the
            # averaged model is off by at most sum(e_i) / sum(a_i) in every coordinate.
            bound = sum(e for e in errors if e is not None) / weight_total
            record.quant_error = bound if math.isfinite(bound) else None
        log(
            INFO,
            "round %s: aggregated %s updates (%s declined, %s excluded)%s",
            server_round,
            record.accepted,
            len(record.declined),
            len(record.excluded),
            (
                f"; masked: {record.mask_survivors} of {record.mask_members} survived, "
                f"{record.mask_dropouts} dropped, T={record.mask_threshold}, masks removed"
                if record.masks_removed
                else ""
            ),
        )
        return self.latest_global, self._train_metrics(record)

    @staticmethod
    def _train_metrics(record: RoundRecord) -> MetricRecord:
        values: dict[str, int | float | list[int] | list[float]] = {
            "accepted": record.accepted,
            "declined": len(record.declined),
            "excluded": len(record.excluded),
            "upload-bytes": record.upload_bytes,
        }
        if record.max_epsilon is not None:
            values["max-epsilon"] = record.max_epsilon
        if record.max_epsilon_replace_one is not None:
            values["max-epsilon-replace-one"] = record.max_epsilon_replace_one
        if record.quant_error is not None:
            values["quant-error"] = record.quant_error
        return MetricRecord(values)
