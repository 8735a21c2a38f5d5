"""client.py: use a stream-http server (or any Streamable HTTP MCP server) from the command line.

    uv run client.py                               # list tools, resources, templates and prompts
    uv run client.py call add a=2 b=3              # call a tool; values are JSON where they parse
    uv run client.py call add_note title=Groceries 'tags=["home"]'
    uv run client.py read notes://index            # read a resource
    uv run client.py prompt summarize_notes tag=home
    uv run client.py --url https://mcp.example.com/mcp --modern list
    uv run client.py logout                        # revoke this server's tokens and forget them

--legacy pins the initialize-handshake protocol (2025-11-25), --modern pins 2026-07-28; by default
the client asks the server which it speaks. When the server asks for sign-in, the client opens your
browser (or prints the link with --no-browser), waits for the answer on a loopback port, and keeps the
tokens in an owner-only file in your config directory; it refreshes them silently after that. When a
tool sends you to a link (a Google permission, say), the client shows it, opens it once you agree (at
once with --yes; never with --no-browser), and waits until you are done in the browser.
A wrong command line prints one line on stderr and exits 2; every other failure prints one line and
exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import html
import json
import logging
import os
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp.shared.exceptions import MCPError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

DEFAULT_URL = "http://127.0.0.1:8000/mcp"
MODERN_VERSION = "2026-07-28"
SIGN_IN_TIMEOUT_S = 300
MCP_PATH = "/mcp"  # where stream-http serves MCP, for the hint when --url names only the origin
CALLBACK_CSS = ("body{margin:0;font:16px/1.5 system-ui,sans-serif;color:#1b1f24;background:#f6f7f9}"
                "main{max-width:32rem;margin:2rem auto;padding:1.5rem;background:#fff;border:1px solid #d0d7de;"
                "border-radius:12px}h1{font-size:1.35rem}@media (max-width:30rem){main{margin:0;border-radius:0}}")
CALLBACK_CSS_HASH = base64.b64encode(hashlib.sha256(CALLBACK_CSS.encode()).digest()).decode()
CALLBACK_CSP = f"default-src 'none'; style-src 'sha256-{CALLBACK_CSS_HASH}'; frame-ancestors 'none'"


def callback_page(query: dict[str, str]) -> bytes:
    """The page the browser shows when it comes back to client.py: done, or why not."""
    if "code" in query:
        title, message = "Signed in", "You can close this tab and go back to the terminal."
    else:
        reason = query.get("error_description") or query.get("error") or "the server sent no answer"
        title, message = "Sign-in did not finish", f"{reason}. The terminal says what to do next."
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)} · client.py</title>'
            f"<style>{CALLBACK_CSS}</style></head><body><main><p>stream-http client.py</p>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></main></body></html>").encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(page)}\r\n"
            f"Content-Security-Policy: {CALLBACK_CSP}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode() + page


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Failure(Exception):
    """Something went wrong that the user should read about in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a wrong command line is one line on stderr, like every other failure (argparse
    prints its whole usage text); it keeps argparse's exit status 2, which tells it apart from those."""

    def error(self, message: str) -> NoReturn:
        err.print(f"[red]error:[/red] {escape(message)} (see: uv run client.py --help)")
        raise SystemExit(2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="client.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--url", default=os.environ.get("MCP_URL") or DEFAULT_URL,
                        help=f"the server's MCP endpoint (default: $MCP_URL or {DEFAULT_URL})")
    era = parser.add_mutually_exclusive_group()
    era.add_argument("--legacy", action="store_true", help="use the initialize handshake (2025-11-25)")
    era.add_argument("--modern", action="store_true", help=f"use protocol {MODERN_VERSION}")
    parser.add_argument("--yes", action="store_true",
                        help="answer yes when the server asks for confirmation, and open its links without asking")
    parser.add_argument("--no-browser", action="store_true",
                        help="print links (sign-in, permissions) instead of opening them")
    parser.add_argument("--verbose", action="store_true", help="show the SDK's own log lines")
    parser.add_argument("command", nargs="?", default="list", choices=["list", "call", "read", "prompt", "logout"])
    parser.add_argument("target", nargs="?", help="tool name, resource URI or prompt name")
    parser.add_argument("arguments", nargs="*", metavar="key=value", help="arguments; values are JSON where they parse")
    args = parser.parse_args(argv)
    if args.command not in ("list", "logout") and not args.target:
        parser.error(f"'{args.command}' needs a {'resource URI' if args.command == 'read' else 'name'}")
    if malformed := next((pair for pair in args.arguments if not pair.partition("=")[0] or "=" not in pair), None):
        parser.error(f"argument {malformed!r} is not key=value")
    return args


