"""The config room: what an experiment is. The typed schema (schema.py), the protocols as data
(protocols.py), the layers that make a config and a run folder's own config (loading.py), prompt
templates and class-name sets (templates.py), what a run will do (plan.py), how it differs from
its protocol (deviations.py) and the up-front checks of a whole run (validate.py). This package
re-exports the schema, the protocols and the loading functions."""
from .loading import (
    dump_config, experiment_digest, experiment_settings, first_difference, load_config, load_run_config, lookup,
    read_config_file, resolve
)
from .protocols import PROTOCOL_DIR, list_protocols, protocol_settings, protocol_supplied
from .schema import (
    DEFAULT_PROTOCOL, INT_MAX, MACHINE_SETTINGS, AugmentConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig,
    build_config, merge, missing_keys, per_task
)

__all__ = ["dump_config", "experiment_digest", "experiment_settings", "first_difference", "load_config",
           "load_run_config", "lookup", "read_config_file", "resolve", "PROTOCOL_DIR", "list_protocols",
           "protocol_settings", "protocol_supplied", "DEFAULT_PROTOCOL", "INT_MAX", "MACHINE_SETTINGS",
           "AugmentConfig", "EvalConfig", "ModelConfig", "RunConfig", "TrainConfig", "build_config", "merge",
           "missing_keys", "per_task"]
