"""Beyond classification: a regression app on scikit-learn's bundled diabetes data.

The app brings its own loss (mean squared error) and metric (R^2, higher is better)
and trains with DP-SGD (epsilon 8) and BFV-encrypted aggregation. Features and target
are standardized with the statistics of the training split only.

Simulate it from the command line::

    sepals-sim --app examples/regression_app.py:make_app --clients 5 --rounds 10 \
        --lr 0.1 --batch-size 16

or from Python (``python examples/regression_app.py`` runs exactly this)::

    from sepals.simulations import simulate

    report, model = simulate(
        "examples/regression_app.py:make_app",
        clients=5,
        rounds=10,
        learning_rate=0.1,
        batch_size=16,
        out="runs/diabetes",
    )
    print(report["initial"]["metric"], "->", report["final"]["metric"])

``model`` is a ``torch.nn.Module`` holding the final global weights, which the
evaluator decrypted and saved to ``runs/diabetes/model.pt``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

from sepals import EdgeApp
from sepals.common.config import PrivacyConfig


def make_model() -> nn.Module:
    """A small MLP: 10 standardized features -> one standardized target."""
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))


def r2_score(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Coefficient of determination of ``outputs`` for ``targets`` (1 is perfect)."""
    residual = torch.sum((targets - outputs) ** 2)
    total = torch.sum((targets - targets.mean()) ** 2)
    return float(1.0 - residual / total)


def diabetes(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train (80%) and test (20%) splits, standardized with the training statistics."""
    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    mx, sx = x[train].mean(axis=0), x[train].std(axis=0)
    my, sy = y[train].mean(), y[train].std()

    def split(rows: np.ndarray) -> TensorDataset:
        xs = torch.tensor((x[rows] - mx) / sx, dtype=torch.float32)
        ys = torch.tensor((y[rows] - my) / sy, dtype=torch.float32).reshape(-1, 1)
        return TensorDataset(xs, ys)

    return split(train), split(test)


def make_app(epsilon: str = "8.0", seed: str = "0") -> EdgeApp:
    """The app: model, data, MSE loss, R^2 metric and an (epsilon, 1e-5) budget."""
    train, test = diabetes(int(seed))
    eps = float(epsilon)
    return EdgeApp(
        model_factory=make_model,
        train_data=train,
        test_data=test,
        privacy=PrivacyConfig(target_epsilon=eps if eps > 0 else None, max_grad_norm=1.0),
        loss_fn=nn.functional.mse_loss,
        metric=r2_score,
        metric_name="r2",
        higher_is_better=True,
    )


if __name__ == "__main__":
    from sepals.simulations import simulate

    report, model = simulate(
        "examples/regression_app.py:make_app",
        clients=5,
        rounds=10,
        learning_rate=0.1,
        batch_size=16,
        out="runs/diabetes",
    )
    print(report["initial"]["metric"], "->", report["final"]["metric"])
