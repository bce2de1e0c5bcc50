"""The server's state directory: metrics, encrypted checkpoints, and resume.

Layout (everything here is safe for an honest-but-curious server to hold: plaintext
metadata and ciphertexts, never a secret key or a plaintext model)::

    STATE/metrics.jsonl        one JSON object per finished round (RoundRecord)
    STATE/checkpoint.json      the last finished round: codec, key fingerprint, weight
                               total, sampling-RNG state, SHA-256 of the model file,
                               the replay keys of every ciphertext accepted so far
    STATE/global-model.spl     that round's encrypted global model (a codec payload)
    STATE/done.json            written when the configured rounds are all finished

Checkpoints are written atomically, model file first, so ``checkpoint.json`` always
names a complete model file. The replay keys (8 bytes each, ascending, base64 in
``replay_keys``) let a restarted server go on refusing replayed ciphertexts, however they
are re-encoded. A checkpoint of an older sepals has SHA-256 digests of raw payloads
instead (``payload_digests``): it loads, those payloads are still refused byte for byte,
and a warning says that a re-encoded copy of one is not (a checkpoint older still, with
neither, loads with none).

Permissions: the directory is created with mode 0700; an existing one that group or
other users may enter is tightened to 0700 with a warning (it belongs to sepals-server).
Every file written here is 0600 from its first byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from sepals.common.codec import UpdateCodec
from sepals.common.errors import SepalsError
from sepals.common.files import SECRET_MODE, make_private_dir
from sepals.common.files import atomic_write as _atomic_write
from sepals.common.log import log
from sepals.common.records import global_record, read_global_model
from sepals.server.serverapp.strategy import EncryptedFedAvg, ReplayKeys, RoundRecord

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.json"
MODEL_FILE = "global-model.spl"
DONE_FILE = "done.json"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def atomic_write(path: Path, data: bytes, secret: bool = True) -> None:
    """:func:`sepals.common.files.atomic_write` with mode 0600: every state file is private.

    ``secret`` is accepted for the same call signature and ignored: always 0600.
    """
    del secret
    _atomic_write(path, data, secret=True)


class CheckpointError(SepalsError):
    """A checkpoint cannot be resumed from (damaged, or made under another key/model)."""


@dataclass(frozen=True)
class Checkpoint:
    """The state of a federation after its last finished round."""

    round: int
    payload: bytes | None
    weight_total: float
    rng_state: dict[str, Any]
    payload_digests: frozenset[bytes] = field(default=frozenset(), repr=False)
    replay_keys: bytes = field(default=b"", repr=False)
    summands: int | None = None
    excluded: dict[int, str] = field(default_factory=dict)

    def arrays(self) -> ArrayRecord:
        """The encrypted global model as the strategy passes it on (empty: round-0 model)."""
        if self.payload is None:
            return ArrayRecord()
        return global_record(self.payload, self.weight_total, self.summands)

    def restore(self, strategy: EncryptedFedAvg) -> None:
        """Resume ``strategy`` from here: sampling RNG, global model, refused ciphertexts.

        Also the clients excluded from the run. The strategy must be built with
        ``round_offset=self.round``.
        """
        strategy.rng.bit_generator.state = self.rng_state
        if self.payload is not None:
            strategy.latest_global = self.arrays()
        strategy.remember_payload_digests(self.payload_digests)
        strategy.remember_replay_keys(ReplayKeys.from_bytes(self.replay_keys))
        strategy.search.excluded.update(self.excluded)


class StateDir:
    """Reads and writes one server state directory (mode 0700, files 0600)."""

    def __init__(self, root: Path) -> None:
        """Create ``root`` (0700), or tighten an existing one to 0700.

        Raises:
            ValueError: ``root`` is not a usable directory (a file is in its place, it
                cannot be written, or it cannot be made private); one line naming it.

        """
        self.root = root
        make_private_dir(root, "[server] state_dir")

    @property
    def metrics_path(self) -> Path:
        """The JSON-lines metrics file."""
        return self.root / METRICS_FILE

    def append_metrics(self, record: RoundRecord) -> None:
        """Append one round's metrics line (flushed and fsync'ed)."""
        line = json.dumps(record.to_dict(), sort_keys=True) + "\n"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.metrics_path, flags, SECRET_MODE)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            os.fchmod(fd, SECRET_MODE)  # also a file left by an older sepals
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics line written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]

    def save_checkpoint(self, strategy: EncryptedFedAvg, server_round: int) -> None:
        """Checkpoint the strategy's latest encrypted global model after ``server_round``.

        A round that changed nothing (every client declined, say) still advances the
        checkpoint, so a restart never repeats a finished round.
        """
        parsed = (
            read_global_model(strategy.latest_global)
            if strategy.latest_global is not None
            else None
        )
        meta: dict[str, Any] = {
            "round": server_round,
            "codec": strategy.codec.name,
            "key_fingerprint": strategy.codec.fingerprint_hex,
            "vector_length": strategy.vector_length,
            "weight_total": 0.0,
            "model_sha256": None,
            "rng_state": strategy.rng.bit_generator.state,
            "replay_keys": base64.b64encode(strategy.replay_keys.to_bytes()).decode("ascii"),
            "excluded_nodes": {str(n): why for n, why in strategy.search.excluded.items()},
        }
        if strategy.payload_digests:
            meta["payload_digests"] = sorted(d.hex() for d in strategy.payload_digests)
        if parsed is not None:
            payload, meta["weight_total"], meta["summands"] = parsed
            atomic_write(self.root / MODEL_FILE, payload)
            meta["model_sha256"] = hashlib.sha256(payload).hexdigest()
        atomic_write(self.root / CHECKPOINT_FILE, (json.dumps(meta, indent=2) + "\n").encode())

    def load_checkpoint(self, codec: UpdateCodec, vector_length: int) -> Checkpoint | None:
        """The last checkpoint, validated against ``codec`` and ``vector_length``.

        Raises:
            CheckpointError: the checkpoint is damaged or belongs to another federation.

        """
        path = self.root / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint in {self.root}: {exc}") from exc
        if meta.get("codec") != codec.name or meta.get("key_fingerprint") != codec.fingerprint_hex:
            raise CheckpointError(
                f"checkpoint was made with codec {meta.get('codec')!r} under key "
                f"{meta.get('key_fingerprint')}; this server runs {codec.name!r} under "
                f"{codec.fingerprint_hex}. Use a fresh state directory for a new federation."
            )
        if meta.get("vector_length") != vector_length:
            raise CheckpointError(
                f"checkpoint holds a {meta.get('vector_length')}-parameter model; the "
                f"configuration says {vector_length}"
            )
        payload = None
        if meta.get("model_sha256") is not None:
            try:
                payload = (self.root / MODEL_FILE).read_bytes()
            except OSError as exc:
                raise CheckpointError(f"cannot read {self.root / MODEL_FILE}: {exc}") from exc
            if hashlib.sha256(payload).hexdigest() != meta["model_sha256"]:
                raise CheckpointError(f"{self.root / MODEL_FILE} does not match checkpoint.json")
            try:
                codec.validate(payload, vector_length)
            except SepalsError as exc:
                raise CheckpointError(f"checkpointed model is not a valid payload: {exc}") from exc
        digests = self._digests(meta.get("payload_digests", []))
        if "replay_keys" not in meta and digests:
            log(
                WARNING,
                "checkpoint in %s is from an older sepals: the %s uploads it accepted are "
                "refused byte for byte only, not re-encoded",
                self.root,
                len(digests),
            )
        return Checkpoint(
            round=int(meta["round"]),
            payload=payload,
            weight_total=float(meta["weight_total"]),
            rng_state=dict(meta["rng_state"]),
            payload_digests=digests,
            replay_keys=self._replay_keys(meta.get("replay_keys", "")),
            summands=self._summands(meta.get("summands")),
            excluded=self._excluded(meta.get("excluded_nodes", {})),
        )

    def _replay_keys(self, raw: Any) -> bytes:
        """The replay keys of a checkpoint (base64 of 8-byte words), checked."""
        try:
            if not isinstance(raw, str):
                raise ValueError("not a string")
            data = base64.b64decode(raw, validate=True)
            ReplayKeys.from_bytes(data)
        except ValueError as exc:  # binascii.Error is one too
            raise CheckpointError(
                f"checkpoint in {self.root}: replay_keys is not base64 of 8-byte keys ({exc})"
            ) from exc
        return data

    def _summands(self, raw: Any) -> int | None:
        """The update count of the checkpointed model (``None``: not recorded)."""
        if raw is None:
            return None
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise CheckpointError(f"checkpoint in {self.root}: summands is not an integer >= 1")
        return raw

    def _excluded(self, raw: Any) -> dict[int, str]:
        """The nodes excluded from the run, with why (node id -> reason)."""
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in raw.items()
        ):
            raise CheckpointError(f"checkpoint in {self.root}: excluded_nodes is malformed")
        return {int(k): v for k, v in raw.items()}

    def _digests(self, raw: Any) -> frozenset[bytes]:
        """The payload digests of a checkpoint (a list of SHA-256 hex strings)."""
        if not isinstance(raw, list):
            raise CheckpointError(f"checkpoint in {self.root}: payload_digests is not a list")
        out = set()
        for item in raw:
            if not isinstance(item, str) or not _SHA256_HEX.fullmatch(item):
                raise CheckpointError(
                    f"checkpoint in {self.root}: payload_digests holds an entry that is not "
                    "a SHA-256 hex digest"
                )
            out.add(bytes.fromhex(item))
        return frozenset(out)

    def mark_done(self, rounds: int) -> None:
        """Record that all ``rounds`` are finished."""
        atomic_write(self.root / DONE_FILE, (json.dumps({"rounds": rounds}) + "\n").encode())

    def done_rounds(self) -> int | None:
        """Rounds recorded by :meth:`mark_done`, if any."""
        path = self.root / DONE_FILE
        if not path.exists():
            return None
        return int(json.loads(path.read_text())["rounds"])
