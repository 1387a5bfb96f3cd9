"""Thin ctypes wrappers for the Linux calls Python 3.11 lacks (unshare, setns, mount, prctl).

Everything here runs as an ordinary user: the caps come from the user namespace we create.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_BIND = 4096

PR_SET_PDEATHSIG = 1

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None),
           f"mount {target}")


def set_parent_death_signal(signum: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0), "prctl")


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Get ``signum`` when the parent exits; exit now if it already has (the race prctl leaves)."""
    parent = os.getppid()
    set_parent_death_signal(signum)
    if os.getppid() != parent:
        os._exit(1)


def restore_default_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: undo that, so the
    programs we exec get the dispositions a shell would give them."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)


def enter_user_namespace(*, inner_uid: int, inner_gid: int, flags: int = 0) -> None:
    """unshare a new user namespace (plus ``flags``) mapping our uid/gid to the given inner ids.

    An unprivileged process may map only its own ids, and must deny setgroups first.
    """
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | flags)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inner_uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inner_gid} {gid} 1")


def make_mounts_private() -> None:
    """Stop mounts we make in a new mount namespace from propagating anywhere."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def bind_mount(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND)


def create_tun(name: str) -> int:
    """Create tun device ``name`` in the current network namespace; return its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def user_namespaces_allowed() -> tuple[bool, str]:
    """Try to create a user+net namespace in a throwaway child; report why not if it fails."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            enter_user_namespace(inner_uid=0, inner_gid=0, flags=CLONE_NEWNET | CLONE_NEWNS)
            code = 0
        except OSError as e:
            code = 100 + (e.errno or 0) % 100
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return True, ""
    return False, os.strerror(code - 100) if code >= 100 else f"child exit {code}"



PR_SET_NAME = 15


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (no privilege needed)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def no_core_dumps() -> None:
    """No core file, soft or hard limit: a process holding a key or the client secret would write
    them to disk (into a shared working directory, say) when it crashes. Children inherit it."""
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def suspend_core_dumps():
    """No core file until the returned function is called: for `exec`, which holds the ticket's
    secret while it sets up, then becomes CMD, whose own limit must be the user's. Only the soft
    limit drops, so it can be put back."""
    import resource
    saved = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, saved[1]))
    return lambda: resource.setrlimit(resource.RLIMIT_CORE, saved)


def set_process_name(name: str) -> None:
    """What ps, top and /proc/PID/comm show (15 bytes at most)."""
    _check(_libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0), "prctl")


def tcp_connections(ds=None) -> tuple:
    """This network namespace's TCP connections, IPv4 then IPv6 (pyroute2 inet_diag_msg, source
    address in ``idiag_src``, family in ``idiag_family``), listening sockets left out."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_CONN
    if ds is None:
        with DiagSocket() as own:
            own.bind()
            return tcp_connections(own)
    return (*ds.get_sock_stats(family=socket.AF_INET, states=SS_CONN),
            *ds.get_sock_stats(family=socket.AF_INET6, states=SS_CONN))


def _diag_address(family: int, address: str) -> tuple[int, int, int, int]:
    """An address as sock_diag's four 32-bit words."""
    packed = socket.inet_pton(family, address).ljust(16, b"\0")
    return struct.unpack(">4I", packed)


def reset_tcp_connections(select) -> int:
    """Abort this network namespace's TCP connections for which ``select(flow)`` is true
    (``flow``: pyroute2's inet_diag_msg), with sock_diag's SOCK_DESTROY: their owners get
    ECONNABORTED at once. Needs CAP_NET_ADMIN here and a kernel with CONFIG_INET_DIAG_DESTROY
    (an OSError otherwise). Returns how many were aborted."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.diag import SOCK_DESTROY, SS_CONN, inet_diag_req
    aborted = 0
    with DiagSocket() as ds:
        ds.bind()
        for flow in tcp_connections(ds):
            if not select(flow):
                continue
            req = inet_diag_req()
            family = flow["idiag_family"]
            req["sdiag_family"], req["sdiag_protocol"] = family, socket.IPPROTO_TCP
            req["idiag_states"] = SS_CONN
            req["idiag_sport"], req["idiag_dport"] = flow["idiag_sport"], flow["idiag_dport"]
            req["idiag_src"] = _diag_address(family, flow["idiag_src"])
            req["idiag_dst"] = _diag_address(family, flow["idiag_dst"])
            req["idiag_if"], req["idiag_cookie"] = flow["idiag_if"], flow["idiag_cookie"]
            try:
                tuple(ds.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK))
                aborted += 1
            except NetlinkError as e:
                if e.code != errno.ENOENT:  # already gone: fine
                    raise OSError(e.code, os.strerror(e.code)) from None
    return aborted
