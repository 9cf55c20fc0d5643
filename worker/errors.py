"""The exception tree. Every message names the thing, the bad value, what is allowed and what to do.

    TokenqError
     ├── ConfigError            config.toml or a command-line value is wrong; the process stops
     └── JobRejected            this job can never succeed: it goes to the dead-letter stream
          ├── MalformedJob      fields missing or of the wrong type, `request` not valid
          ├── UnknownFeature    `feature` is not defined in config.toml
          ├── TooLarge          the stream entry is over queue.max_entry_bytes
          ├── DeadlineExceeded  `deadline_ms` passed before the job could run
          ├── InvalidRequest    the API answered 4xx for reasons in the request itself
          ├── AttemptsExhausted the job failed queue.max_attempts times
          ├── BudgetExceeded    a spend or request cap with budget_policy "reject"
          ├── CircuitOpen       a breaker is open and the feature's breaker_policy is "fail"
          └── DuplicateId       the job's `id` was used by a different job (tenant, feature,
                                request) within queue.result_ttl_s

Errors of the Anthropic SDK are not wrapped: the worker catches `anthropic.RateLimitError`,
`anthropic.InternalServerError` and `anthropic.APIConnectionError` by name.
"""

from __future__ import annotations

from worker.contract import ErrorType


class TokenqError(Exception):
    """Base of every error tokenq raises on purpose."""


class ConfigError(TokenqError):
    """config.toml, or a value given on the command line, is invalid."""


class JobRejected(TokenqError):
    """The job can never succeed as submitted; it is dead-lettered with `error_type`."""

    error_type: ErrorType = "malformed_job"

    def __init__(self, message: str, *, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts  # API calls made for the job before it was rejected


class MalformedJob(JobRejected):
    error_type: ErrorType = "malformed_job"


class UnknownFeature(JobRejected):
    error_type: ErrorType = "unknown_feature"


class TooLarge(JobRejected):
    error_type: ErrorType = "too_large"


class DeadlineExceeded(JobRejected):
    error_type: ErrorType = "deadline_exceeded"


class InvalidRequest(JobRejected):
    error_type: ErrorType = "invalid_request"


class AttemptsExhausted(JobRejected):
    error_type: ErrorType = "max_attempts"


class BudgetExceeded(JobRejected):
    error_type: ErrorType = "budget_exceeded"


class CircuitOpen(JobRejected):
    error_type: ErrorType = "circuit_open"


class DuplicateId(JobRejected):
    error_type: ErrorType = "duplicate_id"
