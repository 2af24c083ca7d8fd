"""TLS / mTLS and bearer tokens for every Tandem connection, in one place.

Servers: ``--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]`` (a client CA turns on mTLS:
client certificates signed by it are required). Clients: ``--tls-ca PEM [--tls-cert PEM
--tls-key PEM]`` and ``--token``. Without them everything is plaintext, as before.
A file that is missing or not PEM raises SecurityError naming the flag (one line for the user).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from services.common.envargs import EnvValue

T = TypeVar("T")


class EnvLookup(Protocol):
    """Each service's ``_env(name, default)``: the variable's text when set (an EnvValue: give it to
    argparse unconverted, as a flag's default, so that an EnvParser checks it like the flag and
    names the variable), else ``default``."""

    def __call__(self, name: str, default: T, /) -> str | T: ...


def env_lookup(service: str = "") -> EnvLookup:
    """The ``TANDEM_<SERVICE>_<NAME>`` lookup every flag of a server falls back to (``TANDEM_<NAME>``
    for commands that are not one service: the CLI, the healthcheck)."""
    prefix = f"TANDEM_{service.upper()}_" if service else "TANDEM_"

    def lookup(name: str, default: T, /) -> str | T:
        variable = prefix + name.upper()
        text = os.environ.get(variable)
        return default if text is None else EnvValue(text, variable)

    return lookup


tandem_env = env_lookup()


def env_flag(env: EnvLookup, name: str, default: bool) -> bool:
    """An on/off flag's default from the environment: the variable turns a flag that is on by
    default off only when it says 0/false/no, and one that is off on only when it says 1/true/yes."""
    value = str(env(name, "")).lower()
    return value not in ("0", "false", "no") if default else value in ("1", "true", "yes")


class SecurityError(ValueError):
    """A bad security flag or file; the message starts with the flag."""


def read_pem(path: str | Path, flag: str, marker: str) -> bytes:
    """The file's bytes; checked for a PEM block containing ``marker`` (CERTIFICATE, PRIVATE KEY)
    so that a swapped or empty file fails here, not as an opaque handshake error later."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise SecurityError(f"{flag}: {str(path)!r} is not a PEM {marker.lower()}")
    return data


@dataclass(frozen=True)
class ServerTls:
    cert: bytes
    key: bytes
    client_ca: bytes | None  # set → mTLS

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)


def add_server_tls_args(parser: argparse.ArgumentParser, env: EnvLookup) -> None:
    parser.add_argument("--tls-cert", default=env("tls_cert", None), metavar="PEM", help="serve TLS with this certificate")
    parser.add_argument("--tls-key", default=env("tls_key", None), metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=env("tls_client_ca", None), metavar="PEM",
                        help="require client certificates signed by this CA (mTLS)")


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """None when no TLS flag is given (plaintext)."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SecurityError("--tls-cert and --tls-key go together" if args.tls_cert or args.tls_key
                            else "--tls-client-ca needs --tls-cert and --tls-key")
    return ServerTls(
        cert=read_pem(args.tls_cert, "--tls-cert", "CERTIFICATE"),
        key=read_pem(args.tls_key, "--tls-key", "PRIVATE KEY"),
        client_ca=read_pem(args.tls_client_ca, "--tls-client-ca", "CERTIFICATE") if args.tls_client_ca else None,
    )


class PortInUse(OSError):
    """A port a server needs is taken; the message names the flag and the port."""


def add_port(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Binds `address`; PortInUse (one line) instead of gRPC's RuntimeError when it cannot."""
    try:
        port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials())
    except RuntimeError:
        port = 0
    if not port:
        raise PortInUse(f"--port: cannot listen on {address} (already in use?)")
    return port


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a server: TLS roots (+ its own certificate for mTLS) and a token."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


INSECURE = ClientSecurity()


def add_client_args(parser: argparse.ArgumentParser, env: EnvLookup, prefix: str = "", what: str = "servers") -> None:
    """``--{prefix}tls-ca``, ``--{prefix}tls-cert``, ``--{prefix}tls-key``, ``--{prefix}token``."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}tls-ca", default=env(f"{dest}tls_ca", None), metavar="PEM",
                        help=f"connect to {what} over TLS, trusting this CA")
    parser.add_argument(f"--{prefix}tls-cert", default=env(f"{dest}tls_cert", None), metavar="PEM",
                        help="client certificate for mTLS (with --tls-ca)")
    parser.add_argument(f"--{prefix}tls-key", default=env(f"{dest}tls_key", None), metavar="PEM",
                        help="private key of the client certificate")
    parser.add_argument(f"--{prefix}token", default=env(f"{dest}token", None), metavar="TOKEN",
                        help=f"bearer token sent to {what}")


def client_security(args: argparse.Namespace, prefix: str = "") -> ClientSecurity:
    dest = prefix.replace("-", "_")
    ca, cert, key, token = (getattr(args, f"{dest}{name}") for name in ("tls_ca", "tls_cert", "tls_key", "token"))
    flag = f"--{prefix}"
    if (cert or key) and not (cert and key):
        raise SecurityError(f"{flag}tls-cert and {flag}tls-key go together")
    if cert and not ca:
        raise SecurityError(f"{flag}tls-cert needs {flag}tls-ca (the CA that signed the server's certificate)")
    return ClientSecurity(
        ca=read_pem(ca, f"{flag}tls-ca", "CERTIFICATE") if ca else None,
        cert=read_pem(cert, f"{flag}tls-cert", "CERTIFICATE") if cert else None,
        key=read_pem(key, f"{flag}tls-key", "PRIVATE KEY") if key else None,
        token=token or None,
    )


def aio_channel(address: str, security: ClientSecurity | None, options=None) -> grpc.aio.Channel:
    if security is not None and security.tls:
        return grpc.aio.secure_channel(address, security.credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)


def sync_channel(address: str, security: ClientSecurity | None, options=None) -> grpc.Channel:
    if security is not None and security.tls:
        return grpc.secure_channel(address, security.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


def call_metadata(security: ClientSecurity | None):
    return security.metadata() if security is not None else None
