"""Run the example notebook: ``execute`` with nbclient (tests), or ``script`` runs its code cells
as one Python script in this process (the demo: progress bars go straight to the terminal).

    python -m vpn_provider.sim.notebook execute NOTEBOOK OUT.ipynb
    python -m vpn_provider.sim.notebook script NOTEBOOK
"""
from __future__ import annotations

import sys


def code_of(path: str) -> str:
    import nbformat
    nb = nbformat.read(path, as_version=4)
    return "\n\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def execute(path: str, out: str, timeout: int = 900) -> None:
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3").execute()
    finally:
        nbformat.write(nb, out)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "execute":
        execute(argv[1], argv[2])
        return 0
    if len(argv) == 2 and argv[0] == "script":
        exec(compile(code_of(argv[1]), argv[1], "exec"), {"__name__": "__main__"})
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
