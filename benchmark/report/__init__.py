"""The report room: what a run leaves and what is read back from it. The run folder -- created
exclusively, locked, its file names (run_folder.py) -- a finished run's matrices, metrics and
figures and the comparison of several runs (compare.py), the figures (figures.py, plots.py) and
the experiment trackers (trackers.py), and papers' published numbers (references.py reads
benchmark/references/*.yaml; published.py sets finished runs beside them)."""
