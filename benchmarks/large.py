"""Big models, honestly measured: one federated round of 10M and 100M-parameter transformers.

For each model size (``--sizes``, default 10M and 100M total parameters) this builds a
BERT sequence classifier from a :class:`transformers.BertConfig` (hidden size and
layers by size, the vocabulary solved so the total hits the size), saves it with
``save_pretrained`` to a temporary folder and loads it back with ``from_pretrained``
(offline: nothing is downloaded), and wraps it with ``peft`` LoRA on every attention
projection (query, key, value, attention output), the rank chosen so that the LoRA
matrices plus the new 2-class head are about 1% of the total. Only that trainable
part is trained, encrypted and sent (:func:`sepals.common.models.get_flat`).

One round for ``--clients`` clients (default 10), played one after the other in this
process, all through sepals' own code:

* **client** (timed per client, the mean is reported): DP-SGD local training of the
  trainable part with Opacus (:func:`sepals.client.training.train_round`, epsilon 8,
  delta 1e-5, the ledger calibrated once per federation as
  :class:`sepals.client.core.SepalsClient` does, outside the timed section) on
  synthetic token data (:data:`EXAMPLES` examples of :data:`SEQ_LEN` tokens per
  client, expected batch :data:`BATCH`, one epoch); the model is rebuilt for the round
  (a deep copy of the loaded model: ``train_round`` calls its factory every round, as
  a sepals client does); then the weighted update ``n * w`` is encoded. With
  encryption on, this includes the client's four pairwise-masking stages
  (:mod:`sepals.client.masking`: keys, sealed Shamir shares, opening them and expanding
  its slot mask, revealing shares for the unmask) and the BFV encode/mask/encrypt
  (:meth:`sepals.common.bfv.BfvCodec.encode_update` with ``slot_mask``).
* **server** (per round): deserialize + validate every upload (``codec.validate``),
  the masking bookkeeping (:class:`sepals.server.serverapp.masking.MaskRound`: admitting keys,
  shares and reveals, ``slot_offset``: Shamir reconstruction + PRG expansion), and the
  ciphertext additions with the offset (``aggregate_loaded``).
* **decrypt**: one client's decryption and decoding of the aggregate.

The same round with encryption OFF runs in the same invocation: plaintext fp32
(:class:`sepals.common.codec.PlainCodec`) through the same validate/aggregate path, no
masking (masking needs BFV). To keep DP-SGD's run-to-run noise out of the ratio, each
client trains ONCE and both paths encode that same update; the training seconds count
in both rounds. ``round = mean client + server + decrypt`` (clients train in parallel
in a real federation). The encryption config is sepals' default BFV (N=8192, primes
[60, 40], t of 44 bits, ``update_bound`` 4096) with ``max_clients`` the round's size.

Targets (printed ``met`` / ``MISSED``, never asserted):

1. upload bytes per client <= :data:`TARGET_UPLOAD_RATIO` x the fp32 bytes of the
   trainable part (4 per value), where the trainable part fills at least one
   ciphertext (``2N`` values); smaller parts are reported as ``n/a``.
2. the LoRA round of the 100M model with encryption on <= :data:`TARGET_ROUND_RATIO` x
   the round with encryption off.

Exactness is checked too: the decrypted, unmasked aggregate must equal the float64 sum
of the clients' weighted updates within one quantization step per client.

``--full`` also fine-tunes ALL parameters of the 100M model under BFV. DP-SGD's
per-sample gradients take ``4 * P`` bytes per example in the batch; the benchmark
estimates the memory first and skips training (saying why, in bytes) when it would not
fit in :data:`MEMORY_FRACTION` of the available memory, and then still measures
encode/mask/encrypt, aggregate and decrypt of the 100M values for every client. The
full round streams: the server validates each upload on arrival and folds it into a
running sum (``aggregate_loaded`` of the running sum and the new upload, reloaded with
``validate``), so it never holds more than two clients' ciphertexts.

Peak RSS is the process's resident set, sampled every 10 ms from ``/proc/self/statm``
during each phase (it includes what the benchmark itself holds: the loaded model, the
other clients' payloads); ``ru_maxrss`` (the whole run's peak) is printed as well.

Usage: ``python -m benchmarks.large [--sizes 10M,100M] [--clients 10]
[--device cpu|cuda|auto] [--full] [--out DIR]``

The machine may be shared: timings are single measurements and indicative.
Importing this module starts nothing: torch, transformers and sepals load when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import TensorDataset

    from sepals.common.codec import UpdateCodec

TARGET_UPLOAD_RATIO = 1.1
TARGET_ROUND_RATIO = 1.3
#: The size the round-ratio target is about.
TARGET_ROUND_SIZE = 100_000_000
LORA_FRACTION = 0.01
LORA_TARGETS = ("query", "key", "value", "attention.output.dense")
EXAMPLES = 32
BATCH = 8
SEQ_LEN = 16
FULL_EXAMPLES = 16
FULL_BATCH = 4
NUM_LABELS = 2
EPSILON = 8.0
PLANNED_ROUNDS = 3
SERVER_ROUND = 1
MAX_POSITIONS = 64
#: Skip full DP-SGD when its estimated memory exceeds this share of MemAvailable.
MEMORY_FRACTION = 0.7
MODE_PLAIN = "plain-fp32"
MODE_BFV = "bfv+masking"
FloatArray = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------- sizes
def parse_size(text: str) -> int:
    """``"10M"`` -> 10,000,000; ``"100k"`` -> 100,000; a plain integer as is.

    Raises:
        ValueError: not a positive size.

    """
    s = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(s[-1:], 1)
    number = s[:-1] if scale != 1 else s
    try:
        value = round(float(number) * scale)
    except ValueError as exc:
        raise ValueError(f"not a size: {text!r} (examples: 100k, 10M, 100M)") from exc
    if value < 1000:
        raise ValueError(f"size must be at least 1k parameters, got {text!r}")
    return value


def size_label(parameters: int) -> str:
    """``10_000_000`` -> ``"10M"`` (for labels)."""
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if parameters >= scale:
            return f"{parameters / scale:g}{unit}"
    return str(parameters)


@dataclass(frozen=True)
class Architecture:
    """A BERT classifier's shape."""

    hidden: int
    layers: int
    heads: int
    vocab: int

    def config(self) -> Any:
        """The :class:`transformers.BertConfig` of this shape (2 labels)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=4 * self.hidden,
            max_position_embeddings=MAX_POSITIONS,
            num_labels=NUM_LABELS,  # type: ignore[call-arg]
        )


def shape_for(parameters: int) -> tuple[int, int]:
    """Hidden size and layers by total size (the vocabulary makes up the rest)."""
    if parameters <= 2_000_000:
        return 32, 2
    if parameters <= 30_000_000:
        return 256, 6
    return 768, 12


def count_parameters(arch: Architecture) -> int:
    """Total parameters of ``arch``'s classifier, counted on the meta device (no memory)."""
    import torch
    from transformers import BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(arch.config())
    return sum(p.numel() for p in model.parameters())