def parse_arguments(pairs: Sequence[str], schema: dict[str, Any] | None = None, *,
                    all_text: bool = False) -> dict[str, Any]:
    """`key=value` pairs (parse_args has checked their shape) as a dict. A value is taken as JSON (2, true,
    ["a"]) where it parses, except for arguments the schema declares as strings, and everywhere with
    `all_text` (prompt arguments)."""
    properties = (schema or {}).get("properties", {})
    result: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if all_text or properties.get(key, {}).get("type") == "string":
            result[key] = value
            continue
        try:
            result[key] = json.loads(value)
        except ValueError:
            result[key] = value
    return result


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "stream-http"


def refresh_at(expires_in: int, now: float) -> float:
    """When to stop sending a token and refresh it instead: a minute before the server's own expiry (half
    the lifetime of a shorter-lived token), because a token that expires on its way to the server is
    answered 401, and the SDK answers a 401 with a whole new sign-in in the browser, not a refresh."""
    return now + expires_in - min(60.0, expires_in / 2)


class TokenCache:
    """The tokens and client registration for each server, in one owner-only file (the SDK's
    TokenStorage). A token's expiry is kept too, so an expired one is refreshed before it is sent."""

    def __init__(self, server_url: str, path: Path | None = None) -> None:
        self.server_url = server_url
        self.path = path or config_dir() / "tokens.json"
        self.on_expiry: Callable[[float | None], None] = lambda _at: None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, everything: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(everything, file, indent=2)
        temporary.replace(self.path)  # never a half-written cache

    def entry(self) -> dict[str, Any]:
        return self._read().get(self.server_url, {})

    def update(self, **fields: Any) -> None:
        everything = self._read()
        everything[self.server_url] = {**everything.get(self.server_url, {}), **fields}
        self._write(everything)

    def forget(self) -> None:
        everything = self._read()
        if everything.pop(self.server_url, None) is not None:
            self._write(everything)

    async def get_tokens(self) -> OAuthToken | None:
        tokens = self.entry().get("tokens")
        return OAuthToken.model_validate(tokens) if tokens else None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        expires_at = refresh_at(tokens.expires_in, time.time()) if tokens.expires_in else None
        self.update(tokens=tokens.model_dump(mode="json", exclude_none=True), expires_at=expires_at)
        self.on_expiry(expires_at)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        client = self.entry().get("client")
        return OAuthClientInformationFull.model_validate(client) if client else None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.update(client=client_info.model_dump(mode="json", exclude_none=True))


