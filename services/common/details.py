"""The last resort that keeps every status's details under gRPC's metadata limit.

A status's details travel in a trailer (grpc-message); past the 8 KiB soft limit the caller gets
RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit") instead of the status the server
meant. Messages quote caller values through tandem.echo.shown already; `DetailsCapInterceptor`
makes sure that no message, today's or a future one, can exceed the limit: whatever a handler (or
an interceptor inside this one, e.g. the token check) gives ``context.abort`` or
``context.set_details`` is cut to tandem.echo.MAX_DETAILS_BYTES, and so is the "Unexpected ..."
text grpc would send for an exception a handler let escape. Register it first (outermost).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc

from tandem.echo import capped

log = logging.getLogger("tandem.grpc")


class CappedContext:
    """A servicer context whose abort and set_details cut the details; the rest is the context's."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._code: grpc.StatusCode | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        await self._context.abort(code, capped(details), trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(capped(details))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    async def escaped(self, method: str, exc: Exception) -> None:
        """An exception the handler let escape: grpc's own status for it, its text cut."""
        text = f"Unexpected {type(exc)}: {exc}"
        if capped(text) == text:
            raise exc  # grpc says it (and logs the traceback) as it always has
        log.error("unexpected %s raised by %s", type(exc).__name__, method, exc_info=exc)
        await self._context.abort(self._code or grpc.StatusCode.UNKNOWN, capped(text))


class DetailsCapInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # no Tandem RPC streams requests (reflection does; it echoes nothing)
        method = handler_call_details.method
        if handler.response_streaming:
            inner_stream = handler.unary_stream
            if inspect.isasyncgenfunction(inner_stream):
                async def generator(request, context):
                    capped_context = CappedContext(context)
                    try:
                        async for response in inner_stream(request, capped_context):
                            yield response
                    except (grpc.aio.AbortError, grpc.aio.UsageError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - re-raised or answered, cut
                        await capped_context.escaped(method, exc)
                behaviour = generator
            else:  # a stream written with context.write: awaited like a unary handler
                behaviour = _awaited(inner_stream, method)
            return grpc.unary_stream_rpc_method_handler(
                behaviour, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            _awaited(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)


def _awaited(inner, method: str):
    """A coroutine handler run on a CappedContext, an escaping exception answered with cut details."""
    async def behaviour(request, context):
        capped_context = CappedContext(context)
        try:
            return await inner(request, capped_context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised or answered, cut
            await capped_context.escaped(method, exc)
    return behaviour