def architecture(parameters: int) -> Architecture:
    """The architecture whose total is closest to ``parameters`` (vocabulary solved).

    Raises:
        ValueError: the size is too small for the smallest shape.

    """
    hidden, layers = shape_for(parameters)
    heads = max(1, hidden // 64)
    probe = Architecture(hidden, layers, heads, 1000)
    base = count_parameters(probe) - 1000 * hidden  # word embeddings are vocab * hidden
    vocab = round((parameters - base) / hidden)
    if vocab < 100:
        raise ValueError(f"{parameters:,} parameters is too small for a BERT of width {hidden}")
    return Architecture(hidden, layers, heads, vocab)


def lora_rank(arch: Architecture, total: int, fraction: float = LORA_FRACTION) -> int:
    """LoRA rank putting about ``fraction`` of ``total`` in the adapters.

    Each adapted ``hidden x hidden`` projection adds ``2 * hidden * r`` parameters.
    """
    per_rank = arch.layers * len(LORA_TARGETS) * 2 * arch.hidden
    return max(1, round(fraction * total / per_rank))


# ----------------------------------------------------------------------------- models
def logits_module(inner: nn.Module) -> nn.Module:
    """``inner`` (a Hugging Face classifier) wrapped so that ``forward(x)`` gives logits."""
    from torch import nn

    class LogitsOnly(nn.Module):
        """Token ids in, sequence-classification logits out."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            """Return the logits of ``x``, with per-example position and token-type ids.

            BERT's default ids are one ``(1, seq)`` row broadcast over the batch; with
            trainable position/token-type embeddings Opacus would see a batch of 1 there.
            """
            import torch

            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            types = torch.zeros_like(x)
            out = self.model(input_ids=x, position_ids=positions, token_type_ids=types)
            return out.logits

    return LogitsOnly(inner)


def quiet_transformers() -> None:
    """No progress bars or deprecation notices from ``transformers`` in the output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def save_checkpoint(arch: Architecture, folder: Path, seed: int) -> Path:
    """Build ``arch`` under ``seed`` and ``save_pretrained`` it to ``folder``."""
    import torch
    from transformers import BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(arch.config())
    quiet_transformers()
    model.save_pretrained(folder)
    del model
    return folder


def load_model(folder: Path, lora_r: int | None) -> nn.Module:
    """``from_pretrained(folder)`` (offline), LoRA-wrapped unless ``lora_r`` is ``None``.

    With LoRA only the adapters and the classification head are trainable; without,
    every parameter is. The model is put in training mode (``from_pretrained`` gives
    eval mode, in which Opacus sees no activations).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import BertForSequenceClassification

    quiet_transformers()
    model: Any = BertForSequenceClassification.from_pretrained(folder, local_files_only=True)
    if lora_r is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if ".classifier." in f".{name}":
                p.requires_grad_(True)
    wrapped = logits_module(model)
    wrapped.train()
    return wrapped


@dataclass
class ModelBench:
    """A loaded model and what a round needs of it.

    Attributes:
        label: ``"10M"``, ``"100M"`` or ``"100M full"``.
        arch: Its shape.
        total: All parameters.
        trainable: Trainable parameters (the vector that is sent).
        lora_r: LoRA rank (``None``: every parameter trainable).
        template: The loaded model; the factory deep-copies it.
        initial: Flat trainable weights of the global model.

    """

    label: str
    arch: Architecture
    total: int
    trainable: int
    lora_r: int | None
    template: nn.Module = field(repr=False)
    initial: FloatArray = field(repr=False)

    def factory(self) -> nn.Module:
        """A fresh copy of the global model (what ``train_round`` rebuilds each round)."""
        return copy.deepcopy(self.template)


def make_bench(parameters: int, *, full: bool, seed: int, folder: Path) -> ModelBench:
    """Build, save, reload (and LoRA-wrap unless ``full``) the model of ``parameters``."""
    from sepals.common.models import get_flat, num_parameters

    arch = architecture(parameters)
    ckpt = save_checkpoint(arch, folder / f"bert-{parameters}", seed)
    total = count_parameters(arch)
    rank = None if full else lora_rank(arch, total)
    model = load_model(ckpt, rank)
    label = size_label(parameters) + (" full" if full else "")
    return ModelBench(
        label=label,
        arch=arch,
        total=sum(p.numel() for p in model.parameters()),
        trainable=num_parameters(model),
        lora_r=rank,
        template=model,
        initial=get_flat(model),
    )


def synthetic_tokens(vocab: int, examples: int, seq_len: int, seed: int) -> TensorDataset:
    """``examples`` random token sequences; the label is the first token's parity."""
    import torch
    from torch.utils.data import TensorDataset

    gen = torch.Generator()
    gen.manual_seed(seed)
    x = torch.randint(0, vocab, (examples, seq_len), generator=gen)
    y = (x[:, 0] % NUM_LABELS).long()
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """The process's current resident set size in bytes (``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """The process's peak RSS so far (``ru_maxrss``, kB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (``None`` where there is none)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class PeakRss:
    """Samples RSS every ``interval`` seconds while active; keeps the peak of all uses."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample during the ``with`` block (a daemon thread; the GIL is released by I/O)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                stop.wait(self.interval)

        self.peak = max(self.peak, rss_bytes())
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, rss_bytes())


class Clock:
    """Accumulated seconds and peak RSS per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, PeakRss] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time (and sample RSS during) the block under ``name``; repeats add up."""
        sampler = self.rss.setdefault(name, PeakRss())
        with sampler.sampling():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def get(self, name: str) -> float:
        """Seconds of ``name`` (0 when it never ran)."""
        return self.seconds.get(name, 0.0)

    def peak(self, *names: str) -> int:
        """Peak RSS over the phases ``names`` (0 when none ran)."""
        return max((self.rss[n].peak for n in names if n in self.rss), default=0)


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainSetup:
    """Local training of one round (the same for every client)."""

    examples: int = EXAMPLES
    batch: int = BATCH
    seq_len: int = SEQ_LEN
    device: str = "cpu"
    epsilon: float = EPSILON


def dp_memory_estimate(trainable: int, total: int, setup: TrainSetup) -> int:
    """Bytes DP-SGD (Opacus ``hooks``) needs, roughly, for one step of a large batch.

    Per-sample gradients (fp32) of every trainable parameter for a Poisson batch three
    standard deviations above its mean, twice (the gradient samples and the clipped
    copies Opacus makes), plus the model copy, its gradient and the momentum buffer
    (``4 * total + 8 * trainable``) and the loaded template (``4 * total``).
    """
    q = min(1.0, setup.batch / setup.examples)
    mean = q * setup.examples
    big_batch = min(setup.examples, math.ceil(mean + 3 * math.sqrt(mean * (1 - q))))
    return 2 * 4 * trainable * big_batch + 8 * total + 8 * trainable


@dataclass
class TrainedClient:
    """One client's round of local training."""

    weighted: FloatArray
    num_examples: int
    seconds: float
    steps: int


