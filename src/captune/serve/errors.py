"""The caption server's errors: `ApiError` (a status, a code and a message a user can act on) and the handlers that
answer every error, FastAPI's and unexpected ones included, as `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import logging
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from captune.serve.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200: status, a code and a message a user can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        err = cast(ApiError, exc)
        return _error_response(err.status, err.code, err.message, err.headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        err = cast(HTTPException, exc)
        return _error_response(err.status_code, f"http_{err.status_code}", str(err.detail), dict(err.headers or {}))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _error_response(500, "internal_error", "internal server error; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _validation_message(err: ValidationError) -> str:
    """`num_beams: Input should be less than or equal to 10; ...` without pydantic's URLs."""
    return "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())
