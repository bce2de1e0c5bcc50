r"""Fine-tune a (tiny) pretrained transformer with LoRA adapters, privately and encrypted.

A text classifier in the Hugging Face layout (``BertForSequenceClassification``) starts
from a local ``save_pretrained`` checkpoint; the federation trains only LoRA adapters on
the attention's ``query`` and ``value`` projections plus the classification head, with
DP-SGD, BFV-encrypted and pairwise-masked aggregation. The frozen backbone never leaves
a client, and each update carries only the trainable parameters (a few percent of them).

Everything here is synthetic and generated on the spot, so the example needs no download:

* **The task** ("sentiment" of a sentence of token ids): a sentence is ``[CLS]``
  followed by 7 to 15 filler tokens among which 1 or 3 *sentiment words* are placed;
  each is positive or negative, and the label is the majority (1: positive).
* **The checkpoint** (:func:`write_checkpoint`) is *really pretrained, but briefly and
  only on public synthetic data*: a seeded random BERT (2 layers, hidden size 32,
  vocabulary 128) is trained in full, without DP, for a few seconds on sentences that
  use only two thirds of the sentiment words (:data:`PUBLIC_POSITIVE`,
  :data:`PUBLIC_NEGATIVE`). It is no language model; it knows nothing but this toy task.
* **The clients' private data** (:func:`private_data`) use *all* the sentiment words,
  so a third of them are new to the checkpoint (their frozen embeddings are random):
  the pretrained model starts well above chance (it knows the public words: about 85%
  accuracy) and the private LoRA fine-tuning learns part of the rest (about 89% after 5
  rounds at epsilon 8 over 3 clients; the test loss falls from about 0.9 to 0.4).

Make the checkpoint and simulate from the command line::

    python examples/text_lora_app.py            # writes runs/text-lora/checkpoint, simulates
    sepals-sim --app examples/text_lora_app.py:make_app \
        --app-arg checkpoint=runs/text-lora/checkpoint --clients 3 --rounds 5 \
        --lr 0.3 --batch-size 64

or join a deployed federation as partition 0 of 3 (``sepals provision --pretrained
runs/text-lora/checkpoint`` puts the checkpoint's SHA-256 in the plan; every client needs
the identical directory)::

    sepals-client --bundle ~/fl/clients/client-1 --app examples/text_lora_app.py:make_app \
        --app-arg checkpoint=runs/text-lora/checkpoint --app-arg partition=0 \
        --app-arg partitions=3

Needs the optional dependencies: ``pip install 'sepals[transformers]'``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sepals import EdgeApp
from sepals.common.config import PrivacyConfig
from sepals.common.finetune import LoRA

# Never reach the hub (the checkpoint is a local directory), and no loading progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PAD, CLS = 0, 1
VOCAB = 128
FILLER = range(10, 100)
POSITIVE = range(100, 112)
NEGATIVE = range(112, 124)
PUBLIC_POSITIVE = range(100, 108)
PUBLIC_NEGATIVE = range(112, 120)
MAX_LEN = 16  # [CLS] + up to 15 tokens
PRIVATE_EXAMPLES = 6000
PRIVATE_SEED = 1
PUBLIC_SEED = 12345

TRAINABLE = LoRA(r=4, alpha=8, target_modules=("query", "value"), train_also=("*classifier*",))
DEFAULT_CHECKPOINT = Path("runs/text-lora/checkpoint")


def sentences(
    n: int,
    seed: int,
    positive: range = POSITIVE,
    negative: range = NEGATIVE,
) -> TensorDataset:
    """``n`` synthetic sentences ``(ids, label)``: ids ``[n, MAX_LEN]`` padded with ``PAD``.

    Each sentence holds 1 or 3 sentiment words drawn from ``positive`` and ``negative``
    at random places among filler tokens; its label is 1 when most of them are positive.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((n, MAX_LEN), PAD, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    pos, neg = torch.tensor(list(positive)), torch.tensor(list(negative))
    for i in range(n):
        length = int(torch.randint(7, MAX_LEN, (1,), generator=gen))
        words = 1 if torch.rand(1, generator=gen) < 0.5 else 3
        signs = torch.rand(words, generator=gen) < 0.5
        body = torch.randint(FILLER.start, FILLER.stop, (length,), generator=gen)
        places = torch.randperm(length, generator=gen)[:words]
        for place, is_pos in zip(places.tolist(), signs.tolist(), strict=True):
            pool = pos if is_pos else neg
            body[place] = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        ids[i, 0] = CLS
        ids[i, 1 : 1 + length] = body
        labels[i] = int(2 * int(signs.sum()) > words)
    return TensorDataset(ids, labels)


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier as sepals wants it: ``forward(ids) -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, 2]`` of a batch of padded token ids."""
        out = self.hf(input_ids=x, attention_mask=(x != PAD).long())
        logits: torch.Tensor = out.logits
        return logits


def make_model(path: str) -> nn.Module:
    """The federation's model: the checkpoint directory ``path``, loaded locally."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return TextClassifier(BertForSequenceClassification.from_pretrained(path))


