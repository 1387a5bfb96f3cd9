"""TEST-ONLY stand-in for TaskVine's Python bindings, which cannot be installed here (no
``vine_worker``, no conda). It lets Parsl *construct* a TaskVineExecutor so the tests can check
the exact worker command lines; anything that would talk to a real manager raises."""
from . import cvine  # noqa: F401


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("TaskVine is not installed here; this is a test-only stand-in")


Manager = Task = FunctionCall = Factory = _Unavailable
