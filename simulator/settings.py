"""What the simulator does: its settings, given as flags at start (__main__.py) and changed
while it runs by POST /_sim/config (a ConfigChange), each checked with a message that says
what the field accepts.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

from simulator.faults import check_fault_rates
from simulator.limits import JSON_FORM, STANDARD, LimitTable, OtpmMode, check_table
from simulator.pricing import PRICES
from simulator.truth import DEFAULT_SKILLS, Mode, Quality

Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
MAX_SKILL = 20.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What the simulator does; POST /_sim/config swaps in a changed copy while it runs."""

    latency_ms: int = 0
    fault_rate: dict[str, float] = {}  # fault ("429") -> share of requests; never mutated
    seed: int = 0
    # "*" or a model id -> (RPM, ITPM, OTPM); has a "*" row; never mutated
    limits: LimitTable = msgspec.field(default_factory=lambda: {"*": STANDARD})
    otpm_mode: OtpmMode = "actual"
    batch_seconds: float = 1.0  # how long a batch takes to process, on the simulator's clock
    batch_error_rate: float = 0.0  # share of batch items answered `errored`
    batch_expiry_rate: float = 0.0  # share of batch items left `expired`
    # Every Messages request and batch create gets the spend-cap 429 while this is on.
    spend_cap_reached: bool = False
    slow_rate: float = 0.0  # share of /v1/messages requests that take slow_ms longer
    slow_ms: int = 5000
    # The ground truth (truth.py): off answers as before it, every answer right.
    quality: Mode = "off"
    signal: float = 0.5
    skills: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_SKILLS))
    json_visible: float = 0.6
    classifier_accuracy: float = 0.8

    def truth(self) -> Quality:
        """The settings the ground truth depends on."""
        return Quality(
            mode=self.quality, signal=self.signal, skills=self.skills,
            json_visible=self.json_visible, classifier_accuracy=self.classifier_accuracy,
            seed=self.seed,
        )  # fmt: skip


DEFAULT_SETTINGS = Settings()
# Settings added after /_sim/config's first shape: its answer shows them only once changed,
# so a client comparing the whole answer with the older fields still matches.
_SHOWN_WHEN_CHANGED = (
    "batch_seconds", "batch_error_rate", "batch_expiry_rate", "spend_cap_reached", "slow_rate",
    "slow_ms", "quality", "signal", "skills", "json_visible", "classifier_accuracy",
)  # fmt: skip


def shown_settings(settings: Settings) -> dict[str, Any]:
    """Settings as GET and POST /_sim/config answer them."""
    shown: dict[str, Any] = msgspec.to_builtins(settings)
    for name in _SHOWN_WHEN_CHANGED:
        if getattr(settings, name) == getattr(DEFAULT_SETTINGS, name):
            del shown[name]
    return shown


class ConfigChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """POST /_sim/config: the settings to change; `fault_rate` replaces the whole table,
    `seed` restarts the fault dice, `limits` replaces the whole limit table and refills
    every bucket at its new capacity, and `skills` replaces the table of changed skills
    (the models it does not name have their default skill)."""

    latency_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    fault_rate: dict[str, float] | None = None
    seed: int | None = None
    limits: dict[str, list[int]] | None = None
    otpm_mode: OtpmMode | None = None
    batch_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None
    batch_error_rate: Rate | None = None
    batch_expiry_rate: Rate | None = None
    spend_cap_reached: bool | None = None
    slow_rate: Rate | None = None
    slow_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    quality: Mode | None = None
    signal: Rate | None = None
    skills: dict[str, float] | None = None
    json_visible: Rate | None = None
    classifier_accuracy: Rate | None = None


decode_change = msgspec.json.Decoder(ConfigChange).decode
# What a field accepts, added to msgspec's bare "Expected ... at `$.limits[...]`" errors.
_FORMS = {
    "$.limits": f"limits is {JSON_FORM}",
    "$.otpm_mode": 'otpm_mode is "actual" (output counted as generated, the 2026 docs) or '
    '"max_tokens" (max_tokens reserved at the start, the 2025 docs)',
    "$.quality": 'quality is "on" (answers right or wrong by the ground truth) or "off" '
    "(every answer right)",
    "$.skills": 'skills is {MODEL: SKILL, ...}, e.g. {"claude-haiku-5-5": 3.0}',
}


def apply_change(settings: Settings, change: ConfigChange) -> Settings:
    """`settings` with the change applied; raises ValueError for bad fault rates, limits or
    skills."""
    given = {
        f: getattr(change, f) for f in change.__struct_fields__ if getattr(change, f) is not None
    }
    if change.fault_rate is not None:
        given["fault_rate"] = check_fault_rates(change.fault_rate)
    if change.limits is not None:
        given["limits"] = check_table(change.limits)
    if change.skills is not None:
        given["skills"] = check_skills(change.skills)
    changed = msgspec.structs.replace(settings, **given)
    check_batch_rates(changed.batch_error_rate, changed.batch_expiry_rate)
    return changed


def check_skills(skills: dict[str, float]) -> dict[str, float]:
    """The whole skills table: the defaults with `skills` over them; raises ValueError for an
    unknown model or a skill outside 0..MAX_SKILL."""
    for model, skill in skills.items():
        if model not in PRICES:
            raise ValueError(
                f"skills: {model!r} is not a model the simulator serves; models: "
                f"{', '.join(PRICES)}"
            )
        if not (math.isfinite(skill) and 0 <= skill <= MAX_SKILL):
            raise ValueError(
                f"skills: {skill!r} for {model} is not a skill from 0 to {MAX_SKILL:g} (on the "
                "difficulty scale, 0 to 10)"
            )
    return {**DEFAULT_SKILLS, **skills}


def check_batch_rates(error_rate: float, expiry_rate: float) -> None:
    """Raises ValueError unless the two batch-item rates are 0..1 and sum to at most 1."""
    for name, rate in (("batch_error_rate", error_rate), ("batch_expiry_rate", expiry_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} is {rate!r}; it must be between 0 and 1")
    if error_rate + expiry_rate > 1:
        raise ValueError(
            f"batch_error_rate + batch_expiry_rate is {error_rate + expiry_rate:g}, more than 1"
        )


def config_error(exc: Exception) -> str:
    """The 400 message of a refused POST /_sim/config: the problem, what the field accepts
    (where msgspec's message names only a path), and the fields there are."""
    text = str(exc)
    hint = next((form for path, form in _FORMS.items() if path in text), None)
    allowed = ", ".join(f.name for f in msgspec.structs.fields(ConfigChange))
    return (
        f"POST /_sim/config: {text}{f'; {hint}' if hint else ''}. "
        f"Send a JSON object with any of: {allowed}."
    )
