"""The cost of one encoding per ciphertext, against the raw-byte check it replaced.

Measures, in this process, at 1M parameters (the 999,985-parameter MLP of
:mod:`benchmarks.million`, default BFV: N = 8192, 62 ciphertexts an upload):

* **server, per client**: what ``aggregate_train`` does with one upload before adding it.
  *With* canonicalization (now): :meth:`~sepals.common.codec.UpdateCodec.validate_upload`
  (the canonical layout of every ciphertext, SEAL's load and checks, a replay key of each
  seed and each c0) and the look-up of those keys among a hundred clients' earlier ones.
  *Without* (before): ``validate`` of the zstd upload SEAL writes, and SHA-256 of the raw
  payload.
* **client, per upload**: ``encode_update`` with and without re-emitting SEAL's zstd
  output in the canonical encoding.
* **the added work alone**, timed directly, since the two paths differ by less than the
  noise of a shared machine: on the client, re-emitting SEAL's output of every ciphertext
  (:meth:`~sepals.common.seal_canon.SeededLayout.from_seal`); on the server, the layout
  check and the replay keys of every ciphertext against SHA-256 of the raw payload.
* **a round**: one client's round at 1M parameters, as :mod:`benchmarks.masking` times
  it: DP-SGD (epsilon 8) on its IID share of digits among ``--clients``, then the encode.

Target: canonicalization costs at most :data:`TARGET_SHARE` of a round. What it adds is
taken as the larger of the end-to-end difference and the added work alone. The client's
is compared with its round; the server's with the same round plus its own checks of
every client's upload (it checks the uploads one after the other, after they arrive),
for ``--clients`` uploads. Printed as ``met`` or ``MISSED``, never asserted.
Times are medians of ``--repeats`` interleaved runs; the machine may be shared.

Usage: ``python -m benchmarks.canon [--parameters P] [--clients C] [--repeats R]``
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

TARGET_SHARE = 0.05
EARLIER_CLIENTS = 100  # clients whose keys the server holds from earlier rounds
DISTINCT = 3  # distinct uploads the server's figures cycle through


def verdict(share: float, target: float = TARGET_SHARE) -> str:
    """``met`` when the added share of a round is at most ``target``, else ``MISSED``."""
    return "met" if share <= target else "MISSED"


@dataclass(frozen=True)
class CanonResult:
    """Every figure, in seconds per client (server) or per upload (client)."""

    parameters: int
    clients: int
    ciphertexts: int
    upload_bytes_before: int
    upload_bytes_now: int
    server_before: float
    server_now: float
    client_encode_before: float
    client_encode_now: float
    client_reemit: float
    server_layout_keys: float
    server_raw_digest: float
    train_seconds: float

    @property
    def round_seconds(self) -> float:
        """One client's round now: DP training and the encode."""
        return self.train_seconds + self.client_encode_now

    @property
    def client_added(self) -> float:
        """What canonicalization adds to a client's round: the larger measure."""
        return max(self.client_encode_now - self.client_encode_before, self.client_reemit)

    @property
    def server_added(self) -> float:
        """What canonicalization adds to the server's check of all the round's uploads."""
        alone = self.server_layout_keys - self.server_raw_digest
        return self.clients * max(self.server_now - self.server_before, alone)

    def client_share(self) -> float:
        """The client's added time over its round (0 when it saves time)."""
        return max(0.0, self.client_added) / self.round_seconds

    def server_share(self) -> float:
        """The server's added time over the round: a client's round plus every check."""
        return max(0.0, self.server_added) / (self.round_seconds + self.clients * self.server_now)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _zstd_encoder(client: Any) -> Any:
    """``client`` as it was before: its uploads left as SEAL saves them (zstd)."""

    class AsSealSaves:
        def from_seal(self, blob: bytes) -> bytes:
            return blob

    before = copy.copy(client)
    before._layout = AsSealSaves()
    return before


