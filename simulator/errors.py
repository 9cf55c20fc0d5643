"""The API's error statuses and their `error.type` (anthropic-api.md §2.1).

A request check raises ApiError; the route turns it into the API's error body (§2.2), so the
SDK picks the same exception class it would pick for the real API.
"""

from __future__ import annotations

from typing import Literal

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]

ERROR_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """A request the API answers with an error: HTTP status, its `error.type`, a message and,
    for some causes, an `error.details.error_code` (the SDK picks a subclass by it, §2.2)."""

    def __init__(self, status: int, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        # The API uses invalid_request_error for any 4xx its table does not list.
        self.error_type: ErrorType = ERROR_TYPES.get(status, "invalid_request_error")
        self.message = message
        self.error_code = error_code
