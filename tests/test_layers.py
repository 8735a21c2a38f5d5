"""server.py reads top to bottom in layers: after section 1 (the server and its surface, which may use
anything), each machinery section uses only the header and the sections above it. Read with `ast`,
not by running it: a name used in a section must not be defined in a later one."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server.py"
pytestmark = pytest.mark.store_of_its_own  # reads server.py: once, whatever the store
BANNER = re.compile(r"^# === (\d+)\. (.+?) =*$")


def sections(source: str) -> list[tuple[int, str, int]]:
    """(number, title, first line) of every numbered banner, in order."""
    found = []
    for line_number, line in enumerate(source.splitlines(), start=1):
        if match := BANNER.match(line):
            found.append((int(match[1]), match[2], line_number))
    return found


def section_of(line: int, banners: list[tuple[int, str, int]]) -> int:
    """The number of the section a line is in (0: the header before section 1)."""
    number = 0
    for banner_number, _, first in banners:
        if line >= first:
            number = banner_number
    return number


def defined_names(statement: ast.stmt) -> Iterator[str]:
    """The module-level names a top-level statement defines."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield statement.name
    elif isinstance(statement, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        for target in targets:
            yield from (node.id for node in ast.walk(target) if isinstance(node, ast.Name))
    elif isinstance(statement, ast.Import | ast.ImportFrom):
        yield from ((alias.asname or alias.name).split(".")[0] for alias in statement.names)
    elif isinstance(statement, ast.If | ast.Try | ast.With):
        for inner in ast.iter_child_nodes(statement):
            if isinstance(inner, ast.stmt):
                yield from defined_names(inner)


class UsedNames(ast.NodeVisitor):
    """Names a statement reads from the module: every Name loaded, less each function's own locals."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}
        self.local: list[set[str]] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not any(node.id in scope for scope in self.local):
            self.used.setdefault(node.id, node.lineno)

    def visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
            for annotation in (arg.annotation for arg in self.arguments(node)):
                if annotation is not None:
                    self.visit(annotation)
            if node.returns is not None:
                self.visit(node.returns)
        body = node.body if isinstance(node.body, list) else [node.body]
        self.local.append({arg.arg for arg in self.arguments(node)} | self.assigned(body))
        for statement in body:
            self.visit(statement)
        self.local.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_function

    def visit_comprehension_scope(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> None:
        self.local.append({name.id for generator in node.generators for name in ast.walk(generator.target)
                           if isinstance(name, ast.Name)})
        self.generic_visit(node)
        self.local.pop()

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_comprehension_scope

    @staticmethod
    def arguments(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[ast.arg]:
        args = node.args
        extra = [arg for arg in (args.vararg, args.kwarg) if arg is not None]
        return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]

    @staticmethod
    def assigned(body: list[ast.stmt]) -> set[str]:
        """Names a function body binds (assignments, loops, withs, imports, nested defs, walrus)."""
        names: set[str] = set()
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.Import | ast.ImportFrom):
                    names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ExceptHandler) and node.name:
                    names.add(node.name)
        return names


def layer_violations(source: str) -> list[str]:
    """Every use, in a machinery section, of a name that a later section defines."""
    banners = sections(source)
    tree = ast.parse(source)
    defined_in: dict[str, int] = {}
    for statement in tree.body:
        for name in defined_names(statement):
            defined_in.setdefault(name, section_of(statement.lineno, banners))
    titles = {number: title for number, title, _ in banners}
    problems = []
    for statement in tree.body:
        here = section_of(statement.lineno, banners)
        if here <= 1:
            continue  # the header and the server's own surface may use anything
        visitor = UsedNames()
        visitor.visit(statement)
        for name, line in visitor.used.items():
            if defined_in.get(name, 0) > here:
                there = defined_in[name]
                problems.append(f"line {line}: section {here} ({titles[here]}) uses {name}, defined in "
                                f"section {there} ({titles[there]})")
    return problems


def test_each_machinery_section_uses_only_the_sections_above_it() -> None:
    problems = layer_violations(SERVER.read_text())
    assert not problems, "server.py's sections are not layers:\n" + "\n".join(problems)


def test_the_banners_are_numbered_in_order() -> None:
    numbers = [number for number, _, _ in sections(SERVER.read_text())]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 8


def test_the_checker_finds_a_name_reached_from_below() -> None:
    """The check itself can fail: a section that calls a function defined two sections later is named."""
    source = ("# === 1. Surface ===\nx = 1\n# === 2. Low ===\ndef low():\n    return high()\n"
              "# === 3. High ===\ndef high():\n    value = 2\n    return value\n")
    assert layer_violations(source) == ["line 5: section 2 (Low) uses high, defined in section 3 (High)"]
    assert layer_violations(source.replace("return high()", "high = 3\n    return high")) == []


# --- nothing leans on a library's private parts


NAMED_TUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make"})  # public, underscored against field clashes


def guarded_imports(tree: ast.AST) -> set[ast.AST]:
    """Imports inside a `try` that catches ImportError: each has a fallback when the module goes."""
    guarded: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(handler.type, ast.Name) and handler.type.id == "ImportError" for handler in node.handlers):
            guarded.update(inner for statement in node.body for inner in ast.walk(statement)
                           if isinstance(inner, ast.Import | ast.ImportFrom))
    return guarded


def private_uses(source: str) -> list[str]:
    """Imports of a module whose path has a private part (unless guarded by an ImportError fallback), and
    reads of a private attribute of anything but the object's own `self` or `cls`."""
    found = []
    tree = ast.parse(source)
    guarded = guarded_imports(tree)
    for node in ast.walk(tree):
        if node in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and any(
                part.startswith("_") for part in node.module.split(".")):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {alias.name}" for alias in node.names
                      if any(part.startswith("_") for part in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and node.attr not in NAMED_TUPLE_API:
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls"):
                found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_server_py_uses_no_private_module_or_attribute_of_a_library() -> None:
    assert private_uses(SERVER.read_text()) == []


def test_the_private_use_check_can_fail() -> None:
    source = "from mcp.server._otel import X\nmanager._handle_request(1)\nself._ok = 1\n"
    assert private_uses(source) == ["line 1: from mcp.server._otel import ...", "line 2: ._handle_request"]
    guarded = "try:\n    from mcp.server._otel import X\nexcept ImportError:\n    X = None\n"
    assert private_uses(guarded) == []


def test_the_one_guarded_private_import_is_the_sdks_span_middleware() -> None:
    """Listed, so that a new one is a decision: the SDK documents dropping its span middleware from
    mcp.middleware, but its class lives in a private module."""
    tree = ast.parse(SERVER.read_text())
    modules = sorted(node.module for node in guarded_imports(tree) if isinstance(node, ast.ImportFrom)
                     and node.module and any(part.startswith("_") for part in node.module.split(".")))
    assert modules == ["mcp.server._otel"]


def test_without_a_tracing_sdk_the_span_middleware_goes_and_every_other_built_in_stays() -> None:
    import server

    chain = list(server.mcp.middleware)
    try:
        server.drop_sdk_spans()
        kept = [type(layer).__name__ for layer in server.mcp.middleware]
    finally:
        server.mcp.middleware[:] = chain
    assert "OpenTelemetryMiddleware" not in kept and "RequestStateBoundary" in kept and kept[-1] == "function"


def test_the_sdk_middleware_chain_keeps_every_built_in_the_installed_sdk_ships() -> None:
    """server.py adds its own middleware to `mcp.middleware` (the SDK's public chain) and replaces no built-in:
    a bare MCPServer's chain, by class, is all still there, outermost first, ours after them."""
    from mcp.server import MCPServer

    import server

    built_in = [type(layer) for layer in MCPServer("bare").middleware]
    ours = [type(layer) for layer in server.mcp.middleware]
    assert built_in, "the SDK ships built-in middleware"
    assert ours[:len(built_in)] == built_in, (ours, built_in)
    assert server.mcp.middleware[len(built_in):] == [server.serve_message]


def test_uvicorns_httptools_protocol_still_has_every_hook_the_head_bound_overrides() -> None:
    """BoundedHead subclasses uvicorn's httptools protocol (uvicorn has no head-size limit there). pyproject.toml
    pins the uvicorn versions it is tested against; should one rename a hook, the server falls back to h11
    (with a log line), and this test says which hook went."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    import server

    missing = server.httptools_hooks_missing(HttpToolsProtocol)
    assert not missing, f"uvicorn {uvicorn.__version__}'s HttpToolsProtocol has no {', '.join(missing)}: " \
                        "update BoundedHead in server.py, or keep pyproject.toml's uvicorn pin"
    assert issubclass(server.bounded_http_protocol(), HttpToolsProtocol)
    assert server.httptools_hooks_missing(type("Renamed", (), {"on_url": lambda self: None})) == [
        hook for hook in server.HTTPTOOLS_HOOKS if hook != "on_url"]
