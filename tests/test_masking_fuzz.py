"""Property-based fuzzing of the server's masking exchanges: setup and unmask replies.

The server's :class:`~sepals.server.serverapp.mask_driver.MaskDriver` is driven through
its public calls with an exchange that answers for six clients (complete graph, ``T = 3``):
honest replies (made by the clients' own functions) mixed with hostile ones: Flower errors
and setup errors with hostile text, missing or wild records, every field removed or set to
a wild value, keys reused, shares addressed to the wrong peers, too many or too few, of
the wrong size or kind, replies from nodes that were not asked and second replies. The
properties: nothing escapes the driver; every malformed reply is left out with a printable
reason in the log; every honest one is kept; the setup's sharers are exactly what the
honest replies allow; and the unmask either removes the masks exactly or is abandoned with
a reason, also when a well-formed share has been changed (which only its owner's
commitment can show). Each round type sees at least 1,000 malformed replies.

Not covered here: a sealed share whose ciphertext is changed keeps its form, so the server
cannot tell it from a good one; its recipient refuses to train (``tests/test_masking.py``).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sepals.client import masking as cm
from sepals.common.mask_prg import add_mod
from sepals.common.masking import MaskParams, pack_ids
from sepals.common.plan import FederationPlan
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_MASK,
    KEY_SETUP_ERROR,
    MASK_SETUP,
    MASK_UNMASK,
)
from sepals.server.serverapp.mask_driver import MaskDriver, Unmasking
from sepals.server.serverapp.masking import MaskRound

pytestmark = pytest.mark.usefixtures("run_identity")

FED = "c" * 32
ROUND = 4
NODES = [3000 + 11 * i for i in range(6)]
PARAMS = MaskParams(neighbours=5, threshold=3)
SLOTS, MODULUS = 64, 17592186028033
OPERATOR_KEY = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
SETUP_EXAMPLES, REVEAL_EXAMPLES = 260, 330
MIN_MALFORMED = 1000
LEFT_OUT = re.compile(r"of node (\d+) left out: (.+)$")
UNEXPECTED = re.compile(r"masking reply from an unexpected node (\d+) left out")
WILD = st.one_of(
    st.sampled_from([None, 0, -1, 2**64, math.nan, "", "x", b"", b"\x00" * 32, [], [b""], [1]]),
    st.binary(max_size=40),
    st.integers(),
    st.text(max_size=10),
    st.lists(st.binary(max_size=40), max_size=7),
)
HOSTILE_TEXT = st.text(max_size=300)
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _plan() -> FederationPlan:
    return FederationPlan(
        federation_id=FED,
        rounds=5,
        fraction_train=1.0,
        local_epochs=1,
        batch_size=8,
        learning_rate=0.1,
        lr_schedule="constant",
        momentum=0.0,
        model_seed=0,
        codec="bfv-q2",
        key_fingerprint="0" * 32,
        vector_length=SLOTS,
        operator_key=OPERATOR_KEY,
        mask_neighbours=PARAMS.neighbours,
        mask_threshold=PARAMS.threshold,
    )


def _raw(cls: Any, values: dict[str, Any]) -> Any:
    # Flower's records refuse some values at construction; a hostile peer does not build
    # them through that check.
    record = cls({})
    record._data.update(values)
    return record


@pytest.fixture(scope="module")
def honest() -> dict[str, Any]:
    """One honest round: setup replies, masks, the unmask request and the reveals."""
    plan = _plan()
    keys = {n: cm.new_share_key() for n in NODES}
    share_pks = {n: cm.share_public_key(k) for n, k in keys.items()}
    server = MaskRound(PARAMS, FED, ROUND)
    body = server.start(share_pks)
    states, setup = {}, {}
    for node in NODES:
        states[node], setup[node] = cm.setup_round(plan, ROUND, node, keys[node], body)
        server.admit_setup(node, setup[node])
    server.close_sharing()
    masks = {}
    for node in server.sharers:
        states[node], masks[node] = cm.open_and_mask(
            plan, states[node], ROUND, server.train_record(node), SLOTS, MODULUS
        )
    dropped = NODES[-1]  # its pairwise masks are rebuilt from the survivors' shares
    request = server.unmask_record([n for n in NODES if n != dropped])
    reveals = {}
    for node in server.survivors:
        states[node], reveals[node] = cm.reveal_shares(plan, states[node], ROUND, request)
    return {
        "share_pks": share_pks,
        "setup": setup,
        "masks": masks,
        "server": server,
        "request": request,
        "reveals": reveals,
    }


class Exchange:
    """Answers the driver's messages with the replies a case prepared for each node."""

    def __init__(self) -> None:
        self.answers: dict[int, list[Message]] = {}
        self.extra: list[Message] = []  # replies to messages that were never sent

    def messages(self, server_round: int, nodes: Any, kind: str, records: Any) -> list[Message]:
        out = []
        for node in nodes:
            content = RecordDict({k: _raw(ConfigRecord, v) for k, v in records(node).items()})
            out.append(Message(content, dst_node_id=node, message_type=kind))
        return out

    def __call__(self, grid: Any, messages: list[Message], timeout: float) -> list[Message]:
        out = [*self.extra]
        for msg in messages:
            for make in self.answers.get(msg.metadata.dst_node_id, []):
                out.append(make(msg))
        return out


