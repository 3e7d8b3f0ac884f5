"""`python -m strata.app.job [strata serve flags]`: `strata serve` as a Ray job.

    ray job submit --working-dir . -- python -m strata.app.job --max-model-len 2048 --host 0.0.0.0

Inside a job RAY_ADDRESS names the cluster it was submitted to, so the Serve application, the
driver and the ranks all land there. Stopping the job (SIGTERM) drains and shuts down as Ctrl-C does.
"""

from __future__ import annotations

import sys

from strata.app.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
