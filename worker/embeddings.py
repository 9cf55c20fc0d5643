"""Vectors for the semantic cache, from one of three providers (`[embeddings] provider`).

- **voyage**: Voyage AI's embeddings API (`POST {voyage_url}/embeddings`, the key in
  `VOYAGE_API_KEY` sent as `Authorization: Bearer`), the embeddings provider Anthropic
  recommends. Request `{"input": [texts], "model", "input_type": null, "truncation": true,
  "output_dimension"}`; answer `{"data": [{"embedding", "index"}], "usage":
  {"total_tokens"}}`; errors `{"detail": "..."}`. Billed per token.
- **local**: a static model2vec model on the CPU, loaded from `local_path` (a folder the user
  downloaded once; nothing is fetched at run time: a folder without a model is an error, not
  a download). Bills nothing.
- **simulator**: the simulator's `POST /v1/embeddings`, the same API as Voyage's with
  deterministic vectors in which paraphrases land close (simulator/embeddings.py); billed
  in its ledger.
- **auto**: voyage when `VOYAGE_API_KEY` is set, else the simulator (as `anthropic.base_url =
  "auto"` does for the API).

Every provider returns unit-length float32 vectors and the tokens it was billed for; the cost
is `tokens x usd_per_mtok` (cost_usd), part of the job's cost. Calls are not retried: the
semantic cache is skipped for a job whose embedding fails (it then calls the API as usual).

    EmbeddingError   a call that failed (HTTP status, timeout, a model folder that is not one)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiohttp
import msgspec
import numpy as np

from worker.config import Config, EmbeddingsConfig

log = logging.getLogger("tokenq.embeddings")
KEY_ENV = "VOYAGE_API_KEY"


class EmbeddingError(Exception):
    """An embedding call that did not give vectors; the message says why."""


class Embedded(NamedTuple):
    """Vectors (one row per text, length 1, float32) and the tokens billed for them."""

    vectors: np.ndarray
    tokens: int


class Embedder(Protocol):
    """What the semantic cache needs of a provider. Users: HttpEmbedder (voyage and the
    simulator), LocalEmbedder (model2vec)."""

    @property
    def name(self) -> str:
        """The provider and model, e.g. "voyage:voyage-3.5-lite:512": part of the cache's key,
        so vectors of different models are never compared."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embedded:
        """Vectors for `texts`; raises EmbeddingError."""
        ...

    async def aclose(self) -> None: ...


