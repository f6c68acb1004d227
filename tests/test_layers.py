"""The library's layers: no module imports one above it, no import cycles; test files share helpers, not tests;
the one private jax API the library uses is still there."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Top-level modules and packages of clipjax/, lowest layer first. A module may import its own
# layer and those below (lazy imports inside functions count too); a new top-level name must be
# placed here.
LAYERS = (
    ("errors", "atomic", "host_env", "progress", "hlo_flops", "distributed", "preemption", "lock", "step_breakdown"),  # foundations
    ("models", "sharding", "losses", "vocab_loss", "locca", "optim", "mfu", "metrics", "data"),  # the parts
    ("evals", "stages", "config", "config_diff"),  # evaluation and the resolved config
    ("train_step", "checkpoint", "interop", "compile_ahead", "report"),  # the step, its state and plans
    ("run", "train", "evaluate", "inference", "planner"),  # whole runs
    ("main", "inference_cli", "bench"),  # command lines and benchmarks
)


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the clipjax modules it imports anywhere in its file (``pkg.mod`` resolved to a module where it is one)."""
    files = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names if a.name.startswith("clipjax")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("clipjax"):
                found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = found - {module, "clipjax"}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1]
    hits = [i for i, names in enumerate(LAYERS) if top in names]
    assert hits, f"clipjax.{top} is in no layer: place it in tests/test_layers.py's LAYERS"
    return hits[0]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if a != "clipjax" and layer(b) > layer(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_layer_above_it_and_no_cycles():
    graph = import_graph(ROOT / "clipjax")
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """Positive control: a small package with one of each."""
    pkg = tmp_path / "clipjax"
    (pkg / "data").mkdir(parents=True)
    files = {"__init__.py": "", "train.py": "", "data/__init__.py": "",
             "losses.py": "def f():\n    from clipjax import train\n",  # lazy, still an import
             "data/config.py": "from clipjax.data.sources import SOURCES\n",
             "data/sources.py": "from clipjax.data import config\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert upward_imports(graph) == [("clipjax.losses", "clipjax.train")]
    assert cycles(graph) == [["clipjax.data.config", "clipjax.data.sources"]]


def test_test_files_import_shared_helpers_not_other_test_files():
    """Each test file runs alone (``pytest tests/test_mfu.py``); shared code lives in helpers.py or conftest.py."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[-1].startswith("test_") or n == "tests"
                          or n.startswith("tests.")]
    assert offenders == []


def test_the_private_jax_state_the_library_reads_is_there():
    """``distributed.coordination_state`` reads jax._src; a jax release that moves it must fail here, not mid-run."""
    from jax._src.lib import _jax

    from clipjax import distributed

    fields = type(distributed.coordination_state()).__annotations__
    assert {"client", "preemption_sync_manager"} <= set(fields)
    assert callable(getattr(_jax.DistributedRuntimeClient, "wait_at_barrier", None))
