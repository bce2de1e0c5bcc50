"""Smoke test of benchmarks.large at a tiny size: a ~100k-parameter BERT, 3 clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import large

CLIENTS = 3
SEED = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One measured round of the tiny model, with the clients' updates and payload sizes."""
    folder = tmp_path_factory.mktemp("large")
    bench = large.make_bench(100_000, full=False, seed=SEED, folder=folder)
    setup = large.TrainSetup(examples=16, batch=4, seq_len=8, device="cpu")
    trainer = large.client_trainer(bench, setup, SEED)
    updates: list[np.ndarray[Any, Any]] = []

    def train(i: int) -> large.TrainedClient:
        out = trainer(i)
        updates.append(out.weighted.copy())
        return out

    codecs = large.make_codecs(CLIENTS)
    sent: dict[str, list[int]] = {large.MODE_PLAIN: [], large.MODE_BFV: []}
    for mode, codec in codecs.client.items():
        real = codec.encode_update

        def spy(*args: Any, _real: Any = real, _mode: str = mode, **kwargs: Any) -> Any:
            payload, error = _real(*args, **kwargs)
            sent[_mode].append(len(payload))
            return payload, error

        codec.encode_update = spy  # type: ignore[method-assign]
    capture: dict[str, bytes] = {}
    result = large.run_round(
        bench, CLIENTS, train, codecs=codecs, seed=SEED, setup=setup, capture=capture
    )
    return {
        "bench": bench,
        "result": result,
        "updates": updates,
        "codecs": codecs,
        "capture": capture,
        "sent": sent,
    }


def test_model_is_about_the_size_and_lora_is_about_one_percent(tiny: dict[str, Any]) -> None:
    bench = tiny["bench"]
    assert abs(bench.total - 100_000) <= 5_000
    assert bench.lora_r is not None
    assert 0.003 <= bench.trainable / bench.total <= 0.03
    assert bench.initial.shape == (bench.trainable,)
    # Only the adapters and the head are trainable.
    names = [n for n, p in bench.template.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)


def test_decrypted_aggregate_is_the_exact_sum(tiny: dict[str, Any]) -> None:
    bfv = tiny["codecs"].client[large.MODE_BFV]
    updates = tiny["updates"]
    assert len(updates) == CLIENTS
    assert not np.allclose(updates[0], updates[1])  # distinct clients
    exact = np.sum(updates, axis=0)
    # Integers: the unmasked BFV sum equals the sum of the clients' quantized updates.
    want = sum(bfv.quantize(u, np.random.default_rng([SEED, i]))[0] for i, u in enumerate(updates))
    got = bfv.integer_sum(tiny["capture"][large.MODE_BFV])
    np.testing.assert_array_equal(got, want)
    # Floats: within one quantization step per client of the plain float64 sum.
    decoded = bfv.decode(tiny["capture"][large.MODE_BFV])
    step = tiny["codecs"].quant_step
    assert np.max(np.abs(decoded - exact)) <= CLIENTS * step
    plain = tiny["codecs"].client[large.MODE_PLAIN].decode(tiny["capture"][large.MODE_PLAIN])
    np.testing.assert_allclose(plain, exact, rtol=1e-5, atol=1e-5)
    for mode in (large.MODE_PLAIN, large.MODE_BFV):
        fig = tiny["result"].modes[mode]
        assert fig.exact
        assert fig.max_abs_error <= fig.error_bound


def test_upload_bytes_come_from_the_real_payloads(tiny: dict[str, Any]) -> None:
    result = tiny["result"]
    for mode, sizes in tiny["sent"].items():
        assert len(sizes) == CLIENTS
        assert result.modes[mode].upload_bytes == pytest.approx(np.mean(sizes))
        assert result.modes[mode].fp32_bytes == 4 * result.trainable
    plain = result.modes[large.MODE_PLAIN]
    assert plain.upload_bytes > plain.fp32_bytes  # the envelope's header counts too
    # A tiny vector still costs one whole ciphertext: far above fp32.
    assert result.modes[large.MODE_BFV].upload_bytes > 4 * plain.upload_bytes
    assert not result.fills_ciphertext