def client_trainer(
    bench: ModelBench, setup: TrainSetup, seed: int
) -> Callable[[int], TrainedClient]:
    """``train(i)``: client ``i``'s DP-SGD round on its own synthetic data.

    The ledger is calibrated here, once (a client calibrates once per federation).
    """
    from sepals.client.privacy import PrivacyLedger, planned_participation
    from sepals.client.training import TrainSettings, dp_schedule, train_round
    from sepals.common.config import PrivacyConfig

    privacy = PrivacyConfig(target_epsilon=setup.epsilon)
    settings = TrainSettings(
        epochs=1,
        batch_size=setup.batch,
        learning_rate=0.05,
        momentum=0.9,
    )
    rate, steps = dp_schedule(setup.examples, settings)
    ledger = PrivacyLedger.empty(privacy).calibrated(
        privacy, rate, steps, planned_participation(PLANNED_ROUNDS, 1.0)
    )

    def train(i: int) -> TrainedClient:
        data = synthetic_tokens(bench.arch.vocab, setup.examples, setup.seq_len, seed + 1000 + i)
        ledger.check_budget(steps)
        t0 = time.perf_counter()
        out = train_round(
            bench.factory,
            bench.initial,
            data,
            settings,
            privacy,
            ledger,
            SERVER_ROUND,
            device=setup.device,
        )
        seconds = time.perf_counter() - t0
        return TrainedClient(
            out.weights * float(out.num_examples), out.num_examples, seconds, out.steps
        )

    return train


