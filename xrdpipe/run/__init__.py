"""The run layer: the only part of xrdpipe that knows the :class:`~xrdpipe.config.Experiment` and
the run file. For each stage it reads what the stage needs from the run file, calls the stage
(pure: arrays and its own spec section in, results out), stores what it returns and skips what
is up to date.

::

    run/
      paths.py        RunPaths: every output file, and every group of the run file, named once
      access.py       opening the run file: reading() (read-only, checked), Writer (in a transaction), strings
      store.py        the run file's layout, RunFile (patterns, frame table) and their typed readers
      groups.py       result groups written whole (write_table), read back (read_table; typed: electrochemistry)
      stagelog.py     /entry/process/stages: which stage finished, from which inputs (mark_stage, read_stages)
      peakstore.py    /entry/peaks: the fit's results, written block by block, read back
      refinestore.py  /entry/refinement: the refinement's results, one row per frame
      stage.py        what every runner shares: stage() (transaction, record, timer, bar)
      integrate.py    integrate (or import) every frame into /entry/patterns
      fit.py          fit peaks (/entry/peaks, peaks.csv), then lattice (/entry/lattice, lattice.csv)
      echem.py        the cycler record onto the frames (/entry/electrochemistry, frames.csv)
      refine.py       the sequential whole-pattern refinement (/entry/refinement, refine.csv)
      output.py       figures and exports
      workflow.py     stage keys, DEPENDS, run_experiment: every stage, skipped when up to date
      watch.py        live processing: run_experiment at every poll on the complete frames

Nothing is imported here: ``import xrdpipe.run`` stays cheap (``xrdpipe --help`` is instant).
"""