class SignIn:
    """Signs the user in when the server asks: the browser goes to the server's sign-in page and comes
    back to a one-shot HTTP listener on a loopback port."""

    def __init__(self, open_browser: bool) -> None:
        self.open_browser = open_browser
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}/callback"
        self.answer: asyncio.Future[dict[str, str]] | None = None
        self.listener: asyncio.Server | None = None

    async def redirect(self, url: str) -> None:
        self.answer = asyncio.get_running_loop().create_future()
        self.listener = await asyncio.start_server(self.receive, "127.0.0.1", self.port)
        if not self.open_browser:
            err.print(f"Sign in by opening this link in your browser:\n{escape(url)}")
            return
        err.print(f"Opening your browser to sign in. If it does not open, visit:\n{escape(url)}")
        open_in_browser(url)

    async def receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").split()
        query = parse_qs(urlsplit(request_line[1]).query) if len(request_line) > 1 else {}
        writer.write(callback_page({key: values[0] for key, values in query.items()}))
        await writer.drain()
        writer.close()
        if self.answer is not None and not self.answer.done() and ("code" in query or "error" in query):
            self.answer.set_result({key: values[0] for key, values in query.items()})

    async def callback(self) -> AuthorizationCodeResult:
        assert self.answer is not None, "redirect() comes first"
        try:
            with err.status("Waiting for you to sign in in your browser..."), anyio.fail_after(SIGN_IN_TIMEOUT_S):
                answer = await self.answer
        except TimeoutError:
            raise Failure(f"nobody signed in within {SIGN_IN_TIMEOUT_S} seconds") from None
        finally:
            if self.listener is not None:
                self.listener.close()
        if "error" in answer:
            raise Failure(f"sign-in refused: {answer.get('error_description') or answer['error']}")
        return AuthorizationCodeResult(code=answer["code"], state=answer.get("state"), iss=answer.get("iss"))


def open_in_browser(url: str) -> None:
    """Open `url` in the person's browser, without waiting for the browser."""
    # Some browsers' launchers only return once the browser exits: keep the event loop free (to receive
    # the sign-in callback, or the server's word that the person is done) meanwhile.
    threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()


def oauth(args: argparse.Namespace, cache: TokenCache) -> OAuthClientProvider:
    sign_in = SignIn(open_browser=not args.no_browser)
    metadata = OAuthClientMetadata(client_name="stream-http client.py", redirect_uris=[sign_in.redirect_uri],
                                   grant_types=["authorization_code", "refresh_token"], response_types=["code"],
                                   token_endpoint_auth_method="none")  # noqa: S106 - a method name
    provider = OAuthClientProvider(server_url=args.url, client_metadata=metadata, storage=cache,
                                   redirect_handler=sign_in.redirect, callback_handler=sign_in.callback)
    # The SDK learns a token's expiry only when it receives one, and takes it at face value; the cache
    # supplies a cached token's, and its earlier deadline for each new one (the SDK stores new tokens
    # right after noting their expiry), so a token is refreshed before it can expire on the way.
    provider.context.token_expiry_time = cache.entry().get("expires_at")
    cache.on_expiry = lambda at: setattr(provider.context, "token_expiry_time", at)
    return provider


@asynccontextmanager
async def connect(args: argparse.Namespace, wait: BrowserWait) -> AsyncIterator[Client]:
    mode = "legacy" if args.legacy else MODERN_VERSION if args.modern else "auto"
    timeout = httpx2.Timeout(30, read=300)
    answerer = Answerer(assume_yes=args.yes, open_browser=not args.no_browser, wait=wait)
    async with httpx2.AsyncClient(auth=oauth(args, TokenCache(args.url)), timeout=timeout) as http:
        client = Client(streamable_http_client(args.url, http_client=http), mode=mode, elicitation_callback=answerer,
                        message_handler=wait.notice, logging_callback=show_log, log_level="info")
        async with client:
            yield client


async def logout(args: argparse.Namespace) -> int:
    """Revoke every token client.py keeps for this server (the refresh token first: that ends the grant on
    servers that tie the two, and a server that does not still gets the access token revoked), then forget
    them and the client registration."""
    cache = TokenCache(args.url)
    entry = cache.entry()
    tokens, client = entry.get("tokens") or {}, entry.get("client") or {}
    held = [(kind, tokens[kind]) for kind in ("refresh_token", "access_token") if tokens.get(kind)]
    if not held or not client.get("client_id"):
        cache.forget()
        err.print(f"Not signed in to {args.url}.")
        return 0
    async with httpx2.AsyncClient(timeout=30) as http:
        endpoint = await revocation_endpoint(http, args.url)
        for kind, token in held:
            await revoke(http, endpoint, client, token, kind)
    cache.forget()
    err.print(f"Signed out of {args.url}: the tokens are revoked and forgotten.")
    return 0