def untrained_clients(
    bench: ModelBench, setup: TrainSetup, seed: int
) -> Callable[[int], TrainedClient]:
    """``train(i)`` when DP-SGD is skipped: the global weights plus a small perturbation.

    Every value is still encoded, masked, encrypted, added and decrypted; no training
    time is counted.
    """

    def train(i: int) -> TrainedClient:
        rng = np.random.default_rng(seed + i)
        w = bench.initial + rng.normal(0.0, 1e-3, bench.initial.size)
        return TrainedClient(w * float(setup.examples), setup.examples, 0.0, 0)

    return train


# ----------------------------------------------------------------------------- the round
@dataclass
class ModeFigures:
    """One mode's round (encryption on or off), per client unless said otherwise.

    Attributes:
        mode: :data:`MODE_BFV` or :data:`MODE_PLAIN`.
        upload_bytes: Mean length of a client's real payload, in bytes.
        fp32_bytes: 4 bytes per trainable value.
        client_seconds: Mean client seconds: training + this mode's codec work.
        client_train_seconds: Mean DP-SGD seconds (shared by both modes).
        client_codec_seconds: Mean encode (+ masking stages, + encrypt) seconds.
        client_mask_seconds: Mean of the masking stages alone (0 in plain mode).
        server_seconds: Server seconds of the round (all clients).
        server_validate_seconds: Of which validating the uploads.
        server_unmask_seconds: Of which the masking bookkeeping and ``slot_offset``.
        decrypt_seconds: Decrypting and decoding the aggregate, once.
        round_seconds: ``client_seconds + server_seconds + decrypt_seconds``.
        peak_rss_client: Peak process RSS (bytes) during training and this mode's encoding.
        peak_rss_server: Peak process RSS during this mode's server work.
        peak_rss_decrypt: Peak process RSS during the decryption.
        max_abs_error: Largest |decoded sum - float64 sum of the weighted updates|.
        error_bound: The bound that error must stay within.
        download_bytes: Bytes of the aggregate payload.

    """

    mode: str
    upload_bytes: float
    fp32_bytes: int
    client_seconds: float
    client_train_seconds: float
    client_codec_seconds: float
    client_mask_seconds: float
    server_seconds: float
    server_validate_seconds: float
    server_unmask_seconds: float
    decrypt_seconds: float
    round_seconds: float
    peak_rss_client: int
    peak_rss_server: int
    peak_rss_decrypt: int
    max_abs_error: float
    error_bound: float
    download_bytes: int

    @property
    def upload_ratio(self) -> float:
        """Upload bytes over the fp32 bytes of the trainable part."""
        return self.upload_bytes / self.fp32_bytes

    @property
    def exact(self) -> bool:
        """Whether the decoded sum is within the bound."""
        return self.max_abs_error <= self.error_bound


@dataclass
class SizeResult:
    """One model's round in both modes."""

    label: str
    total: int
    trainable: int
    lora_r: int | None
    hidden: int
    layers: int
    vocab: int
    clients: int
    examples: int
    batch: int
    seq_len: int
    device: str
    steps: int
    streamed: bool
    values_per_ciphertext: int
    training_note: str | None
    modes: dict[str, ModeFigures]

    @property
    def fills_ciphertext(self) -> bool:
        """Whether the trainable part fills at least one ciphertext."""
        return self.trainable >= self.values_per_ciphertext

    @property
    def round_ratio(self) -> float:
        """Round seconds encrypted over plain."""
        return self.modes[MODE_BFV].round_seconds / self.modes[MODE_PLAIN].round_seconds


@dataclass
class Codecs:
    """Both modes' codecs and the masking parameters of a round of ``clients``."""

    client: dict[str, UpdateCodec]
    server: dict[str, UpdateCodec]
    values_per_ciphertext: int
    quant_step: float


