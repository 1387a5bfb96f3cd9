"""Run on the login host as the user, with the venv's Python (CCTools' ndcctools.taskvine, built
by scripts/build-taskvine): a TaskVine manager on a fixed port (no project name, so no catalog
server is ever asked) whose tasks read files over XRootD by DNS name. Prints one JSON line."""
import json
import sys

import ndcctools.taskvine as vine

port, urls = int(sys.argv[1]), sys.argv[2:]
m = vine.Manager(port=port, run_info_path=f"vine-runinfo-{port}")  # in the working directory
print(f"listening on {m.port}", flush=True)
tasks = {}
for url in urls:
    t = vine.Task(f"xrdcp -s -f {url} - | sha256sum | cut -d' ' -f1")
    m.submit(t)
    tasks[t.id] = url
results = {}
while not m.empty():
    t = m.wait(5)
    if t:
        results[tasks[t.id]] = {"output": (t.output or "").strip(), "exit": t.exit_code, "result": t.result}
print(json.dumps(results), flush=True)
