"""The package's layers hold: codecs -> storage -> service -> tools, a lower layer never importing a higher
one, and the embedded log runs where pyzmq is not installed.  docs/ARCHITECTURE.md draws the same layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "walsvc"

# Module -> layer.  Codecs and pure decisions: bytes and values in and out, no files, sockets or threads.
LAYERS = {
    0: {"errors", "metrics", "record", "_record_c", "frame", "protocol", "group", "producer_session", "ingest",
        "repair"},
    1: {"config", "access", "fsync", "segment", "scan", "recovery", "head", "lock", "cursor", "retention", "rotation",
        "log", "logid", "seek", "nori", "stopped"},
    2: {"endpoints", "wakeup", "writer", "_writer_c", "producer", "reader", "mirror", "jetstream", "prometheus"},
    3: {"cli", "verify", "status", "up", "__main__", "workers"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
NAMES = ["codecs", "storage", "service", "tools"]
SERVICE_ONLY = {"zmq", "nats", "prometheus_client"}  # third-party packages below the service layer must not need


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _imports(path: Path) -> set[str]:
    """walsvc modules and third-party top-level packages a file imports, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = node.module.split(".")[0] if node.module else None
                found |= {base} if base else {alias.name for alias in node.names}
            elif node.module:
                top = node.module.split(".")[0]
                found.add(node.module.split(".")[1] if top == "walsvc" and "." in node.module else top)
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found


def test_every_module_has_a_layer() -> None:
    modules = {_module(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules <= set(LAYER_OF), f"modules without a layer (add them to LAYERS): {modules - set(LAYER_OF)}"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        if module == "__init__":
            continue
        layer = LAYER_OF[module]
        for name in _imports(path):
            if name in LAYER_OF and LAYER_OF[name] > layer:
                wrong.append(f"{path.relative_to(ROOT)} ({NAMES[layer]}) imports {name} ({NAMES[LAYER_OF[name]]})")
            if layer < 2 and name in SERVICE_ONLY:
                wrong.append(f"{path.relative_to(ROOT)} ({NAMES[layer]}) imports {name}, a service dependency")
    assert not wrong, "\n".join(wrong)


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        if module != "__init__":
            graph.setdefault(module, set()).update(n for n in _imports(path) if n in LAYER_OF and n != module)
    return graph


def test_no_modules_import_each_other() -> None:
    """Within a layer too, imports run one way: a circle (even through a lazy import) means two modules are
    one concept split in two, or one reaches up into the other's caller."""
    graph = _import_graph()
    circles = []
    for start in sorted(graph):
        path, seen = [start], {start}
        stack = [iter(sorted(graph[start]))]
        while stack:  # depth-first from `start` through modules named after it (each circle once, from its first)
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
                seen.discard(path.pop())
            elif step == start:
                circles.append(" -> ".join([*path, start]))
            elif step not in seen and step > start:
                path.append(step)
                seen.add(step)
                stack.append(iter(sorted(graph.get(step, ()))))
    assert not circles, "modules that import each other:\n" + "\n".join(circles)


NO_ZMQ = r"""
import sys, tempfile
sys.modules["zmq"] = None  # `import zmq` now fails, as where pyzmq is not installed
import walsvc
from walsvc import Log, Record
with Log.open(tempfile.mkdtemp() + "/wal", fsync="always") as log:
    log.append_batch([Record.put(b"k%d" % i, b"v") for i in range(5)])
    assert [r.lsn for r in log.read()] == [1, 2, 3, 4, 5]
    assert [len(b) for b in log.read_batches()] == [5]
try:
    walsvc.Producer
except ImportError:
    print("embedded ok; Producer needs pyzmq")
"""


def test_the_embedded_log_runs_without_pyzmq() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_ZMQ], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "embedded ok; Producer needs pyzmq"
