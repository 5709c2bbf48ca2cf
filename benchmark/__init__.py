"""cfbench: continual fine-tuning benchmark for foundation image models."""
import importlib.abc
import sys

__version__ = "0.1.0"


class _NoJaxWhileQpsolversLoads(importlib.abc.MetaPathFinder):
    """avalanche-lib imports qpsolvers (its GEM plugin), which probes every installed QP solver as it
    loads; avalanche's own requirement qpsolvers[open_source_solvers] installs jaxopt and qpax, so
    every cfbench process imported JAX (`import benchmark.run.runner`: 6.8-7.4 s with it, 5.2-5.3 s
    without; every `cfbench run`, DDP rank and sweep worker pays it).
    cfbench never solves a QP. While qpsolvers itself is loading, JAX reads as absent (qpsolvers
    leaves those solvers out); at any other moment JAX imports as usual."""

    BLOCKED = ("jax", "jaxlib", "jaxopt", "qpax")

    def find_spec(self, name, path=None, target=None):
        loading = getattr(getattr(sys.modules.get("qpsolvers"), "__spec__", None), "_initializing", False)
        if loading and name.partition(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"{name} is not imported while qpsolvers loads (cfbench solves no QP)",
                                      name=name)
        return None


if not any(isinstance(f, _NoJaxWhileQpsolversLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoJaxWhileQpsolversLoads())
