"""flagsvc's gunicorn worker does not miss a stop sent while it boots.

Between its fork and the moment it installs its own signal handlers, a gunicorn worker still runs
the handler it inherited from the arbiter, which only queues the signal on the arbiter's queue.
gunicorn's gevent worker then never hears that SIGTERM and serves on until the arbiter kills it at
the graceful timeout. Each case runs in a process of its own: it installs signal handlers.
(The kept-alive connections a stop closes are tested on `flagsvc serve`, in test_serve.py.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BOOT = textwrap.dedent(
    """
    import logging, os, queue, signal, sys

    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config

    from flagsvc.gevent_worker import Worker

    # The arbiter's own handler, as a forked worker inherits it.
    arbiter = Arbiter.__new__(Arbiter)
    arbiter.SIG_QUEUE = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, arbiter.signal)
    for sig in sys.argv[1:]:
        os.kill(os.getpid(), getattr(signal, sig))

    worker = Worker(1, os.getppid(), [], None, 30, Config(), logging.getLogger("test"))
    worker.PIPE = os.pipe()
    os.set_blocking(worker.PIPE[1], False)
    worker.init_signals()
    worker.tmp.close()
    print("alive" if worker.alive else "stopping")
    """
)


def boot(*signals: str) -> str:
    """A worker that sets up its signal handlers after ``signals`` reached the arbiter's handler."""
    done = subprocess.run(
        [sys.executable, "-c", BOOT, *signals], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(("signals", "state"), [((), "alive"), (("SIGTERM",), "stopping")])
def test_a_stop_sent_before_the_worker_has_its_own_handlers_stops_it(signals, state):
    assert boot(*signals) == state
