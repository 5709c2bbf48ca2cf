"""The evaluation room: what is measured after the pretrained model and after every task. An
evaluation round (evaluate.py: features once per dataset, linear probes, zero-shot classifiers,
task heads, calibration), the probes (probe.py), the multi-head classifier a run trains
(multihead.py), the accuracy matrix and its CSV format (matrix.py) and the forgetting metrics
computed from it (metrics.py)."""
