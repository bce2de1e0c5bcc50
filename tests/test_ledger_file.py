"""The persistent privacy ledger: atomic file, restart semantics and `sepals ledger show`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from sepals.cli import main as sepals_main
from sepals.client.app import LEDGER_STATE_KEY, load_ledger, store_ledger
from sepals.client.core import ClientRuntime
from sepals.client.privacy import PrivacyLedger, compute_epsilon
from sepals.common.codec import PlainCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import InsecureFileError
from sepals.common.federation import FederationConfig
from sepals.common.ledger import LedgerFileError, read_ledger_file, write_ledger_file
from sepals.common.plan import FederationPlan
from sepals.common.round_signature import generate_operator_key

PRIVACY = PrivacyConfig(target_epsilon=8.0, delta=1e-5)


def _spent(rounds: int) -> PrivacyLedger:
    ledger = PrivacyLedger.empty(PRIVACY).calibrated(PRIVACY, 0.05, 20, 10)
    history: tuple[tuple[float, float, int], ...] = ()
    for r in range(1, rounds + 1):
        sigma, q = ledger.noise_multiplier or 0.0, ledger.sample_rate or 0.0
        history = ((sigma, q, 20 * r),)
        ledger = ledger.record_round(r, history)
    return ledger


def test_ledger_file_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _spent(3)
    ledger.save(path, "client-7")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"], "no temporary file left"
    loaded = PrivacyLedger.load(path, PRIVACY)
    assert loaded == ledger
    doc = read_ledger_file(path)
    assert doc["client_id"] == "client-7"
    assert doc["ledger"]["epsilon"] == pytest.approx(
        compute_epsilon(PRIVACY.accountant, ledger.history, PRIVACY.delta)
    )
    assert doc["ledger"]["rounds"] == [1, 2, 3]


def test_missing_file_is_an_empty_ledger_and_a_bad_one_is_an_error(tmp_path: Path) -> None:
    assert PrivacyLedger.load(tmp_path / "none.json", PRIVACY) == PrivacyLedger.empty(PRIVACY)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    bad.chmod(0o600)
    with pytest.raises(LedgerFileError, match="cannot read"):
        PrivacyLedger.load(bad, PRIVACY)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(LedgerFileError, match="not a sepals-ledger"):
        PrivacyLedger.load(bad, PRIVACY)


def _doc(path: Path, **changes: object) -> None:
    """Rewrite the ledger at ``path`` with ``changes`` applied to its 'ledger' object."""
    doc = json.loads(path.read_text())
    doc["ledger"].update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"epsilon": "3.1"}, "ledger.epsilon"),
        ({"epsilon": -1.0}, "ledger.epsilon"),
        ({"delta": 2.0}, "ledger.delta"),
        ({"delta": True}, "ledger.delta"),
        ({"target_epsilon": 0}, "ledger.target_epsilon"),
        ({"history": [[1.0, 0.05, -20]]}, "ledger.history[0]"),
        ({"history": [[1.0, 0.05]]}, "ledger.history[0]"),
        ({"history": [[1.0, 1.5, 20]]}, "ledger.history[0]"),
        ({"history": [[1.0, 0.05, 2.5]]}, "ledger.history[0]"),
        ({"history": {"a": 1}}, "ledger.history"),
        ({"rounds": [1, "2"]}, "ledger.rounds"),
        ({"rounds": [0]}, "ledger.rounds"),
        ({"sample_rate": 0.0}, "ledger.sample_rate"),
        ({"planned_rounds": -1}, "ledger.planned_rounds"),
        ({"noise_multiplier": [1]}, "ledger.noise_multiplier"),
        ({"accountant": 3}, "ledger.accountant"),
    ],
)
def test_a_malformed_ledger_is_a_ledger_file_error_naming_the_key(
    tmp_path: Path, changes: dict[str, object], key: str
) -> None:
    path = tmp_path / "l.json"
    _spent(2).save(path, "c")
    _doc(path, **changes)
    with pytest.raises(LedgerFileError, match=re.escape(key)) as info:
        PrivacyLedger.load(path, PRIVACY)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_nan_epsilon_is_refused_and_infinity_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    _spent(1).save(path, "c")
    _doc(path, epsilon=math.inf)  # json writes Infinity: an honest "no guarantee"
    assert read_ledger_file(path)["ledger"]["epsilon"] == math.inf
    _doc(path, epsilon=math.nan)
    with pytest.raises(LedgerFileError, match="NaN"):
        read_ledger_file(path)


def test_a_ledger_readable_by_others_is_refused_unless_overridden(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = _spent(1)
    ledger.save(path, "c")
    path.chmod(0o644)
    with pytest.raises(InsecureFileError, match=f"chmod 600 {re.escape(str(path))}"):
        read_ledger_file(path)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        PrivacyLedger.load(path, PRIVACY)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        ledger.save(path, "c")
    assert (path.stat().st_mode & 0o777) == 0o644, "a refused write leaves the file alone"
    assert read_ledger_file(path, allow_insecure_permissions=True)["client_id"] == "c"
    write_ledger_file(path, "c", asdict(ledger), allow_insecure_permissions=True)
    assert (path.stat().st_mode & 0o777) == 0o600, "the override rewrites it private"
    assert PrivacyLedger.load(path, PRIVACY) == ledger


def test_writing_a_malformed_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    bad = asdict(_spent(1)) | {"epsilon": math.nan}
    with pytest.raises(LedgerFileError, match=r"ledger\.epsilon"):
        write_ledger_file(path, "c", bad)
    assert not path.exists()


def test_ledger_under_another_delta_cannot_be_composed(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    _spent(1).save(path, "c")
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger.load(path, PrivacyConfig(target_epsilon=8.0, delta=1e-6))


def test_a_lowered_budget_applies_to_the_stored_spend(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = _spent(2)
    ledger.save(path, "c")
    tight = PrivacyConfig(target_epsilon=(ledger.epsilon or 0) * 1.01, delta=1e-5)
    from sepals.common.errors import BudgetExhaustedError

    with pytest.raises(BudgetExhaustedError):
        PrivacyLedger.load(path, tight).check_budget(20)


PLAN = FederationPlan.create(
    FederationConfig(),
    PlainCodec.name,
    PlainCodec().fingerprint_hex,
    10,
    generate_operator_key()[1],
)


def _runtime(path: Path | None) -> ClientRuntime:
    return ClientRuntime(
        client_id="c",
        model_factory=lambda: None,  # type: ignore[arg-type,return-value]
        train_data=[],  # type: ignore[arg-type]
        test_data=None,
        privacy=PRIVACY,
        encryption=EncryptionConfig(scheme="none"),
        plan=PLAN,
        ledger_path=path,
    )


def test_the_larger_spend_wins_between_file_and_context(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    runtime = _runtime(path)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store_ledger(context, runtime, _spent(3))
    assert LEDGER_STATE_KEY in context.state and path.exists()
    # A stale file (restored from a backup, say) never under-counts.
    _spent(1).save(path, "c")
    assert load_ledger(context, runtime).rounds == (1, 2, 3)
    # A fresh process (empty context) continues from the file.
    fresh = Context(run_id=2, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store_ledger(context, runtime, _spent(3))
    assert load_ledger(fresh, runtime).rounds == (1, 2, 3)


def test_sepals_ledger_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "l.json"
    ledger = _spent(2)
    ledger.save(path, "client-3")
    assert sepals_main(["ledger", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "client-3" in out and f"{ledger.epsilon:.4f} of 8" in out and "2: 1, 2" in out
    # Both relations, from the ledger's own accountant: no other accountant's figure.
    assert "zero-out neighbours (enforced)" in out
    assert f"replace-one      {ledger.replace_one_epsilon:.4f} (the same accountant" in out
    assert "docs/privacy.md#neighbouring-relations" in out
    assert (ledger.replace_one_epsilon or 0) > (ledger.epsilon or 0)
    assert sepals_main(["ledger", "show", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["ledger"]["rounds"] == [1, 2]
    assert sepals_main(["ledger", "show", str(tmp_path / "missing.json")]) == 2