def cost_usd(cfg: EmbeddingsConfig, tokens: int) -> float:
    """What `tokens` embedded tokens cost at `embeddings.usd_per_mtok`."""
    return tokens * cfg.usd_per_mtok / 1_000_000


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """`matrix` as float32 rows of length 1 (a zero row stays zero)."""
    rows = np.asarray(matrix, dtype=np.float32).reshape(len(matrix), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


class _Item(msgspec.Struct, frozen=True):
    embedding: list[float]
    index: int


class _Usage(msgspec.Struct, frozen=True):
    total_tokens: int


class _Reply(msgspec.Struct, frozen=True):
    data: list[_Item]
    usage: _Usage


_decode_reply = msgspec.json.Decoder(_Reply).decode


class HttpEmbedder:
    """Voyage AI's embeddings API, or the simulator's copy of it."""

    def __init__(self, url: str, key: str, cfg: EmbeddingsConfig, provider: str) -> None:
        self.url, self.cfg, self.provider = url, cfg, provider
        self._headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.cfg.model}:{self.cfg.dimensions}"

    async def embed(self, texts: Sequence[str]) -> Embedded:
        if self._session is None:  # made in the running loop, on first use
            self._session = aiohttp.ClientSession()
        body = msgspec.json.encode({
            "input": list(texts), "model": self.cfg.model, "input_type": None,
            "truncation": True, "output_dimension": self.cfg.dimensions,
        })  # fmt: skip
        try:
            async with self._session.post(
                self.url, data=body, headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            ) as reply:  # fmt: skip
                raw = await reply.read()
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EmbeddingError(f"{self.provider} embeddings at {self.url}: {exc!r}") from None
        if status != 200:
            raise EmbeddingError(f"{self.provider} embeddings answered {status}: {_detail(raw)}")
        try:
            parsed = _decode_reply(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise EmbeddingError(f"{self.provider} embeddings: unexpected answer ({exc})") from None
        items = sorted(parsed.data, key=lambda item: item.index)
        if len(items) != len(texts) or any(len(i.embedding) == 0 for i in items):
            raise EmbeddingError(
                f"{self.provider} embeddings: {len(items)} vectors for {len(texts)} texts"
            )
        vectors = unit_rows(np.array([item.embedding for item in items], dtype=np.float32))
        return Embedded(vectors, parsed.usage.total_tokens)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _detail(raw: bytes) -> str:
    try:
        detail = msgspec.json.decode(raw).get("detail")
    except (msgspec.DecodeError, AttributeError):
        detail = None
    return str(detail if detail is not None else raw[:300].decode(errors="replace"))


class LocalEmbedder:
    """A model2vec static model from a local folder, run on the CPU in a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._model: Any = None
        self._loading = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"local:{Path(self.path).name}"

    async def _loaded(self) -> Any:
        async with self._loading:
            if self._model is None:
                self._model = await asyncio.to_thread(load_local, self.path)
        return self._model

    async def embed(self, texts: Sequence[str]) -> Embedded:
        model = await self._loaded()
        try:
            matrix = await asyncio.to_thread(model.encode, list(texts))
        except Exception as exc:  # model2vec and tokenizers raise assorted errors
            raise EmbeddingError(f"local model {self.path!r} could not embed: {exc!r}") from None
        return Embedded(unit_rows(matrix), 0)

    async def aclose(self) -> None:
        self._model = None


def load_local(path: str) -> Any:
    """The model2vec StaticModel in `path`; raises EmbeddingError (never downloads: model2vec
    would try the Hugging Face hub for a path that is not a folder, so that is checked here)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise EmbeddingError(
            f"embeddings.local_path {path!r} holds no model2vec model (no config.json); "
            "download one there once, e.g. StaticModel.from_pretrained('minishlab/"
            "potion-base-8M').save_pretrained(PATH)"
        )
    try:
        from model2vec import StaticModel
    except ImportError:
        raise EmbeddingError(
            'embeddings.provider = "local" needs model2vec: pip install "tokenq[local]"'
        ) from None
    try:
        return StaticModel.from_pretrained(folder, normalize=True)
    except Exception as exc:  # a damaged folder: safetensors, tokenizers, json errors
        raise EmbeddingError(f"cannot load the model in {path!r}: {exc!r}") from None


def provider_of(cfg: Config, env: Mapping[str, str] = os.environ) -> str:
    """The provider `auto` stands for: voyage with a key in the environment, else simulator."""
    chosen = cfg.embeddings.provider
    if chosen == "auto":
        return "voyage" if env.get(KEY_ENV) else "simulator"
    return chosen


def make_embedder(cfg: Config, env: Mapping[str, str] = os.environ) -> Embedder:
    """The embedder `[embeddings]` describes; raises EmbeddingError for voyage without a key."""
    e = cfg.embeddings
    provider = provider_of(cfg, env)
    if provider == "local":
        return LocalEmbedder(e.local_path)
    if provider == "voyage":
        key = env.get(KEY_ENV, "")
        if not key:
            raise EmbeddingError(
                f'embeddings.provider = "voyage" needs the API key in ${KEY_ENV}; set it, or '
                'use provider = "local" or "simulator"'
            )
        return HttpEmbedder(e.voyage_url.rstrip("/") + "/embeddings", key, e, "voyage")
    url = cfg.anthropic.simulator_url.rstrip("/") + "/v1/embeddings"
    return HttpEmbedder(url, "simulator", e, "simulator")
