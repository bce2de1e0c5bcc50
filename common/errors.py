"""The sepals exception hierarchy.

Every error that sepals raises on purpose derives from :class:`SepalsError`, so an
application can catch the whole family in one place. Input validation in constructors
raises :class:`ValueError` directly, as the Python data model expects.
"""


class SepalsError(Exception):
    """Base class of all sepals domain errors."""


class PayloadError(SepalsError):
    """An update or aggregate payload cannot be used."""


class MalformedPayloadError(PayloadError):
    """A payload is truncated, has a bad header, a wrong length, or fails to deserialize."""


class ForeignKeyError(PayloadError):
    """A payload was made under another HE key than the one this party holds."""


class GlobalModelRejectedError(MalformedPayloadError):
    """A decrypted global model is not a sum that bounded, honest updates could make.

    Raised by a client that decrypts it (non-finite values, a value beyond what the
    round's updates can sum to, or padding that is not zero): it refuses to adopt it.
    """


class ExplanationRejectedError(GlobalModelRejectedError):
    """A sum a client is asked to open that is not a sum of explanation contributions.

    Its tag does not match its values (a global model, an update, or a release with
    something added), or it has the wrong length: the client returns no plaintext.
    """


class NonFiniteUpdateError(PayloadError):
    """A model update contains NaN or infinite values."""


class SecretKeyExposureError(SepalsError):
    """A secret HE key was offered to a party that must never hold one (the server)."""


class MissingSecretKeyError(SepalsError):
    """A client-side operation (decryption) was attempted without the secret key."""


class BudgetExhaustedError(SepalsError):
    """Training one more round would push a client past its (epsilon, delta) budget."""


class DeltaTooLargeError(SepalsError, ValueError):
    """A client's delta is not below 1/n for its n training examples."""


class TrainingInputError(SepalsError, ValueError):
    """A client cannot train on what it holds: its data, its model, its loss or its ledger.

    ``reason`` is a fixed phrase that names the problem without quoting any value; it is
    what the server may see. The message, which may quote values, stays on the client.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason


class ModelCompatibilityError(SepalsError):
    """A model cannot be trained with DP-SGD (for example it contains BatchNorm)."""


class InsecureFileError(SepalsError):
    """A file that holds a secret is readable or writable by group or other users."""


class LedgerLockedError(SepalsError):
    """Another process holds the privacy ledger (two clients must never share one)."""


class MaskProtocolError(SepalsError):
    """A masking message is malformed, inconsistent or not allowed at this point."""


class BadSharesError(MaskProtocolError):
    """The masking shares some neighbours sealed for this client do not open.

    ``senders`` are their node ids (public to the server): the client names them in its
    reply, so that the server can exclude a client that several neighbours accuse.
    """

    def __init__(self, senders: list[int]) -> None:
        super().__init__(f"masking shares from node(s) {senders} do not open")
        self.senders = sorted(senders)
