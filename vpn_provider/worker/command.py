"""The worker command as text that survives every launcher, and back.

Launchers paste a worker command into shell text: SingleNodeLauncher into a function body,
SrunLauncher and MpiExecLauncher into an *unquoted* heredoc (where ``$``, backticks and
backslashes expand while the script is written). Work Queue and TaskVine prefix the worker
with ``PARSL_WORKER_BLOCK_ID=<id>``, an environment assignment. So:

* a simple command (words and NAME=VALUE assignments, no shell operators) is passed as argv,
  and ``vpn-provider exec`` applies the assignments itself, like env(1) - no shell stays
  between us and the worker, so signals and the exit status pass straight through;
* anything else runs under ``/bin/sh -c``;
* if the resulting text would contain a character a heredoc expands, the argv travels as
  base64 (``--argv-b64``), whose alphabet no shell touches.
"""
from __future__ import annotations

import base64
import json
import re
import shlex

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_HEREDOC_SPECIAL = ("$", "`", "\\")
_SHELL_OPERATOR_CHARS = set(";&|<>()")


def simple_command_words(command: str) -> list[str] | None:
    """The words of ``command`` if it is a simple command, else None."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: leave it to the shell to report
        return None
    if not words or any(w and set(w) <= _SHELL_OPERATOR_CHARS for w in words):
        return None
    if any(ch in command for ch in "$`*?[~{#\n"):  # expansions, globs, comments need a shell
        return None
    return words


def worker_argv(command: str) -> list[str]:
    return simple_command_words(command) or ["/bin/sh", "-c", command]


def split_assignments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=VALUE words become environment variables, as with env(1)."""
    env = {}
    i = 0
    while i < len(argv) and _ASSIGNMENT.match(argv[i]):
        name, _, value = argv[i].partition("=")
        env[name] = value
        i += 1
    return env, argv[i:]


def encode_argv(argv: list[str]) -> str:
    return base64.b64encode(json.dumps(argv).encode()).decode()


def decode_argv(text: str) -> list[str]:
    try:
        argv = json.loads(base64.b64decode(text, validate=True))
    except (ValueError, TypeError):
        raise ValueError("--argv-b64 is not base64 of a JSON list") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("--argv-b64 must decode to a non-empty list of strings")
    return argv


def exec_command_text(prefix: list[str], command: str) -> str:
    """Shell text running ``command`` under ``prefix`` (``vpn-provider exec --ticket ...``)."""
    argv = worker_argv(command)
    words = shlex.join(argv)
    if any(ch in words for ch in _HEREDOC_SPECIAL):
        return f"{shlex.join(prefix)} --argv-b64 {encode_argv(argv)}"
    # A $VAR in the prefix (say, the ticket path) may expand early or not at all: exec
    # expands variables in --ticket itself, so both give the same path.
    return f"{shlex.join(prefix)} -- {words}"
