"""The client's closed set of errors: what a trainer may catch, and why each was raised."""

from __future__ import annotations


class RewardClientError(Exception):
    """Base of every error the reward client raises."""


class RequestFailed(RewardClientError):
    """The service answered with an error that a retry cannot fix (4xx but 429, or a 500)."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"HTTP {status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message


class ServiceUnavailable(RewardClientError):
    """The service stayed unreachable, overloaded or failing after every retry."""

    def __init__(self, message: str, *, attempts: int, status: int | None = None) -> None:
        super().__init__(f"{message} (after {attempts} attempt{'s' * (attempts != 1)})")
        self.attempts = attempts
        self.status = status


class ModelMismatch(RewardClientError):
    """The service serves another model than the fingerprint the client was pinned to."""

    def __init__(self, expected: str, served: str) -> None:
        super().__init__(
            f"the service serves model fingerprint {served}, expected {expected}: "
            "the reward model behind this URL changed"
        )
        self.expected = expected
        self.served = served


class ItemTooLarge(RewardClientError):
    """One item exceeds the service's advertised per-item limit; it was not sent."""

    def __init__(self, index: int, chars: int, limit: int) -> None:
        super().__init__(f"items[{index}]: {chars} characters, the service accepts {limit}")
        self.index = index