def measure(
    parameters: int,
    clients: int,
    repeats: int,
    *,
    train: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CanonResult:
    """Measure the figures (see the module docstring); ``train=False`` skips the round."""
    from sepals.common.bfv import BfvCodec
    from sepals.common.codec import replay_key, unpack_payload
    from sepals.common.config import EncryptionConfig
    from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle
    from sepals.server.serverapp.strategy import ReplayKeys

    say = progress or (lambda _text: None)
    config = EncryptionConfig(max_clients=max(clients, EARLIER_CLIENTS))
    bundle = generate_bfv_bundle(config)
    client = BfvCodec.for_client(bundle, config)
    server = BfvCodec.for_server(public_bfv_bundle(bundle), config)
    before = _zstd_encoder(client)
    rng = np.random.default_rng(seed)
    update = rng.normal(0.0, 0.05, parameters)
    train_seconds = 0.0
    if train:
        from benchmarks import masking

        say(f"one client's DP round at {parameters:,} parameters, {clients} clients")
        run, _ = masking._train_one_client(masking.model_factory(parameters), clients, seed)
        update = run()[0]  # also the warm-up
        train_seconds = statistics.median(_timed(run) for _ in range(repeats))
    length = update.size  # the MLP's count, a few below ``parameters``
    say("client: encoding with and without the canonical encoding")
    encode_now, encode_before = [], []
    for _ in range(repeats):  # interleaved, so that load drifts hit both alike
        encode_now.append(_timed(lambda: client.encode_update(update, rng)))
        encode_before.append(_timed(lambda: before.encode_update(update, rng)))
    now = [client.encode_update(update * (1 + i / 10), rng)[0] for i in range(DISTINCT)]
    old = [before.encode_update(update * (1 + i / 10), rng)[0] for i in range(DISTINCT)]
    seal_blobs = unpack_payload(old[0])[1]  # the ciphertexts as SEAL saved them
    reemit = statistics.median(
        _timed(lambda: [client._layout.from_seal(b) for b in seal_blobs]) for _ in range(repeats)
    )
    say("server: checking uploads with and without the canonical encoding")
    chunks = len(server.validate_upload(now[0], length).loaded)
    canonical = unpack_payload(now[0])[1]

    def layout_and_keys() -> list[int]:
        keys = []
        for i, chunk in enumerate(canonical):
            c0, seed = server._layout.parse(i, chunk)
            keys += [replay_key(b"bfv-seed", seed), replay_key(b"bfv-c0", c0)]
        return keys

    layout_keys = statistics.median(_timed(layout_and_keys) for _ in range(repeats))
    raw_digest = statistics.median(
        _timed(lambda: hashlib.sha256(old[0]).digest()) for _ in range(repeats)
    )
    seen = ReplayKeys(np.random.default_rng(seed).integers(0, 2**63, EARLIER_CLIENTS * 2 * chunks))

    def check_now(payload: bytes) -> None:
        checked = server.validate_upload(payload, length)
        if seen.any_of(checked.replay_keys):
            raise AssertionError("a fresh upload looked like a replay")

    def check_before(payload: bytes) -> None:
        server.validate(payload, length)
        hashlib.sha256(payload).digest()

    server_now, server_before = [], []
    for i in range(repeats * DISTINCT):
        new_payload, old_payload = now[i % DISTINCT], old[i % DISTINCT]
        server_now.append(_timed(partial(check_now, new_payload)))
        server_before.append(_timed(partial(check_before, old_payload)))
    return CanonResult(
        parameters=length,
        clients=clients,
        ciphertexts=chunks,
        upload_bytes_before=len(old[0]),
        upload_bytes_now=len(now[0]),
        server_before=statistics.median(server_before),
        server_now=statistics.median(server_now),
        client_encode_before=statistics.median(encode_before),
        client_encode_now=statistics.median(encode_now),
        client_reemit=reemit,
        server_layout_keys=layout_keys,
        server_raw_digest=raw_digest,
        train_seconds=train_seconds,
    )


def format_result(r: CanonResult) -> str:
    """The printed report: figures, then one row per target."""
    ms = 1e3
    lines = [
        f"{r.parameters:,} parameters, {r.ciphertexts} ciphertexts an upload, {r.clients} clients",
        f"upload bytes: {r.upload_bytes_now:,} now (uncompressed, seeded) vs "
        f"{r.upload_bytes_before:,} before (zstd) = "
        f"{r.upload_bytes_now / r.upload_bytes_before:.4f}x",
        f"server per client: load+check+key {r.server_now * ms:.2f} ms now vs "
        f"load+digest {r.server_before * ms:.2f} ms before "
        f"({r.server_now / r.server_before:.3f}x, {(r.server_now - r.server_before) * ms:+.2f} ms)"
        f"; alone: layout+keys {r.server_layout_keys * ms:.2f} ms vs SHA-256 of the payload "
        f"{r.server_raw_digest * ms:.2f} ms",
        f"client per upload: encode {r.client_encode_now:.3f} s now vs "
        f"{r.client_encode_before:.3f} s before "
        f"({(r.client_encode_now - r.client_encode_before) * ms:+.1f} ms); alone: re-emitting "
        f"SEAL's output {r.client_reemit * ms:.2f} ms",
    ]
    if r.train_seconds > 0:
        lines += [
            f"a client's round: DP training {r.train_seconds:.3f} s + encode "
            f"{r.client_encode_now:.3f} s = {r.round_seconds:.3f} s",
            "",
            f"target: canonicalization <= {TARGET_SHARE:.0%} of a round at 1M parameters",
            f"client: {r.client_added * ms:+.1f} ms on a {r.round_seconds:.3f} s round = "
            f"{r.client_share():.2%}: {verdict(r.client_share())}",
            f"server: {r.server_added * ms:+.1f} ms for {r.clients} uploads on a "
            f"{r.round_seconds + r.clients * r.server_now:.3f} s round = "
            f"{r.server_share():.2%}: {verdict(r.server_share())}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its report."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.canon", description=__doc__)
    p.add_argument("--parameters", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.parameters < 100 or args.clients < 1 or args.repeats < 1:
        p.error("--parameters must be >= 100, --clients and --repeats >= 1")
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    result = measure(
        args.parameters,
        args.clients,
        args.repeats,
        seed=args.seed,
        progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True),
    )
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
