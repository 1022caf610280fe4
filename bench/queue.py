"""The queue-policy benchmark, under the name the issue gives it: ``bench/queue.py``.

    .venv/bin/python bench/queue.py [--heavy 60] [--light 12] [--every 2] [--keep]

The measurement lives in :mod:`bench.queue_policy` (its docstring says what it does). Running any
script in ``bench/`` puts this folder first on ``sys.path``, so this file also stands where the
standard library's ``queue`` is looked for (torch, Celery and httpx all import it): imported
under that name, it loads the standard library's module in its place, and only run as a script
does it start the benchmark.
"""

import importlib.util
import sys
import sysconfig
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.queue_policy import main

    sys.exit(main())
else:
    # The import system returns whatever sys.modules holds under the name once this file has run.
    _spec = importlib.util.spec_from_file_location(
        __name__, Path(sysconfig.get_paths()["stdlib"]) / "queue.py"
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
