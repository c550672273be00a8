"""gunicorn.conf.py of the gunicorn tests: 4 sync workers, Vela's hooks."""
import os

import vela.gunicorn
from vela.gunicorn import child_exit, on_starting, post_fork, worker_exit  # noqa: F401

vela.gunicorn.configure(os.environ["VELA_TEST_CACHE"], capacity="8MiB", stampede_timeout=10.0)

workers = 4
worker_class = "sync"
preload_app = os.environ.get("VELA_TEST_PRELOAD") == "1"
timeout = 30
graceful_timeout = 3
loglevel = "info"
