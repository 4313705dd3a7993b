"""TLS material: loading the server's PEM chain and key, and self-signed sets for development.

The seeds' service takes a PEM certificate chain and key; self-signed certificates are for
development only, with the client passing the root certificate. :func:`generate_self_signed`
makes such a set (a CA, a server certificate it signs for ``localhost`` and 127.0.0.1, the
key) with ``cryptography``, which is needed only for this, so it is imported lazily.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import TesseraError


class TLSConfigError(TesseraError):
    """The certificate chain or key is missing, unreadable or does not match."""


@dataclass(frozen=True)
class TLSFiles:
    """A server certificate chain and its private key, both PEM."""

    chain: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(chain, key) bytes; checks they form a usable pair before any server starts."""
        try:
            chain = self.chain.read_bytes()
            key = self.key.read_bytes()
        except OSError as exc:
            raise TLSConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        self.server_context()  # raises on a mismatched or malformed pair
        return chain, key

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.2+ server context for the REST endpoint."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.chain), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"TLS chain {self.chain} and key {self.key} are not a usable PEM pair: {exc}"
            ) from None
        return ctx


def generate_self_signed(
    folder: str | os.PathLike[str], *, hostname: str = "localhost", days: int = 30
) -> tuple[Path, Path, Path]:
    """Write ``ca.pem``, ``chain.pem`` (server cert + CA) and ``key.pem`` into ``folder``.

    For development and tests only: the CA key is thrown away, so nothing else can ever be
    signed with it.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise TesseraError(
            "generating certificates needs the cryptography package: pip install cryptography"
        ) from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tessera development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, chain_path, key_path = folder / "ca.pem", folder / "chain.pem", folder / "key.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    chain_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_bytes = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return ca_path, chain_path, key_path
