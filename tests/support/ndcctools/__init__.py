"""TEST-ONLY alias: upstream ships ``ndcctools`` through conda; Debian ships the same Work Queue
bindings as a top-level ``work_queue`` module (python3-workqueue). Parsl imports
``ndcctools.work_queue``, so the tests map that name to Debian's module. Not part of the product."""
