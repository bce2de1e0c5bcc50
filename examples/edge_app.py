r"""An example edge app: a device that holds part of the digits data set.

It brings its own torch model and data and a privacy budget, and joins a federation
through the sepals client SDK. Two ways to run it (see the README, "Deploy"):

* in its own process, through the SDK::

      python examples/edge_app.py --bundle ~/fl/clients/client-1 --partition 0

* through the CLI, which imports :func:`make_app`::

      sepals-client --bundle ~/fl/clients/client-1 \
          --app examples/edge_app.py:make_app --app-arg partition=0

``python examples/edge_app.py --parameters`` prints the model's parameter count, which
the federation's plan must carry (``sepals provision --model-parameters``): a client
whose model has another size is refused before it joins.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from sepals import EdgeApp, FederationConnectionError, join_federation
from sepals.common.config import PrivacyConfig
from sepals.common.errors import SepalsError


def make_model() -> nn.Module:
    """The federation's model: every client must build the same architecture."""
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def local_data(
    partition: int, partitions: int, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """The device's share of the digits data (an IID split), 80% train / 20% test.

    On a real device this would read local files; the data never leaves the process.
    """
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    mine = np.array_split(order, partitions)[partition]
    cut = int(0.8 * len(mine))
    xs = torch.tensor(x[mine] / 16.0, dtype=torch.float32)
    ys = torch.tensor(y[mine], dtype=torch.long)
    return TensorDataset(xs[:cut], ys[:cut]), TensorDataset(xs[cut:], ys[cut:])


def make_app(partition: str = "0", partitions: str = "3", epsilon: str = "8.0") -> EdgeApp:
    """The edge app: model, local data and a privacy budget (epsilon at delta 1e-5)."""
    part, parts = int(partition), int(partitions)
    if not 0 <= part < parts:
        raise ValueError(f"partition must be in [0, {parts}), got {part}")
    train, test = local_data(part, parts)
    return EdgeApp(
        model_factory=make_model,
        train_data=train,
        test_data=test,
        privacy=PrivacyConfig(target_epsilon=float(epsilon), delta=1e-5, max_grad_norm=1.0),
    )


def main() -> None:
    """Join the federation of ``--bundle`` in this process."""
    parser = argparse.ArgumentParser(description="sepals example edge app (digits)")
    parser.add_argument("--bundle", help="client bundle directory from `sepals provision`")
    parser.add_argument("--partition", default="0")
    parser.add_argument("--partitions", default="3")
    parser.add_argument("--epsilon", default="8.0")
    parser.add_argument("--insecure", action="store_true", help="server runs with --insecure")
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the server"
    )
    parser.add_argument("--parameters", action="store_true", help="print the parameter count")
    args = parser.parse_args()
    if args.parameters:
        print(sum(p.numel() for p in make_model().parameters()))
        return
    if not args.bundle:
        parser.error("--bundle is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Flower prints its lines with its own handler; through the root handler too, each
    # would show twice.
    logging.getLogger("flwr").propagate = False
    app = make_app(args.partition, args.partitions, args.epsilon)
    try:
        served = join_federation(
            args.bundle, app, insecure=args.insecure, connect_timeout=args.connect_timeout
        )
    except KeyboardInterrupt:
        print("edge_app: interrupted", file=sys.stderr)
        sys.exit(130)
    except FederationConnectionError as exc:
        print(f"edge_app: {exc}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, SepalsError) as exc:
        print(f"edge_app: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"served {served} tasks")


if __name__ == "__main__":
    main()
