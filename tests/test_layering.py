"""The import graph of the product: no cycle, and every import points down the layers.

Layers, bottom to top:
  0 core:         models, configs, weights, file I/O, errors, numerics (mlx_sd.unet, mlx_sd.io, ...)
  1 on the core:  LoRA (lora.*) and conversion (convert.*)
  2 application:  training parts, pipeline, generation, evaluation, the studio, CLIs and the demo
  3 the script:   train.py
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlx_sd", "lora", "convert")

# Longest matching prefix wins; a module that matches none fails the test (give it a layer here).
LAYERS = {
    "mlx_sd": 0,
    "mlx_sd.configs": 0,
    "mlx_sd.metrics": 0,  # feature models and metric maths
    "mlx_sd.metrics.cli": 2,
    "mlx_sd.studio": 2,
    "mlx_sd.data": 2,
    "mlx_sd.sources": 2,
    "mlx_sd.captions": 2,
    "mlx_sd.model_card": 2,
    "mlx_sd.buckets": 2,
    "mlx_sd.training": 2,
    "mlx_sd.trainer": 2,
    "mlx_sd.train_options": 2,
    "mlx_sd.run": 2,
    "mlx_sd.checkpoint": 2,
    "mlx_sd.distributed": 2,
    "mlx_sd.pipeline": 2,
    "mlx_sd.validation": 2,
    "mlx_sd.logs": 2,
    "mlx_sd.generate": 2,
    "mlx_sd.generate_folder": 2,
    "mlx_sd.clip_filter": 2,
    "mlx_sd.evaluate": 2,
    "mlx_sd.doctor": 2,
    "mlx_sd.demo": 2,
    "lora": 1,
    "convert": 1,
    "convert.__main__": 2,
    "train": 3,
}


def modules() -> dict[str, Path]:
    found = {"train": ROOT / "train.py"}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = f
    return found


def layer(module: str) -> int | None:
    best = None
    for prefix, n in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, n)
    return None if best is None else best[1]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The product modules `module` imports (relative imports resolved; `from pkg import mod` counts mod)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join(prefix + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` / `from a.b import name`: the module part
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_every_import_points_down():
    up = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
          for m, deps in sorted(graph().items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert up == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g = graph()
    assert "mlx_sd.model_folder" in g["convert.folder"]  # lazy and relative imports are resolved
    assert layer("mlx_sd.unet") == 0 and layer("convert.__main__") == 2 and layer("train") == 3
