"""Undecodable requests answer INVALID_ARGUMENT, not UNKNOWN.

grpc.aio turns an exception raised by a method's request deserializer into UNKNOWN "Unexpected
DecodeError". `DecodeErrorInterceptor` wraps the deserializer so that a message that does not
parse (garbage, truncated, invalid UTF-8 in a string field) becomes an `Undecodable` marker, and
the method's behaviour answers it with INVALID_ARGUMENT before the servicer sees it. Register it
last, so that authentication (the token interceptor) still answers first.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that could not be parsed."""

    reason: str


def _safe(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - every parse failure is the caller's bad bytes
            return Undecodable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return deserialize


def _message(method: str, bad: Undecodable) -> str:
    return f"request: the message could not be decoded as {method}'s request ({bad.reason})"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # no Tandem RPC streams requests (reflection does; it parses its own)
        method = handler_call_details.method

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
                async for response in inner_stream(request, context):
                    yield response

            async def writer(request, context):  # a handler that writes with context.write (health Watch)
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
                return await inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                stream if inspect.isasyncgenfunction(inner_stream) else writer,
                _safe(handler.request_deserializer), handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, _safe(handler.request_deserializer), handler.response_serializer)
