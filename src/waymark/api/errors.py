"""Mapping Waymark's errors to HTTP answers: status, code, message, and each field's problem."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from waymark.api.responses import JSONAnswer
from waymark.core.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LimitExceeded,
    NotFound,
    StoreBusy,
    Unauthenticated,
    WaymarkError,
)

STATUS: dict[type[WaymarkError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    LimitExceeded: 413,
    StoreBusy: 503,
}


def error_body(exc: WaymarkError) -> dict[str, Any]:
    """The JSON body of an error answer."""
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, InvalidInput):
        body["errors"] = [{"path": i.path, "reason": i.reason, "code": i.code} for i in exc.issues]
    return {"error": body}


async def waymark_error_handler(_request: Request, exc: Exception) -> JSONAnswer:
    assert isinstance(exc, WaymarkError)
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
    headers = {"WWW-Authenticate": 'Basic realm="waymark"'} if status == 401 else None
    return JSONAnswer(error_body(exc), status_code=status, headers=headers)


async def validation_error_handler(_request: Request, exc: Exception) -> JSONAnswer:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "path": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
            "reason": err.get("msg", "invalid"),
            "code": "invalid",
        }
        for err in exc.errors()
    ]
    return JSONAnswer(
        {"error": {"code": "invalid_input", "message": "invalid request", "errors": errors}},
        status_code=400,
    )


async def data_error_handler(_request: Request, exc: Exception) -> JSONAnswer:
    """A value the database cannot take or compare (e.g. a NUL character): the input's fault."""
    reason = str(getattr(exc, "orig", exc)).splitlines()[0]
    return JSONAnswer(
        {
            "error": {
                "code": "invalid_input",
                "message": f"a value in the request cannot be stored or compared: {reason}",
                "errors": [],
            }
        },
        status_code=400,
    )
