"""Preloaded by the fork server of the process pool (:mod:`xrdpipe.parallel`): Ctrl-C is
ignored there and in the workers it forks (the caller stops the pool), then the integrator's
modules are imported once for every worker."""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

from . import integration  # noqa: E402,F401
