"""TLS of the embedded broker as nsqd configures it (``nsqd.go`` buildTLSConfig, ``client_v2.go`` Stats).

The server context comes from ``--tls-cert`` and ``--tls-key``, with
``--tls-min-version`` and ``--tls-client-auth-policy``: none asks the client
for no certificate, ``require-verify`` requires one signed by a CA of
``--tls-root-ca-file`` (the system's CAs without it). nsqd's ``require``
takes any certificate unverified, which Python's ``ssl`` cannot: here it is
verified as ``require-verify`` is. The client context (for an https auth
server) trusts ``--tls-root-ca-file`` when given, else the system's CAs.
"""

from __future__ import annotations

import ssl
import warnings
from typing import Any

# nsqd's --tls-min-version values (v1.3.0 has no ssl3.0 any more).
TLS_VERSIONS = {
    "tls1.0": ssl.TLSVersion.TLSv1,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH_POLICIES = ("", "require", "require-verify")

# /stats' tls_version, as Go names the versions.
_GO_VERSIONS = {"TLSv1": "TLS1.0", "TLSv1.1": "TLS1.1", "TLSv1.2": "TLS1.2", "TLSv1.3": "TLS1.3"}
# /stats' tls_cipher_suite: the suites nsqd v1.3.0 names, by IANA number; it reports others as "Unknown <number>".
_GO_CIPHER_SUITES = {
    0x0005: "TLS_RSA_WITH_RC4_128_SHA",
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0xC007: "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC011: "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    0xC012: "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
}


def _set_minimum_version(context: ssl.SSLContext, min_version: str) -> None:
    with warnings.catch_warnings():  # nsqd's default, TLS 1.0, is deprecated in Python
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = TLS_VERSIONS[min_version]


def server_context(
    cert: str, key: str, client_auth_policy: str, root_ca_file: str, min_version: str
) -> ssl.SSLContext | None:
    """The context TLS clients are served with; None without a certificate and key (TLS is not offered).

    ``ValueError`` (nsqd's "failed to build TLS config") when the files do not load.
    """
    if not cert and not key:
        return None
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        _set_minimum_version(context, min_version)
        if client_auth_policy:
            context.verify_mode = ssl.CERT_REQUIRED
            if root_ca_file:
                context.load_verify_locations(root_ca_file)
            else:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise ValueError(f"failed to build TLS config - {error}") from None
    return context


def client_context(root_ca_file: str, min_version: str) -> ssl.SSLContext:
    """The context nsqd queries an https auth server with."""
    try:
        context = ssl.create_default_context(cafile=root_ca_file or None)
        _set_minimum_version(context, min_version)
    except (OSError, ValueError) as error:
        raise ValueError(f"failed to build client TLS config - {error}") from None
    return context


class Negotiated:
    """What a client's TLS connection negotiated, as nsqd's /stats and auth queries name it."""

    __slots__ = ("cipher_suite", "common_name", "version")

    def __init__(self, ssl_object: Any, cipher_numbers: dict[str, int]) -> None:
        version = ssl_object.version() or ""
        self.version = _GO_VERSIONS.get(version, f"Unknown {version}")
        cipher = ssl_object.cipher()
        number = cipher_numbers.get(cipher[0], 0) if cipher else 0
        self.cipher_suite = _GO_CIPHER_SUITES.get(number, f"Unknown {number}")
        self.common_name = _common_name(ssl_object.getpeercert() or {})


def cipher_numbers(context: ssl.SSLContext) -> dict[str, int]:
    """The IANA number of each cipher suite the context may negotiate, by OpenSSL name."""
    return {cipher["name"]: cipher["id"] & 0xFFFF for cipher in context.get_ciphers()}


def _common_name(certificate: dict[str, Any]) -> str:
    """A peer certificate's subject common name as Go reads it (the last one), or ""."""
    common_name = ""
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                common_name = str(value)
    return common_name
