"""The package's shape, read from its source with `ast`: no import cycle, and the modules the
command line reads before TensorFlow starts import none of it."""

import ast
import importlib
import os

import pytest

import faqd_tf
from faqd_tf.names import EXPORTS

PACKAGE = os.path.dirname(os.path.abspath(faqd_tf.__file__))
TENSORFLOW_FREE = (
    "faqd_tf.names",
    "faqd_tf.fields",
    "faqd_tf.options",
    "faqd_tf.config",
    "faqd_tf.runner",
    "faqd_tf.cli",
)


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path, top_level_only=False):
    """The modules `path` imports: faqd_tf's by name, others by their top package. Imports under
    `if TYPE_CHECKING:` never run; with `top_level_only`, those inside functions are left out too."""
    out = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                out.update(
                    a.name if a.name in MODULES else a.name.split(".")[0] for a in child.names
                )
            elif isinstance(child, ast.ImportFrom) and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    out.add(
                        full
                        if full in MODULES
                        else child.module
                        if child.module in MODULES
                        else child.module.split(".")[0]
                    )
            visit(child)

    with open(path) as f:
        visit(ast.parse(f.read()))
    return out


def _cycle(graph):
    """One import cycle of `graph` as a list of modules, or None."""
    state = {}

    def walk(module, trail):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return trail[trail.index(other) :] + [other]
            if other not in state:
                found = walk(other, trail + [other])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = walk(module, [module])
            if found:
                return found
    return None


def test_no_import_cycle():
    # Imports inside functions count: a lazy import only postpones a cycle.
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
        "a",
        "b",
        "c",
        "a",
    ]  # the check finds one


@pytest.mark.parametrize("module", TENSORFLOW_FREE)
def test_modules_read_before_tensorflow_starts_import_none_of_it(module):
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        imports = _imports(MODULES[current], top_level_only=True)
        assert not imports & {"tensorflow", "keras"}, (
            f"{current} (imported by {module}) imports TensorFlow"
        )
        todo += [i for i in imports if i in MODULES]
        todo += [
            current.rsplit(".", depth)[0] for depth in range(1, current.count(".") + 1)
        ]  # its packages run first


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_export_kinds_name_functions_that_exist(kind):
    for path in filter(None, (EXPORTS[kind].write, EXPORTS[kind].check)):
        module, name = path.split(":")
        assert callable(getattr(importlib.import_module(module), name)), path
