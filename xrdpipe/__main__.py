"""``python -m xrdpipe``: the same as the ``xrdpipe`` command."""

from .cli import main

main()
