"""Answer checks: whether an answer is fit to deliver and, when it is not, why.

A feature's check runs these tests in order; the first that fails is the reason (None: it
passes). The worker escalates an answer that fails to the next dearer tier (router.py).

1. cut: `stop_reason` is "max_tokens" (CUT; the escalation also doubles the room);
2. `min_output_tokens`: the answer has fewer output tokens (the usage's count when the caller
   gives it, else estimated from the text at four characters a token);
3. `expect = "json"`: the text, or the text inside one ``` fence, parses as JSON; with
   `expect_schema`, the value validates against that JSON Schema (the draft its "$schema"
   names, else 2020-12; "format" is an annotation and not checked; references only inside
   the schema, which config.py has checked);
4. `expect_regex`: `re.search` finds the pattern somewhere in the text (anchor it with `^` and
   `$`, add flags inline such as `(?s)`).

A reason never quotes the answer: reasons go into `route_reason` of usage events and into
logs, which hold no completions. An answer nested too deeply to parse or validate fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from worker.config import FeatureConfig

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

CUT = "stop_reason max_tokens"
MAX_REASON = 200  # characters: a reason is one clause of route_reason


def check_answer(
    feature: FeatureConfig, text: str, stop_reason: str | None, output_tokens: int | None = None
) -> str | None:
    """Why an answer fails the feature's check, or None when it passes. Never raises."""
    if stop_reason == "max_tokens":
        return CUT
    least = feature.min_output_tokens
    if least is not None:
        counted = output_tokens if output_tokens is not None else -(-len(text) // 4)
        if counted < least:
            about = "" if output_tokens is not None else "about "
            return f"answer has {about}{counted} output tokens, under min_output_tokens {least}"
    compiled = _compiled(feature)
    if feature.expect == "json":
        problem = _json_problem(text, compiled.validator)
        if problem:
            return problem[:MAX_REASON]
    if compiled.regex is not None and not compiled.regex.search(text):
        return "answer does not match expect_regex"
    return None


def _json_problem(text: str, validator: Validator | None) -> str | None:
    try:
        value = msgspec.json.decode(_strip_fence(text))
    except msgspec.DecodeError:
        return "answer is not JSON"
    except RecursionError:
        return "answer is JSON nested too deeply to check"
    if validator is None:
        return None
    from jsonschema.exceptions import best_match  # loaded with the validator
    from referencing.exceptions import Unresolvable

    try:
        if validator.is_valid(value):
            return None
        error = best_match(validator.iter_errors(value))
    except RecursionError:
        return "answer is JSON nested too deeply to check against expect_schema"
    except Unresolvable:  # config.py resolves every $ref from the root; one under an $id may not
        return "expect_schema has a $ref that points nowhere; fix the schema"
    if error is None:  # cannot happen: is_valid said there is one
        return "answer fails expect_schema"
    if error.validator == "required":
        return f"answer fails expect_schema: {error.message}"  # the name is the schema's
    where = "/".join(str(p) for p in error.absolute_schema_path)
    return f"answer fails expect_schema at #/{where}"


def _strip_fence(text: str) -> str:
    """JSON inside a ``` fence counts as JSON."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3]
        if stripped.startswith("json"):
            stripped = stripped[4:]
    return stripped


@dataclass(frozen=True, slots=True)
class _Compiled:
    validator: Validator | None
    regex: re.Pattern[str] | None


# Compiled checks by the identity of the feature's (frozen) config, which a reload replaces;
# the config object is kept with its entry so that its id cannot be reused while cached.
_COMPILED: dict[int, tuple[FeatureConfig, _Compiled]] = {}


def _compiled(feature: FeatureConfig) -> _Compiled:
    hit = _COMPILED.get(id(feature))
    if hit is not None and hit[0] is feature:
        return hit[1]
    if len(_COMPILED) >= 1024:  # reloads leave old configs behind; start afresh
        _COMPILED.clear()
    compiled = _Compiled(_validator(feature.expect_schema), _regex(feature.expect_regex))
    _COMPILED[id(feature)] = (feature, compiled)
    return compiled


def _validator(schema: dict[str, Any] | str | None) -> Validator | None:
    if not isinstance(schema, dict):  # None; a path is replaced by its schema at load time
        return None
    # Imported here: jsonschema takes ~90 ms to import, paid only by features with a schema.
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for
    from referencing import Registry

    # An empty registry: a reference outside the schema resolves to nothing, never a fetch.
    return validator_for(schema, default=Draft202012Validator)(schema, registry=Registry())


def _regex(pattern: str | None) -> re.Pattern[str] | None:
    return None if pattern is None else re.compile(pattern)
