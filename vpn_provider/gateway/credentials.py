"""The gateway's own CA, server certificate and client secret, created once per state dir."""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import proc

CLIENT_USER = "worker"
_VALIDITY = datetime.timedelta(days=3650)


@dataclasses.dataclass(frozen=True)
class Credentials:
    server_cert: Path
    server_key: Path
    passwd_file: Path
    user: str
    secret: str = dataclasses.field(repr=False)
    pin: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def pin_of(cert_pem: bytes) -> str:
    """openconnect's ``pin-sha256:`` form: base64 of the SHA-256 of the SubjectPublicKeyInfo."""
    spki = x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "pin-sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _make_ca_and_server(state: Path, names: list[str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vpn-provider CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + _VALIDITY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
              .issuer_name(ca_name).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + _VALIDITY)
              .add_extension(_san(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    _write_private(state / "ca-key.pem", _pem_key(ca_key))
    (state / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(state / "server-key.pem", _pem_key(key))
    (state / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))


def _make_client_secret(state: Path) -> None:
    secret = secrets.token_urlsafe(32)
    # openssl reads the secret on stdin, so it never appears in argv.
    hashed = proc.run(["openssl", "passwd", "-6", "-stdin"], stdin=secret + "\n").stdout.strip()
    _write_private(state / "client-secret", secret.encode())
    _write_private(state / "ocpasswd", f"{CLIENT_USER}:*:{hashed}\n".encode())


def ensure_credentials(state: Path, names: list[str]) -> Credentials:
    """Create what is missing; keep what exists, so tickets already handed out stay valid."""
    if not (state / "server.pem").exists() or not (state / "server-key.pem").exists():
        _make_ca_and_server(state, names or ["vpn-provider-gateway"])
    if not (state / "client-secret").exists() or not (state / "ocpasswd").exists():
        _make_client_secret(state)
    return Credentials(server_cert=state / "server.pem", server_key=state / "server-key.pem",
                       passwd_file=state / "ocpasswd", user=CLIENT_USER,
                       secret=(state / "client-secret").read_text().strip(),
                       pin=pin_of((state / "server.pem").read_bytes()))
