"""Domain errors of the router. Servicers raise these; one interceptor turns them into gRPC statuses.

They carry no gRPC types, so validation, admission and the worker pool stay testable on their own.
"""


class RouterError(Exception):
    """Base class: `message` is what the client reads, so it must say what to change."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RouterError):
    """A request field is malformed or out of range; `field` names it as the proto does."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhausted(RouterError):
    """The router's in-flight and queue bounds are full; the client should back off and retry."""


class Unavailable(RouterError):
    """No worker group can take the request, or the one serving it failed; safe to retry."""


class Unauthenticated(RouterError):
    """The API key is missing or wrong."""


class WorkerRefused(RouterError):
    """The worker refused a request (an `EngineResponse.error`); `code` is a grpc.StatusCode value."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
