"""Cross-cutting concerns of every RPC: domain errors -> gRPC statuses, and the optional API key.

Servicers raise `router.errors` exceptions and never touch status codes; `ErrorInterceptor` is the
one place that maps them, logs them with the request id, and turns anything unexpected into INTERNAL
with a message that points at the router log (the client never sees a traceback, and the router
never dies on a request).
"""

from __future__ import annotations

import inspect
import logging

import grpc

from router.api_key import ApiKey
from router.errors import (
    InvalidArgument, ResourceExhausted, RouterError, Unauthenticated, Unavailable, WorkerRefused,
)
from router.request_log import current_request_id

logger = logging.getLogger("nextserve.router")

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: RouterError) -> grpc.StatusCode:
    if isinstance(error, WorkerRefused):
        code = _STATUS_BY_VALUE.get(error.code, grpc.StatusCode.INTERNAL)
        return code if code != grpc.StatusCode.OK else grpc.StatusCode.INTERNAL
    return STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL)


def _rebuild(handler: grpc.RpcMethodHandler, unary_unary=None, unary_stream=None) -> grpc.RpcMethodHandler:
    if unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                handler.response_serializer)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # reflection's stream-stream RPC needs no mapping
        method = handler_call_details.method
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await behavior(request, context)
                except Exception as e:
                    await _abort_with(context, method, e)

            return _rebuild(handler, unary_unary=unary_unary)
        behavior = handler.unary_stream
        if not inspect.isasyncgenfunction(behavior):
            # A streaming handler that writes with `context.write` (health's Watch) stays a coroutine.
            async def unary_stream_writer(request, context):
                try:
                    await behavior(request, context)
                except Exception as e:
                    await _abort_with(context, method, e)

            return _rebuild(handler, unary_stream=unary_stream_writer)

        async def unary_stream(request, context):
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as e:
                await _abort_with(context, method, e)

        return _rebuild(handler, unary_stream=unary_stream)


async def _abort_with(context, method: str, error: Exception) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error  # a handler already chose the status
    request_id = current_request_id.get()
    if isinstance(error, RouterError):
        code = status_of(error)
        level = logging.WARNING if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL) else logging.INFO
        logger.log(level, "request %s: %s -> %s: %s", request_id, method, code.name, error.message)
        await context.abort(code, error.message)
    logger.exception("request %s: %s failed with an unexpected error", request_id, method)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in the router (request id {request_id}); the router log has the details")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer KEY` or `x-api-key: KEY` on the protected services. Health
    checks and reflection stay open, so orchestrators and grpcurl need no secret."""

    def __init__(self, api_key: str, protected_services: tuple[str, ...]):
        self._api_key = ApiKey(api_key)
        self._prefixes = tuple(f"/{service}/" for service in protected_services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        reason = self._api_key.refusal(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        if handler.unary_unary is not None:
            async def deny_unary(request, context):
                raise Unauthenticated(reason)

            return _rebuild(handler, unary_unary=deny_unary)

        async def deny_stream(request, context):
            raise Unauthenticated(reason)
            yield  # makes this an async generator, like the handler it replaces

        return _rebuild(handler, unary_stream=deny_stream)
