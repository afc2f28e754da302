"""The code's structure: no import circles among ppvilg's and ppvilg_deploy's modules (imports inside functions
count too: a lazy import hides a circle, it does not remove it), the deployment runtime never imports the
training package, the model reads no process-global parallel state, and config.py imports no training code."""
import ast
import os

from conftest import ROOT

PACKAGES = {"ppvilg": os.path.join(ROOT, "ppvilg"),
            "ppvilg_deploy": os.path.join(ROOT, "deploy", "python", "ppvilg_deploy")}


def _module_files():
    out = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(folder):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].replace(os.sep, ".")
                    name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(dirpath, f)
    return out


def import_graph():
    """{module: set of project modules it imports}, from the source (every import statement, at any depth)."""
    files = _module_files()
    graph = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod when it is a module, else a name of pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:   # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One import circle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    graph = import_graph()
    assert "ppvilg.config" in graph and "ppvilg_deploy.decoding" in graph   # the walk found the modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_depend_one_way():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("ppvilg_deploy"):
            assert not [d for d in deps if d.startswith("ppvilg.") or d == "ppvilg"], \
                f"{name}: the deployment runtime imports the training package"
    assert not [d for d in graph["ppvilg.config"] if d.startswith("ppvilg.engine")], graph["ppvilg.config"]
    for name in ("ppvilg.models.vilg", "ppvilg.models.vilg_pp", "ppvilg.models.layout"):
        assert not [d for d in graph[name] if d.startswith(("ppvilg.distributed", "ppvilg.engine"))], \
            f"{name} imports {graph[name]}"


def test_no_module_global_parallel_state():
    import ppvilg.distributed.env as env
    assert not hasattr(env, "current") and not hasattr(env, "_STATE")


def test_nothing_reads_pickle_but_the_explicit_legacy_converter():
    """paddle.load / pickle.load run code from the file they read: only tools/convert_checkpoint.py's
    --legacy-pickle path may call them."""
    found = []
    for folder in ("ppvilg", "tools", "deploy", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                path = os.path.join(dirpath, f)
                if not f.endswith(".py") or path.endswith(os.path.join("tools", "convert_checkpoint.py")):
                    continue
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                for needle in ("paddle.load(", "pickle.load(", "pickle.loads(", "allow_pickle=True"):
                    if needle in text:   # (np.load without allow_pickle reads plain arrays only)
                        found.append(f"{os.path.relpath(path, ROOT)}: {needle}")
    assert not found, found


def test_inference_code_never_imports_the_training_engine():
    graph = import_graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    for module in ("ppvilg.inference", "ppvilg.generation", "ppvilg.export", "ppvilg.evaluation",
                   "ppvilg.checkpoints"):
        engine = sorted(m for m in reach(module) if m.startswith("ppvilg.engine"))
        assert not engine, f"{module} imports {engine}"