def make_codecs(clients: int) -> Codecs:
    """Plain and BFV codecs as sepals builds them (keys generated here, untimed)."""
    from sepals.common.config import EncryptionConfig
    from sepals.common.scheme import (
        generate_secret_context,
        make_client_codec,
        make_server_codec,
        public_context_bytes,
    )

    bfv = EncryptionConfig(scheme="bfv", max_clients=clients)
    plain = EncryptionConfig(scheme="none")
    secret = generate_secret_context(bfv)
    return Codecs(
        client={
            MODE_PLAIN: make_client_codec(plain, None),
            MODE_BFV: make_client_codec(bfv, secret),
        },
        server={
            MODE_PLAIN: make_server_codec(plain, None),
            MODE_BFV: make_server_codec(bfv, public_context_bytes(secret)),
        },
        values_per_ciphertext=bfv.values_per_ciphertext,
        quant_step=bfv.quant_step,
    )


class Aggregator:
    """The server's sum of one mode: all uploads held, or streamed into a running sum."""

    def __init__(self, codec: UpdateCodec, length: int, stream: bool) -> None:
        self.codec = codec
        self.length = length
        self.stream = stream
        self.loaded: list[list[Any]] = []

    def admit(self, payload: bytes) -> None:
        """Validate ``payload``; when streaming, fold it into the running sum at once."""
        loaded = self.codec.validate(payload, self.length)
        if not self.stream or not self.loaded:
            self.loaded.append(loaded)
            return
        partial = self.codec.aggregate_loaded([self.loaded[0], loaded], self.length)
        del loaded
        self.loaded = [self.codec.validate(partial, self.length)]

    def finish(self, slot_offset: npt.NDArray[np.uint64] | None = None) -> bytes:
        """The aggregate payload (with the masks' offset added, when given)."""
        return self.codec.aggregate_loaded(self.loaded, self.length, slot_offset)


