"""TEST-ONLY: ``ndcctools.work_queue`` -> Debian's ``work_queue`` (see __init__.py)."""
import sys

if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")

from work_queue import *  # noqa: F403
from work_queue import WORK_QUEUE_DEFAULT_PORT, cctools_debug_flags_set, cctools_debug_config_file  # noqa: F401
