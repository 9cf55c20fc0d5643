"""The tier router: which tier (model) a job runs on, and why.

The order of precedence, first match wins:

1. the job's own `tier` field ("forced by job.tier");
2. the feature's fixed `tier` ("features.<name>.tier");
3. the rules of `[[router.rules]]`, in file order ("rule <n>: ..."): each rule may name
   `features`, a `min_input_tokens` / `max_input_tokens` range of the estimated input, and
   `keywords` (any of them, case-insensitive, in the text of the messages and system prompt);
4. the classifier, if `router.classifier.enabled`: one small call on the classifier tier with a
   tiny `max_tokens` that answers with a tier name; its answer is cached in Redis by the hash
   of the request for `cache_ttl_s` ("classifier: <tier>" or "classifier (cached): <tier>").
   It is shown the request's text, or when that is over `max_chars` the opening of the text
   and then the last user turn (classifier_text);
5. `router.default_tier`.

Tiers are ordered as `[tiers]` lists them, cheapest first. An answer that fails the feature's
check (worker.checks: cut at `max_tokens`, `min_output_tokens`, `expect = "json"` with its
`expect_schema`, `expect_regex`) is escalated to the next dearer tier, at most
`router.max_escalations` times (an answer cut at `max_tokens` also gets twice the room, up to
the feature's `max_tokens_cap`); a budget or breaker with the `downgrade` policy moves a job to
the next cheaper tier. Every step is appended to the job's `route_reason`.

With `router.policy = "adaptive"`, worker.adaptive takes the place of steps 4 and 5 for the
features that set `target_pass_rate` (see that module and worker.learning).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

# Re-exported: the worker and the batcher import the answer check from here.
from worker.checks import CUT as CUT
from worker.checks import check_answer as check_answer
from worker.config import Config, FeatureConfig, RouteRule
from worker.contract import Job
from worker.estimate import raw_estimate


def tier_order(cfg: Config) -> list[str]:
    """Tiers cheapest first: the order of the [tiers] table."""
    return list(cfg.tiers)


def dearer(cfg: Config, tier: str) -> str | None:
    """The next dearer tier, or None at the top."""
    order = tier_order(cfg)
    n = order.index(tier)
    return order[n + 1] if n + 1 < len(order) else None


def cheaper(cfg: Config, tier: str) -> str | None:
    """The next cheaper tier, or None at the bottom."""
    order = tier_order(cfg)
    n = order.index(tier)
    return order[n - 1] if n > 0 else None


def request_text(params: dict[str, Any]) -> str:
    """The text a person wrote into a request: system prompt and message text blocks."""
    return " ".join(_texts([params.get("system"), *params.get("messages", [])]))


def messages_text(params: dict[str, Any]) -> str:
    """The text of a request's messages alone (no system prompt, no tools)."""
    return " ".join(_texts(params.get("messages") or []))


def _texts(values: Iterable[Any]) -> Iterable[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            if value.get("type", "text") == "text" and isinstance(value.get("text"), str):
                yield value["text"]
            if "content" in value:
                yield from _texts([value["content"]])
        elif isinstance(value, list):
            yield from _texts(value)


def _matches(rule: RouteRule, feature: str, input_tokens: int, text_lower: str) -> bool:
    if rule.features is not None and feature not in rule.features:
        return False
    if rule.min_input_tokens is not None and input_tokens < rule.min_input_tokens:
        return False
    if rule.max_input_tokens is not None and input_tokens > rule.max_input_tokens:
        return False
    return rule.keywords is None or any(k.lower() in text_lower for k in rule.keywords)


def _describe(n: int, rule: RouteRule) -> str:
    if rule.name:
        return f"rule {n} ({rule.name})"
    parts = []
    if rule.features is not None:
        parts.append("features " + ",".join(rule.features))
    if rule.min_input_tokens is not None:
        parts.append(f"input >= {rule.min_input_tokens}")
    if rule.max_input_tokens is not None:
        parts.append(f"input <= {rule.max_input_tokens}")
    if rule.keywords is not None:
        parts.append("keywords")
    return f"rule {n} ({'; '.join(parts) or 'always'})"


def static_route(
    cfg: Config, job: Job, feature: FeatureConfig, params: dict[str, Any],
    input_tokens: int | None = None,
) -> tuple[str, str] | None:  # fmt: skip
    """Steps 1-3: the tier and why, or None when the classifier (or the default) decides.
    The input is estimated (raw_estimate) only when a rule needs it and none is given."""
    if job.tier is not None:
        return job.tier, "forced by job.tier"
    if feature.tier is not None:
        return feature.tier, f"features.{job.feature}.tier"
    if cfg.router.rules:
        if input_tokens is None:
            input_tokens = raw_estimate(params)
        text = request_text(params).lower()
        for n, rule in enumerate(cfg.router.rules):
            if _matches(rule, job.feature, input_tokens, text):
                return rule.tier, _describe(n, rule)
    return None


CLASSIFIER_SYSTEM = (
    "You route requests to a model tier. Tiers, cheapest first: {tiers}. Reply with exactly "
    "one tier name: the cheapest tier that can answer the request well."
)


HEAD_SHARE = 4  # a cut request keeps at least 1/HEAD_SHARE of max_chars for the system's head
GAP = " [...] "


def classifier_text(params: dict[str, Any], max_chars: int) -> str:
    """What the classifier is shown: the request's text (system prompt, then the messages)
    when it fits max_chars; else the head of the text (the system prompt's opening: what
    the task is) and then the last user turn (what is asked), which a long system prompt
    would otherwise push out of view."""
    whole = request_text(params)
    if len(whole) <= max_chars:
        return whole
    messages = [m for m in params.get("messages") or [] if isinstance(m, dict)]
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    question = " ".join(_texts([last.get("content")])) if last is not None else ""
    head = max(max_chars // HEAD_SHARE, max_chars - len(question) - len(GAP))
    if not question or whole.startswith(question):  # nothing before the question to cut
        return whole[:max_chars]
    return (whole[:head] + GAP + question)[:max_chars]


def classifier_request(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    """The small call that asks for a tier (its text: classifier_text)."""
    c = cfg.router.classifier
    text = classifier_text(params, c.max_chars)
    return {
        "model": cfg.tiers[c.tier],
        "max_tokens": c.max_tokens,
        "system": CLASSIFIER_SYSTEM.format(tiers=", ".join(tier_order(cfg))),
        "messages": [{"role": "user", "content": text or "(empty request)"}],
    }


def classifier_answer(cfg: Config, text: str) -> str | None:
    """The tier a classifier reply names (the first tier name found in it), or None."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return next((w for w in words if w in cfg.tiers), None)


def request_hash(params: dict[str, Any]) -> str:
    """A stable hash of a request (model left out), the classifier cache's key."""
    body = {k: v for k, v in params.items() if k != "model"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