def run_round(
    bench: ModelBench,
    clients: int,
    train: Callable[[int], TrainedClient],
    *,
    codecs: Codecs | None = None,
    stream: bool = False,
    seed: int = 0,
    setup: TrainSetup | None = None,
    training_note: str | None = None,
    progress: Callable[[str], None] | None = None,
    capture: dict[str, bytes] | None = None,
) -> SizeResult:
    """One round of ``clients`` with encryption on (BFV + masking) and off (fp32).

    Each client trains once (``train(i)``); both modes encode that update. See the
    module docstring for what each timed section holds. ``capture`` (tests) receives
    each mode's aggregate payload.

    Raises:
        ValueError: fewer than 3 clients (masking needs a graph with a threshold).

    """
    if clients < 3:
        raise ValueError(f"clients must be >= 3, got {clients}")
    from benchmarks.masking import make_plan, node_ids
    from sepals.client import masking as cm
    from sepals.common.bfv import BfvCodec
    from sepals.common.masking import resolve_mask_params
    from sepals.server.serverapp.masking import MaskRound

    say = progress if progress is not None else (lambda _text: None)
    setup = setup if setup is not None else TrainSetup()
    codecs = codecs if codecs is not None else make_codecs(clients)
    bfv = codecs.client[MODE_BFV]
    if not isinstance(bfv, BfvCodec):
        raise TypeError("the encrypted mode needs sepals' BFV codec")
    length = bench.trainable
    slots = bfv.slot_count(length)
    t = bfv.plain_modulus
    params = resolve_mask_params(clients)
    plan = make_plan(bfv, length, params)
    nodes = node_ids(clients)
    clock = Clock()
    clock_of = {MODE_PLAIN: Clock(), MODE_BFV: Clock()}
    enc, pln = clock_of[MODE_BFV], clock_of[MODE_PLAIN]

    # Masking stages 1-2 (before training): client keys and sealed shares, server admits.
    server_mask = MaskRound(params, plan.federation_id, SERVER_ROUND)
    states: dict[int, Any] = {}
    for node in nodes:
        with enc.phase("client.mask"):
            state, reply = cm.start_round(SERVER_ROUND, node)
        states[node] = state
        with enc.phase("server.unmask"):
            server_mask.admit_keys(node, reply)
    members = server_mask.members_record()
    for node in nodes:
        with enc.phase("client.mask"):
            state, reply = cm.share_secrets(plan, states[node], SERVER_ROUND, members)
        states[node] = state
        with enc.phase("server.unmask"):
            server_mask.admit_shares(node, reply)
    with enc.phase("server.unmask"):
        server_mask.close_sharing()

    aggregators = {
        mode: Aggregator(codecs.server[mode], length, stream) for mode in (MODE_PLAIN, MODE_BFV)
    }
    uploads: dict[str, list[int]] = {MODE_PLAIN: [], MODE_BFV: []}
    exact = np.zeros(length, dtype=np.float64)
    total_examples = 0
    steps = 0
    for i, node in enumerate(nodes):
        with clock.phase("client.train"):
            trained = train(i)
        train_peak = clock.rss["client.train"].peak
        exact += trained.weighted
        total_examples += trained.num_examples
        steps = trained.steps
        # ---- encryption off: fp32 through the same validate/aggregate path
        with pln.phase("client.codec"):
            payload, _ = codecs.client[MODE_PLAIN].encode_update(trained.weighted)
        uploads[MODE_PLAIN].append(len(payload))
        with pln.phase("server.validate"):
            aggregators[MODE_PLAIN].admit(payload)
        del payload
        # ---- encryption on: open shares + expand the slot mask, encode/mask/encrypt
        rounding = np.random.default_rng([seed, i])
        with enc.phase("client.mask"), enc.phase("client.codec"):
            state, mask = cm.open_and_mask(
                plan, states[node], SERVER_ROUND, server_mask.train_record(node), slots, t
            )
        states[node] = state
        with enc.phase("client.codec"):
            payload, _ = bfv.encode_update(trained.weighted, rounding, slot_mask=mask)
        del mask
        uploads[MODE_BFV].append(len(payload))
        with enc.phase("server.validate"):
            aggregators[MODE_BFV].admit(payload)
        del payload, trained
        # Opacus's hooks leave reference cycles: without a collection every client's
        # model copy, gradients and momentum stay alive (--full was OOM-killed so).
        gc.collect()
        for c in clock_of.values():  # training's peak counts in both modes' client phase
            c.rss.setdefault("client.train", PeakRss()).peak = train_peak
        say(f"{bench.label}: client {i + 1}/{clients} done")

    # Stage 4 (after the uploads): reveals; the server rebuilds the offset and adds.
    unmask = server_mask.unmask_record(nodes)
    for node in nodes:
        with enc.phase("client.mask"), enc.phase("client.codec"):
            state, reply = cm.reveal_shares(plan, states[node], SERVER_ROUND, unmask)
        states[node] = state
        with enc.phase("server.unmask"):
            server_mask.admit_reveal(node, reply)
    with enc.phase("server.unmask"):
        offset = server_mask.slot_offset(slots, t)
    with enc.phase("server.aggregate"):
        aggregate_bfv = aggregators[MODE_BFV].finish(offset)
    del offset
    with pln.phase("server.aggregate"):
        aggregate_plain = aggregators[MODE_PLAIN].finish()
    aggregators.clear()
    if capture is not None:
        capture.update({MODE_PLAIN: aggregate_plain, MODE_BFV: aggregate_bfv})
    say(f"{bench.label}: aggregated; decrypting")

    modes: dict[str, ModeFigures] = {}
    for mode, aggregate in ((MODE_PLAIN, aggregate_plain), (MODE_BFV, aggregate_bfv)):
        c = clock_of[mode]
        with c.phase("decrypt"):
            decoded = codecs.client[mode].decode(aggregate)
        error = float(np.max(np.abs(decoded - exact))) if length else 0.0
        del decoded
        if mode == MODE_BFV:
            bound = clients * codecs.quant_step * (1 + 1e-9)
        else:  # fp32 rounding of each upload, then fp32 additions
            bound = float(np.max(np.abs(exact))) * clients * 2.0**-22 + 1e-30
        train_s = clock.get("client.train") / clients
        codec_s = c.get("client.codec") / clients
        server_s = c.get("server.validate") + c.get("server.unmask") + c.get("server.aggregate")
        modes[mode] = ModeFigures(
            mode=mode,
            upload_bytes=float(np.mean(uploads[mode])),
            fp32_bytes=4 * length,
            client_seconds=train_s + codec_s,
            client_train_seconds=train_s,
            client_codec_seconds=codec_s,
            client_mask_seconds=c.get("client.mask") / clients,
            server_seconds=server_s,
            server_validate_seconds=c.get("server.validate"),
            server_unmask_seconds=c.get("server.unmask"),
            decrypt_seconds=c.get("decrypt"),
            round_seconds=train_s + codec_s + server_s + c.get("decrypt"),
            peak_rss_client=c.peak("client.train", "client.codec", "client.mask"),
            peak_rss_server=c.peak("server.validate", "server.unmask", "server.aggregate"),
            peak_rss_decrypt=c.peak("decrypt"),
            max_abs_error=error,
            error_bound=bound,
            download_bytes=len(aggregate),
        )
    return SizeResult(
        label=bench.label,
        total=bench.total,
        trainable=bench.trainable,
        lora_r=bench.lora_r,
        hidden=bench.arch.hidden,
        layers=bench.arch.layers,
        vocab=bench.arch.vocab,
        clients=clients,
        examples=setup.examples,
        batch=setup.batch,
        seq_len=setup.seq_len,
        device=setup.device,
        steps=steps,
        streamed=stream,
        values_per_ciphertext=codecs.values_per_ciphertext,
        training_note=training_note,
        modes=modes,
    )


