"""Run on the login host as the user, with Debian's python3 (its python3-workqueue module): a
Work Queue manager whose tasks read files over XRootD by DNS name. Prints one JSON line."""
import json
import sys

import work_queue as wq

port, urls = int(sys.argv[1]), sys.argv[2:]
q = wq.WorkQueue(port=port)
print(f"listening on {q.port}", flush=True)
for url in urls:
    t = wq.Task(f"xrdcp -s -f {url} - | sha256sum | cut -d' ' -f1")
    t.specify_tag(url)
    q.submit(t)
results = {}
while not q.empty():
    t = q.wait(5)
    if t:
        results[t.tag] = {"output": (t.output or "").strip(), "exit": t.return_status, "result": t.result}
print(json.dumps(results), flush=True)
