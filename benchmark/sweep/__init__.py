"""The sweep room: `cfbench sweep`, a grid of runs over Ray. The sweep file's schema and its
expansion into checked run configs (config.py), the driver (driver.py), what the sweep folder
holds (state.py), one run as an idempotent Ray task (worker.py), the progress lines
(progress.py) and the watchdog that ends an embedded cluster with its driver (reaper.py)."""