def run_size(
    parameters: int,
    clients: int,
    *,
    full: bool = False,
    setup: TrainSetup | None = None,
    seed: int = 0,
    folder: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SizeResult:
    """Build the model of ``parameters`` (LoRA, or every parameter with ``full``), run a round.

    With ``full`` the round streams, and DP-SGD is skipped when
    :func:`dp_memory_estimate` exceeds :data:`MEMORY_FRACTION` of the available memory
    or training fails for lack of memory (the result's ``training_note`` says which).
    """
    say = progress if progress is not None else (lambda _text: None)
    setup = setup if setup is not None else TrainSetup()
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sepals-large-")))
        t0 = time.perf_counter()
        bench = make_bench(parameters, full=full, seed=seed, folder=folder)
        say(
            f"{bench.label}: {bench.total:,} parameters, {bench.trainable:,} trainable "
            f"({bench.trainable / bench.total:.2%}), LoRA r={bench.lora_r}; built, saved and "
            f"loaded in {time.perf_counter() - t0:.1f} s"
        )
        note: str | None = None
        train = client_trainer(bench, setup, seed)
        if full:
            need = dp_memory_estimate(bench.trainable, bench.total, setup)
            avail = available_bytes()
            if avail is not None and need > MEMORY_FRACTION * avail:
                note = (
                    f"DP-SGD skipped: per-sample gradients of {bench.trainable:,} parameters "
                    f"(4 B each, Poisson batch up to ~{setup.batch} expected) need about "
                    f"{need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
                    f"{avail / 2**30:.1f} GiB available"
                )
            else:
                try:
                    say(
                        f"{bench.label}: trying one client's full DP-SGD round (memory estimate "
                        f"{need / 2**30:.1f} GiB)"
                    )
                    train(0)
                except (RuntimeError, MemoryError) as exc:
                    if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
                        raise  # not a lack of memory: a bug to see
                    note = f"DP-SGD failed for lack of memory: {type(exc).__name__}: {exc}"[:300]
            if note is not None:
                say(f"{bench.label}: {note}")
                train = untrained_clients(bench, setup, seed)
        return run_round(
            bench,
            clients,
            train,
            stream=full,
            seed=seed,
            setup=setup,
            training_note=note,
            progress=progress,
        )


# ----------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Target:
    """One target row."""

    target: str
    measured: str
    verdict: str


def verdict(value: float, target: float) -> str:
    """``met`` when ``value`` is at most ``target``, else ``MISSED``.

    Raises:
        ValueError: ``value`` is negative or not finite, or ``target`` is not positive.

    """
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"value must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive finite number, got {target!r}")
    return "met" if value <= target else "MISSED"


def targets(results: Sequence[SizeResult]) -> list[Target]:
    """The target rows over ``results``: upload per size, round ratio, exactness."""
    rows: list[Target] = []
    for r in results:
        enc = r.modes[MODE_BFV]
        label = f"{r.label}: upload <= {TARGET_UPLOAD_RATIO:g}x fp32"
        if r.fills_ciphertext:
            rows.append(
                Target(
                    label,
                    f"{enc.upload_bytes:,.0f} B / {enc.fp32_bytes:,} B = {enc.upload_ratio:.3f}x",
                    verdict(enc.upload_ratio, TARGET_UPLOAD_RATIO),
                )
            )
        else:
            rows.append(
                Target(
                    label,
                    f"{enc.upload_ratio:.3f}x ({r.trainable:,} values < one ciphertext's "
                    f"{r.values_per_ciphertext:,})",
                    "n/a",
                )
            )
    for r in results:
        if r.lora_r is not None and r.total >= 0.5 * TARGET_ROUND_SIZE:
            rows.append(
                Target(
                    f"{r.label} LoRA: round encrypted <= {TARGET_ROUND_RATIO:g}x plain",
                    f"{r.modes[MODE_BFV].round_seconds:.2f} s / "
                    f"{r.modes[MODE_PLAIN].round_seconds:.2f} s = {r.round_ratio:.3f}x",
                    verdict(r.round_ratio, TARGET_ROUND_RATIO),
                )
            )
    for r in results:
        for m in r.modes.values():
            rows.append(
                Target(
                    f"{r.label} {m.mode}: sum exact within bound",
                    f"max err {m.max_abs_error:.3g} <= {m.error_bound:.3g}",
                    "met" if m.exact else "MISSED",
                )
            )
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


TABLE_HEAD = (
    "model",
    "trainable",
    "mode",
    "upload MB",
    "up/fp32",
    "client s",
    "(train s",
    "codec s)",
    "server s",
    "decrypt s",
    "round s",
    "enc/plain",
    "RSS MB c/s/d",
)


