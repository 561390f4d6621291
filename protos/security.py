"""Data-plane security between the router and the expert workers: a shared secret sent as call metadata (checked
by a server interceptor) and optional TLS. The health service stays open, so probes need no secret."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SECRET_METADATA_KEY = "x-expertmesh-secret"
PROTECTED_PREFIX = "/expertmesh.v1.ExpertService/"  # Dispatch, Info and whatever else the service gains
SECRET_ENV = "EXPERTMESH_GRPC_SECRET"  # where a standalone worker reads its secret (never argv)


@dataclass(frozen=True)
class DataPlaneSecurity:
    """The secret every ExpertService call must carry, and optional TLS material (PEM bytes).

    TLS: with cert + key the workers serve TLS and the router trusts that cert (self-signed is fine); adding
    a CA makes it mutual: both ends present cert/key and check the other's against the CA. `tls_server_name`
    is the name the router checks in the worker's cert (default: the address it dials, so the cert needs the
    nodes' IPs as SANs)."""

    secret: str = field(repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    tls_server_name: str | None = None

    def __post_init__(self):
        if not self.secret:
            raise ValueError("data-plane secret: empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("gRPC TLS: a certificate and its private key go together (--grpc-tls-cert and "
                             "--grpc-tls-key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("gRPC TLS: --grpc-tls-ca needs --grpc-tls-cert and --grpc-tls-key too")

    def __repr__(self) -> str:
        return f"DataPlaneSecurity(secret=<hidden>, tls={self.tls})"

    @staticmethod
    def generate(tls_cert: bytes | None = None, tls_key: bytes | None = None, tls_ca: bytes | None = None,
                 tls_server_name: str | None = None) -> DataPlaneSecurity:
        """A fresh random secret (one per deployment)."""
        return DataPlaneSecurity(secrets.token_urlsafe(32), tls_cert, tls_key, tls_ca, tls_server_name)

    @staticmethod
    def from_files(cert: str | None, key: str | None, ca: str | None,
                   server_name: str | None = None) -> DataPlaneSecurity:
        """generate() with TLS material read from PEM files (flags name them: errors say which one)."""
        def read(path: str | None, flag: str) -> bytes | None:
            if path is None:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None
            if b"-----BEGIN" not in data:
                raise ValueError(f"{flag}: {path} is not a PEM file")
            return data
        return DataPlaneSecurity.generate(read(cert, "--grpc-tls-cert"), read(key, "--grpc-tls-key"),
                                          read(ca, "--grpc-tls-ca"), server_name)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_METADATA_KEY, self.secret),)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca,
                                           require_client_auth=self.tls_ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        if self.tls_ca is None:  # trust the workers' own (self-signed) certificate
            return grpc.ssl_channel_credentials(root_certificates=self.tls_cert)
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls and self.tls_server_name \
            else []


def secure_channel(address: str, security: DataPlaneSecurity | None, options: list) -> grpc.Channel:
    """A (sync) gRPC channel to a worker: TLS when the security says so, else plaintext."""
    creds = security.channel_credentials() if security is not None else None
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, creds, options=[*options, *security.channel_options()])


def _unauthenticated(message: str) -> grpc.RpcMethodHandler:
    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.unary_unary_rpc_method_handler(deny)


class SecretInterceptor(grpc.aio.ServerInterceptor):
    """Rejects ExpertService calls whose metadata lacks the secret (UNAUTHENTICATED, constant-time compare);
    other services (health) pass."""

    def __init__(self, secret: str):
        self._secret = secret.encode()
        self._missing = _unauthenticated(f"missing {SECRET_METADATA_KEY} metadata (the deployment's secret)")
        self._wrong = _unauthenticated(f"wrong {SECRET_METADATA_KEY}")

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return await continuation(handler_call_details)
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == SECRET_METADATA_KEY),
                     None)
        if given is None:
            return self._missing
        if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._secret):
            return self._wrong
        return await continuation(handler_call_details)
