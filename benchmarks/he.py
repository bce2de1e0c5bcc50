"""HE benchmark: sepals' codec against plaintext fp32 and the NVFlare-default CKKS.

For models of 1,290 (the pretrained job's trainable head), 2,410 (the default digits
MLP), 100k, 1M and 10M parameters and federations of 10 and 100 clients it measures,
per client:

* upload bytes (one client's payload) and download bytes (the aggregate);
* encode + encrypt + serialize seconds (one core);
* server load (deserialize + validate) and aggregate (add) seconds;
* decrypt + decode seconds of the aggregate;
* the largest absolute error of the FedAvg result (sum / example total) against the
  exact float64 computation.

Encodings: (a) plaintext fp32 (:class:`PlainCodec`); (b) the NVIDIA FLARE default,
CKKS N=8192, coefficient moduli [60, 40, 40], scale 2^40, through TenSEAL's high-level
API (:class:`CkksCodec`); (c) sepals' BFV codec (:class:`BfvCodec`) at both rings it
picks from, N = 4096 and N = 8192 (``bfv-4096``, ``bfv-8192``); ``*`` marks the one
:func:`~sepals.common.config.bfv_ring_for` picks for each size, and the targets are
checked on that one. Ratios are printed against (a) and (b), all measured in this
process.

How 100 clients are simulated: encryption is timed on ``--distinct`` clients (default
3) whose updates differ; the server then loads those payloads (timed, per client) and
adds ``clients`` of them, cycling through the distinct ones, so the additions are real
but only a few distinct ciphertexts are held in memory. The exact reference sum cycles
the same way. The NVFlare baseline at 10M parameters is encrypted on 2 clients and
its additions are timed on 10 (adding 100 of its ciphertexts takes minutes); such
cells are marked. Each client's update is ``n * w`` with ``n = 200`` examples and weights
``w ~ N(0, 0.1)`` (clipped to +-1), the kind of vector a client encrypts.

Usage: ``python -m benchmarks.he [--quick] [--sizes 100000 1000000] [--clients 10 100]``
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

EXAMPLES_PER_CLIENT = 200
# The default model (the digits MLP) and the pretrained job's trainable head.
DEFAULT_MODEL = 2410
PRETRAINED_HEAD = 1290


@dataclass
class Cell:
    """One (encoding, size, clients) measurement; times are seconds per client."""

    encoding: str
    size: int
    clients: int
    added: int
    upload: int
    download: int
    encrypt: float
    load: float
    add: float
    decrypt: float
    max_error: float

    @property
    def server(self) -> float:
        """Server seconds per client: load plus its share of the additions."""
        return self.load + self.add


def _codecs() -> dict[str, tuple[Any, Any]]:
    """(client codec, server codec) per encoding; keys made here, public side to server."""
    from sepals.common.codec import PlainCodec
    from sepals.common.config import BFV_RINGS, EncryptionConfig
    from sepals.common.scheme import (
        generate_secret_context,
        make_client_codec,
        make_server_codec,
        public_context_bytes,
    )

    out: dict[str, tuple[Any, Any]] = {"plain-fp32": (PlainCodec(), PlainCodec())}
    nvflare = EncryptionConfig(
        scheme="ckks", coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40, max_clients=100
    )
    configs = [("nvflare-ckks", nvflare)] + [
        (f"bfv-{n}", EncryptionConfig(poly_modulus_degree=n)) for n in BFV_RINGS
    ]
    for name, cfg in configs:
        secret = generate_secret_context(cfg)
        out[name] = (
            make_client_codec(cfg, secret),
            make_server_codec(cfg, public_context_bytes(secret)),
        )
    return out


def _updates(size: int, distinct: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        EXAMPLES_PER_CLIENT * np.clip(rng.normal(0.0, 0.1, size), -1.0, 1.0)
        for _ in range(distinct)
    ]


def measure(
    name: str,
    client: Any,
    server: Any,
    size: int,
    clients: list[int],
    distinct: int,
    seed: int,
    max_adds: int,
) -> list[Cell]:
    """Measure one encoding at one size for every federation size in ``clients``."""
    updates = _updates(size, distinct, seed)
    payloads, enc_times = [], []
    for i, x in enumerate(updates):
        t0 = time.perf_counter()
        payloads.append(client.encode(x, np.random.default_rng(i)))
        enc_times.append(time.perf_counter() - t0)
    loaded, load_times = [], []
    for p in payloads:
        t0 = time.perf_counter()
        loaded.append(server.validate(p, size))
        load_times.append(time.perf_counter() - t0)
    cells = []
    for k in clients:
        # Adding 100 clients' 10M-parameter NVFlare ciphertexts takes minutes; past
        # ``max_adds`` the additions per client are timed on max_adds clients and the
        # error is that of their sum (the report flags such cells).
        added = min(k, max_adds)
        t0 = time.perf_counter()
        aggregate = server.aggregate_loaded([loaded[i % distinct] for i in range(added)], size)
        t_add = time.perf_counter() - t0
        t0 = time.perf_counter()
        weight_total = float(EXAMPLES_PER_CLIENT * added)
        got = client.decode(aggregate) / weight_total
        t_dec = time.perf_counter() - t0
        exact = np.zeros(size)
        for i in range(added):
            exact += updates[i % distinct]
        exact /= weight_total
        cells.append(
            Cell(
                encoding=name,
                size=size,
                clients=k,
                added=added,
                upload=int(np.mean([len(p) for p in payloads])),
                download=len(aggregate),
                encrypt=float(np.mean(enc_times)),
                load=float(np.mean(load_times)),
                add=t_add / added,
                decrypt=t_dec,
                max_error=float(np.max(np.abs(got - exact))),
            )
        )
        del aggregate, got, exact
    del payloads, loaded
    gc.collect()
    return cells


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ours(size: int) -> str:
    """The BFV encoding sepals uses for a model of ``size`` parameters."""
    from sepals.common.config import bfv_ring_for

    return f"bfv-{bfv_ring_for(size)}"


def report(cells: list[Cell]) -> None:
    """Print the table, the ratios against (a) and (b), and the targets."""
    from sepals.common.config import BFV_RINGS

    by = {(c.encoding, c.size, c.clients): c for c in cells}
    sizes = sorted({c.size for c in cells})
    ks = sorted({c.clients for c in cells})
    rings = [f"bfv-{n}" for n in BFV_RINGS]
    names = ["plain-fp32", "nvflare-ckks", *rings]
    print(
        "\nper client; times in seconds per 1M parameters (server: per client per 1M); "
        "error = max |FedAvg - exact|; * = the ring sepals picks for that size"
    )
    head = (
        f"{'params':>9} {'clients':>7} {'encoding':<13} {'upload':>10} {'download':>10} "
        f"{'enc s/1M':>9} {'load ms':>8} {'add ms':>7} {'srv ms':>7} {'dec s/1M':>9} "
        f"{'max err':>8}"
    )
    print(head)
    for size in sizes:
        m = size / 1e6
        for k in ks:
            for name in names:
                c = by.get((name, size, k))
                if c is None:
                    continue
                note = "" if c.added == k else f"  (adds and error timed on {c.added} clients)"
                label = name + ("*" if name == _ours(size) else "")
                print(
                    f"{size:>9} {k:>7} {label:<13} {_fmt_bytes(c.upload):>10} "
                    f"{_fmt_bytes(c.download):>10} {c.encrypt / m:9.3f} "
                    f"{1e3 * c.load / m:8.2f} {1e3 * c.add / m:7.2f} {1e3 * c.server / m:7.2f} "
                    f"{c.decrypt / m:9.3f} {c.max_error:8.1e}{note}"
                )
    print("\nratios of each BFV ring against (a) plain-fp32 and (b) nvflare-ckks (* = picked)")
    print(
        f"{'params':>9} {'clients':>7} {'ring':<10} {'up/a':>6} {'up/b':>6} {'down/a':>7} "
        f"{'down/b':>7} {'enc/b':>6} {'srv/b':>6} {'dec/b':>6} {'b up/a':>7}"
    )
    for size in sizes:
        for k in ks:
            a, b = by.get(("plain-fp32", size, k)), by.get(("nvflare-ckks", size, k))
            for ring in rings:
                s = by.get((ring, size, k))
                if a is None or b is None or s is None:
                    continue
                label = ring + ("*" if ring == _ours(size) else "")
                print(
                    f"{size:>9} {k:>7} {label:<10} {s.upload / a.upload:6.2f} "
                    f"{s.upload / b.upload:6.3f} {s.download / a.download:7.2f} "
                    f"{s.download / b.download:7.3f} {s.encrypt / b.encrypt:6.3f} "
                    f"{s.server / b.server:6.3f} {s.decrypt / b.decrypt:6.3f} "
                    f"{b.upload / a.upload:7.2f}"
                )
    plain = {(c.size, c.clients): c for c in cells if c.encoding == "plain-fp32"}
    ours = [c for c in cells if c.encoding == _ours(c.size) and (c.size, c.clients) in plain]
    if not ours:
        return

    def worst(values: list[float]) -> float:
        return max(values) if values else float("nan")

    def up_ratio(c: Cell) -> float:
        return c.upload / plain[c.size, c.clients].upload

    default_model = [c for c in ours if c.size == DEFAULT_MODEL]
    large = [c for c in ours if c.size >= 100_000]
    up = worst([up_ratio(c) for c in large])
    down = worst([c.download / plain[c.size, c.clients].download for c in large])
    big = [c for c in ours if c.size >= 1_000_000] or large
    enc = worst([c.encrypt / (c.size / 1e6) for c in big])
    srv = worst([1e3 * c.server / (c.size / 1e6) for c in big])
    add = worst([1e3 * c.add / (c.size / 1e6) for c in big])
    dec = worst([c.decrypt / (c.size / 1e6) for c in big])
    print(
        "\ntargets (the ring sepals picks; worst case over both federation sizes and, for "
        "bytes, the model sizes named, for times the sizes >= 1M)"
    )
    rows = [
        (
            f"upload / plaintext, the default model ({DEFAULT_MODEL:,})",
            worst([up_ratio(c) for c in default_model]),
            3.5,
            "x",
        ),
        ("upload / plaintext, models >= 100k", up, 1.5, "x"),
        ("download / plaintext, models >= 100k", down, 3.0, "x"),
        ("encode+encrypt+serialize, s per 1M", enc, 0.3, "s"),
        ("server load+aggregate, ms per client per 1M", srv, 10.0, "ms"),
        ("  of which additions only, ms per client per 1M", add, 10.0, "ms"),
        ("decrypt+decode, s per 1M", dec, 0.3, "s"),
    ]
    for label, value, target, unit in rows:
        if value != value:  # no cell of that kind was measured
            continue
        verdict = "meets" if value <= target else "MISSES"
        print(f"  {label:<50} {value:8.3f} {unit:<2} (target <= {target:g}): {verdict}")


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the two small models, 100k and 1M parameters only"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--distinct", type=int, default=3, help="distinct client updates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [PRETRAINED_HEAD, DEFAULT_MODEL]
    default = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    sizes = args.sizes or models + default
    t_start = time.perf_counter()
    codecs = _codecs()
    print(
        f"HE benchmark: sizes {sizes}, clients {args.clients}; encryption timed on "
        f"{args.distinct} distinct clients, their ciphertexts added cyclically to make each "
        "federation (see the module docstring)",
        flush=True,
    )
    cells: list[Cell] = []
    for size in sizes:
        for name, (client, server) in codecs.items():
            t0 = time.perf_counter()
            baseline_big = name == "nvflare-ckks" and size >= 10_000_000
            distinct = 2 if baseline_big else args.distinct
            max_adds = 10 if baseline_big else max(args.clients)
            cells += measure(
                name, client, server, size, args.clients, distinct, args.seed, max_adds
            )
            print(f"  {name} at {size} parameters: {time.perf_counter() - t0:.1f} s", flush=True)
    report(cells)
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
