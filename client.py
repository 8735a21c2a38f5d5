"""client.py: use a stream-http server (or any Streamable HTTP MCP server) from the command line.

    uv run client.py                               # list tools, resources, templates and prompts
    uv run client.py call add a=2 b=3              # call a tool; values are JSON where they parse
    uv run client.py call add_note title=Groceries 'tags=["home"]'
    uv run client.py read notes://index            # read a resource
    uv run client.py prompt summarize_notes tag=home
    uv run client.py --url https://mcp.example.com/mcp --modern list

--legacy pins the initialize-handshake protocol (2025-11-25), --modern pins 2026-07-28; by default
the client asks the server which it speaks. Failures print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

DEFAULT_URL = "http://127.0.0.1:8000/mcp"
MODERN_VERSION = "2026-07-28"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Failure(Exception):
    """Something went wrong that the user should read about in one line."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="client.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--url", default=os.environ.get("MCP_URL", DEFAULT_URL),
                        help=f"the server's MCP endpoint (default: $MCP_URL or {DEFAULT_URL})")
    era = parser.add_mutually_exclusive_group()
    era.add_argument("--legacy", action="store_true", help="use the initialize handshake (2025-11-25)")
    era.add_argument("--modern", action="store_true", help=f"use protocol {MODERN_VERSION}")
    parser.add_argument("--yes", action="store_true", help="answer yes when the server asks for confirmation")
    parser.add_argument("command", nargs="?", default="list", choices=["list", "call", "read", "prompt"])
    parser.add_argument("target", nargs="?", help="tool name, resource URI or prompt name")
    parser.add_argument("arguments", nargs="*", metavar="key=value", help="arguments; values are JSON where they parse")
    args = parser.parse_args(argv)
    if args.command != "list" and not args.target:
        parser.error(f"'{args.command}' needs a {'resource URI' if args.command == 'read' else 'name'}")
    return args


def parse_arguments(pairs: Sequence[str], schema: dict[str, Any] | None = None, *,
                    all_text: bool = False) -> dict[str, Any]:
    """`key=value` pairs as a dict. A value is taken as JSON (2, true, ["a"]) where it parses, except
    for arguments the schema declares as strings, and everywhere with `all_text` (prompt arguments)."""
    properties = (schema or {}).get("properties", {})
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Failure(f"argument {pair!r} is not key=value")
        if all_text or properties.get(key, {}).get("type") == "string":
            result[key] = value
            continue
        try:
            result[key] = json.loads(value)
        except ValueError:
            result[key] = value
    return result


def connect(args: argparse.Namespace) -> Client:
    mode = "legacy" if args.legacy else MODERN_VERSION if args.modern else "auto"
    return Client(args.url, mode=mode, elicitation_callback=Answerer(args.yes),
                  logging_callback=show_log, log_level="info")


async def run(args: argparse.Namespace) -> int:
    async with connect(args) as client:
        if args.command == "list":
            await show_catalogue(client)
            return 0
        if args.command == "call":
            return await call_tool(client, args.target, parse_arguments(args.arguments, await input_schema(
                client, args.target)))
        if args.command == "read":
            result = await client.read_resource(args.target)
            for content in result.contents:
                out.print(content.text if isinstance(content, types.TextResourceContents)
                          else f"<{content.mime_type}, {len(content.blob) * 3 // 4} bytes>")
            return 0
        prompt = await client.get_prompt(args.target, parse_arguments(args.arguments, all_text=True))
        for message in prompt.messages:
            text = message.content.text if isinstance(message.content, types.TextContent) else message.content
            out.print(f"[bold]{message.role}:[/bold] {text}")
        return 0


async def input_schema(client: Client, name: str) -> dict[str, Any] | None:
    tool = next((tool for tool in (await client.list_tools()).tools if tool.name == name), None)
    return tool.input_schema if tool else None


async def show_catalogue(client: Client) -> None:
    info = client.server_info
    out.print(f"[bold]{info.name if info else 'server'}[/bold] {info.version if info else ''} "
              f"(protocol {client.protocol_version})")
    sections = [
        ("Tools", (await client.list_tools()).tools, lambda t: (t.name, t.description)),
        ("Resources", (await client.list_resources()).resources, lambda r: (r.uri, r.description)),
        ("Resource templates", (await client.list_resource_templates()).resource_templates,
         lambda r: (r.uri_template, r.description)),
        ("Prompts", (await client.list_prompts()).prompts, lambda p: (p.name, p.description)),
    ]
    for title, items, describe in sections:
        out.print(f"\n[bold]{title}[/bold] ({len(items)})")
        for item in items:
            name, description = describe(item)
            out.print(f"  {name}  [dim]{first_sentence(description)}[/dim]")


