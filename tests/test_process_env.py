"""Flower's usage telemetry stays off in sepals' processes, whatever imported Flower first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh interpreter whose environment lacks FLWR_TELEMETRY_ENABLED, the way a
# user's shell starts sepals-sim. The CLI module is imported before its main() runs, and
# it imports Flower, which reads its switch then: "1", telemetry on. No request leaves:
# urlopen is replaced by a recorder that refuses.
PROBE = """
import urllib.error, urllib.request
import sepals.simulations.cli
from flwr.supercore import telemetry
read_at_import = telemetry.FLWR_TELEMETRY_ENABLED
sent = []
def refuse(request, *args, **kwargs):
    sent.append(request.full_url)
    raise urllib.error.URLError("no network in tests")
urllib.request.urlopen = refuse
from sepals.simulations.process_env import apply_process_env
apply_process_env()
result = telemetry.create_event(list(telemetry.EventType)[0], None)
print(read_at_import, result, len(sent))
"""


def _probe(tmp_path: Path, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "HOME": str(tmp_path), "FLWR_HOME": str(tmp_path / ".flwr"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()


def test_telemetry_is_off_though_flower_read_its_switch_first(tmp_path: Path) -> None:
    read_at_import, result, sent = _probe(tmp_path)
    assert read_at_import == "1", "the probe must import Flower before the switch is set"
    assert result == "disabled" and sent == "0"


@pytest.mark.parametrize("choice", ["0", "1"])
def test_a_users_own_telemetry_setting_wins(tmp_path: Path, choice: str) -> None:
    read_at_import, _, sent = _probe(tmp_path, FLWR_TELEMETRY_ENABLED=choice)
    assert read_at_import == choice
    assert sent == ("1" if choice == "1" else "0")  # "1": Flower tried to send its event