async def revoke(http: httpx2.AsyncClient, endpoint: str, client: dict[str, Any], token: str, kind: str) -> None:
    """One token revoked (RFC 7009), authenticated as the registered client."""
    form = {"token": token, "token_type_hint": kind, "client_id": client["client_id"]}
    if secret := client.get("client_secret"):
        form["client_secret"] = secret
    response = await http.post(endpoint, data=form)
    if response.status_code != 200:
        raise Failure(f"the server refused to revoke the {kind.replace('_', ' ')} (HTTP {response.status_code})")


async def revocation_endpoint(http: httpx2.AsyncClient, mcp_url: str) -> str:
    parts = urlsplit(mcp_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    resource = (await http.get(f"{origin}/.well-known/oauth-protected-resource{parts.path.rstrip('/')}")).json()
    issuer = urlsplit(resource["authorization_servers"][0])
    metadata = await http.get(f"{issuer.scheme}://{issuer.netloc}/.well-known/oauth-authorization-server"
                              f"{issuer.path.rstrip('/')}")
    endpoint = metadata.json().get("revocation_endpoint")
    if not endpoint:
        raise Failure("the server offers no token revocation")
    return endpoint


async def run(args: argparse.Namespace, wait: BrowserWait) -> int:
    if args.command == "logout":
        return await logout(args)
    async with connect(args, wait) as client:
        with wait.around_request():
            return await carry_out(client, args, wait)


async def carry_out(client: Client, args: argparse.Namespace, wait: BrowserWait) -> int:
    """The command on the command line, on a connected client."""
    if args.command == "list":
        await show_catalogue(client)
        return 0
    if args.command == "call":
        arguments = parse_arguments(args.arguments, await input_schema(client, args.target))
        return await call_tool(client, args.target, arguments, wait)
    if args.command == "read":
        result = await client.read_resource(args.target)
        for content in result.contents:
            out.print(content.text if isinstance(content, types.TextResourceContents)
                      else f"<{content.mime_type}, {len(content.blob) * 3 // 4} bytes>", markup=False)
        return 0
    prompt = await client.get_prompt(args.target, parse_arguments(args.arguments, all_text=True))
    for message in prompt.messages:
        text = message.content.text if isinstance(message.content, types.TextContent) else message.content
        out.print(f"{message.role}:", style="bold", end=" ")
        out.print(text, markup=False)  # the server's text, shown as it is (a note may hold [brackets])
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


async def call_tool(client: Client, name: str, arguments: dict[str, Any], wait: BrowserWait) -> int:
    with ProgressDisplay(wait) as progress:
        result = await client.call_tool(name, arguments, progress_callback=progress.update)
    if result.is_error:
        text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
        raise Failure(f"tool {name} failed: {' '.join(text.split())}")
    if result.structured_content is not None:
        out.print_json(data=result.structured_content)
    else:
        for content in result.content:
            out.print(content.text if isinstance(content, types.TextContent) else content, markup=False)
    return 0


class ProgressDisplay:
    """Shows the progress a tool reports: a bar on a terminal, plain lines otherwise."""

    def __init__(self, wait: BrowserWait) -> None:
        # Progress without a total (the spec allows it) is a count, not a fraction.
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed:g}{task.fields[of]}"), TimeElapsedColumn(),
                            console=err, transient=True)
        self.task: TaskID | None = None
        self.wait = wait

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
        of = f"/{total:g}" if total else ""
        if self.task is None:
            self.wait.hide()  # a tool that reports progress is running, and a terminal shows one live display
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, of=of)
        self.bar.update(self.task, completed=progress, total=total, description=description, of=of)


async def show_log(params: types.LoggingMessageNotificationParams) -> None:
    err.print(f"{params.level}: {params.data}", style="dim", markup=False)


