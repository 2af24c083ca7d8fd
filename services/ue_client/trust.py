"""Which edges get the user's credentials.

A bearer token is a password: the CLI sends it to an edge only over TLS that verifies the edge's
certificate (the channel's roots are --tls-ca), or to an address the user or operator named
themselves (--edge, or the comma-separated TANDEM_TRUSTED_EDGES). An edge that only a scheduler's
plan named, reached in plaintext, gets the request without the token: a forged plan (or a fake
edge registered with the scheduler) must not harvest it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TRUSTED_EDGES_ENV = "TANDEM_TRUSTED_EDGES"

Security = TypeVar("Security", bound="DataclassInstance")  # services.common.security.ClientSecurity (kept import-free)


def trusted_edges(*named: str | None, env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The addresses named by the user (e.g. --edge) plus TANDEM_TRUSTED_EDGES."""
    listed = env.get(TRUSTED_EDGES_ENV, "").split(",")
    return frozenset(address.strip() for address in (*named, *listed) if address and address.strip())


def credentials_for_edge(address: str | None, security: Security | None,
                         trusted: frozenset[str]) -> tuple[Security | None, str | None]:
    """The security to reach `address` with, and a note for the user when the token is withheld."""
    token = getattr(security, "token", None)
    if security is None or not address or not token or getattr(security, "tls", False) or address in trusted:
        return security, None
    note = (f"edge {address} came from the scheduler's plan over plaintext and is not a trusted edge "
            f"(--edge, {TRUSTED_EDGES_ENV}): your token was not sent to it")
    return dataclasses.replace(security, token=None), note
