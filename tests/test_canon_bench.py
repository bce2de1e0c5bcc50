"""The canonicalization benchmark at a tiny size (nothing timed is asserted)."""

from __future__ import annotations

import pytest

from benchmarks import canon


@pytest.fixture(scope="module")
def result() -> canon.CanonResult:
    return canon.measure(20_000, 4, 1, train=False)


def test_the_benchmark_measures_both_paths_on_real_uploads(result):
    assert (result.parameters, result.clients, result.ciphertexts) == (20_000, 4, 2)
    # The canonical encoding is SEAL's seeded one without zstd's frame: 10 bytes less a
    # ciphertext with the 60-bit data prime (zstd stores its random words raw).
    assert result.upload_bytes_before - result.upload_bytes_now == 10 * result.ciphertexts
    for seconds in (
        result.server_now,
        result.server_before,
        result.client_encode_now,
        result.client_encode_before,
        result.client_reemit,
        result.server_layout_keys,
        result.server_raw_digest,
    ):
        assert 0 < seconds < 60
    text = canon.format_result(result)
    assert "2 ciphertexts an upload" in text and "target" not in text  # no round measured


def test_the_verdict_and_the_shares():
    assert canon.verdict(0.05) == "met" and canon.verdict(0.0501) == "MISSED"
    r = canon.CanonResult(1000, 10, 1, 100, 90, 0.010, 0.012, 0.2, 0.25, 0.01, 0.003, 0.001, 0.75)
    assert r.round_seconds == pytest.approx(1.0)
    assert r.client_added == pytest.approx(0.05) and r.client_share() == pytest.approx(0.05)
    assert r.server_added == pytest.approx(10 * 0.002)
    assert r.server_share() == pytest.approx(0.02 / (1.0 + 0.12))
    assert "MISSED" not in canon.format_result(r) and "met" in canon.format_result(r)
