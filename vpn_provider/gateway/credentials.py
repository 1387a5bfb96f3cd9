"""The gateway's own CA, server certificate and client secret, created once per state dir; and
the checks that keep another user's files out of the directories we keep them in.

Another local user who can write to a state dir could plant a client secret of theirs, or a
symlink through which we would overwrite one of our own files. So (ssh's rule) we use only
directories that are ours and that nobody else can write to, nor any directory above them, and
we open every file there without following a symlink, refusing files that are not ours.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import errno
import hashlib
import ipaddress
import os
import pwd
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import proc
from ..errors import GatewayError

CLIENT_USER = "worker"
_VALIDITY = datetime.timedelta(days=3650)
#: In the credentials dir; the secret ones must not be readable by anyone else.
SECRET_FILES = ("client-secret", "ocpasswd", "server-key.pem", "ca-key.pem", "ticket.json")
PUBLIC_FILES = ("server.pem", "ca.pem", "gateways.lock")


@dataclasses.dataclass(frozen=True)
class Credentials:
    server_cert: Path
    server_key: Path
    passwd_file: Path
    user: str
    secret: str = dataclasses.field(repr=False)
    pin: str


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_dir(path: Path, what: str) -> bool:
    """Refuse (GatewayError) a directory that is not ours or that group or others can write to,
    and one below a directory that is neither root's nor ours, or that others can write to
    unless it is sticky (like /tmp: nobody else can rename what is ours there). A symlink on the
    way must be root's or ours; what it points to is checked. False if ``path`` does not exist
    yet (then the part of its path that exists passed)."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for p in (*reversed(path.parents), path):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.getuid()):
            raise GatewayError(f"{what} {path}: {p} is a symlink of {_owner(st.st_uid)}",
                               f"use a {what} of your own")
    for p in reversed(real.parents):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return False
        if st.st_uid not in (0, os.getuid()):
            raise GatewayError(f"{what} {path} is inside {p}, which belongs to {_owner(st.st_uid)}",
                               f"use a {what} of your own")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise GatewayError(f"{what} {path} is inside {p}, which group or others can write to "
                               f"(mode {stat.S_IMODE(st.st_mode):04o})",
                               f"chmod go-w {p}, or use a {what} elsewhere")
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise GatewayError(f"{what} {path} is not a directory", f"use a {what} of your own")
    if st.st_uid != os.getuid():
        raise GatewayError(f"{what} {path} belongs to {_owner(st.st_uid)}, not you", f"use a {what} of your own")
    if st.st_mode & 0o022:
        raise GatewayError(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                           f"chmod go-w {path}, and remove any file in it you did not make")
    return True


def _refuse_unsafe(path: Path, st: os.stat_result, private: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise GatewayError(f"{path} is {kind}", f"remove it (rm {path})")
    if st.st_uid != os.getuid():
        raise GatewayError(f"{path} belongs to {_owner(st.st_uid)}, not you", f"remove it (rm {path})")
    if st.st_mode & (0o077 if private else 0o022):
        who = "read or written" if private else "written"
        raise GatewayError(f"{path} can be {who} by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                           f"chmod {'600' if private else 'go-w'} {path}")


def check_file(path: Path, *, private: bool = False) -> bool:
    """Refuse a file that is a symlink, not a regular file, not ours, writable by group or others
    or (``private``) readable by them. False if it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    _refuse_unsafe(path, st, private)
    return True


def check_existing(cred_dir: Path) -> None:
    """The credentials already in ``cred_dir`` (see check_file)."""
    for name in SECRET_FILES:
        check_file(cred_dir / name, private=True)
    for name in PUBLIC_FILES:
        check_file(cred_dir / name)


def open_file(path: Path, flags: int, *, private: bool = False) -> int:
    """``os.open`` for every file in a state or credentials dir: never through a symlink, never
    blocking on a FIFO, new files 0600, and refusing what check_file refuses. O_TRUNC applies only
    once the file passed, so another user's file is never emptied."""
    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer; regular files ignore it.
        fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO without a reader
            check_file(path, private=private)
        raise
    try:
        _refuse_unsafe(path, os.fstat(fd), private)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: Path, *, private: bool = False) -> bytes:
    with os.fdopen(open_file(path, os.O_RDONLY, private=private), "rb") as f:
        return f.read()


def write_file(path: Path, data: bytes) -> None:
    with os.fdopen(open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
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
    write_file(state / "ca-key.pem", _pem_key(ca_key))
    write_file(state / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    write_file(state / "server-key.pem", _pem_key(key))
    write_file(state / "server.pem", server.public_bytes(serialization.Encoding.PEM))


def _make_client_secret(state: Path) -> None:
    write_file(state / "client-secret", secrets.token_urlsafe(32).encode())


def _make_password_file(state: Path) -> None:
    """ocserv's password file for the ticket's secret (only a gateway with a tunnel needs it)."""
    secret = read_file(state / "client-secret", private=True).decode().strip()
    # openssl reads the secret on stdin, so it never appears in argv.
    hashed = proc.run(["openssl", "passwd", "-6", "-stdin"], stdin=secret + "\n").stdout.strip()
    write_file(state / "ocpasswd", f"{CLIENT_USER}:*:{hashed}\n".encode())


def ensure_credentials(state: Path, names: list[str], *, tunnel: bool = True) -> Credentials:
    """Create what is missing; keep what exists, so tickets already handed out stay valid.
    The certificate (its pin is in the ticket) comes from `cryptography`; only the tunnel's
    password file needs a tool (openssl) on this host."""
    check_existing(state)
    if not (state / "server.pem").exists() or not (state / "server-key.pem").exists():
        _make_ca_and_server(state, names or ["vpn-provider-gateway"])
    if not (state / "client-secret").exists():
        (state / "ocpasswd").unlink(missing_ok=True)  # it would name an old secret
        _make_client_secret(state)
    if tunnel and not (state / "ocpasswd").exists():
        _make_password_file(state)
    return Credentials(server_cert=state / "server.pem", server_key=state / "server-key.pem",
                       passwd_file=state / "ocpasswd", user=CLIENT_USER,
                       secret=read_file(state / "client-secret", private=True).decode().strip(),
                       pin=pin_of(read_file(state / "server.pem")))