def _answer(record: dict[str, Any] | None, key: str = KEY_MASK, error: Any = None) -> Any:
    def make(msg: Message) -> Message:
        if error is not None:
            return Message(error, reply_to=msg)
        content = RecordDict({} if record is None else {key: _raw(ConfigRecord, record)})
        return Message(content, reply_to=msg)

    return make


def _stray(node: int, record: dict[str, Any], kind: str) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=kind)
    return Message(RecordDict({KEY_MASK: _raw(ConfigRecord, record)}), reply_to=orig)


def _left_out(caplog: pytest.LogCaptureFixture) -> tuple[dict[int, str], set[int]]:
    reasons, strays = {}, set()
    for rec in caplog.records:
        text = rec.getMessage()
        if m := LEFT_OUT.search(text):
            reasons[int(m.group(1))] = m.group(2)
        elif m := UNEXPECTED.search(text):
            strays.add(int(m.group(1)))
    return reasons, strays


def _driver(exchange: Exchange) -> MaskDriver:
    return MaskDriver(PARAMS, lambda: FED, exchange.messages, exchange, 1.0, 1)


# ---------------------------------------------------------------------- setup replies
SETUP_KEYS = ["mask-pk", "share-pk", "commit", "to", "sealed"]
SETUP_FAULTS = [
    "error",
    "setup-error",
    "no record",
    "wild",
    "missing",
    "mask-pk is share-pk",
    "mask-pk of another",
    "share-pk of another",
    "to: one missing",
    "to: a stranger",
    "to: one twice",
    "sealed: one fewer",
    "sealed: empty share",
    "sealed: oversized share",
    "sealed: not bytes",
    "second reply",
]


def _bad_setup(fault: str, node: int, good: dict[str, Any], others: list[dict[str, Any]], data):
    """``(answers for node, stray replies)`` of one malformed setup reply."""
    rec = dict(good)
    to = list(rec["to"][i : i + 8] for i in range(0, len(rec["to"]), 8))
    if fault == "error":
        code = data.draw(st.integers(0, 5000).filter(lambda c: c != ERR_BUDGET_EXHAUSTED))
        return [_answer(None, error=Error(code=code, reason=data.draw(HOSTILE_TEXT)))], []
    if fault == "setup-error":
        failed = {"code": data.draw(WILD), "reason": data.draw(HOSTILE_TEXT)}
        if failed["code"] == ERR_BUDGET_EXHAUSTED:
            failed["code"] = 7
        return [_answer(failed, key=KEY_SETUP_ERROR)], []
    if fault == "no record":
        return [_answer(None)], []
    if fault == "wild":
        key = data.draw(st.sampled_from(SETUP_KEYS))
        rec[key] = data.draw(WILD.filter(lambda v, key=key: _detectable(key, v, good)))
    elif fault == "missing":
        del rec[data.draw(st.sampled_from(SETUP_KEYS))]
    elif fault == "mask-pk is share-pk":
        rec["mask-pk"] = rec["share-pk"]
    elif fault == "mask-pk of another" and others:
        rec["mask-pk"] = data.draw(st.sampled_from(others))["mask-pk"]
    elif fault == "share-pk of another":
        rec["share-pk"] = next(r["share-pk"] for r in others or [{"share-pk": b"\x01" * 32}])
    elif fault == "to: one missing":
        rec["to"] = b"".join(to[1:])
    elif fault == "to: a stranger":
        rec["to"] = b"".join(to[1:]) + pack_ids([12345])
    elif fault == "to: one twice":
        rec["to"] = b"".join([to[1], *to[1:]])
    elif fault == "sealed: one fewer":
        rec["sealed"] = rec["sealed"][1:]
    elif fault == "sealed: empty share":
        rec["sealed"] = [b"", *rec["sealed"][1:]]
    elif fault == "sealed: oversized share":
        rec["sealed"] = [b"\x00" * 1025, *rec["sealed"][1:]]
    elif fault == "sealed: not bytes":
        rec["sealed"] = [1, *rec["sealed"][1:]]
    elif fault == "second reply":
        return [_answer(good), _answer(good)], [node]
    else:  # "mask-pk of another" with no other reply yet
        rec["mask-pk"] = rec["share-pk"]
    return [_answer(rec)], []


