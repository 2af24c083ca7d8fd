"""Per-user bearer tokens (``--tokens FILE``: JSON {"token": "user-name", ...}).

Every RPC except health and reflection needs ``authorization: Bearer TOKEN``: a missing or
unknown token is UNAUTHENTICATED; a request naming another user (its ``user``,
``personalized_user`` or ``user_id`` field, or one of a message it carries: whose LoRA / identity
it uses) is PERMISSION_DENIED.
`check_access` is the whole decision, pure; `TokenInterceptor` only applies it to each call.
"""

from __future__ import annotations

import argparse
import contextvars
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.security import EnvLookup, SecurityError
from tandem.echo import shown

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
USER_FIELDS = ("user", "personalized_user", "user_id")
# The token's user for the call being served (None: tokens off, or an exempt method). Set by the
# interceptor in the task that then runs the handler, so a servicer can check ownership.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("tandem_token_user", default=None)


def caller_user() -> str | None:
    """The authenticated user of the call being served; None when tokens are off."""
    return _CALLER.get()


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str


def load_tokens(path: str | Path, flag: str = "--tokens") -> dict[str, str]:
    try:
        table = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SecurityError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise SecurityError(f"{flag}: {str(path)!r} is not JSON: {exc}") from exc
    if not isinstance(table, dict) or not table or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in table.items()):
        raise SecurityError(f'{flag}: {str(path)!r} must be a non-empty JSON object {{"token": "user-name", ...}}')
    return table


def add_tokens_arg(parser: argparse.ArgumentParser, env: EnvLookup) -> None:
    parser.add_argument("--tokens", default=env("tokens", None), metavar="FILE",
                        help='require per-user bearer tokens: JSON {"token": "user-name", ...}')


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip() or None
    return None


def token_user(tokens: Mapping[str, str], token: str | None) -> str | None:
    """The token's user; compared in constant time so response timing does not leak tokens."""
    found = None
    for known, user in tokens.items():
        if token is not None and hmac.compare_digest(known.encode(), token.encode()):
            found = user
    return found


def claimed_users(request, depth: int = 2) -> list[str]:
    """The identities a request acts as: the non-empty user fields it has, and those of the
    messages it carries (the device service's request holds an edge GenerateRequest and its user)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", {})
    users = [getattr(request, name) for name in USER_FIELDS if name in fields and getattr(request, name)]
    for field in getattr(descriptor, "fields", ()) if depth > 0 else ():
        if field.message_type is not None and not field.is_repeated and request.HasField(field.name):
            users += claimed_users(getattr(request, field.name), depth - 1)
    return users


def check_access(tokens: Mapping[str, str], token: str | None, claimed: Iterable[str]) -> Denial | None:
    """None when the call may go on."""
    if token is None:
        return Denial(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer TOKEN' metadata")
    user = token_user(tokens, token)
    if user is None:
        return Denial(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
    for other in claimed:
        if other != user:
            return Denial(grpc.StatusCode.PERMISSION_DENIED, f"user: the token is {shown(user)}'s, not {shown(other)}'s")
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each non-exempt unary-request handler with `check_access` on its request.
    ``exempt_methods``: full method names that check their own credential (the scheduler's edge
    heartbeat takes an edge credential, never a user token)."""

    def __init__(self, tokens: Mapping[str, str], exempt_methods: Iterable[str] = ()):
        self.tokens = dict(tokens)
        self.exempt_methods = frozenset(exempt_methods)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or method.startswith(EXEMPT_PREFIXES) \
                or method in self.exempt_methods:
            return handler  # no Tandem RPC streams requests
        token = bearer_token(handler_call_details.invocation_metadata)
        tokens = self.tokens

        async def enforce(request, context) -> None:
            denial = check_access(tokens, token, claimed_users(request))
            if denial is not None:
                await context.abort(denial.code, denial.message)
            _CALLER.set(token_user(tokens, token))

        if handler.response_streaming:
            inner = handler.unary_stream

            async def checked_stream(request, context):
                await enforce(request, context)
                async for response in inner(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                checked_stream, handler.request_deserializer, handler.response_serializer)
        inner_unary = handler.unary_unary

        async def checked_unary(request, context):
            await enforce(request, context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked_unary, handler.request_deserializer, handler.response_serializer)


def interceptors(args: argparse.Namespace, exempt_methods: Iterable[str] = ()) -> list[grpc.aio.ServerInterceptor]:
    """[] unless --tokens is given."""
    return [TokenInterceptor(load_tokens(args.tokens), exempt_methods)] if args.tokens else []
