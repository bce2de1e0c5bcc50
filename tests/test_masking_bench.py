"""Helpers of the masking benchmark at tiny sizes (nothing timed, no figure asserted)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from benchmarks import masking as bench
from sepals.common.bfv import BfvCodec
from sepals.common.config import EncryptionConfig
from sepals.common.mask_prg import add_mod
from sepals.common.masking import resolve_mask_params
from sepals.common.models import num_parameters
from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle

T_SMALL = 2**20 + 7  # any modulus in [2, 2^62) works for the slot-domain checks


@pytest.fixture(scope="module")
def codecs() -> tuple[BfvCodec, BfvCodec]:
    config = EncryptionConfig(scheme="bfv", max_clients=8)
    bundle = generate_bfv_bundle(config)
    return BfvCodec.for_client(bundle, config), BfvCodec.for_server(
        public_bfv_bundle(bundle), config
    )


def _round(
    codec: BfvCodec, clients: int, drops: int, slots: int, modulus: int, *, summed: bool
) -> bench.MaskedRoundRun:
    params = resolve_mask_params(clients)
    plan = bench.make_plan(codec, 100, params)
    nodes = bench.node_ids(clients)
    dropped = bench.pick_dropouts(nodes, drops, nodes[0], seed=1)
    return bench.run_mask_round(
        plan, params, nodes, nodes[0], dropped, slots, modulus, sum_survivor_masks=summed
    )


# Eight clients: k = 7, T = 5; survivors keep a share of their own seed, so k + 1 - T = 3
# may drop.
@pytest.mark.parametrize("drops", [0, 1, 2, 3])
def test_round_setup_gives_masks_the_offset_cancels(
    codecs: tuple[BfvCodec, BfvCodec], drops: int
) -> None:
    rnd = _round(codecs[0], 8, drops, 64, T_SMALL, summed=True)
    assert rnd.mask.shape == (64,) and rnd.mask.any()
    assert int(rnd.mask.max()) < T_SMALL
    assert len(rnd.dropped) == drops and rnd.me in rnd.survivors
    assert rnd.survivors_mask_sum is not None
    offset = rnd.server.slot_offset(64, T_SMALL)
    total = rnd.survivors_mask_sum.copy()
    add_mod(total, offset, T_SMALL)
    assert not total.any()
    # The timed client's mask alone is not cancelled by the offset.
    alone = rnd.mask.copy()
    add_mod(alone, offset, T_SMALL)
    assert alone.any()


def test_masked_bfv_sum_with_offset_is_the_plain_sum(codecs: tuple[BfvCodec, BfvCodec]) -> None:
    client, server = codecs
    length = 300
    slots = client.slot_count(length)
    t = client.plain_modulus
    params = resolve_mask_params(5)
    plan = bench.make_plan(client, length, params)
    nodes = bench.node_ids(5)
    dropped = bench.pick_dropouts(nodes, 1, nodes[0], seed=0)
    rnd = bench.run_mask_round(
        plan, params, nodes, nodes[0], dropped, slots, t, sum_survivor_masks=True
    )
    assert rnd.survivors_mask_sum is not None
    rng = np.random.default_rng(3)
    vec = rng.normal(size=length)
    # Put the whole survivors' mask on one upload and add an unmasked zero update: the
    # sum carries the survivors' masks, so the offset must restore the plain sum exactly.
    masked = client.encode_update(vec, np.random.default_rng(1), slot_mask=rnd.survivors_mask_sum)
    plain = client.encode_update(vec, np.random.default_rng(1))
    zero = client.encode_update(np.zeros(length))
    loaded_masked = [server.validate(p[0], length) for p in (masked, zero)]
    total = server.aggregate_loaded(loaded_masked, length, rnd.server.slot_offset(slots, t))
    assert np.array_equal(client.integer_sum(total), client.integer_sum(plain[0]))
    wrong = server.aggregate_loaded(loaded_masked, length)
    assert not np.array_equal(client.integer_sum(wrong), client.integer_sum(plain[0]))


def test_round_records_message_sizes(codecs: tuple[BfvCodec, BfvCodec]) -> None:
    rnd = _round(codecs[0], 6, 1, 8, T_SMALL, summed=False)
    msgs = rnd.messages
    assert set(msgs) == {
        "keys reply",
        "members message",
        "shares reply",
        "train message mask part",
        "unmask message",
        "reveal reply",
    }
    assert msgs["keys reply"] == 3 * 32 + sum(len(k) for k in ("mask-pk", "share-pk", "commit"))
    assert rnd.survivors_mask_sum is None
    assert all(v > 0 for v in msgs.values())


def test_timed_client_must_survive(codecs: tuple[BfvCodec, BfvCodec]) -> None:
    params = resolve_mask_params(4)
    plan = bench.make_plan(codecs[0], 10, params)
    nodes = bench.node_ids(4)
    with pytest.raises(ValueError, match="timed client"):
        bench.run_mask_round(plan, params, nodes, nodes[0], [nodes[0]], 4, T_SMALL)


def test_prg_vectors_and_reconstruction(codecs: tuple[BfvCodec, BfvCodec]) -> None:
    rnd = _round(codecs[0], 8, 2, 8, T_SMALL, summed=False)
    server = rnd.server
    alive = set(rnd.survivors)
    pairs = sum(sum(1 for j in server.graph[d] if j in alive) for d in rnd.dropped)
    assert bench.prg_vectors(server) == len(rnd.survivors) + pairs > len(rnd.survivors)
    assert bench.reconstruct_all(server) >= 0.0
    # Corrupted shares make the reconstruction check fail.
    key = (rnd.survivors[0], 0)
    server.revealed[key] = [s[:2] + bytes(16) for s in server.revealed[key]]
    with pytest.raises(ValueError, match="does not rebuild"):
        bench.reconstruct_all(server)


def test_pick_dropouts_is_seeded_and_spares_the_timed_client() -> None:
    nodes = bench.node_ids(20)
    a = bench.pick_dropouts(nodes, 5, nodes[3], seed=4)
    assert a == bench.pick_dropouts(nodes, 5, nodes[3], seed=4)
    assert len(set(a)) == 5 and nodes[3] not in a and set(a) <= set(nodes)
    with pytest.raises(ValueError, match="cannot drop"):
        bench.pick_dropouts(nodes, 20, nodes[0], seed=0)


def test_node_ids_are_distinct_valid_ids() -> None:
    ids = bench.node_ids(50)
    assert len(set(ids)) == 50 and all(0 < i < 2**64 for i in ids)
    assert ids == bench.node_ids(50)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"abc", 3),
        (7, 8),
        (True, 8),
        ([b"ab", 1], 10),
        ({"k": [b"x", b"yz"]}, 1 + 3),
        ("hé", 3),
    ],
)
def test_record_bytes(value: Any, expected: int) -> None:
    assert bench.record_bytes(value) == expected


def test_record_bytes_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="cannot size"):
        bench.record_bytes(object())


@pytest.mark.parametrize(
    ("value", "target", "expected"),
    [(0.1, 0.15, "met"), (0.15, 0.15, "met"), (0.1500001, 0.15, "MISSED"), (2.0, 1.0, "MISSED")],
)
def test_verdict(value: float, target: float, expected: str) -> None:
    assert bench.verdict(value, target) == expected


@pytest.mark.parametrize(("value", "target"), [(-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0)])
def test_verdict_refuses_bad_numbers(value: float, target: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        bench.verdict(value, target)


def test_model_factory_sizes() -> None:
    from benchmarks import million

    assert bench.model_factory(1_000_000) is million.make_model
    small = num_parameters(bench.model_factory(20_000)())
    assert 19_000 <= small <= 20_000


def test_sizes_validate() -> None:
    assert bench.Sizes().dropouts == 10
    assert bench.QUICK.dropouts == 1
    for bad in ({"parameters": 10}, {"clients": 2}, {"dropout_fraction": 0.5}):
        with pytest.raises(ValueError):
            bench.Sizes(**bad)


def test_result_rows_report_missed_targets() -> None:
    result = bench.MaskingResult(
        parameters=1000,
        clients=10,
        dropouts=1,
        neighbours=9,
        threshold=7,
        slots=8192,
        client_examples=100,
        client_train_seconds=1.0,
        client_encode_seconds=1.0,
        client_decode_seconds=0.5,
        client_unmasked_seconds=2.0,
        client_stage_seconds={"keys": 0.0, "shares": 0.0, "mask": 0.5, "reveal": 0.0},
        client_masked_encode_extra_seconds=0.0,
        client_added_seconds=0.5,
        client_added_ratio=0.25,
        server_offset_seconds=1.5,
        server_first_reconstruct_seconds=2.0,
        server_reconstruct_seconds=0.5,
        server_prg_seconds=1.0,
        server_prg_vectors=20,
        server_prg_vector_ms_single_thread=3.0,
        server_add_mod_ms=1.0,
        server_add_offset_extra_seconds=0.1,
        server_aggregate_seconds=1.0,
        server_unmask_seconds=1.6,
        server_unmask_ratio=1.6,
        offset_cancels_masks=True,
        upload_bytes_unmasked=100,
        upload_bytes_masked=100,
        upload_ratio=1.0,
        message_bytes={"keys reply": 96},
    )
    verdicts = [r.verdict for r in result.rows()]
    assert verdicts == ["MISSED", "MISSED", "met", "not run"]
    result.wall = {
        "seconds_masked": 10.0 * (bench.TARGET_WALL_RATIO - 0.05),
        "seconds_unmasked": 10.0,
        "ratio": bench.TARGET_WALL_RATIO - 0.05,
        "accuracy_masked": 0.9,
        "accuracy_unmasked": 0.9,
    }
    assert [r.verdict for r in result.rows()][-2:] == ["met", "met"]
    result.wall = {
        **result.wall,
        "ratio": bench.TARGET_WALL_RATIO + 0.05,
        "accuracy_masked": 0.898,
    }
    assert [r.verdict for r in result.rows()][-2:] == ["MISSED", "MISSED"]
    text = bench.format_result(result)
    assert "MISSED" in text and "cancels the survivors' masks exactly: yes" in text


def test_cli_refuses_bad_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_run_benchmark_at_a_tiny_size() -> None:
    result = bench.run_benchmark(
        bench.Sizes(parameters=200, clients=5, dropout_fraction=0.2), repeats=1
    )
    assert (result.clients, result.dropouts, result.neighbours, result.threshold) == (5, 1, 4, 3)
    assert result.offset_cancels_masks
    assert result.upload_bytes_masked > 0 and result.upload_bytes_unmasked > 0
    assert result.client_added_seconds > 0 and result.client_unmasked_seconds > 0
    assert result.server_prg_vectors == 4 + 4  # 4 self masks; the dropped one's 4 pairs
    assert set(result.client_stage_seconds) == {"keys", "shares", "mask", "reveal"}
    assert [r.verdict for r in result.rows()][-1] == "not run"