def _detectable(key: str, value: Any, good: dict[str, Any]) -> bool:
    """Whether a wild ``value`` for ``key`` is one the server can tell from a good one.

    Any 32 bytes may be a mask key or a commitment, and any five small blobs may be
    sealed shares: only the unmask stage or the recipients can tell those apart.
    """
    if value == good[key]:
        return False
    if key in ("mask-pk", "commit"):
        return not (isinstance(value, bytes) and len(value) == 32)
    if key == "sealed" and isinstance(value, list) and len(value) == len(good["sealed"]):
        return not all(isinstance(b, bytes) and 0 < len(b) <= 1024 for b in value)
    return True


SETUP_PLAN = st.lists(
    st.sampled_from(["honest"] * 12 + SETUP_FAULTS), min_size=len(NODES), max_size=len(NODES)
)


def test_fuzzed_setup_replies_leave_out_exactly_the_malformed_ones(honest, caplog):
    tally = {"malformed": 0, "rounds set up": 0}

    @settings(FUZZ, max_examples=SETUP_EXAMPLES)
    @given(plan=SETUP_PLAN, strays=st.integers(0, 2), data=st.data())
    def run(plan: list[str], strays: int, data: Any) -> None:
        caplog.clear()
        exchange = Exchange()
        kept, bad, second = [], [], []
        for node, fault in zip(NODES, plan, strict=True):
            good = honest["setup"][node]
            if fault == "honest":
                exchange.answers[node] = [_answer(good)]
                kept.append(node)
                continue
            others = [honest["setup"][n] for n in kept]
            exchange.answers[node], twice = _bad_setup(fault, node, good, others, data)
            if twice:  # the first of two replies is sound; the second is left out
                kept.append(node)
                second.append(node)
            else:
                bad.append(node)
        exchange.extra = [
            _stray(99000 + i, honest["setup"][NODES[0]], MASK_SETUP) for i in range(strays)
        ]
        driver = _driver(exchange)
        driver.share_keys = dict(honest["share_pks"])
        with caplog.at_level(logging.WARNING, logger="sepals"):
            setup = driver.setup(None, ROUND, NODES)
        reasons, unexpected = _left_out(caplog)
        assert sorted(reasons) == sorted(bad)
        assert unexpected == {99000 + i for i in range(strays)} | set(second)
        for reason in reasons.values():
            assert reason.isprintable() and 0 < len(reason) <= 220
        mask_round = setup.mask_round
        assert sorted(mask_round.sealed) == sorted(mask_round.keys) == sorted(kept)
        # complete graph: each sharer needs T others among the sharers
        expected = sorted(kept) if len(kept) - 1 >= PARAMS.threshold else []
        assert setup.sharers == expected
        assert (setup.outcome.abandoned is None) == bool(expected)
        for node in bad:  # its share key is forgotten: it registers again
            assert node not in driver.share_keys
        tally["malformed"] += len(bad) + len(second) + strays
        tally["rounds set up"] += bool(expected)

    run()
    assert tally["malformed"] >= MIN_MALFORMED, tally
    assert tally["rounds set up"] >= SETUP_EXAMPLES // 10, tally


# ---------------------------------------------------------------------- unmask replies
REVEAL_KEYS = ["peers", "kinds", "shares"]
REVEAL_FAULTS = [
    "error",
    "no record",
    "wild",
    "missing",
    "peers: one missing",
    "peers: a stranger",
    "peers: one twice",
    "kinds: one flipped",
    "kinds: not ints",
    "shares: one fewer",
    "shares: wrong size",
    "shares: wrong index",
    "shares: not bytes",
    "second reply",
    "from the dropped node",
]
CHANGED = "share value changed"  # well formed: kept, and caught when the secret is rebuilt


