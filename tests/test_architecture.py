"""The floors of the house, read from the code's imports (top-level and inside functions alike).

infra/            ground floor: mesh and sharding, checkpoint I/O, the phase schedule
models/ diffusion/ data/ configs/   never import training/
pipeline/ generate.py evaluation/ export/ tools/   sample through `pipeline`, never training/
and no two modules import each other, directly or round a longer loop.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).parents[1]

# (who, what it must not import). A folder's rule covers every module under it.
FORBIDDEN = (
  ("md_jax/infra", "md_jax.training"),
  ("md_jax/infra", "md_jax.pipeline"),
  ("md_jax/infra", "md_jax.models"),
  ("md_jax/infra", "md_jax.data"),
  ("md_jax/models", "md_jax.training"),
  ("md_jax/models", "md_jax.pipeline"),
  ("md_jax/diffusion", "md_jax.training"),
  ("md_jax/data", "md_jax.training"),
  ("configs", "md_jax.training"),
  ("md_jax/pipeline", "md_jax.training"),
  ("md_jax/generate.py", "md_jax.training"),
  ("md_jax/evaluation", "md_jax.training"),
  ("md_jax/export", "md_jax.training"),
  ("md_jax/tools", "md_jax.training"),
)


def imported_modules(source: str, package: str) -> set[str]:
  """Every md_jax module a file's source imports, wherever the import statement stands
  (`from md_jax.a import b` counts as md_jax.a and md_jax.a.b; relative imports resolved
  against `package`)."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, *([base] if base else [])])
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return {name for name in found if name == "md_jax" or name.startswith("md_jax.")}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files():
  for folder in ("md_jax", "configs", "launch"):
    yield from sorted((REPO / folder).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in source_files()}
  graph = {}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    graph[name] = {m for m in imported_modules(path.read_text(), package) if m in files} - {name}
  return graph


def forbidden_edges(graph) -> list[str]:
  edges = []
  for rule_path, banned in FORBIDDEN:
    who = rule_path.removesuffix(".py").replace("/", ".")
    for module, imports in graph.items():
      if module != who and not module.startswith(who + "."):
        continue
      edges += [
        f"{module} -> {m}" for m in sorted(imports) if m == banned or m.startswith(banned + ".")
      ]
  return edges


def cycles(graph) -> list[list[str]]:
  """The import loops (strongly connected components of more than one module), Tarjan's way."""
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
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_module_imports_across_a_forbidden_floor():
  assert forbidden_edges(import_graph()) == []


def test_no_two_modules_import_each_other():
  assert cycles(import_graph()) == []


def test_the_checks_catch_an_edge_a_lazy_import_and_a_loop():
  source = "def f():\n  from md_jax.training import diffusion\n"
  graph = {"md_jax.pipeline.x": imported_modules(source, "md_jax.pipeline")}
  assert forbidden_edges(graph) == [
    "md_jax.pipeline.x -> md_jax.training",
    "md_jax.pipeline.x -> md_jax.training.diffusion",
  ]
  assert imported_modules("from . import phases\n", "md_jax.infra") == {
    "md_jax.infra",
    "md_jax.infra.phases",
  }
  loop = {"md_jax.a": {"md_jax.b"}, "md_jax.b": {"md_jax.c"}, "md_jax.c": {"md_jax.a"}}
  assert cycles({**loop, "md_jax.d": {"md_jax.a"}}) == [["md_jax.a", "md_jax.b", "md_jax.c"]]


def test_no_source_file_holds_more_than_400_lines():
  lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in source_files()}
  assert {path: n for path, n in lines.items() if n > 400} == {}