def table_rows(results: Sequence[SizeResult]) -> list[tuple[str, ...]]:
    """One row per model and mode (the columns of :data:`TABLE_HEAD`)."""
    rows: list[tuple[str, ...]] = []
    for r in results:
        for mode in (MODE_PLAIN, MODE_BFV):
            m = r.modes[mode]
            ratio = f"{r.round_ratio:.3f}x" if mode == MODE_BFV else "1"
            rows.append(
                (
                    r.label,
                    f"{r.trainable:,}",
                    mode,
                    _mb(m.upload_bytes),
                    f"{m.upload_ratio:.3f}",
                    f"{m.client_seconds:.3f}",
                    f"{m.client_train_seconds:.3f}",
                    f"{m.client_codec_seconds:.3f}",
                    f"{m.server_seconds:.3f}",
                    f"{m.decrypt_seconds:.3f}",
                    f"{m.round_seconds:.3f}",
                    ratio,
                    f"{m.peak_rss_client / 1e6:,.0f}/{m.peak_rss_server / 1e6:,.0f}/"
                    f"{m.peak_rss_decrypt / 1e6:,.0f}",
                )
            )
    return rows


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    cells = [list(head), *map(list, rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    fmt = [
        ("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        for row in cells
    ]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt[0], rule, *fmt[1:]])


def format_report(results: Sequence[SizeResult]) -> str:
    """Everything printed after the runs: setup lines, the table, the targets."""
    lines = []
    for r in results:
        shape = f"BERT h={r.hidden} L={r.layers} vocab={r.vocab:,}"
        part = f"LoRA r={r.lora_r} on {', '.join(LORA_TARGETS)} + head" if r.lora_r else "all"
        lines.append(
            f"{r.label}: {r.total:,} parameters ({shape}); trainable {r.trainable:,} "
            f"({r.trainable / r.total:.2%}, {part}); {r.clients} clients x {r.examples} "
            f"examples of {r.seq_len} tokens, batch {r.batch}, {r.steps} DP-SGD steps on "
            f"{r.device}; server {'streams' if r.streamed else 'holds all uploads'}"
        )
        if r.training_note:
            lines.append(f"  {r.training_note}")
        m = r.modes[MODE_BFV]
        lines.append(
            f"  {MODE_BFV}: masking stages {m.client_mask_seconds:.3f} s per client; server "
            f"validate {m.server_validate_seconds:.3f} s, unmask {m.server_unmask_seconds:.3f} s"
            f"; download {_mb(m.download_bytes)} MB"
        )
    lines += [
        "",
        "per client per round (client s = mean; server s = whole round; round s = client + "
        "server + decrypt; RSS = process peak during client/server/decrypt phases)",
        markdown(TABLE_HEAD, table_rows(results)),
        "",
        markdown(
            ("target", "measured", "verdict"),
            [(t.target, t.measured, t.verdict) for t in targets(results)],
        ),
        "",
        f"peak RSS of the whole run (ru_maxrss): {max_rss_bytes() / 2**30:.2f} GiB",
    ]
    return "\n".join(lines)


def result_json(results: Sequence[SizeResult]) -> dict[str, Any]:
    """The figures as JSON-ready data (with the targets and derived ratios)."""
    out = []
    for r in results:
        d = asdict(r)
        d["round_ratio"] = r.round_ratio
        for mode, m in r.modes.items():
            d["modes"][mode]["upload_ratio"] = m.upload_ratio
            d["modes"][mode]["exact"] = m.exact
        out.append(d)
    return {
        "results": out,
        "targets": [asdict(t) for t in targets(results)],
        "max_rss_bytes": max_rss_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: run each size (and ``--full``), print the tables, write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__)
    p.add_argument("--sizes", default="10M,100M", help="total sizes, comma-separated")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--device", default="cpu", help="where DP-SGD runs: cpu, cuda or auto")
    p.add_argument("--full", action="store_true", help="also train ALL 100M parameters")
    p.add_argument("--full-only", action="store_true", help="only the --full round")
    p.add_argument("--examples", type=int, default=EXAMPLES)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--full-examples", type=int, default=FULL_EXAMPLES)
    p.add_argument("--full-batch", type=int, default=FULL_BATCH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-large")
    args = p.parse_args(argv)
    try:
        sizes = [] if args.full_only else [parse_size(s) for s in args.sizes.split(",") if s]
    except ValueError as exc:
        print(f"error: --sizes: {exc}", file=sys.stderr)
        return 2
    if args.clients < 3:
        print("error: --clients must be >= 3", file=sys.stderr)
        return 2
    from sepals.client.training import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print("..", text, flush=True)

    import torch

    print(
        f"large benchmark: sizes {[size_label(s) for s in sizes]}"
        f"{' + 100M full' if args.full or args.full_only else ''}, {args.clients} clients, "
        f"DP-SGD on {device}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    t0 = time.perf_counter()
    results: list[SizeResult] = []
    setup = TrainSetup(args.examples, args.batch, args.seq_len, device)
    for size in sizes:
        results.append(run_size(size, args.clients, setup=setup, seed=args.seed, progress=say))
        say(f"{results[-1].label} round measured ({time.perf_counter() - t0:.0f} s so far)")
    if args.full or args.full_only:
        full_setup = TrainSetup(args.full_examples, args.full_batch, args.seq_len, device)
        results.append(
            run_size(
                TARGET_ROUND_SIZE,
                args.clients,
                full=True,
                setup=full_setup,
                seed=args.seed,
                progress=say,
            )
        )
    report = format_report(results)
    print(report, flush=True)
    print(f"benchmark wall time {time.perf_counter() - t0:.0f} s", flush=True)
    path = out / "large.json"
    path.write_text(json.dumps(result_json(results), indent=2) + "\n")
    print(f"figures written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
