"""Which programs the preload transport reaches: a preload library is loaded only by the dynamic
loader, so only into dynamically linked programs, and never into set-user-ID ones. Scripts are
judged by their interpreter."""
from __future__ import annotations

import os
import shutil
import stat
import struct

#: What `check` looks at when user namespaces are off: what HEP jobs usually run.
USUAL_PROGRAMS = ("curl", "wget", "python3", "xrdcp", "xrdfs", "work_queue_worker", "vine_worker", "git")
_PT_INTERP = 3
_MAX_SCRIPT_HOPS = 4


def why_not_preloaded(program: str) -> str:
    """"" if ``program`` (a path or a name on PATH) would load the preload library, else why not."""
    path = shutil.which(program) or program
    for _ in range(_MAX_SCRIPT_HOPS):
        try:
            if os.stat(path).st_mode & (stat.S_ISUID | stat.S_ISGID):
                return "set-user-ID or set-group-ID: the loader ignores LD_PRELOAD"
            with open(path, "rb") as f:
                head = f.read(256)
                if head.startswith(b"#!"):
                    words = head[2:].split(b"\n", 1)[0].split()
                    if not words:
                        return "a script without an interpreter"
                    interpreter = words[0].decode(errors="replace")
                    if os.path.basename(interpreter) == "env" and len(words) > 1:
                        interpreter = shutil.which(words[1].decode(errors="replace")) or ""
                    path = interpreter
                    continue
                if head[:4] != b"\x7fELF" or len(head) < 64:
                    return "not a program (neither ELF nor a script)"
                return "" if _has_interpreter(f, head) else "statically linked: the loader never sees LD_PRELOAD"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
    return "a chain of scripts too long to follow"


def _has_interpreter(f, head: bytes) -> bool:
    """Whether an ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        phoff, = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
    else:
        phoff, = struct.unpack_from(order + "I", head, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    return any(struct.unpack_from(order + "I", table, i * phentsize)[0] == _PT_INTERP
               for i in range(len(table) // phentsize) if phentsize >= 4)
