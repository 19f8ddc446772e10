"""Self-signed TLS material for serving kontextd over HTTPS on a local machine.

A throwaway CA signs a single server certificate. The CA's private key is never written to disk, so the
CA can vouch for nothing but that one leaf: trusting it (SSL_CERT_FILE) carries no wider risk.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kontextd.atomic import write_atomic

VALIDITY = datetime.timedelta(days=825)  # the longest lifetime Apple platforms accept for a TLS leaf
RENEW_BEFORE = datetime.timedelta(days=30)
# Tolerate a client clock running somewhat behind ours.
BACKDATE = datetime.timedelta(hours=1)

CA_CERT_NAME = "ca.pem"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"

_Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: pathlib.Path  # what users point SSL_CERT_FILE at
    cert: pathlib.Path  # server certificate (leaf)
    key: pathlib.Path  # server private key (0600)


def ensure_self_signed(directory: pathlib.Path, hosts: Sequence[str]) -> TlsFiles:
    """Return usable TLS files in `directory`, reusing existing ones when they still fit `hosts`."""
    if not hosts:
        raise ValueError("at least one host is required for the certificate's subjectAltName")
    wanted = {_parse_host(host) for host in hosts}
    files = TlsFiles(
        ca_cert=directory / CA_CERT_NAME,
        cert=directory / SERVER_CERT_NAME,
        key=directory / SERVER_KEY_NAME,
    )
    if not _reusable(files, wanted):
        _generate(files, wanted)
    return files


def _parse_host(host: str) -> _Host:
    # Accept URL-style "[::1]" too; DNS names compare case-insensitively and without a trailing dot.
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower().rstrip(".")


def _reusable(files: TlsFiles, wanted: set[_Host]) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        # A crash between the three writes can leave a mixed set; treat that like missing files.
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if key.public_key() != leaf.public_key():
        return False
    covered: set[_Host] = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    covered.update(san.get_values_for_type(x509.IPAddress))
    deadline = datetime.datetime.now(datetime.UTC) + RENEW_BEFORE
    return wanted <= covered and min(ca.not_valid_after_utc, leaf.not_valid_after_utc) > deadline


def _generate(files: TlsFiles, hosts: set[_Host]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - BACKDATE, now + VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kontextd"),
            x509.NameAttribute(NameOID.COMMON_NAME, "kontextd local CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(host) if isinstance(host, str) else x509.IPAddress(host)
            for host in sorted(hosts, key=str)
        ]
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kontextd"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "kontextd local server"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    # Key first: if we stop part-way, _reusable sees a key/cert mismatch and regenerates.
    write_atomic(
        files.key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    write_atomic(files.cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_atomic(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
