"""The house: every import of the project's modules (function-level ones included) points down
the floors below, never up and never in a circle; a function-level import is there only for the
reasons listed here. README "Architecture" describes the same floors."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmark", "strategies", "tasks")

# bottom to top; a module may import its own floor and the floors below
FLOORS = [
    ("ground", ("benchmark.errors", "benchmark.limits", "benchmark.files", "benchmark.records", "benchmark.progress",
                "benchmark.distributed")),
    ("tasks", ("tasks",)),
    ("models", ("benchmark.models",)),
    ("strategies", ("strategies",)),  # above the encoders: a strategy may install adapters into one
    ("config", ("benchmark.config",)),
    ("evaluation", ("benchmark.evaluation",)),
    ("report", ("benchmark.report",)),
    ("run", ("benchmark.run",)),
    ("sweep", ("benchmark.sweep",)),
    ("perf", ("benchmark.perf", "benchmark.perf_cache")),
    ("command line", ("benchmark.cli", "benchmark.__main__", "benchmark")),
]

# (importer, imported prefix) -> why the import sits inside a function
FUNCTION_LEVEL = {
    ("benchmark.cli", ""): "start-up time: `cfbench list`, `--help` and a refused config answer without importing "
                           "torch; each command imports what it runs",
    ("benchmark.sweep.worker", "benchmark.run.runner"): "start-up time: the sweep driver imports the Ray task's "
                                                        "entry point but never trains (no Avalanche in the driver)",
    ("benchmark.sweep.worker", "benchmark.run.launch"): "start-up time: the launcher imports torch; the driver "
                                                        "(`sweep --dry-run` of 10,000 runs) never launches ranks",
    ("benchmark.run.launch", "benchmark.models.factory"): "start-up time: `--nproc`'s launcher (2.5 s of timm and "
                                                         "open_clip) builds a model only to look for BatchNorm "
                                                         "that trains",
    ("benchmark.sweep.driver", "benchmark.report.compare"): "start-up time: matplotlib, for the comparison at the "
                                                            "end of a sweep, never for --dry-run",
    ("benchmark.perf.cache", "benchmark.evaluation"): "optional dependency: the cache benchmark runs on a bare GPU "
                                                      "machine without Avalanche; only its accuracy part needs it",
    ("benchmark.perf.cache", "benchmark.models"): "optional dependency: open_clip, only for the accuracy part",
    ("benchmark.config.validate", "benchmark.models.factory"): "start-up time: `run --check` imports no torch; only "
                                                               "a local checkpoint file is loaded (torch) to check it",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at function level) for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for stmt in tree.body for node in ast.walk(stmt)
           if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            # `from . import slice_store` imports the submodule; names that are not modules come from base
            targets = submodules + ([base] if len(submodules) < len(node.names) else [])
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import tasks.cache` names tasks.cache; `a.b.func` -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno, id(node) not in top))
    return found


def _floor(module: str) -> int:
    best, floor = -1, None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    assert floor is not None, f"{module} is on no floor of tests/test_architecture.py"
    return floor


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_imports_only_point_down():
    upward = [f"{name} ({FLOORS[_floor(name)][0]}) imports {target} ({FLOORS[_floor(target)][0]}), line {line}"
              for name, edges in GRAPH.items() for target, line, _ in edges if _floor(target) > _floor(name)]
    assert not upward, "\n".join(upward)


def test_no_import_circle_even_through_function_level_imports():
    edges = {name: sorted({t for t, _, _ in found}) for name, found in GRAPH.items()}
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def test_function_level_imports_have_a_listed_reason():
    def allowed(name: str, target: str) -> bool:
        return any(name == importer and (prefix == "" or target == prefix or target.startswith(prefix + "."))
                   for importer, prefix in FUNCTION_LEVEL)

    hidden = [f"{name}:{line} imports {target} inside a function"
              for name, found in GRAPH.items() for target, line, inner in found if inner and not allowed(name, target)]
    assert not hidden, "\n".join(hidden)


def test_no_room_holds_more_than_ten_modules():
    crowded = {folder.relative_to(ROOT): n for folder in (ROOT / "benchmark").rglob("*")
               if folder.is_dir() and (n := len(list(folder.glob("*.py")))) > 10}
    assert not crowded, crowded


def test_the_walk_sees_an_upward_import_and_a_circle(tmp_path):
    """The checks above can fail: a model importing the run loop is upward, and the walker finds
    function-level imports."""
    source = "def f():\n    from ..run.runner import run_strategy\n"
    path = tmp_path / "__init__.py"
    path.write_text(source)
    (target, line, inner), = [e for e in _imports("benchmark.models", path) if e[0].startswith("benchmark.run")]
    assert target == "benchmark.run.runner" and inner and _floor(target) > _floor("benchmark.models")


def test_the_cache_benchmark_keeps_its_path_and_needs_no_avalanche():
    """`python -m benchmark.perf_cache` (BENCHMARKS.md, GPU-machine scripts) still imports, without
    Avalanche or open_clip: it runs on a bare GPU machine."""
    import subprocess
    import sys

    code = "import sys, benchmark.perf_cache as m; print(callable(m.main), 'avalanche' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False", "False"], out.stderr[-2000:]


def test_the_training_code_loads_without_jax_and_jax_still_imports_after():
    """avalanche -> qpsolvers probes JAX's solvers as it loads (1.1 s of every process's start-up);
    cfbench keeps JAX out while qpsolvers loads (benchmark/__init__.py), and only then."""
    import subprocess
    import sys

    code = ("import sys, benchmark.run.runner, qpsolvers; print('jax' in sys.modules, "
            "'jaxopt_osqp' in qpsolvers.available_solvers); import jax; print(jax.numpy.zeros(2).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.stdout.split() == ["False", "False", "(2,)"], out.stderr[-2000:]