class BrowserWait:
    """What client.py shows while the person is away in the browser, at a link the server sent them to: a
    spinner with the time taken on a terminal, one line otherwise. The wait ends when the server says they
    are done (notifications/elicitation/complete, 2025-11-25) or when the request answers (on 2026-07-28
    the SDK retries it at once, and the server answers the retry once the person is done)."""

    TEXT = "Waiting for you to finish in your browser"

    def __init__(self) -> None:
        self.elicitation_id: str | None = None
        self.spinner: Progress | None = None
        self.unfinished = False  # the person was sent to a link, and neither they nor the request came back

    def begin(self, elicitation_id: str | None) -> None:
        self.hide()
        self.elicitation_id, self.unfinished = elicitation_id, True
        if not err.is_terminal:
            err.print(f"{self.TEXT}...")
            return
        self.spinner = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                console=err, transient=True)
        self.spinner.add_task(f"{self.TEXT} (Ctrl-C to stop)", total=None)
        self.spinner.start()

    def hide(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    async def notice(self, message: types.ServerNotification | Exception) -> None:
        """The SDK's message handler: listens for the server's word that the person is done in the browser."""
        if (isinstance(message, types.ElicitCompleteNotification) and self.unfinished
                and message.params.elicitation_id == self.elicitation_id):
            self.hide()
            self.unfinished = False
            err.print("Done in the browser; the server goes on.")

    @contextmanager
    def around_request(self) -> Iterator[None]:
        """Around the request that may send the person to a link: its answer ends the wait."""
        try:
            yield
            self.unfinished = False
        finally:
            self.hide()

    def interrupted_line(self) -> str:
        """What Ctrl-C ended, in one line."""
        if self.unfinished:
            return "stopped waiting for your browser (Ctrl-C); run the command again to go on"
        return "interrupted (Ctrl-C)"


class Answerer:
    """Answers the server's questions (elicitation). A form is filled in on the terminal (yes to everything
    with --yes, declined without a terminal); a link is shown, opened in the browser, and waited for."""

    def __init__(self, assume_yes: bool, open_browser: bool, wait: BrowserWait) -> None:
        self.assume_yes = assume_yes
        self.open_browser = open_browser
        self.wait = wait

    async def __call__(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        if isinstance(params, types.ElicitRequestURLParams):
            return await self.follow_link(params)
        return await self.fill_in_form(params)

    async def follow_link(self, params: types.ElicitRequestURLParams) -> types.ElicitResult:
        """Show the link, open it once the person agrees (the spec wants their consent before a server's link
        is opened: --yes gives it in advance), and wait for them to come back. Without a terminal the link is
        printed and waited for all the same: the person acts in the browser, not here."""
        err.print(f"[bold]The server asks:[/bold] {escape(params.message)}")
        err.print(shown_link(params.url))
        if urlsplit(params.url).scheme not in ("http", "https"):
            err.print("[yellow]Declined: client.py opens only http and https links.[/yellow]")
            return types.ElicitResult(action="decline")
        if not await self.open_where_agreed(params.url):
            return types.ElicitResult(action="decline")
        self.wait.begin(params.elicitation_id)
        return types.ElicitResult(action="accept")

    async def open_where_agreed(self, url: str) -> bool:
        """Open the link if the person agrees: asked on a terminal, in advance with --yes. Without either, or
        with --no-browser, they open it themselves. False when they decline."""
        if not self.open_browser:
            err.print("Open it in your browser; client.py waits until you are done there.")
            return True
        if not self.assume_yes and not sys.stdin.isatty():
            err.print("Open it in your browser; client.py waits until you are done there (--yes opens it for you).")
            return True
        if not self.assume_yes and not await agrees("Open it in your browser?"):
            return False
        err.print("Opening your browser. If it does not open, visit the link above.")
        open_in_browser(url)
        return True

    async def fill_in_form(self, params: types.ElicitRequestFormParams) -> types.ElicitResult:
        fields: dict[str, Any] = (params.requested_schema or {}).get("properties", {})
        if self.assume_yes:
            return types.ElicitResult(action="accept", content={k: _default_answer(v) for k, v in fields.items()})
        if not sys.stdin.isatty():
            err.print(f"[yellow]The server asks: {escape(params.message)} (declined: not a terminal; "
                      "use --yes)[/yellow]")
            return types.ElicitResult(action="decline")
        err.print(f"[bold]The server asks:[/bold] {escape(params.message)}")
        content = {}
        for name, spec in fields.items():
            answer = await ask(f"  {spec.get('description') or name} ")
            content[name] = _coerce(answer, spec)
        return types.ElicitResult(action="accept", content=content)


def shown_link(url: str) -> str:
    """A link as printed: whole, on a line of its own, its host in bold (where it really leads, at a glance)."""
    host = urlsplit(url).netloc
    if not host:
        return escape(url)
    before, _, after = url.partition(host)
    return f"{escape(before)}[bold]{escape(host)}[/bold]{escape(after)}"


async def agrees(question: str) -> bool:
    """The person's yes (the default) or no to a question on the terminal."""
    return (await ask(f"{question} [Y/n] ")).strip().lower() in ("", "y", "yes")


async def ask(question: str) -> str:
    """A line typed at the terminal ("" at the end of input). It is read on a daemon thread, because Ctrl-C
    must end client.py at once, and the interpreter would wait for any other thread's pending read."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def settle(line: str) -> None:
        if not answer.done():
            answer.set_result(line)

    def read() -> None:
        # Not input(): on a terminal it hands the line to readline, which would leave the terminal in its
        # own mode when Ctrl-C ends client.py mid-question.
        try:
            line = sys.stdin.readline().rstrip("\r\n")
        except (OSError, ValueError):
            line = ""
        with suppress(RuntimeError):  # the event loop is closed: nobody waits for the answer
            loop.call_soon_threadsafe(settle, line)

    err.print(question, end="")
    threading.Thread(target=read, daemon=True).start()
    try:
        return await answer
    except asyncio.CancelledError:  # abandoned (Ctrl-C): what is printed next starts a line of its own
        err.print()
        raise


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
    if isinstance(exc, MCPError) and exc.code == types.URL_ELICITATION_REQUIRED:
        return f"the server needs you to open a link first: {links_asked_for(exc)}; then run the command again"
    if isinstance(exc, MCPError):
        return f"the server refused: {exc.message} (error {exc.code})"
    if isinstance(exc, httpx2.HTTPError):
        return f"HTTP error talking to {url}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def links_asked_for(exc: MCPError) -> str:
    """The messages and links of a URL-elicitation-required error (where the server cannot ask mid-call)."""
    asked = (exc.data or {}).get("elicitations", []) if isinstance(exc.data, dict) else []
    return " ".join(f"{item.get('message', '')} {item.get('url', '')}".strip() for item in asked) or exc.message


def missing_path_hint(url: str) -> str | None:
    """For a URL that names only an origin (http://127.0.0.1:8000) where origin/mcp answers: the line that
    says so. A server may serve MCP at its root, so this is asked only once that has failed."""
    parts = urlsplit(url)
    if parts.path not in ("", "/"):
        return None
    guess = f"{parts.scheme}://{parts.netloc}{MCP_PATH}"
    try:
        found = httpx2.get(guess, timeout=5).status_code != 404
    except httpx2.HTTPError:
        return None
    return f"no MCP endpoint at {url}; did you mean {guess}?" if found else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The SDK logs failures with tracebacks; this tool reports each failure in one line instead.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL + 1, format="%(name)s: %(message)s")
    wait = BrowserWait()
    try:
        return anyio.run(run, args, wait)
    except BaseException as exc:  # every failure becomes one readable line, never a traceback
        first = first_leaf(exc)
        if isinstance(first, SystemExit):  # rich exits this way when stdout is a closed pipe
            return first.code if isinstance(first.code, int) else 1
        if isinstance(first, (KeyboardInterrupt, asyncio.CancelledError)):  # Ctrl-C, or what it cancelled
            err.print(wait.interrupted_line())
            return 130
        hint = missing_path_hint(args.url) if isinstance(first, (MCPError, httpx2.HTTPStatusError)) else None
        err.print(f"[red]error:[/red] {escape(hint or describe(first, args.url))}")
        return 1


def first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside the exception groups the SDK's task groups raise."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
