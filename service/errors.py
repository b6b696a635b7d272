"""Errors sent as OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lm.errors import LMError


class APIError(Exception):
    """An error to send as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers

    @classmethod
    def bad_input(cls, exc: LMError) -> APIError:
        """A 400 for a library error about the request, naming the parameter it carries."""
        message = f"{exc.param}: {exc}" if exc.param else str(exc)
        return cls(400, message, param=exc.param)


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or FastAPI's, leaves as an OpenAI error body; never a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(LMError)
    async def _lm_error(request: Request, exc: LMError):
        error = APIError.bad_input(exc)
        return error_response(error.status, error.message, param=error.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object"
        else:
            where = ".".join(loc) if loc else "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "request_too_large",
        }.get(exc.status_code)
        return error_response(
            exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: never leak a traceback
        return error_response(500, "internal error", type_="server_error")
