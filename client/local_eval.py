"""A deployed client's own view of each global model: its test data, its log, nothing sent.

A deployed federation has no central evaluator (the server cannot decrypt), so each
edge client shows in its own log how every global model it receives does on its own
test data. The global model of round ``r`` reaches the client in round ``r``'s evaluate
message (federated evaluation, whose result also goes to the server) or in round
``r + 1``'s train message. An evaluate reply's metrics are logged as they are; a train
message's global model is evaluated after its task is done (so the reply is not
delayed), unless the same model was already evaluated. Nothing of it leaves the client.
"""

from __future__ import annotations

from logging import DEBUG, INFO
from typing import Any

from flwr.app import Message

from sepals.client.app import client_for
from sepals.client.core import ClientRuntime
from sepals.common.log import log
from sepals.common.protocol import KEY_CONFIG, KEY_GLOBAL, KEY_METRICS
from sepals.common.records import read_global_model
from sepals.common.round_signature import global_model_digest

_TRAIN, _EVALUATE = "train", "evaluate"


def _metric_text(metric_name: str, metrics: Any) -> str | None:
    """``accuracy 91.67% (loss 0.3102)`` from an evaluation's metrics (``None``: none)."""
    key = "accuracy" if "accuracy" in metrics else "metric"
    if key not in metrics:
        return None
    value = float(metrics[key])
    shown = f"{100 * value:.2f}%" if key == "accuracy" else f"{value:.4f}"
    loss = f" (loss {float(metrics['loss']):.4f})" if "loss" in metrics else ""
    return f"{metric_name} {shown}{loss}"


class LocalEvaluation:
    """Logs how each global model does on this client's own test data.

    Args:
        runtime: The client's runtime (its test data, model and key).

    """

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self._pending: Message | None = None
        self._last: str | None = None

    def note(self, message: Message, reply: Message) -> None:
        """After the ClientApp answered ``message`` with ``reply``."""
        if self.runtime.test_data is None or reply.has_error():
            return
        kind = message.metadata.message_type
        if kind == _TRAIN:
            self._pending = message
        elif kind == _EVALUATE and KEY_METRICS in reply.content.metric_records:
            global_model = read_global_model(message.content.array_records.get(KEY_GLOBAL))
            config = message.content.config_records.get(KEY_CONFIG)
            server_round = None if config is None else config.get("server-round")
            metrics = reply.content.metric_records[KEY_METRICS]
            self._log(server_round, metrics, global_model, "sent for federated evaluation")

    def evaluate_pending(self) -> None:
        """Evaluate the global model of the last train message, once the task is done."""
        message, self._pending = self._pending, None
        if message is None:
            return
        global_model = read_global_model(message.content.array_records.get(KEY_GLOBAL))
        if global_model_digest(global_model) == self._last:
            return
        client = client_for(self.runtime)
        try:
            cfg = client.admit(
                message.metadata.message_type,
                message.content.config_records.get(KEY_CONFIG),
                global_model,
            )
            metrics = client.evaluate(cfg, global_model)
        except Exception as exc:  # the round's own reply already said what went wrong
            log(DEBUG, "local evaluation skipped: %s", type(exc).__name__)
            return
        self._log(cfg.server_round - 1, metrics, global_model, "local only")

    def _log(self, after_round: Any, metrics: Any, global_model: Any, where: str) -> None:
        text = _metric_text(self.runtime.metric_name, metrics)
        if text is None:
            return
        self._last = global_model_digest(global_model)
        count = metrics.get("num-examples", "?")
        model = f"the global model of round {after_round}" if after_round else "the initial model"
        log(
            INFO,
            "client %s: %s: %s on its own %s test examples (%s)",
            self.runtime.client_id,
            model,
            text,
            count,
            where,
        )