def write_checkpoint(
    directory: str | Path, *, steps: int = 300, seed: int = 0, quiet: bool = False
) -> Path:
    """Write the tiny pretrained BERT of this example to ``directory``; return it.

    A seeded random ``BertForSequenceClassification`` (2 layers, hidden 32, 2 heads,
    vocabulary 128, no dropout) is trained in full, without DP, for ``steps`` Adam steps
    on public synthetic sentences that use only the public sentiment words,
    then saved with ``save_pretrained``. ``steps=0`` saves the seeded init untrained.
    The same arguments give the same files on the same torch build.
    """
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )  # two labels: the config's default
    hf = BertForSequenceClassification(config)
    if steps > 0:
        data = sentences(4096, PUBLIC_SEED, PUBLIC_POSITIVE, PUBLIC_NEGATIVE)
        model = TextClassifier(hf).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rows = torch.randint(len(data), (64,), generator=gen)
            x, y = data.tensors[0][rows], data.tensors[1][rows]
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if not quiet:
            print(f"pretrained {steps} steps on public data, last loss {loss.item():.3f}")
    out = Path(directory)
    hf.save_pretrained(out)
    return out


def private_data(partition: int, partitions: int) -> tuple[TensorDataset, TensorDataset]:
    """The device's share (an IID split) of the private sentences: 80% train, 20% test."""
    data = sentences(PRIVATE_EXAMPLES, PRIVATE_SEED)
    mine = torch.arange(PRIVATE_EXAMPLES)[partition::partitions]
    cut = int(0.8 * len(mine))
    x, y = data.tensors[0][mine], data.tensors[1][mine]
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def make_app(
    checkpoint: str = str(DEFAULT_CHECKPOINT),
    partition: str = "0",
    partitions: str = "1",
    epsilon: str = "8.0",
) -> EdgeApp:
    """The edge app: the pretrained checkpoint, LoRA + head trainable, private data, DP."""
    part, parts = int(partition), int(partitions)
    if not 0 <= part < parts:
        raise ValueError(f"partition must be in [0, {parts}), got {part}")
    if not Path(checkpoint).is_dir():
        raise ValueError(
            f"no checkpoint directory {checkpoint}: run `python examples/text_lora_app.py` "
            "once to write it"
        )
    train, test = private_data(part, parts)
    return EdgeApp(
        model_factory=make_model,
        train_data=train,
        test_data=test,
        privacy=PrivacyConfig(target_epsilon=float(epsilon), delta=1e-5, max_grad_norm=1.0),
        pretrained=checkpoint,
        trainable=TRAINABLE,
    )


def main() -> None:
    """Write the checkpoint if it is missing, then simulate 3 clients for 5 rounds."""
    from sepals.simulations import simulate

    checkpoint = DEFAULT_CHECKPOINT
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint)
    start = time.perf_counter()
    report, _model = simulate(
        "examples/text_lora_app.py:make_app",
        app_args={"checkpoint": str(checkpoint.resolve())},
        clients=3,
        rounds=5,
        encryption="bfv",
        learning_rate=0.3,
        batch_size=64,
        cpus=2,
        out="runs/text-lora/sim",
    )
    params = report["config"]["model"]["parameters"]
    final = report["final"]
    print(f"model: {report['config']['model']['trainable']}")
    print(f"trainable {params['trainable']:,} of {params['total']:,} parameters")
    print(f"codec: {final['codec']}, masking: {final.get('masking')}")
    upload = report["rounds"][-1]["upload_bytes_per_client"]
    print(f"upload per client per round: {upload / 1e3:.1f} kB (fp32 would be "
          f"{params['trainable_fp32_bytes'] / 1e3:.1f} kB)")
    print(f"accuracy {report['initial']['accuracy']:.3f} -> {final['accuracy']:.3f}, "
          f"loss {report['initial']['loss']:.3f} -> {final['loss']:.3f}")
    print(f"epsilon {final['epsilon']:.2f} (budget 8.0, delta 1e-5)")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
