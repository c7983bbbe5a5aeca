"""The package's modules import each other in one direction: no import circles (issue 35).

Every import counts, a deferred one inside a function too (it still ties the two modules together: a lazy
`load_world_model` that imports a backend, which imports the caller back, is a circle), except a submodule taking
its own package's shared names (`cwm_ray.world_model.token` → `cwm_ray.world_model`: one package, whose `__init__`
loads its backends lazily) and the string table of cwm_ray.builtin_models, which names its builders rather than
importing them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cwm_ray"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target not in modules or target == name:
                    continue
                if name.startswith(target + "."):
                    continue  # a submodule taking the shared names of its own package's __init__
                graph[name].add(target)
                break  # `from a.b import c`: the module c if it is one, else a.b
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_package_has_no_import_circle() -> None:
    graph = _graph()
    assert len(graph) > 40 and graph["cwm_ray.world_model.token"] >= {"cwm_ray.recognition", "cwm_ray.config"}
    cycle = _cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_module_ray_trains_controller_unpickles_leaves_transformers_out() -> None:
    """Ray Train's TrainController unpickles `cwm_ray.train.train_func`, so it imports `cwm_ray.train`, as every
    training driver does; neither uses transformers. With transformers' `get_scheduler` imported at the top (its
    optimization module pulls in peft and the modeling code), a 4-step CLI training took 46 s of CPU against 40-41
    without (two runs each): the controller's and the driver's imports, paid again for every training."""
    import subprocess
    import sys

    code = "import sys, cwm_ray.train; print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
