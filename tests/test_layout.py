"""The package's shape, checked: no import cycle, no private name used across modules, no
library module over 600 lines or importing torch at load time, a train step that names no
method. (Tools under ocl_jax/tools are outside the library.)"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "ocl_jax"
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(include_tools=False):
  for path in sorted(PACKAGE.rglob("*.py")):
    if include_tools or "tools" not in path.relative_to(PACKAGE).parts:
      yield _module_name(path), path


def _module_level_imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The ocl_jax modules `path` imports when it is loaded (not inside functions)."""
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("ocl_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ocl_jax"):
      for a in node.names:  # `from pkg import module` imports the module, else the package
        found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
  return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` (name -> names it imports) as a path, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
  modules = dict(_modules(include_tools=True))
  graph = {
      name: _module_level_imports(path, set(modules)) - {name} for name, path in modules.items()
  }
  assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _imported_ocl_modules(tree: ast.Module) -> set[str]:
  """Local names bound to ocl_jax modules or packages (`from ocl_jax.x import y [as z]`)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ocl_jax"):
      for a in node.names:
        target = f"{node.module}.{a.name}"
        if (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / target.replace(".", "/")
        ).is_dir():
          names.add(a.asname or a.name)
        if a.name.startswith("_") and not a.name.startswith("__"):
          names.add(f"!{a.name}")
    elif isinstance(node, ast.Import):
      names |= {a.asname for a in node.names if a.name.startswith("ocl_jax") and a.asname}
  return names


@pytest.mark.parametrize("folder", ["ocl_jax", "tests"])
def test_no_private_name_used_from_another_module(folder):
  bad = []
  for path in sorted((ROOT / folder).rglob("*.py")):
    tree = ast.parse(path.read_text())
    modules = _imported_ocl_modules(tree)
    bad += [f"{path.relative_to(ROOT)}: imports {n[1:]}" for n in modules if n.startswith("!")]
    for node in ast.walk(tree):
      if (
          isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name)
          and node.value.id in modules
          and node.attr.startswith("_")
          and not node.attr.startswith("__")
      ):
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_library_modules_are_short_and_load_without_torch():
  long, torch = [], []
  for name, path in _modules():
    if (n := len(path.read_text().splitlines())) > MAX_LINES:
      long.append(f"{name}: {n} lines")
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        torch += [f"{name} imports {m}" for m in mods if m and m.split(".")[0] == "torch"]
  assert not long, f"modules over {MAX_LINES} lines: {long}"
  assert not torch, torch


def test_the_train_step_names_no_method():
  from ocl_jax import methods

  source = (PACKAGE / "train" / "step.py").read_text()
  tree = ast.parse(source)
  strings = {
      n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
  }
  assert not strings & set(methods.names()), strings & set(methods.names())
  assert ".method ==" not in source and "method.name" not in source
