"""A tiny gRPC health probe (grpc.health.v1) for container HEALTHCHECKs and scripts.

    python -m services.cli.healthcheck HOST:PORT [SERVICE] [--timeout SECONDS] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]

Exits 0 only when the server answers SERVING for SERVICE ("" = the server as a whole), 1 when it
answers anything else or cannot be reached within the timeout, 2 on bad usage. Prints one line.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.addresses import AddressError, check_address
from services.common.envargs import EnvParser
from services.common.security import ClientSecurity, SecurityError, add_client_args, client_security, sync_channel, tandem_env

DEFAULT_TIMEOUT = 3.0


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT,
          security: ClientSecurity | None = None) -> tuple[bool, str]:
    """Asks `address` once for the health of `service`; returns (serving, one-line message)."""
    what = f"{address} ({service})" if service else address
    with sync_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"UNKNOWN_SERVICE: {what} does not know service {service!r}"
            reason = code.name if code is not None else "ERROR"
            detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
            return False, f"{reason}: {what} did not answer ({detail or 'no detail'})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{status}: {what}"


def main(argv: list[str] | None = None) -> int:
    parser = EnvParser(prog="python -m services.cli.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("service", nargs="?", default="", help='service name (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds ({DEFAULT_TIMEOUT:g})")
    add_client_args(parser, tandem_env, what="the server")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout: must be > 0")
    try:
        check_address(args.address, "address")
    except AddressError as exc:  # gRPC would read "127.0.0.1" as port 443 and report it unreachable
        print(f"error: {exc}", flush=True)
        return 2
    try:
        security = client_security(args)
    except SecurityError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    serving, message = check(args.address, args.service, args.timeout, security)
    print(message, flush=True)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
