"""Runtime libraries are imported only under edgeres/backends/: in code, and in scripts embedded as strings."""

import ast
import re
from pathlib import Path

import edgeres

PACKAGE = Path(edgeres.__file__).parent
RUNTIMES = {"onnxruntime", "openvino", "tensorrt", "polygraphy", "pycuda", "cuda"}
_IMPORT = re.compile(r"\bimport\s+([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)|\bfrom\s+([A-Za-z_][\w.]*)\s+import\b")


def _runtime(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in RUNTIMES


def _in_text(text: str) -> list[str]:
    """Runtime imports in a string: parsed as Python where it parses, else wherever `import X` / `from X import`."""
    try:
        return _in_tree(ast.parse(text))
    except SyntaxError:
        names = [m for many, one in _IMPORT.findall(text) for m in ([one] if one else re.split(r"\s*,\s*", many))]
        return [f"import {m}" for m in names if _runtime(m)]


def _in_tree(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _runtime(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _runtime(node.module):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__") and _runtime(str(node.args[0].value)):
                found.append(f"{name}({node.args[0].value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            found += [f"{hit} (in a string)" for hit in _in_text(node.value)]
    return found


def scan(source: str) -> list[str]:
    return _in_tree(ast.parse(source))


def test_the_scan_finds_code_strings_and_dynamic_imports():
    assert scan("import onnxruntime as ort") == ["import onnxruntime"]
    assert scan("def f():\n    from openvino import Core") == ["from openvino import ..."]
    assert scan("importlib.import_module('tensorrt')") == ["import_module('tensorrt')"]
    probe = 'PROBE = r"""\nimport json, sys\nimport numpy as np\nimport onnxruntime as ort\n"""'
    assert scan(probe) == ["import onnxruntime (in a string)"]
    assert scan('CMD = "python -c \'import numpy, tensorrt; print(1)\'"') == ["import tensorrt (in a string)"]
    assert scan("from edgeres.backends.tensorrt import bundle\nimport numpy") == []  # edgeres's own module


def test_no_runtime_import_outside_backends():
    hits = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "backends") in path.parents:
            continue
        found = scan(path.read_text())
        if found:
            hits[str(path.relative_to(PACKAGE))] = found
    assert hits == {}, f"runtime libraries imported outside edgeres/backends/: {hits}"