def test_times_are_counted(tiny: dict[str, Any]) -> None:
    result = tiny["result"]
    assert result.steps >= 1
    for m in result.modes.values():
        assert m.client_train_seconds > 0
        assert m.round_seconds == pytest.approx(
            m.client_seconds + m.server_seconds + m.decrypt_seconds
        )
        assert m.peak_rss_client > 0 and m.peak_rss_server > 0 and m.peak_rss_decrypt > 0
    enc = result.modes[large.MODE_BFV]
    assert enc.client_mask_seconds > 0 and enc.server_unmask_seconds > 0
    assert result.modes[large.MODE_PLAIN].client_mask_seconds == 0


def test_table_and_json_have_the_rows(tiny: dict[str, Any], tmp_path: Path) -> None:
    result = tiny["result"]
    text = large.format_report([result])
    assert large.MODE_PLAIN in text and large.MODE_BFV in text
    rows = large.table_rows([result])
    assert [r[2] for r in rows] == [large.MODE_PLAIN, large.MODE_BFV]
    assert all(len(r) == len(large.TABLE_HEAD) for r in rows)
    targets = {t.target: t.verdict for t in large.targets([result])}
    assert targets["100k: upload <= 1.1x fp32"] == "n/a"
    assert targets[f"100k {large.MODE_BFV}: sum exact within bound"] == "met"
    data = json.loads(json.dumps(large.result_json([result])))
    (entry,) = data["results"]
    assert set(entry["modes"]) == {large.MODE_PLAIN, large.MODE_BFV}
    assert (
        entry["modes"][large.MODE_BFV]["upload_bytes"] == result.modes[large.MODE_BFV].upload_bytes
    )
    assert entry["trainable"] == result.trainable
    assert data["targets"]


def test_streamed_aggregation_equals_the_held_one(tiny: dict[str, Any]) -> None:
    codecs = tiny["codecs"]
    bfv = codecs.client[large.MODE_BFV]
    server = codecs.server[large.MODE_BFV]
    length = tiny["result"].trainable
    payloads = [
        bfv.encode_update(u, np.random.default_rng(i))[0] for i, u in enumerate(tiny["updates"])
    ]
    sums = []
    for stream in (False, True):
        agg = large.Aggregator(server, length, stream)
        for p in payloads:
            agg.admit(p)
        assert len(agg.loaded) == (1 if stream else CLIENTS)
        sums.append(bfv.integer_sum(agg.finish()))
    np.testing.assert_array_equal(sums[0], sums[1])


@pytest.mark.parametrize(
    ("value", "target", "expected"), [(1.0, 1.1, "met"), (1.1, 1.1, "met"), (1.2, 1.1, "MISSED")]
)
def test_verdict(value: float, target: float, expected: str) -> None:
    assert large.verdict(value, target) == expected


def test_sizes_and_shapes() -> None:
    assert large.parse_size("10M") == 10_000_000
    assert large.parse_size("100k") == 100_000
    with pytest.raises(ValueError):
        large.parse_size("ten")
    for size in (10_000_000, 100_000_000):
        arch = large.architecture(size)
        total = large.count_parameters(arch)
        assert abs(total - size) <= 0.02 * size
        r = large.lora_rank(arch, total)
        trainable = arch.layers * len(large.LORA_TARGETS) * 2 * arch.hidden * r
        assert 0.007 <= trainable / total <= 0.013


def test_memory_estimate_grows_with_the_batch() -> None:
    small = large.dp_memory_estimate(1000, 1000, large.TrainSetup(examples=16, batch=2))
    big = large.dp_memory_estimate(1000, 1000, large.TrainSetup(examples=16, batch=8))
    assert big > small > 8 * 1000
