"""Router errors as OpenAI-style JSON: `{"error": {"message", "type", "param", "code"}}`.

The domain errors of `router.errors` map to HTTP statuses here, as `router.interceptors` maps them to
gRPC codes; `status_name` gives the gRPC-style name the metrics use for both APIs, so one query
covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from router.errors import (
    InvalidArgument, ResourceExhausted, RouterError, Unauthenticated, Unavailable, WorkerRefused,
)
from router.interceptors import status_of


class HttpError(RouterError):
    """An error only the HTTP API has (an unknown model or path, a body too large)."""

    def __init__(self, status: int, message: str, error_type: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.param = param


def model_not_found(model: str, served: str) -> HttpError:
    return HttpError(404, f"the model {model!r} does not exist; this server serves {served!r} (GET /v1/models)",
                     "invalid_request_error", "model_not_found", "model")


@dataclass(frozen=True)
class ErrorReply:
    status: int
    body: dict
    status_name: str  # for metrics and logs: OK, INVALID_ARGUMENT, ... as the gRPC API says


_BY_TYPE = {
    InvalidArgument: (400, "invalid_request_error", "invalid_value"),
    Unauthenticated: (401, "authentication_error", "invalid_api_key"),
    ResourceExhausted: (429, "rate_limit_error", "queue_full"),
    Unavailable: (503, "service_unavailable", "no_worker_ready"),
}
_HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "worker_unavailable"),
}
_NAME_OF_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def body(message: str, error_type: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def reply_for(error: RouterError) -> ErrorReply:
    if isinstance(error, HttpError):
        return ErrorReply(error.status, body(error.message, error.error_type, error.code, error.param),
                          _NAME_OF_HTTP.get(error.status, "INTERNAL"))
    if isinstance(error, WorkerRefused):
        code = status_of(error)
        status, error_type, short = _HTTP_OF_GRPC.get(code, (500, "internal_error", "worker_error"))
        return ErrorReply(status, body(error.message, error_type, short), code.name)
    status, error_type, short = _BY_TYPE.get(type(error), (500, "internal_error", "internal_error"))
    param = error.field if isinstance(error, InvalidArgument) else None
    return ErrorReply(status, body(error.message, error_type, short, param), status_of(error).name)


def internal_reply(request_id: str) -> ErrorReply:
    message = f"internal error in the router (request id {request_id}); the router log has the details"
    return ErrorReply(500, body(message, "internal_error", "internal_error"), "INTERNAL")
