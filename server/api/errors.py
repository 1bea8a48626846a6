"""Typed errors -> OpenAI-shaped JSON errors with the right HTTP status.

Every error response has the body {"error": {"message", "type", "param", "code"}} and the
request's `x-request-id` header. Unexpected exceptions become a 500 whose message names
only the request id; the traceback goes to the log under that id.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ConfigError
from server.engine.request import SamplingParamsError
from server.errors import AdapterError, GrammarError, PromptTooLongError, ReplicaLostError

log = logging.getLogger("loraplex.api")


class APIError(Exception):
    """An error meant for the client: status, OpenAI type, message, offending param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # always encodable
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "authentication_error", None, "invalid_api_key")


def forbidden(message: str) -> APIError:
    return APIError(403, message, "permission_error", None, "insufficient_permissions")


def queue_full(waiting: int, retry_after: int = 1) -> APIError:
    return APIError(429, f"server queue is full ({waiting} requests waiting); retry later",
                    "rate_limit_error", None, "queue_full", {"Retry-After": str(retry_after)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "service_unavailable")


def from_exception(e: Exception) -> APIError | None:
    """The client-facing error for a typed project error; None for anything unexpected."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, SamplingParamsError):
        return invalid(str(e), e.param)
    if isinstance(e, GrammarError):
        return invalid(str(e), "response_format", "invalid_grammar")
    if isinstance(e, PromptTooLongError):
        return APIError(413, str(e), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(e, AdapterError):
        return invalid(str(e), "lora_path", "invalid_adapter")
    if isinstance(e, ConfigError):
        return invalid(str(e))
    if isinstance(e, ReplicaLostError):
        return APIError(503, f"{e}; retry the request", "server_error", None, "replica_lost")
    return None


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def error_response(err: APIError, request_id: str) -> JSONResponse:
    headers = dict(err.headers)
    headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def internal_error(e: BaseException, request_id: str) -> APIError:
    log.error("request %s failed", request_id, exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"internal server error (request id {request_id})", "server_error",
                    None, "internal_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") in ("invalid_unicode", "too_long") and "where" in first.get("ctx", {}):
        return invalid(str(first.get("msg")), first["ctx"]["where"], first["type"])
    if first.get("type") == "json_invalid":
        return invalid(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                       None, "invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return invalid("request body must be a JSON object (content-type: application/json)", None, "invalid_body")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                    for e in errors[:5])
    return invalid(msg, param)


def install(app: FastAPI) -> None:
    """Register the handlers for APIError, validation and routing errors.

    Every other exception (typed project errors included) reaches app.RequestGate, which maps
    it with from_exception or answers 500 and logs the traceback under the request id.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), kind, None, None)
        return error_response(err, request_id_of(request))
