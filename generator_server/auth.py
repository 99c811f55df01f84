"""Bearer-token check for every endpoint except /health."""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request


def require_api_key(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <--api-key>`` (no key set: open)."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send 'Authorization: Bearer KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )
