"""Explain a model's prediction on the device: nothing is sent, no budget is spent.

An edge app (here the digits app of ``examples/edge_app.py``) explains why the model
predicts what it does for one of its own inputs, in its own process, with Captum
(Integrated Gradients by default)::

    python examples/explain_app.py                       # a fresh model, as a demo
    sepals-sim --app examples/edge_app.py:make_app --rounds 5 --out runs/edge
    python examples/explain_app.py --weights runs/edge/model.pt --out digit.png

``--weights`` takes a ``state_dict`` of the app's model: the global model a simulation
of this app saved (``model.pt``), or the global model a deployed client decrypted. The
heat map shows, pixel by pixel, what raised (red) or lowered (blue) the explained
class's score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_app import make_app  # the example beside this file


def main(argv: list[str] | None = None) -> int:
    """Explain the model's prediction for one local input and draw it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a state_dict file (model.pt)")
    parser.add_argument("--index", type=int, default=0, help="which local test example")
    parser.add_argument("--method", default="integrated_gradients")
    parser.add_argument("--out", default="explanation-local.png")
    args = parser.parse_args(argv)
    app = make_app(partition="0", partitions="3")
    x, y = app.test_dataset[args.index]  # type: ignore[index]
    explanation = app.explain(x.unsqueeze(0), method=args.method, weights=args.weights)
    path = explanation.plot(args.out, image_shape=(8, 8))
    print(
        f"label {int(y)}, predicted {explanation.predictions[0]}: "
        f"{explanation.method} attributions of class {explanation.targets[0]} in {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
