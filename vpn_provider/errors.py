"""Errors a person can act on: each renders as one line saying what failed and what to do."""


class VPNError(Exception):
    """Base class. ``str(err)`` is the one-line message the CLI prints."""


class TicketError(VPNError):
    def __init__(self, path: str, problem: str, remedy: str = ""):
        super().__init__(path, problem, remedy)
        self.path, self.problem, self.remedy = path, problem, remedy

    def __str__(self) -> str:
        tail = f"; {self.remedy}" if self.remedy else ""
        return f"ticket {self.path}: {self.problem}{tail}"


class CommandError(VPNError):
    """An external command failed. Carries argv (never secrets: those travel on stdin)."""

    def __init__(self, argv: list[str], returncode: int, output: str = ""):
        super().__init__(argv, returncode, output)
        self.argv, self.returncode, self.output = list(argv), returncode, output

    def __str__(self) -> str:
        last = next((ln.strip() for ln in reversed(self.output.splitlines()) if ln.strip()), "")
        said = f": {last}" if last else ""
        return f"{self.argv[0]} exited with status {self.returncode}{said}"


class MissingTool(VPNError):
    def __init__(self, tool: str, package: str):
        super().__init__(tool, package)
        self.tool, self.package = tool, package

    def __str__(self) -> str:
        return f"{self.tool} not found on PATH; install the Debian package '{self.package}'"


class _ReasonError(VPNError):
    """``reason`` is a short phrase, ``remedy`` what to do; rendered after the class's ``prefix``."""
    prefix = ""

    def __init__(self, reason: str, remedy: str = ""):
        super().__init__(reason, remedy)
        self.reason, self.remedy = reason, remedy

    def __str__(self) -> str:
        return f"{self.prefix}{self.reason}" + (f"; {self.remedy}" if self.remedy else "")


class TunnelError(_ReasonError):
    """The worker-side tunnel did not come up."""
    prefix = "VPN tunnel failed: "


class GatewayError(_ReasonError):
    """The gateway cannot start or do what was asked."""
    prefix = "gateway: "
