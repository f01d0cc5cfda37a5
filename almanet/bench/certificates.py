"""TLS certificates made on the spot, for the tests and benchmarks of TLS connections (needs ``cryptography``).

``make_certificates(directory)`` writes PEM files: a CA, a server
certificate it signs for ``127.0.0.1``, ``::1`` and ``localhost`` (nsqd's
``--tls-cert`` and ``--tls-key``), a client certificate it signs (for
``--tls-client-auth-policy``), and another CA that signed neither (a wrong
``tls_ca_file``). Keys are P-256, certificates valid for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """The files ``make_certificates`` wrote."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str

    def nsqd_flags(self, *, require_client_certificate: bool = False) -> list[str]:
        """nsqd's flags to serve TLS with the server certificate (and to require a client one it trusts)."""
        flags = [f"-tls-cert={self.server_cert}", f"-tls-key={self.server_key}", f"-tls-root-ca-file={self.ca}"]
        return flags + (["-tls-client-auth-policy=require-verify"] if require_client_certificate else [])


def make_certificates(directory: str | Path) -> Certificates:
    """Write the certificates and keys into ``directory`` (which must exist)."""
    folder = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("almanet test CA", ca_key, "almanet test CA", ca_key, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    server = _certificate(
        "nsqd", server_key, "almanet test CA", ca_key, names=names, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "almanet client", client_key, "almanet test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("another CA", other_key, "another CA", other_key, is_ca=True)
    files = {
        "ca.pem": _pem(ca),
        "server.pem": _pem(server),
        "server-key.pem": _pem_key(server_key),
        "client.pem": _pem(client),
        "client-key.pem": _pem_key(client_key),
        "other-ca.pem": _pem(other),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    paths = [str(folder / name) for name in files]
    return Certificates(*paths)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    names: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        # Python 3.13's default context checks X.509 strictly: key identifiers, and a CA's key usage.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if is_ca:
        usages = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement"),
            False,
        )
        builder = builder.add_extension(
            x509.KeyUsage(**usages, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
