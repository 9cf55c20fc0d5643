"""The semantic cache's pure parts: keys, the exact context, trust, the in-process index,
the simulator's vectors, the embedders' choice and the local model2vec embedder."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulator.embeddings import content_words, vector
from worker.config import parse_config
from worker.contract import Keys
from worker.embeddings import EmbeddingError, LocalEmbedder, make_embedder, provider_of
from worker.errors import ConfigError
from worker.semantic import context_of, last_user_text, max_tokens_class, trusted
from worker.semantic_audit import scope_of
from worker.semantic_index import ScopeIndex

ROOT = Path(__file__).resolve().parents[2]
RAW: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
FAQ: dict[str, Any] = {"system": "You are support.", "max_tokens": 300,
       "messages": [{"role": "user", "content": "How do I cancel my subscription?"}]}  # fmt: skip


def with_turn(params: dict[str, Any], text: str) -> dict[str, Any]:
    return {**params, "messages": [*params["messages"][:-1], {"role": "user", "content": text}]}


def test_only_the_last_user_turn_is_left_out_of_the_context() -> None:
    base = context_of("sim:m:512", "claude-haiku-5-5", FAQ)
    assert context_of("sim:m:512", "claude-haiku-5-5", with_turn(FAQ, "Other words")) == base
    assert context_of("sim:m:512", "claude-haiku-5-5", {**FAQ, "system": "Be terse."}) != base
    assert context_of("sim:m:512", "claude-sonnet-5-5", FAQ) != base
    assert context_of("sim:m:1024", "claude-haiku-5-5", FAQ) != base
    assert context_of("sim:m:512", "claude-haiku-5-5", {**FAQ, "tools": [{"name": "t"}]}) != base
    earlier = {**FAQ, "messages": [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"},
                                   *FAQ["messages"]]}  # fmt: skip
    assert context_of("sim:m:512", "claude-haiku-5-5", earlier) != base


def test_max_tokens_in_one_power_of_two_share_a_context() -> None:
    assert [max_tokens_class(n) for n in (1, 2, 3, 300, 512, 513)] == [1, 2, 4, 512, 512, 1024]
    same = context_of("e", "m", {**FAQ, "max_tokens": 400})
    assert same == context_of("e", "m", FAQ)
    assert context_of("e", "m", {**FAQ, "max_tokens": 600}) != same


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("Where is my order?", "Where is my order?"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb"),
        ([{"type": "text", "text": "a"}, {"type": "image", "source": {}}], None),
        ("", None),
        ([], None),
    ],
)
def test_only_a_plain_text_user_turn_is_compared(content: Any, text: str | None) -> None:
    assert last_user_text({"messages": [{"role": "user", "content": content}]}) == text


def test_an_assistant_turn_last_is_not_compared() -> None:
    params = {"messages": [*FAQ["messages"], {"role": "assistant", "content": "Sure"}]}
    assert last_user_text(params) is None


def test_tenant_names_with_colons_give_distinct_scopes_that_parse_back() -> None:
    keys = Keys("tq")
    a, b = keys.semantic_scope("faq", "acme:shared"), keys.semantic_scope("faq", "acme")
    c = keys.semantic_scope("faq:x", None)
    assert len({a, b, c, keys.semantic_scope("faq", None)}) == 4
    assert scope_of(keys, a) == ("faq", "acme:shared")
    assert scope_of(keys, b) == ("faq", "acme")
    assert scope_of(keys, c) == ("faq:x", None)
    assert scope_of(keys, keys.semantic_scope("f", "we:ird\n{tag}%")) == ("f", "we:ird\n{tag}%")


def test_each_bad_verdict_halves_the_room_to_one() -> None:
    assert trusted(0.92, 0) == pytest.approx(0.92)
    assert trusted(0.92, 1) == pytest.approx(0.96)
    assert trusted(0.92, 2) == pytest.approx(0.98)


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def test_index_finds_the_nearest_of_the_same_context_only() -> None:
    rng = np.random.default_rng(1)
    index = ScopeIndex()
    vectors = {f"e{i}": unit(rng.standard_normal(16)) for i in range(50)}
    for i, (entry_id, v) in enumerate(vectors.items()):
        index.add(entry_id, "ctx-a" if i % 2 == 0 else "ctx-b", v, at_ms=1000 + i)
    found = index.nearest("ctx-a", vectors["e10"], since_ms=0)
    assert found is not None and found.entry_id == "e10"
    assert found.similarity == pytest.approx(1.0, abs=1e-5)
    other = index.nearest("ctx-b", vectors["e10"], since_ms=0)
    assert other is not None and other.entry_id != "e10"
    assert index.nearest("ctx-c", vectors["e10"], since_ms=0) is None


def test_index_removal_keeps_every_other_row_findable() -> None:
    rng = np.random.default_rng(2)
    index = ScopeIndex()
    vectors = {f"e{i}": unit(rng.standard_normal(8)) for i in range(20)}
    for entry_id, v in vectors.items():
        index.add(entry_id, "c", v, at_ms=0)
    for gone in ("e0", "e7", "e19"):
        index.remove(gone)
    assert len(index) == 17
    for entry_id, v in vectors.items():
        found = index.nearest("c", v, since_ms=0)
        assert found is not None
        assert (found.entry_id == entry_id) == (entry_id not in ("e0", "e7", "e19"))


def test_index_skips_entries_older_than_the_ttl() -> None:
    index = ScopeIndex()
    v = unit(np.ones(4))
    index.add("old", "c", v, at_ms=100)
    assert index.nearest("c", v, since_ms=101) is None
    index.add("new", "c", v, at_ms=200)
    found = index.nearest("c", v, since_ms=101)
    assert found is not None and found.entry_id == "new"


def cos(a: str, b: str) -> float:
    return float(np.dot(vector(a, "voyage-3.5-lite", 512), vector(b, "voyage-3.5-lite", 512)))


def test_simulator_vectors_put_paraphrases_close_and_near_misses_apart() -> None:
    question = "How do I cancel my subscription?"
    for paraphrase in ("How can I terminate my membership?", "Steps to end the plan please"):
        assert cos(question, paraphrase) > 0.93
    assert cos(question, "How do I pause my subscription?") < 0.88
    assert cos(question, "How do I cancel my order?") < 0.88
    assert cos(question, "Where is my invoice?") < 0.6
    assert vector(question, "voyage-3.5-lite", 256) == vector(question, "voyage-3.5-lite", 256)


def test_simulator_vectors_know_phrases_and_drop_stopwords() -> None:
    words = content_words("Could you please put on hold my e-mail address?")
    assert words == {"pause": 2.5, "email": 2.5}


def config(**embeddings: Any) -> Any:
    raw = copy.deepcopy(RAW)
    raw["embeddings"].update(embeddings)
    return parse_config(raw)


def test_auto_is_voyage_with_a_key_and_the_simulator_without() -> None:
    cfg = config()
    assert provider_of(cfg, {}) == "simulator"
    assert provider_of(cfg, {"VOYAGE_API_KEY": "pa-x"}) == "voyage"
    assert make_embedder(cfg, {"VOYAGE_API_KEY": "pa-x"}).name == "voyage:voyage-3.5-lite:512"


def test_voyage_without_a_key_says_where_to_put_it() -> None:
    with pytest.raises(EmbeddingError, match=r"VOYAGE_API_KEY"):
        make_embedder(config(provider="voyage"), {})


def test_semantic_cache_settings_are_checked_with_their_key() -> None:
    raw = copy.deepcopy(RAW)
    raw["features"]["support_faq"]["semantic_cache"] = {"threshold": 1.5, "max_entry": 3}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "features.support_faq.semantic_cache.threshold = 1.5 is not allowed" in text
    assert "unknown key 'features.support_faq.semantic_cache.max_entry'" in text


def test_local_provider_needs_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs embeddings\.local_path"):
        config(provider="local")
    with pytest.raises(ConfigError, match="holds no model2vec model"):
        config(provider="local", local_path=str(tmp_path))


def tiny_model(folder: Path) -> None:
    """A model2vec model of nine words, made here: no download."""
    from model2vec import StaticModel
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "[PAD]", "cancel", "terminate", "subscription", "membership", "pause",
             "order", "how"]  # fmt: skip
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(words), 16)).astype(np.float32)
    vectors[3], vectors[5] = vectors[2], vectors[4]  # synonyms share a vector
    StaticModel(vectors, tokenizer, normalize=True).save_pretrained(folder)


async def test_local_embedder_runs_a_model_from_its_folder(tmp_path: Path) -> None:
    tiny_model(tmp_path / "model")
    cfg = config(provider="local", local_path=str(tmp_path / "model"))
    embedder = make_embedder(cfg)
    assert isinstance(embedder, LocalEmbedder)
    done = await embedder.embed(["cancel subscription", "terminate membership", "pause order"])
    assert done.tokens == 0  # nobody bills a local model
    assert done.vectors.shape == (3, 16)
    assert float(done.vectors[0] @ done.vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(done.vectors[0] @ done.vectors[2]) < 0.9
    await embedder.aclose()


async def test_local_embedder_never_downloads_a_missing_model(tmp_path: Path) -> None:
    embedder = LocalEmbedder(str(tmp_path / "nothing-here"))
    with pytest.raises(EmbeddingError, match="holds no model2vec model"):
        await embedder.embed(["x"])