def _bad_reveal(fault: str, node: int, good: dict[str, Any], data: Any):
    rec = {k: (list(v) if isinstance(v, list) else v) for k, v in good.items()}
    peers = [rec["peers"][i : i + 8] for i in range(0, len(rec["peers"]), 8)]
    i = data.draw(st.integers(0, len(peers) - 1))
    if fault == "error":
        code = data.draw(st.integers(0, 5000))
        return [_answer(None, error=Error(code=code, reason=data.draw(HOSTILE_TEXT)))]
    if fault == "no record":
        return [_answer(None)]
    if fault == "wild":
        key = data.draw(st.sampled_from(REVEAL_KEYS))
        rec[key] = data.draw(WILD.filter(lambda v, key=key: v != good[key]))
    elif fault == "missing":
        del rec[data.draw(st.sampled_from(REVEAL_KEYS))]
    elif fault == "peers: one missing":
        rec["peers"] = b"".join(peers[:i] + peers[i + 1 :])
    elif fault == "peers: a stranger":
        rec["peers"] = b"".join([*peers[:i], pack_ids([777]), *peers[i + 1 :]])
    elif fault == "peers: one twice":
        j = (i + 1) % len(peers)
        rec["peers"] = b"".join([*peers[:j], peers[i], *peers[j + 1 :]])
    elif fault == "kinds: one flipped":
        rec["kinds"][i] = 1 - rec["kinds"][i]
    elif fault == "kinds: not ints":
        rec["kinds"][i] = data.draw(st.sampled_from([None, "0", b"\x00", 2, -1]))
    elif fault == "shares: one fewer":
        del rec["shares"][i]
    elif fault == "shares: wrong size":
        share = rec["shares"][i]
        rec["shares"][i] = data.draw(st.sampled_from([share[:-1], share + b"\x00", b""]))
    elif fault == "shares: wrong index":
        share = rec["shares"][i]
        index = int.from_bytes(share[:2], "little")
        rec["shares"][i] = ((index % 9) + 1 + 9).to_bytes(2, "little") + share[2:]
    elif fault == "shares: not bytes":
        rec["shares"][i] = data.draw(st.sampled_from([None, 5, "ab"]))
    elif fault == CHANGED:
        share = rec["shares"][i]
        at = data.draw(st.integers(2, len(share) - 1))
        rec["shares"][i] = share[:at] + bytes([share[at] ^ 0x5A]) + share[at + 1 :]
    elif fault == "second reply":
        return [_answer(good), _answer(good)]
    return [_answer(rec)]


REVEAL_PLAN = st.lists(
    st.sampled_from(["honest"] * 4 + REVEAL_FAULTS + [CHANGED]), min_size=5, max_size=5
)


def test_fuzzed_reveals_unmask_exactly_or_abandon_with_a_reason(honest, caplog):
    survivors = list(honest["server"].survivors)
    assert len(survivors) == len(NODES) - 1
    tally = {"malformed": 0, "unmasked": 0}

    @settings(FUZZ, max_examples=REVEAL_EXAMPLES)
    @given(plan=REVEAL_PLAN, data=st.data())
    def run(plan: list[str], data: Any) -> None:
        caplog.clear()
        exchange = Exchange()
        kept, bad, changed, second = [], [], 0, []
        for node, fault in zip(survivors, plan, strict=True):
            good = honest["reveals"][node]
            if fault == "honest":
                exchange.answers[node] = [_answer(good)]
                kept.append(node)
            elif fault == "from the dropped node":
                exchange.answers[node] = [_answer(good)]
                kept.append(node)
                exchange.extra.append(_stray(NODES[-1], good, MASK_UNMASK))
                second.append(NODES[-1])
            else:
                exchange.answers[node] = _bad_reveal(fault, node, good, data)
                if fault == "second reply":
                    kept.append(node)
                    second.append(node)
                elif fault == CHANGED:
                    kept.append(node)
                    changed += 1
                else:
                    bad.append(node)
        mask_round = copy.deepcopy(honest["server"])
        unmasking = Unmasking(ROUND, mask_round, honest["request"])
        driver = _driver(exchange)
        with caplog.at_level(logging.WARNING, logger="sepals"):
            driver.unmask_alone(None, unmasking)
            offset, reason = driver.offset(unmasking, SLOTS, MODULUS)
        reasons, unexpected = _left_out(caplog)
        assert sorted(reasons) == sorted(bad) and unexpected == set(second)
        for text in reasons.values():
            assert text.isprintable() and 0 < len(text) <= 220
        assert mask_round.revealers == set(kept)
        if offset is None:
            assert reason.isprintable() and reason
            # only too few revealers, or a changed share, abandons the round
            assert changed or len(kept) < PARAMS.threshold, reason
        else:
            assert len(kept) >= PARAMS.threshold
            for node in mask_round.survivors:
                add_mod(offset, honest["masks"][node], MODULUS)
            assert not offset.any()  # the masks are removed exactly, never wrongly
            tally["unmasked"] += 1
        tally["malformed"] += len(bad) + len(second) + changed

    run()
    assert tally["malformed"] >= MIN_MALFORMED, tally
    assert tally["unmasked"] >= REVEAL_EXAMPLES // 10, tally
