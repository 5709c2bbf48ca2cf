"""The run room: what trains one run. `runner.run_strategy` reads top to bottom (build, evaluate
the pretrained model, per task: head, train, evaluate, checkpoint); the training loop on
Avalanche (training.py) with its batch loader (batches.py), on-device augmentation (augment.py),
the learning-rate schedule and gradient clipping (schedule.py), and the checkpoint that pins its
experiment (checkpoint.py)."""
