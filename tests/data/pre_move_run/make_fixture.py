"""Made once, with the code of main 7616d01 (before the run layer moved to ``xrdpipe/run/``):

    PYTHONPATH= .venv/bin/python tests/data/pre_move_run/make_fixture.py

A six-frame synthetic experiment at the fixed path ``/tmp/xrdpipe-pre-move-run`` (stage keys hold
absolute paths and file modification times), run whole (integrate, echem, fit, refine, lattice,
plots, export). Kept here: the input files and the run file (``inputs.tar.gz``) and ``record.json``
(every input file's mtime_ns, the stage keys and the fingerprints the run file holds).
``tests/test_run_compat.py`` unpacks it at the same path and checks that the code of today finds
every stage up to date.
"""

import json
import shutil
import sys
import tarfile
from pathlib import Path

import h5py

from xrdpipe.config import load_experiment
from xrdpipe.testing import make_experiment

ROOT = Path("/tmp/xrdpipe-pre-move-run")
HERE = Path(__file__).parent

EXTRA = """
[refinement]
method = "lebail"
range = [5.5, 23.0]
background_terms = 4
max_iter = 30

[[refinement.phases]]
name = "O3"

[[refinement.phases]]
name = "P3"
"""


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    syn = make_experiment(ROOT, n_frames=6, shape=(256, 256), frames_per_file=3, npt=600, counts=0.002,
                          background=100.0, seed=0, run_name="pre-move")
    text = syn.experiment_file.read_text()
    text = text.replace('formats = ["png", "pdf"]', 'formats = ["png"]\nkinds = ["lattice"]\ndpi = 50')
    text = text.replace('formats = ["xye", "fxye", "topas"]', 'formats = ["xye"]')
    syn.experiment_file.write_text(text + EXTRA)
    from xrdpipe.workflow import run_experiment, stage_keys

    exp = load_experiment(syn.experiment_file)
    summary = run_experiment(exp, progress=False)
    print(summary)
    assert all(v == "ran" for v in summary.stages.values()), summary.stages
    again = run_experiment(load_experiment(syn.experiment_file), progress=False)
    assert not again.did_work, again.stages
    inputs = ["experiment.toml", "cycler.csv", "demo.poni", "mask.edf", *sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "raw").iterdir())]
    run_file = exp.run.run_file
    outputs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*") if p.is_file())
    with h5py.File(run_file, "r") as h5:
        stages = {k: dict(v.attrs) for k, v in h5["/entry/process/stages"].items()}
        fingerprints = {"patterns": h5["/entry/process/fingerprint"][()].decode(),
                        "peaks": h5["/entry/peaks"].attrs["fingerprint"],
                        "refinement": h5["/entry/refinement"].attrs["fingerprint"]}
    record = {"commit": sys.argv[1] if len(sys.argv) > 1 else "",
              "mtime_ns": {p: (ROOT / p).stat().st_mtime_ns for p in inputs + outputs},
              "stage_keys": stage_keys(exp), "stages": {k: {"key": v["key"], "outputs": json.loads(v["outputs"])}
                                                       for k, v in stages.items()},
              "fingerprints": fingerprints, "outputs": outputs}
    (HERE / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    with tarfile.open(HERE / "inputs.tar.gz", "w:gz") as tar:
        for p in inputs + outputs:
            tar.add(ROOT / p, arcname=p)
    print("record.json and inputs.tar.gz written")


if __name__ == "__main__":
    main()
