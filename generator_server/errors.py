"""The one exception type the service raises for an expected failure; the app turns it into a JSON answer."""

from __future__ import annotations


class ApiError(Exception):
    """An answer other than success: ``status_code`` and a message that says what was wrong."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
