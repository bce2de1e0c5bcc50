"""``flwr run .``'s key holder and central evaluation, as ``sepals-sim`` has them.

The ServerApp of ``flwr run .`` never holds the HE secret key. A helper process
(:class:`~sepals.simulations.helper_process.HelperProcess`) creates the keys, writes
the clients' secret context to the run directory (mode 0600) and returns only the
public context; it then decrypts each round's global model and scores it on the app's
held-out test split, as ``sepals-sim``'s evaluator does. The ServerApp logs that score
every round and on its closing line, so the run shows whether the model learned
without any client revealing anything.

Own apps given by ``--run-config "app='path/to/app.py:make_app'"`` are found here too:
a relative file is looked up in the app directory that ``flwr run`` packed and
installed, then in the working directory.
"""

from __future__ import annotations

import os
import sys
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore.utils import get_flwr_home

from sepals.common.config import EncryptionConfig
from sepals.common.log import log
from sepals.common.records import read_global_model
from sepals.simulations.config import AppSource
from sepals.simulations.evaluator import evaluator_data, evaluator_keys, evaluator_run
from sepals.simulations.helper_process import HelperProcess
from sepals.simulations.progress import format_metric

# Flower installs a run's app bundle under $FLWR_HOME/apps and puts it on sys.path.
_APPS_DIR = "apps"


def installed_app_dirs() -> list[Path]:
    """The installed Flower app directories on ``sys.path`` (where ``flwr run`` put them)."""
    apps = (get_flwr_home() / _APPS_DIR).resolve()
    found = []
    for entry in sys.path:
        try:
            path = Path(entry).resolve()
        except (OSError, ValueError):
            continue
        if path.is_relative_to(apps) and path != apps and path not in found:
            found.append(path)
    return found


def resolve_app_spec(spec: str) -> str:
    """``spec`` (``module:attr`` or ``file.py:attr``) with a relative file made absolute.

    A relative ``file.py`` is looked up in the installed app directory (``flwr run .``
    packs the app directory's ``.py`` files that git does not ignore), then in the
    working directory.

    Raises:
        ValueError: the spec is malformed, or the file is in neither place.

    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"run config 'app' must be 'module:attr' or 'path/to/file.py:attr', got {spec!r}"
        )
    if not target.endswith(".py") or Path(target).expanduser().is_absolute():
        return spec
    places = [*installed_app_dirs(), Path(os.getcwd())]
    for place in places:
        if (place / target).is_file():
            return f"{(place / target).resolve()}:{attr}"
    raise ValueError(
        f"run config 'app': no file {target} in {' or '.join(str(p) for p in places)}; "
        "give a path inside the app directory that flwr run packs, an absolute path or "
        "a module:attr"
    )


class CentralEvaluation:
    """The run's key holder and central evaluator, in a helper process.

    Args:
        encryption: The run's encryption (keys are made when it is on).
        secret_path: Where the clients' secret context goes (``None``: no encryption).
        source: The job's app.
        seed: The federation's seed (the shared round-0 model; the test split).
        clients: Nodes in the run.
        partition: The job's partition.
        rounds: The run's rounds (for the round lines).
        metric_name: The app's metric (``accuracy`` by default).

    """

    def __init__(
        self,
        encryption: EncryptionConfig,
        secret_path: str | None,
        source: AppSource,
        *,
        seed: int,
        clients: int,
        partition: str,
        rounds: int,
        metric_name: str,
    ) -> None:
        self.seed, self.rounds, self.metric_name = seed, rounds, metric_name
        self.values: dict[int, float | None] = {}
        self._errors: list[str] = []
        self._helper = HelperProcess("evaluator")
        try:
            self.public_context: bytes | None = self._helper.submit(
                evaluator_keys, encryption, secret_path
            ).result()
        except BaseException:
            self._helper.shutdown(wait=True, cancel_futures=True)
            raise
        # The test data loads while the run starts; the helper runs calls in order.
        self._ready = self._helper.submit(evaluator_data, source, seed, "cpu", clients, partition)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Decrypt and score round ``server_round``'s global model (the strategy's hook)."""
        self._ready.result()
        loss, value, error, _ = self._helper.submit(
            evaluator_run, read_global_model(arrays), self.seed
        ).result()
        if error is not None and error not in self._errors:
            self._errors.append(error)
            log(WARNING, "sepals flwr app: central evaluation failed: %s", error)
        self.values[server_round] = value
        log(
            INFO,
            "sepals flwr app: round %s/%s: %s on the held-out test split (central)",
            server_round,
            self.rounds,
            format_metric(self.metric_name, value),
        )
        scores = (("loss", loss), (self.metric_name, value))
        return MetricRecord({k: v for k, v in scores if v is not None})

    def final_text(self) -> str:
        """``acc 91.67% central (round 0: acc 10.28%)``: the last round's score and the first's."""
        if not self.values:
            return f"{format_metric(self.metric_name, None)} central"
        last = max(self.values)
        text = f"{format_metric(self.metric_name, self.values[last])} central"
        if 0 in self.values and last != 0:
            text += f" (round 0: {format_metric(self.metric_name, self.values[0])})"
        return text

    def close(self) -> None:
        """End the helper process (and with it the only copy of the key in memory)."""
        self._helper.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CentralEvaluation:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()