async def call_tool(client: Client, name: str, arguments: dict[str, Any]) -> int:
    with ProgressDisplay() as progress:
        result = await client.call_tool(name, arguments, progress_callback=progress.update)
    if result.is_error:
        text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
        raise Failure(f"tool {name} failed: {' '.join(text.split())}")
    if result.structured_content is not None:
        out.print_json(data=result.structured_content)
    else:
        for content in result.content:
            out.print(content.text if isinstance(content, types.TextContent) else content)
    return 0


class ProgressDisplay:
    """Shows the progress a tool reports: a bar on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed:g}/{task.total:g}"), TimeElapsedColumn(),
                            console=err, transient=True)
        self.task: TaskID | None = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.task is not None:
            self.bar.stop()

    async def update(self, progress: float, total: float | None, message: str | None) -> None:
        description = message or "working"
        if not err.is_terminal:
            err.print(f"progress {progress:g}{f'/{total:g}' if total else ''}: {description}")
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)
        self.bar.update(self.task, completed=progress, total=total, description=description)


async def show_log(params: types.LoggingMessageNotificationParams) -> None:
    err.print(f"[dim]{params.level}: {params.data}[/dim]")


class Answerer:
    """Answers the server's questions (elicitation): on the terminal, or yes with --yes."""

    def __init__(self, assume_yes: bool) -> None:
        self.assume_yes = assume_yes

    async def __call__(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        schema = getattr(params, "requested_schema", None) or {}
        fields: dict[str, Any] = schema.get("properties", {})
        if self.assume_yes:
            return types.ElicitResult(action="accept", content={k: _default_answer(v) for k, v in fields.items()})
        if not sys.stdin.isatty():
            err.print(f"[yellow]The server asks: {params.message} (declined: not a terminal; use --yes)[/yellow]")
            return types.ElicitResult(action="decline")
        err.print(f"[bold]The server asks:[/bold] {params.message}")
        content = {}
        for name, spec in fields.items():
            answer = await anyio.to_thread.run_sync(input, f"  {spec.get('description') or name} ")
            content[name] = _coerce(answer, spec)
        return types.ElicitResult(action="accept", content=content)


def _default_answer(spec: dict[str, Any]) -> Any:
    if "default" in spec:
        return spec["default"]
    return {"boolean": True, "integer": 0, "number": 0}.get(spec.get("type", ""), "")


def _coerce(answer: str, spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    if kind == "boolean":
        return answer.strip().lower() in ("y", "yes", "true", "1")
    if kind in ("integer", "number"):
        return (int if kind == "integer" else float)(answer)
    return answer


def first_sentence(text: str | None) -> str:
    flat = " ".join((text or "").split())
    return flat.split(". ")[0].rstrip(".") + "." if flat else ""


def describe(exc: BaseException, url: str) -> str:
    """One line that says what went wrong, found inside the SDK's exception groups."""
    if isinstance(exc, Failure):
        return str(exc)
    if isinstance(exc, httpx2.ConnectError):
        return f"cannot connect to {url}: {exc} (is the server running? start it with: uv run server.py)"
    if isinstance(exc, httpx2.TimeoutException):
        return f"{url} did not answer in time"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"{url} answered HTTP {exc.response.status_code}: {exc.response.text[:200]}"
    if isinstance(exc, MCPError):
        return f"the server refused: {exc.message} (error {exc.code})"
    if isinstance(exc, httpx2.HTTPError):
        return f"HTTP error talking to {url}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return anyio.run(run, args)
    except BaseException as exc:  # every failure becomes one readable line, never a traceback
        first = first_leaf(exc)
        if isinstance(first, SystemExit):  # rich exits this way when stdout is a closed pipe
            return first.code if isinstance(first.code, int) else 1
        if isinstance(first, KeyboardInterrupt):
            return 130
        err.print(f"[red]error:[/red] {describe(first, args.url)}")
        return 1


def first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside the exception groups the SDK's task groups raise."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
