"""POST /v1/embeddings: Voyage AI's embeddings API, with synthetic vectors in which a
rephrased question lands close to the original and a near-miss does not (README: The
simulator, "Embeddings").

**Request and answer** as Voyage's (docs.voyageai.com/reference/embeddings-api):
`{"input": str | [str, ...], "model", "input_type": null | "query" | "document",
"truncation", "output_dimension", "output_dtype": "float"}` answered
`{"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": i}],
"model", "usage": {"total_tokens": N}}`; errors as Voyage sends them, `{"detail": "..."}`
with the status (401 without `Authorization: Bearer`, 400 for a bad field).

**The vectors are a model of meaning, declared synthetic.** No real embedding model was
measured. A text's vector is built from its *content words*:
  1. lowercased; the multi-word phrases of PHRASES replaced by the word they stand for
     ("put on hold" -> pause, "e-mail address" -> email);
  2. split into words; each word cut to a crude stem (a plural "s", "ing", "ed") and mapped
     through SYNONYMS to its canonical word (terminate -> cancel, membership ->
     subscription): this is the knowledge the model has of which words mean the same;
  3. STOPWORDS dropped: the words every question has ("how", "can", "my", "please", "steps"),
     which carry no intent;
  4. each remaining canonical word, counted once, adds a fixed unit vector (seeded by the
     model and the word) weighted INTENT_WEIGHT (2.5) for the words that say what is wanted
     (INTENT_WORDS: actions such as cancel, pause, refund; things such as subscription,
     password, invoice), else 1. Words of one RELATED family (cancel, pause, delete and
     downgrade all stop something; email, shipping, password and account are who you are)
     share a family direction: their vectors have a cosine of RELATEDNESS (0.75), as related
     words do in a real model. That is what makes a near-miss close;
  5. plus noise: a random vector seeded by the whole text, NOISE (0.18) times the length of
     the sum, so two wordings of the same words are not identical, as with a real model;
  6. normalised to length 1, as Voyage's are.
So a paraphrase that uses known synonyms and the same intent words lands at a cosine of
about 0.97, one that adds or drops a detail ("on the app") at 0.88-0.94; a near-miss with a
related action or thing ("pause" vs "cancel my subscription") at 0.75-0.85, one with an
unrelated one near 0.5; and a paraphrase whose synonym the table does not know is missed.
Vectors are deterministic: the same text, model and dimensions give the same vector on any
machine.

**Billing.** Tokens are 4 characters each (at least 1 a text); the usage is billed in the
ledger's `embeddings` section at EMBEDDING_PRICES.
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

EMBEDDING_PRICES: dict[str, float] = {  # USD per million tokens
    "voyage-3.5-lite": 0.02,
    "voyage-3.5": 0.06,
    "voyage-3-large": 0.18,
    "voyage-code-3": 0.18,
}
DIMENSIONS = (256, 512, 1024, 2048)
DEFAULT_DIMENSIONS = 1024
MAX_INPUTS = 1000
MAX_TOKENS = 1_000_000
INTENT_WEIGHT = 2.5
NOISE = 0.18
RELATEDNESS = 0.75  # the cosine of two words of one family
RELATED: dict[str, tuple[str, ...]] = {
    "stopping": ("cancel", "pause", "delete", "downgrade"),
    "starting": ("resume", "upgrade", "add"),
    "altering": ("change", "reset"),
    "money": ("refund", "return", "pay"),
    "finding": ("track", "export"),
    "identity": ("email", "shipping", "password", "account", "twofactor", "login", "username"),
    "billing": ("invoice", "card"),
    "plans": ("subscription", "seat"),
    "developer": ("apikey", "webhook", "report"),
}
_FAMILY = {word: family for family, words in RELATED.items() for word in words}

STOPWORDS = frozenset(
    """
    a an the i me my mine we our you your it its this that these those is are was were be been
    am do does did done doing have has had can could would should will shall may might must how
    what when where which who whom why there here to of in on at for from by with about into
    onto as and or but if so not no yes please thank thanks hi hello hey help want like need
    wonder wondering tell show explain know possible way ways step steps process procedure
    instruction instructions question quick any some just also still really again get go going
    make let able guide anyone someone something ok okay kindly asap
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Words that say what is wanted: actions and the things they act on.
INTENT_WORDS = frozenset(
    """
    cancel pause resume upgrade downgrade change reset track return refund export delete add pay
    subscription order password email address invoice card account report apikey webhook
    shipping login username twofactor seat
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Phrases first (longest first), so "put on hold" is one word.
PHRASES: dict[str, str] = {
    "put on hold": "pause",
    "shut down": "cancel",
    "get rid of": "delete",
    "send back": "return",
    "money back": "refund",
    "scale back": "downgrade",
    "move up": "upgrade",
    "move down": "downgrade",
    "get back into": "reset",
    "e-mail address": "email",
    "email address": "email",
    "e-mail": "email",
    "mail address": "email",
    "shipping address": "shipping",
    "delivery address": "shipping",
    "postal address": "shipping",
    "credit card": "card",
    "payment card": "card",
    "payment method": "card",
    "debit card": "card",
    "api key": "apikey",
    "api token": "apikey",
    "access key": "apikey",
    "access token": "apikey",
    "callback url": "webhook",
    "sign in": "login",
    "log in": "login",
    "two-factor": "twofactor",
    "two factor": "twofactor",
    "2fa": "twofactor",
    "user name": "username",
}
SYNONYMS: dict[str, str] = {
    # actions
    "terminate": "cancel", "end": "cancel", "stop": "cancel", "discontinue": "cancel",
    "freeze": "pause", "suspend": "pause", "hold": "pause",
    "restart": "resume", "reactivate": "resume", "unpause": "resume",
    "update": "change", "modify": "change", "edit": "change", "alter": "change",
    "recover": "reset", "forgot": "reset", "forgotten": "reset", "lost": "reset",
    "follow": "track", "status": "track", "locate": "track", "trace": "track",
    "reimburse": "refund", "reimbursement": "refund", "repay": "refund",
    "download": "export", "extract": "export",
    "remove": "delete", "erase": "delete", "wipe": "delete",
    "create": "add", "register": "add", "set": "add", "setup": "add", "new": "add",
    "settle": "pay", "payment": "pay",
    # things
    "membership": "subscription", "subscribe": "subscription", "plan": "subscription",
    "purchase": "order", "parcel": "order", "package": "order",
    "passcode": "password", "passphrase": "password", "pin": "password",
    "mail": "email",
    "bill": "invoice", "receipt": "invoice", "statement": "invoice",
    "profile": "account",
    "dashboard": "report", "analytics": "report",
    "token": "apikey", "key": "apikey",
    "hook": "webhook", "notification": "webhook",
    "signin": "login", "logon": "login",
    "user": "seat", "licence": "seat", "license": "seat",
}  # fmt: skip
_WORD = re.compile(r"[a-z0-9_]+")
_PHRASE = re.compile("|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True)))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            cut = word[: -len(suffix)]
            return cut if cut in SYNONYMS or cut in INTENT_WORDS else word
    return word


def content_words(text: str) -> dict[str, float]:
    """A text's canonical content words and their weights (the module docstring, 1-4)."""
    lowered = _PHRASE.sub(lambda m: f" {PHRASES[m.group(0)]} ", text.lower())
    out: dict[str, float] = {}
    for raw in _WORD.findall(lowered):
        word = _stem(raw)
        word = SYNONYMS.get(word, word)
        if word in STOPWORDS or len(word) < 2:
            continue
        out[word] = INTENT_WEIGHT if word in INTENT_WORDS else 1.0
    return out


@lru_cache(maxsize=65_536)
def _random_unit(model: str, name: str, dimensions: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(f"{model}\x1f{name}".encode(), digest_size=8).digest())
    v = np.random.default_rng(seed).standard_normal(dimensions)
    return v / np.linalg.norm(v)


def _basis(model: str, word: str, dimensions: int) -> np.ndarray:
    own = _random_unit(model, word, dimensions)
    family = _FAMILY.get(word)
    if family is None:
        return own
    shared = _random_unit(model, "\x00family:" + family, dimensions)
    v = math.sqrt(1 - RELATEDNESS) * own + math.sqrt(RELATEDNESS) * shared
    return v / np.linalg.norm(v)


def vector(text: str, model: str, dimensions: int) -> list[float]:
    """The embedding of `text` (length 1; see the module docstring)."""
    total = np.zeros(dimensions)
    for word, weight in content_words(text).items():
        total += weight * _basis(model, word, dimensions)
    size = float(np.linalg.norm(total)) or 1.0
    noise = _random_unit(model, "\x00text:" + hashlib.sha256(text.encode()).hexdigest(), dimensions)
    total += NOISE * size * noise
    return [float(x) for x in total / np.linalg.norm(total)]


def tokens_of(text: str) -> int:
    """Tokens billed for one text: 4 characters each, at least 1."""
    return max(1, math.ceil(len(text) / 4))


class EmbedRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input: str | list[str]
    model: str
    input_type: str | None = None
    truncation: bool = True
    output_dimension: int | None = None
    output_dtype: str = "float"
    encoding_format: str | None = None


class EmbeddingItem(msgspec.Struct, frozen=True):
    object: str
    embedding: list[float]
    index: int


class EmbedUsage(msgspec.Struct, frozen=True):
    total_tokens: int


class EmbedResponse(msgspec.Struct, frozen=True):
    object: str
    data: list[EmbeddingItem]
    model: str
    usage: EmbedUsage


class VoyageError(Exception):
    """An error Voyage answers as {"detail": message} with this status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


_decode = msgspec.json.Decoder(EmbedRequest).decode


def check_request(headers: Any, raw: bytes) -> tuple[EmbedRequest, list[str], int]:
    """The request, its texts and the dimensions asked for; raises VoyageError."""
    bearer = headers.get("authorization", "")
    if not (bearer.startswith("Bearer ") and bearer[7:].strip()):
        raise VoyageError(401, "Provide an API key as Authorization: Bearer <key> (any key).")
    try:
        request = _decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise VoyageError(400, f"Request body: {exc}") from None
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not texts or len(texts) > MAX_INPUTS or any(not t for t in texts):
        raise VoyageError(400, f"input: give 1 to {MAX_INPUTS} non-empty texts")
    if request.model not in EMBEDDING_PRICES:
        raise VoyageError(
            400, f"Model {request.model} is not supported. Supported: {', '.join(EMBEDDING_PRICES)}"
        )
    if request.input_type not in (None, "query", "document"):
        raise VoyageError(400, "input_type: must be null, 'query' or 'document'")
    dimensions = request.output_dimension or DEFAULT_DIMENSIONS
    if dimensions not in DIMENSIONS:
        raise VoyageError(400, f"output_dimension: must be one of {DIMENSIONS} or null")
    if request.output_dtype != "float" or request.encoding_format is not None:
        raise VoyageError(400, "the simulator gives output_dtype 'float' without encoding_format")
    if sum(tokens_of(t) for t in texts) > MAX_TOKENS:
        raise VoyageError(400, f"input: more than {MAX_TOKENS:,} tokens in one request")
    return request, texts, dimensions


def answer(request: EmbedRequest, texts: list[str], dimensions: int) -> EmbedResponse:
    """The embeddings of `texts` and the tokens billed."""
    items = [
        EmbeddingItem("embedding", vector(text, request.model, dimensions), i)
        for i, text in enumerate(texts)
    ]
    usage = EmbedUsage(sum(tokens_of(t) for t in texts))
    return EmbedResponse("list", items, request.model, usage)


def error_response(exc: VoyageError) -> web.Response:
    return web.Response(
        body=msgspec.json.encode({"detail": exc.detail}), status=exc.status,
        content_type="application/json",
    )  # fmt: skip
