"""stream-http: a remote MCP server over Streamable HTTP.

One file is the whole server: an MCP Python SDK `MCPServer` (what SDK 1.x called FastMCP)
with tools, resources and prompts, served over Streamable HTTP by Starlette and uvicorn.

Run it:
    uv run server.py                 # http://127.0.0.1:8000/mcp, stateful, no configuration
    uv run server.py --stateless     # every POST stands alone: for replicas behind a balancer
    uv run server.py --help          # every setting, its environment variable and default
    mcp dev server.py                # the MCP Inspector, over stdio
    mcp run server.py                # stdio, for clients that launch their servers

Map (`grep -n '^# ===' server.py`):
    1. Settings            every knob: environment, .env and command line, from one table
    2. The MCP server      the server object, and what its handlers reach (caller, runtime, changes)
    3. The MCP surface     tools, resources, prompts, completions: edit these first
    4. Storage             notes in SQLite, one interface for every backend
    5. Resumable streams   the event store behind Last-Event-ID
    6. Runtime             what tools and routes share while the server runs
    7. HTTP app            request checks, CORS, routes, build_app()
    8. Command line        main()
"""

import argparse
import asyncio
import dataclasses
import gc
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import sys
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import uvicorn
from dotenv import dotenv_values
from mcp.server import MCPServer, ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import CallNext, HandlerResult
from mcp.server.mcpserver import (
    Context,
    Elicit,
    ElicitationResult,
    Resolve,
)
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.session import ServerSession
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore, check_accept_headers
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import (
    INVALID_PARAMS,
    ClientCapabilities,
    Completion,
    CompletionArgument,
    CompletionContext,
    ElicitationCapability,
    JSONRPCMessage,
    PromptReference,
    ResourceTemplateReference,
    ToolAnnotations,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("stream_http")

SERVER_NAME = "stream-http"
VERSION = "0.1.0"
MCP_PATH = "/mcp"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

NOTE_TITLE_MAX_CHARS = 200
NOTE_BODY_MAX_CHARS = 20_000
NOTE_TAGS_MAX = 10
NOTE_TAG_MAX_CHARS = 32
SEARCH_LIMIT_MAX = 100
LONG_TASK_STEPS_MAX = 50
LIST_NOTIFY_TIMEOUT_S = 1.0
SHUTDOWN_GRACE_S = 5


# === 1. Settings =============================================================


class ConfigError(Exception):
    """The configuration cannot work; the message names every problem found."""


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, default, help text and optional flag."""

    env: str
    default: str
    help: str
    flag: str | None = None
    switch: bool = False  # a flag that takes no value and means "true"


OPTIONS: tuple[Option, ...] = (
    Option("HOST", "127.0.0.1", "Address to listen on. Anything but loopback needs sign-in "
           "or ALLOW_UNAUTHENTICATED.", "--host"),
    Option("PORT", "8000", "TCP port to listen on.", "--port"),
    Option("PUBLIC_URL", "", "The URL clients reach this server at (scheme, host, port, any path "
           "prefix); the MCP endpoint is PUBLIC_URL/mcp. Default: http://HOST:PORT.", "--public-url"),
    Option("DATA_DIR", "./data", "Directory for the embedded SQLite store.", "--data-dir"),
    Option("STORE_URL", "", "Where state lives: sqlite:///path/to/file.db. "
           "Default: a SQLite file in DATA_DIR.", "--store-url"),
    Option("MCP_STATELESS", "false", "Serve every POST on its own, without Mcp-Session-Id "
           "(for several replicas).", "--stateless", switch=True),
    Option("MCP_JSON_RESPONSE", "false", "Answer each POST with one JSON body instead of an SSE "
           "stream; progress and mid-call questions are dropped.", "--json-response", switch=True),
    Option("CORS_ORIGINS", "", "Comma-separated browser origins allowed besides localhost, "
           "e.g. https://inspector.example.com."),
    Option("ALLOWED_HOSTS", "", "Comma-separated extra Host header values to accept "
           "(host, host:port, or host:* for any port)."),
    Option("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.", "--log-level"),
    Option("ALLOW_UNAUTHENTICATED", "false", "Serve a non-loopback address without sign-in: "
           "anyone who reaches the port can use every tool.", "--allow-unauthenticated", switch=True),
    Option("MAX_REQUEST_BYTES", "1048576", "Largest request body accepted, in bytes."),
    Option("SESSION_IDLE_TIMEOUT", "1800", "Seconds before an idle stateful session is closed."),
    Option("MAX_SESSIONS", "10000", "Most stateful sessions open at once."),
    Option("EVENT_STORE_MAX_EVENTS", "10000", "Most stream events kept for clients that "
           "reconnect with Last-Event-ID."),
)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, parsed and checked. Build it with `load_settings`."""

    host: str
    port: int
    public_url: str
    data_dir: Path
    store_url: str
    stateless: bool
    json_response: bool
    cors_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    log_level: str
    allow_unauthenticated: bool
    max_request_bytes: int
    session_idle_timeout_s: int
    max_sessions: int
    event_store_max_events: int

    @property
    def mcp_url(self) -> str:
        """The endpoint clients connect to."""
        return self.public_url + MCP_PATH

    @property
    def binds_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def auth_enabled(self) -> bool:
        return False

    @property
    def mode(self) -> str:
        if self.stateless:
            return "stateless+json" if self.json_response else "stateless"
        return "stateful+json" if self.json_response else "stateful"


class _Reader:
    """Parses raw setting strings, collecting every problem instead of stopping at the first."""

    def __init__(self, raw: Mapping[str, str]) -> None:
        self.raw = raw
        self.problems: list[str] = []

    def text(self, name: str) -> str:
        return self.raw[name].strip()

    def integer(self, name: str, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self.text(name)
        try:
            number = int(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not a whole number")
            return minimum
        if not minimum <= number <= maximum:
            self.problems.append(f"{name}={number} is outside {minimum}..{maximum}")
        return number

    def boolean(self, name: str) -> bool:
        value = self.text(name).lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("", "0", "false", "no", "off"):
            return False
        self.problems.append(f"{name}={value!r} is not true or false")
        return False

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.text(name).split(",") if item.strip())

    def choice(self, name: str, choices: Sequence[str]) -> str:
        value = self.text(name).upper()
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value

    def url(self, name: str, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems.append(f"{name}={value!r} must be an http:// or https:// URL with a host")
        elif parts.query or parts.fragment:
            self.problems.append(f"{name}={value!r} must not have a query or fragment")
        return value.rstrip("/")


def read_environment() -> dict[str, str]:
    """The process environment over the values in ./.env (the environment wins)."""
    from_file = {key: value for key, value in dotenv_values(".env").items() if value is not None}
    return {**from_file, **os.environ}


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `environ` (default: the environment and .env) with `overrides` on top."""
    source = read_environment() if environ is None else environ
    raw = {option.env: source.get(option.env, option.default) for option in OPTIONS}
    raw.update(overrides or {})
    read = _Reader(raw)
    host = read.text("HOST")
    port = read.integer("PORT", minimum=0, maximum=65535)
    data_dir = Path(read.text("DATA_DIR") or ".")
    settings = Settings(
        host=host,
        port=port,
        public_url=read.url("PUBLIC_URL", read.text("PUBLIC_URL") or default_public_url(host, port)),
        data_dir=data_dir,
        store_url=read.text("STORE_URL") or f"sqlite:///{data_dir / 'stream-http.db'}",
        stateless=read.boolean("MCP_STATELESS"),
        json_response=read.boolean("MCP_JSON_RESPONSE"),
        cors_origins=tuple(read.url("CORS_ORIGINS", origin) for origin in read.items("CORS_ORIGINS")),
        allowed_hosts=read.items("ALLOWED_HOSTS"),
        log_level=read.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR")),
        allow_unauthenticated=read.boolean("ALLOW_UNAUTHENTICATED"),
        max_request_bytes=read.integer("MAX_REQUEST_BYTES", minimum=1024),
        session_idle_timeout_s=read.integer("SESSION_IDLE_TIMEOUT", minimum=1),
        max_sessions=read.integer("MAX_SESSIONS", minimum=1),
        event_store_max_events=read.integer("EVENT_STORE_MAX_EVENTS", minimum=10),
    )
    if not settings.store_url.startswith(tuple(f"{scheme}://" for scheme in STORE_BACKENDS)):
        read.problems.append(f"STORE_URL={settings.store_url!r} must start with sqlite:///")
    if read.problems:
        raise ConfigError("; ".join(read.problems))
    return settings


def default_public_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
        host = "localhost"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# === 2. The MCP server and what its handlers reach ===========================
#
# Handlers below need three things from the running server, each one call away:
# `current_user()` (who is calling), `runtime()` (settings and store) and `CHANGES` (the bus that
# tells listening clients their resource list changed).


@dataclass(frozen=True)
class User:
    """The person behind the current request."""

    subject: str
    email: str | None = None
    name: str | None = None
    hosted_domain: str | None = None
    client_id: str | None = None


LOCAL_USER = User(subject="local", name="Local user")


def current_user() -> User:
    """Who sent the message being handled: the signed-in account, or the local user."""
    token = get_access_token()
    if token is None:
        return LOCAL_USER
    claims = token.claims or {}
    return User(
        subject=token.subject or token.client_id,
        email=claims.get("email"),
        name=claims.get("name"),
        hosted_domain=claims.get("hd"),
        client_id=token.client_id,
    )


_current_runtime: ContextVar["Runtime"] = ContextVar("stream_http_runtime")
_serving_runtime: ContextVar["Runtime"] = ContextVar("stream_http_serving_runtime")


def runtime() -> "Runtime":
    """The running server's shared state (settings, store) for the message being handled."""
    return _current_runtime.get()


async def share_runtime(ctx: ServerRequestContext["Runtime", Any], call_next: CallNext) -> HandlerResult:
    """Make the lifespan's runtime reachable from every handler, including static resources and
    completions, which the SDK calls without a Context."""
    token = _current_runtime.set(ctx.lifespan_context)
    try:
        return await call_next(ctx)
    finally:
        _current_runtime.reset(token)


@asynccontextmanager
async def runtime_lifespan(server: "MCPServer[Runtime]") -> AsyncIterator["Runtime"]:
    """Yield the HTTP app's runtime, or under `mcp run` (stdio) open one from the environment."""
    serving = _serving_runtime.get(None)
    if serving is not None:
        yield serving
        return
    async with Runtime(load_settings()) as opened:
        yield opened


@dataclass(frozen=True)
class NotesChanged(ResourcesListChanged):
    """The list of `owner`'s notes changed: a resources list-changed event for that user only."""

    owner: str = ""


@dataclass(frozen=True)
class NoteUpdated(ResourceUpdated):
    """A resource of `owner` changed (notes://index or one note): for that user's subscribers only."""

    owner: str = ""


LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
STDIO_SESSION = "stdio"


@dataclass
class HandshakeSession:
    """A stateful 2025-era session: who owns it, its log level, the resources it subscribed to."""

    owner: str
    session: ServerSession  # the latest request's proxy; its connection channel outlives the request
    log_level: str = "debug"
    watched: set[str] = field(default_factory=set)


class ChangeBus:
    """Delivers change events to the connections they concern, in both protocol eras.

    It is the SDK's `SubscriptionBus` for `subscriptions/listen` streams (2026-07-28), and it keeps
    the handshake-era sessions whose GET stream receives `notifications/resources/list_changed`
    and `notifications/resources/updated`. An event that names an owner reaches only that user.
    """

    def __init__(self) -> None:
        self._listeners: dict[object, tuple[str, Callable[[ServerEvent], None]]] = {}
        self._sessions: dict[str, HandshakeSession] = {}

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        """Register a listen stream for the user who opened it."""
        token = object()
        self._listeners[token] = (current_user().subject, listener)

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    def session(self, session_id: str, owner: str, session: ServerSession, limit: int) -> HandshakeSession:
        """The record of a handshake-era session, made on its first request (oldest dropped past `limit`)."""
        known = self._sessions.get(session_id)
        if known is None or known.owner != owner:
            known = self._sessions[session_id] = HandshakeSession(owner, session)
            while len(self._sessions) > limit:
                self._sessions.pop(next(iter(self._sessions)))
        known.session = session
        return known

    def log_level(self, session_id: str | None) -> str:
        known = self._sessions.get(session_id or "")
        return known.log_level if known else LOG_LEVELS[0]

    async def publish(self, event: ServerEvent) -> None:
        owner = getattr(event, "owner", None)
        for listener_owner, listener in list(self._listeners.values()):
            if owner is None or owner == listener_owner:
                try:
                    listener(event)
                except Exception:  # one broken stream must not keep the event from the others
                    logger.exception("a listen stream failed to take an event")
        if owner is not None:
            await self._notify_sessions(owner, event)
        await anyio.lowlevel.checkpoint()

    async def _notify_sessions(self, owner: str, event: ServerEvent) -> None:
        for session_id, known in list(self._sessions.items()):
            if known.owner != owner:
                continue
            if isinstance(event, ResourceUpdated):
                if event.uri not in known.watched:
                    continue
                notify = known.session.send_resource_updated(event.uri)
            else:
                notify = known.session.send_resource_list_changed()
            with anyio.move_on_after(LIST_NOTIFY_TIMEOUT_S):
                try:
                    await notify
                    continue
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass
            logger.debug("session %s no longer listens; forgetting it", session_id)
            self._sessions.pop(session_id, None)


CHANGES = ChangeBus()


async def serve_handshake_sessions(ctx: ServerRequestContext["Runtime", Any], call_next: CallNext) -> HandlerResult:
    """What 2025-era sessions get beyond the SDK: list-changed and resource-updated notifications
    on their GET stream, resource subscriptions, and a log level they can set."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return await call_next(ctx)
    settings = runtime().settings
    # Over stdio the process serves one client: its whole life is one session.
    session_id = ctx.request.headers.get("mcp-session-id") if ctx.request is not None else STDIO_SESSION
    known = None
    if session_id and not settings.stateless:
        known = CHANGES.session(session_id, current_user().subject, ctx.session, settings.max_sessions)
    params = ctx.params or {}
    if ctx.method == "logging/setLevel":
        if params.get("level") not in LOG_LEVELS:
            raise MCPError(INVALID_PARAMS, f"level must be one of {', '.join(LOG_LEVELS)}")
        if known is not None:
            known.log_level = params["level"]
        return {}
    if ctx.method in ("resources/subscribe", "resources/unsubscribe"):
        uri = params.get("uri")
        if not isinstance(uri, str) or not uri:
            raise MCPError(INVALID_PARAMS, "uri must be a non-empty string")
        if known is not None and ctx.method == "resources/subscribe":
            known.watched.add(uri)
        elif known is not None:
            known.watched.discard(uri)
        return {}
    result = await call_next(ctx)
    if ctx.method == "initialize" and isinstance(result, dict):
        capabilities = result.setdefault("capabilities", {})
        capabilities.setdefault("resources", {}).update(listChanged=not settings.stateless,
                                                        subscribe=not settings.stateless)
        capabilities["logging"] = {}
    return result


async def name_unknown_primitives(ctx: ServerRequestContext["Runtime", Any], call_next: CallNext) -> HandlerResult:
    """Answer an unknown tool or prompt, or a prompt that cannot render, with the spec's -32602
    (the SDK reports the first as a tool result and the others with error code 0)."""
    if ctx.method == "tools/call":
        name = (ctx.params or {}).get("name")
        if isinstance(name, str) and name not in {tool.name for tool in await mcp.list_tools()}:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {name}")
    if ctx.method != "prompts/get":
        return await call_next(ctx)
    try:
        return await call_next(ctx)
    except ValueError as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from exc


mcp: "MCPServer[Runtime]" = MCPServer(
    SERVER_NAME,
    title="stream-http",
    version=VERSION,
    instructions=(
        "A personal notebook and a few utilities. Use search_notes before add_note to avoid "
        "duplicates; notes belong to the signed-in user and nobody else sees them."
    ),
    lifespan=runtime_lifespan,
    subscriptions=CHANGES,
    middleware=[share_runtime, serve_handshake_sessions, name_unknown_primitives],
)
"""What `mcp run server.py` and `mcp dev server.py` load; `build_app` serves it over HTTP."""


# === 3. Tools, resources, prompts (edit here) ================================
#
# Plain functions: their docstrings and `Field` descriptions are what the model reads.

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)


# --- tools


@mcp.tool(title="Echo", annotations=READ_ONLY)
def echo(
    message: Annotated[str, Field(description="Text to send back.", max_length=10_000)],
) -> str:
    """Return the message unchanged. Useful to check that the connection works."""
    return message


@mcp.tool(title="Add two numbers", annotations=READ_ONLY)
def add(
    a: Annotated[float, Field(description="First addend.")],
    b: Annotated[float, Field(description="Second addend.")],
) -> float:
    """Add two numbers and return the sum."""
    return a + b


class Identity(BaseModel):
    subject: str = Field(description="Stable identifier of the account.")
    email: str | None = Field(description="Verified email address, when signed in.")
    name: str | None = Field(description="Display name.")
    hosted_domain: str | None = Field(description="Google Workspace domain, when there is one.")
    client_id: str | None = Field(description="The MCP client this request came through.")
    authenticated: bool = Field(description="False when the server runs without sign-in.")


@mcp.tool(title="Who am I", annotations=READ_ONLY)
def whoami() -> Identity:
    """Describe the account this conversation acts for: who owns the notes and which client is
    connected. Without sign-in, everyone is the same local user."""
    user = current_user()
    return Identity(**dataclasses.asdict(user), authenticated=user is not LOCAL_USER)


class NoteView(BaseModel):
    id: str = Field(description="Identifier to pass to delete_note or read as notes://{id}.")
    title: str
    body: str
    tags: list[str]
    created_at: float = Field(description="Unix time the note was written.")


class NoteList(BaseModel):
    notes: list[NoteView]
    total: int = Field(description="How many notes matched, before the limit.")


Tag = Annotated[str, Field(min_length=1, max_length=NOTE_TAG_MAX_CHARS, pattern=r"^[\w-]+$")]


@mcp.tool(title="Add a note", annotations=ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False))
async def add_note(
    title: Annotated[str, Field(description="Short title.", min_length=1, max_length=NOTE_TITLE_MAX_CHARS)],
    body: Annotated[str, Field(description="The note itself (Markdown).", max_length=NOTE_BODY_MAX_CHARS)] = "",
    tags: Annotated[list[Tag], Field(description="Labels (letters, digits, - and _), "
                                     "used by search_notes.", max_length=NOTE_TAGS_MAX)] = [],  # noqa: B006
) -> NoteView:
    """Save a note in the user's private notebook and return it with its new id."""
    note = Note.new(title=title.strip(), body=body, tags=normalise_tags(tags))
    owner = current_user().subject
    await runtime().store.add_note(owner, note)
    await runtime().announce_notes_changed(owner, note.id)
    return note.view()


@mcp.tool(title="Search notes", annotations=READ_ONLY)
async def search_notes(
    query: Annotated[str, Field(description="Words to look for in titles and bodies; "
                                "empty matches every note.", max_length=200)] = "",
    tag: Annotated[str | None, Field(description="Only notes with this tag.", max_length=NOTE_TAG_MAX_CHARS)] = None,
    limit: Annotated[int, Field(description="Most notes to return.", ge=1, le=SEARCH_LIMIT_MAX)] = 20,
) -> NoteList:
    """Find the user's notes by words and tag, newest first."""
    found, total = await runtime().store.find_notes(
        current_user().subject, query=query.strip(), tag=tag.lower() if tag else None, limit=limit
    )
    return NoteList(notes=[note.view() for note in found], total=total)


class DeleteConfirmation(BaseModel):
    confirm: bool = Field(description="Delete this note for good?")


NOT_ASKED = "not asked"


async def ask_before_deleting(note_id: str, ctx: Context) -> Elicit[DeleteConfirmation] | str:
    """Ask the user to confirm, where this connection can carry the question."""
    note = await runtime().store.get_note(current_user().subject, note_id)
    if note is None:
        raise ToolError(f"There is no note {note_id!r}. search_notes lists the ids.")
    if not can_ask_user(ctx):
        return NOT_ASKED
    return Elicit(f"Delete the note {note.title!r} ({note_id})? This cannot be undone.", DeleteConfirmation)


class DeleteOutcome(BaseModel):
    deleted: bool
    note_id: str
    confirmation: Literal["confirmed", "declined", "cancelled", "not asked"] = Field(
        description="What the user said; 'not asked' when the connection cannot ask "
        "(stateless or JSON-response HTTP, or a client without elicitation).")


@mcp.tool(title="Delete a note", annotations=ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False))
async def delete_note(
    note_id: Annotated[str, Field(description="Id of the note, as search_notes returns it.", max_length=64)],
    answer: Annotated[ElicitationResult[DeleteConfirmation], Resolve(ask_before_deleting)],
) -> DeleteOutcome:
    """Delete one of the user's notes. Where the client supports it, the user is asked to confirm
    first and nothing is deleted unless they agree. Where the connection cannot ask (stateless or
    JSON-response HTTP, or a client without elicitation) the note is deleted straight away and the
    result says 'not asked': rely on the client's own confirmation for destructive tools."""
    verdict = confirmation_of(answer)
    if verdict not in ("confirmed", NOT_ASKED):
        return DeleteOutcome(deleted=False, note_id=note_id, confirmation=verdict)
    owner = current_user().subject
    deleted = await runtime().store.delete_note(owner, note_id)
    if deleted:
        await runtime().announce_notes_changed(owner, note_id)
    return DeleteOutcome(deleted=deleted, note_id=note_id, confirmation=verdict)


class TaskReport(BaseModel):
    steps_completed: int
    seconds: float


@mcp.tool(title="Run a long task", annotations=READ_ONLY)
async def long_task(
    ctx: Context,
    steps: Annotated[int, Field(description="How many steps to run.", ge=1, le=LONG_TASK_STEPS_MAX)] = 5,
    step_seconds: Annotated[float, Field(description="Seconds each step takes.", ge=0, le=5)] = 0.5,
) -> TaskReport:
    """Run a task in steps, reporting progress and a log message after each one. A model can use it
    to see how the client shows long-running work."""
    started = time.monotonic()
    for step in range(1, steps + 1):
        await anyio.sleep(step_seconds)
        await ctx.report_progress(step, steps, f"step {step} of {steps}")
        await send_log(ctx, f"long_task finished step {step} of {steps}")
    return TaskReport(steps_completed=steps, seconds=round(time.monotonic() - started, 3))


# --- resources


@mcp.resource("notes://index", name="Notes index", mime_type="application/json")
async def notes_index() -> str:
    """Every note of the user: id, title, tags and when it was written, newest first."""
    found, _ = await runtime().store.find_notes(current_user().subject, limit=SEARCH_LIMIT_MAX)
    return json.dumps([{"id": n.id, "title": n.title, "tags": list(n.tags), "created_at": n.created_at}
                       for n in found])


@mcp.resource("notes://{note_id}", name="Note", mime_type="text/markdown")
async def note_text(note_id: str) -> str:
    """One note of the user, as Markdown."""
    note = await runtime().store.get_note(current_user().subject, note_id)
    if note is None:
        raise ResourceNotFoundError(f"There is no note {note_id!r}")
    return note.markdown()


@mcp.resource("server://info", name="Server info", mime_type="application/json")
def server_info() -> str:
    """What this server is and how it runs: version, transport mode, enabled features."""
    settings = runtime().settings
    return json.dumps({
        "name": SERVER_NAME,
        "version": VERSION,
        "mcp_endpoint": settings.mcp_url,
        "mode": settings.mode,
        "protocol_eras": ["2025-11-25 (initialize handshake)", *MODERN_PROTOCOL_VERSIONS],
        "features": {
            "sign_in": settings.auth_enabled,
            "resumable_streams": not settings.stateless,
            "store": urlsplit(settings.store_url).scheme,
        },
    })


# --- prompts

DRAFT_STYLES = ("email", "blog post", "summary", "tweet")


@mcp.prompt(title="Summarize notes")
async def summarize_notes(tag: str | None = None) -> list[UserMessage]:
    """Ask the model to summarize the user's notes, optionally only those with one tag."""
    found, _ = await runtime().store.find_notes(current_user().subject, tag=tag, limit=SEARCH_LIMIT_MAX)
    if not found:
        return [UserMessage(f"I have no notes{f' tagged {tag!r}' if tag else ''} yet. Say so briefly.")]
    notes = "\n\n".join(note.markdown() for note in found)
    return [UserMessage(f"Summarize these notes in a few bullet points:\n\n{notes}")]


@mcp.prompt(title="Draft from a note")
async def draft_from_note(note_id: str, style: str = "email") -> list[UserMessage]:
    """Ask the model to turn one note into a draft in the given style."""
    note = await runtime().store.get_note(current_user().subject, note_id)
    if note is None:
        raise MCPError(INVALID_PARAMS, f"There is no note {note_id!r}")
    return [UserMessage(f"Write a {style} based on this note:\n\n{note.markdown()}")]


# --- completions


@mcp.completion()
async def complete_argument(
    ref: PromptReference | ResourceTemplateReference,
    argument: CompletionArgument,
    context: CompletionContext | None,
) -> Completion | None:
    """Offer note ids, tags and styles to clients that autocomplete arguments."""
    prefix = argument.value.lower()
    if argument.name == "note_id":
        candidates = await runtime().store.note_ids(current_user().subject)
    elif argument.name == "tag":
        candidates = await runtime().store.note_tags(current_user().subject)
    elif argument.name == "style":
        candidates = list(DRAFT_STYLES)
    else:
        return None
    matches = [value for value in candidates if value.lower().startswith(prefix)]
    return Completion(values=matches[:100], total=len(matches), has_more=len(matches) > 100)


# --- helpers the surface uses


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(tag.strip().lower() for tag in tags if tag.strip()))


def can_ask_user(ctx: Context) -> bool:
    """Whether this connection can put a question to the user in the middle of a tool call."""
    if not ctx.session.check_client_capability(ClientCapabilities(elicitation=ElicitationCapability())):
        return False
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS or ctx.session.can_send_request


def confirmation_of(answer: Any) -> Literal["confirmed", "declined", "cancelled", "not asked"]:
    if getattr(answer, "action", None) == "accept":
        data = answer.data
        if data == NOT_ASKED:
            return NOT_ASKED
        return "confirmed" if isinstance(data, DeleteConfirmation) and data.confirm else "declined"
    return "declined" if getattr(answer, "action", None) == "decline" else "cancelled"


async def send_log(ctx: Context, message: str, level: str = "info") -> None:
    """Send a log notification at or above the level the session asked for. Logging is deprecated from
    protocol 2026-07-28 on, where it only reaches clients that opt in; it still works everywhere, so
    the SDK's deprecation warning is silenced here."""
    session_id = ctx.headers.get("mcp-session-id") if ctx.headers else STDIO_SESSION
    if LOG_LEVELS.index(level) < LOG_LEVELS.index(CHANGES.log_level(session_id)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        pending = ctx.session.send_log_message(level, message, SERVER_NAME, related_request_id=ctx.request_id)
    await pending


# === 4. Storage ==============================================================


class StorageError(Exception):
    """The store failed; the message says what was being done."""


@dataclass(frozen=True)
class Note:
    id: str
    title: str
    body: str
    tags: tuple[str, ...]
    created_at: float

    @classmethod
    def new(cls, *, title: str, body: str, tags: tuple[str, ...]) -> "Note":
        # A letter first, so an id never reads as a number (1e100, 12345678) to clients that guess types.
        note_id = "n" + secrets.token_hex(4)
        return cls(id=note_id, title=title, body=body, tags=tags, created_at=round(time.time(), 3))

    def view(self) -> NoteView:
        return NoteView(id=self.id, title=self.title, body=self.body, tags=list(self.tags),
                        created_at=self.created_at)

    def markdown(self) -> str:
        tags = f"\n\nTags: {', '.join(self.tags)}" if self.tags else ""
        return f"# {self.title}\n\n{self.body}{tags}"


class Store(Protocol):
    """Where notes live. Every method is atomic."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def add_note(self, owner: str, note: Note) -> None: ...
    async def get_note(self, owner: str, note_id: str) -> Note | None: ...
    async def find_notes(self, owner: str, *, query: str = "", tag: str | None = None,
                         limit: int = 20) -> tuple[list[Note], int]: ...
    async def delete_note(self, owner: str, note_id: str) -> bool: ...
    async def note_ids(self, owner: str) -> list[str]: ...
    async def note_tags(self, owner: str) -> list[str]: ...


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS notes_by_owner_time ON notes (owner, created_at DESC);
"""


class SQLiteStore:
    """The embedded store: one SQLite file, used from one worker thread so writes are serialised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def _run(self, action: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def call() -> Any:
            if self._db is None:
                raise StorageError(f"{action}: the store is not open")
            try:
                with self._db:
                    return fn(self._db)
            except sqlite3.Error as exc:
                raise StorageError(f"{action}: {exc}") from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SQLITE_SCHEMA)
            db.isolation_level = ""  # back to implicit transactions, committed by `with db`
            return db

        try:
            self._db = await anyio.to_thread.run_sync(connect, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"opening {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def ping(self) -> None:
        await self._run("ping", lambda db: db.execute("SELECT 1").fetchone())

    async def add_note(self, owner: str, note: Note) -> None:
        row = (owner, note.id, note.title, note.body, json.dumps(note.tags), note.created_at)
        await self._run("adding a note", lambda db: db.execute(
            "INSERT INTO notes VALUES (?, ?, ?, ?, ?, ?)", row))

    async def get_note(self, owner: str, note_id: str) -> Note | None:
        row = await self._run("reading a note", lambda db: db.execute(
            "SELECT id, title, body, tags, created_at FROM notes WHERE owner = ? AND id = ?",
            (owner, note_id)).fetchone())
        return _note_from_row(row) if row else None

    async def find_notes(self, owner: str, *, query: str = "", tag: str | None = None,
                         limit: int = 20) -> tuple[list[Note], int]:
        where = "owner = ?"
        args: list[Any] = [owner]
        for word in query.split():
            where += " AND (title LIKE ? ESCAPE '\\' OR body LIKE ? ESCAPE '\\')"
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", word) + "%"
            args += [pattern, pattern]
        if tag:
            where += " AND EXISTS (SELECT 1 FROM json_each(notes.tags) WHERE value = ?)"
            args.append(tag)

        def search(db: sqlite3.Connection) -> tuple[list[Any], int]:
            # `where` is assembled from fixed fragments; every value is a bound parameter.
            total = db.execute(f"SELECT count(*) FROM notes WHERE {where}", args).fetchone()[0]  # noqa: S608
            rows = db.execute(f"SELECT id, title, body, tags, created_at FROM notes WHERE {where} "  # noqa: S608
                              "ORDER BY created_at DESC, id LIMIT ?", [*args, limit]).fetchall()
            return rows, total

        rows, total = await self._run("searching notes", search)
        return [_note_from_row(row) for row in rows], total

    async def delete_note(self, owner: str, note_id: str) -> bool:
        cursor = await self._run("deleting a note", lambda db: db.execute(
            "DELETE FROM notes WHERE owner = ? AND id = ?", (owner, note_id)))
        return cursor.rowcount > 0

    async def note_ids(self, owner: str) -> list[str]:
        rows = await self._run("listing note ids", lambda db: db.execute(
            "SELECT id FROM notes WHERE owner = ? ORDER BY created_at DESC", (owner,)).fetchall())
        return [row[0] for row in rows]

    async def note_tags(self, owner: str) -> list[str]:
        rows = await self._run("listing tags", lambda db: db.execute(
            "SELECT DISTINCT value FROM notes, json_each(notes.tags) WHERE owner = ? ORDER BY value",
            (owner,)).fetchall())
        return [row[0] for row in rows]


def _note_from_row(row: Sequence[Any]) -> Note:
    note_id, title, body, tags, created_at = row
    return Note(id=note_id, title=title, body=body, tags=tuple(json.loads(tags)), created_at=created_at)


STORE_BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite": lambda url: SQLiteStore(Path(url.removeprefix("sqlite:///"))),
}


def open_store(settings: Settings) -> Store:
    """The store named by STORE_URL (not yet opened: that happens in the lifespan)."""
    return STORE_BACKENDS[urlsplit(settings.store_url).scheme](settings.store_url)


# === 5. Resumable streams ====================================================
#
# In stateful mode every SSE event gets an id; a client that loses its connection reconnects with
# `Last-Event-ID` and receives what it missed. The SDK ships only the `EventStore` interface, and
# one store serves every session, so events are tagged with the session that produced them
# (`StreamScope`, carried in a context variable from the request that opened the session) and a
# replay is only served to that same session.


@dataclass(eq=False)
class StreamScope:
    """The session an HTTP request belongs to; learnt from the response when the request opens one."""

    session_id: str | None = None


_stream_scope: ContextVar[StreamScope | None] = ContextVar("stream_http_stream_scope", default=None)


@dataclass(eq=False)
class _StoredEvent:
    event_id: str
    scope: StreamScope
    stream_id: str
    message: JSONRPCMessage | None


class MemoryEventStore(EventStore):
    """Keeps the latest `max_events` events in memory, each replayable only by its own session."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: dict[str, _StoredEvent] = {}
        self._order: deque[_StoredEvent] = deque()
        self._streams: dict[tuple[int, str], deque[_StoredEvent]] = {}

    @property
    def size(self) -> int:
        """How many events are kept. (Not `__len__`: the SDK tests the store for truth.)"""
        return len(self._events)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        scope = _stream_scope.get() or StreamScope()
        event = _StoredEvent(secrets.token_urlsafe(12), scope, stream_id, message)
        self._events[event.event_id] = event
        self._order.append(event)
        self._streams.setdefault((id(scope), stream_id), deque()).append(event)
        while len(self._order) > self.max_events:
            self._forget(self._order.popleft())
        return event.event_id

    def _forget(self, event: _StoredEvent) -> None:
        self._events.pop(event.event_id, None)
        key = (id(event.scope), event.stream_id)
        stream = self._streams.get(key)
        if stream and stream[0] is event:
            stream.popleft()
        if not stream:
            self._streams.pop(key, None)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        last = self._events.get(last_event_id)
        asking = _stream_scope.get()
        if last is None or asking is None or asking.session_id != last.scope.session_id:
            return None
        stream = list(self._streams.get((id(last.scope), last.stream_id), ()))
        for event in stream[stream.index(last) + 1:]:
            if event.message is not None:
                await send_callback(EventMessage(event.message, event.event_id))
        return last.stream_id


# === 6. Runtime ==============================================================



class Runtime:
    """What tools and routes share while the server runs: settings, the store, the event store.

    Built without I/O; `async with runtime:` opens the store and closes it again.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.events = None if settings.stateless else MemoryEventStore(settings.event_store_max_events)

    async def __aenter__(self) -> "Runtime":
        await self.store.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.store.close()

    async def announce_notes_changed(self, owner: str, note_id: str) -> None:
        """Tell `owner`'s listening connections that their notes changed."""
        for event in (NotesChanged(owner=owner), NoteUpdated(uri="notes://index", owner=owner),
                      NoteUpdated(uri=f"notes://{note_id}", owner=owner)):
            await CHANGES.publish(event)


# === 7. HTTP app =============================================================


def json_rpc_error(status: int, code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An HTTP error whose body is a JSON-RPC error a client can act on."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


PARSE_ERROR, INVALID_REQUEST = -32700, -32600


@dataclass(frozen=True)
class HostPolicy:
    """Which Host and Origin headers the MCP endpoint accepts (DNS-rebinding protection)."""

    hosts: tuple[str, ...]
    origins: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> "HostPolicy":
        public = urlsplit(settings.public_url)
        public_origin = f"{public.scheme}://{public.netloc}"
        loopback_hosts = ("127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]")
        loopback_origins = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*",
                            "http://127.0.0.1", "http://localhost", "http://[::1]")
        return cls(
            hosts=tuple(dict.fromkeys((public.netloc, *loopback_hosts, *settings.allowed_hosts))),
            origins=tuple(dict.fromkeys((public_origin, *loopback_origins, *settings.cors_origins))),
        )

    def transport_security(self) -> TransportSecuritySettings:
        return TransportSecuritySettings(allowed_hosts=list(self.hosts), allowed_origins=list(self.origins))

    def allows_host(self, host: str | None) -> bool:
        return host is not None and _matches(host.lower(), self.hosts)

    def allows_origin(self, origin: str | None) -> bool:
        return origin is None or _matches(origin.lower(), self.origins)

    def origin_regex(self) -> str:
        """The same origins as one regular expression, for the CORS middleware."""
        parts = [re.escape(o[:-2]) + r"(:\d+)?" if o.endswith(":*") else re.escape(o) for o in self.origins]
        return "^(" + "|".join(parts) + ")$"


def _matches(value: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if value == pattern or (pattern.endswith(":*") and value.startswith(pattern[:-1])
                                and value[len(pattern) - 1:].isdigit()):
            return True
    return False


class RequestGate:
    """Checks every request to the MCP endpoint before the SDK sees it, answering bad ones with the
    right status and a JSON-RPC error: a foreign Host or Origin, an oversized or malformed body, a
    wrong Content-Type or Accept header. It also marks which session a request belongs to, for the
    event store."""

    def __init__(self, app: ASGIApp, *, policy: HostPolicy, max_body_bytes: int, json_response: bool,
                 stateless: bool) -> None:
        self.app = app
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.json_response = json_response
        self.stateless = stateless

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        problem = self.check_headers(request)
        body = b""
        if problem is None and request.method == "POST":
            body, problem = await self.read_body(request)
        if problem is not None:
            await problem(scope, receive, send)
            return
        stream_scope = StreamScope(session_id=request.headers.get("mcp-session-id"))
        token = _stream_scope.set(stream_scope)
        try:
            await self.app(scope, _replay(body, receive) if request.method == "POST" else receive,
                           _learn_session_id(stream_scope, send))
        finally:
            _stream_scope.reset(token)

    def check_headers(self, request: Request) -> Response | None:
        host = request.headers.get("host")
        if not self.policy.allows_host(host):
            return json_rpc_error(421, INVALID_REQUEST, f"Host {host!r} is not served here; "
                                  "add it to ALLOWED_HOSTS or set PUBLIC_URL")
        origin = request.headers.get("origin")
        if not self.policy.allows_origin(origin):
            return json_rpc_error(403, INVALID_REQUEST, f"Origin {origin!r} is not allowed; add it to CORS_ORIGINS")
        if self.stateless and request.method in ("GET", "DELETE"):
            # Without sessions there is no stream to open or end; notifications come through
            # subscriptions/listen (2026-07-28) instead.
            return json_rpc_error(405, INVALID_REQUEST, f"{request.method} needs a session and this server is "
                                  "stateless; POST requests, and use subscriptions/listen for notifications",
                                  headers={"Allow": "POST"})
        if request.method != "POST":
            return None
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return json_rpc_error(415, INVALID_REQUEST, "Content-Type must be application/json")
        has_json, has_sse = check_accept_headers(request)
        if not has_json or not (has_sse or self.json_response or _is_modern(request)):
            return json_rpc_error(406, INVALID_REQUEST,
                                  "Accept must include application/json and text/event-stream")
        return None

    async def read_body(self, request: Request) -> tuple[bytes, Response | None]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", self.too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return b"", self.too_large()
        return bytes(body), check_json_rpc(bytes(body))

    def too_large(self) -> Response:
        return json_rpc_error(413, INVALID_REQUEST, f"Request body is larger than {self.max_body_bytes} bytes")


def check_json_rpc(body: bytes) -> Response | None:
    """A specific error for a body that is not one JSON-RPC 2.0 message, or None."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return json_rpc_error(400, PARSE_ERROR, "Body is not valid JSON")
    if isinstance(message, list):
        return json_rpc_error(400, INVALID_REQUEST, "Batches are not supported; send one message per request")
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return json_rpc_error(400, INVALID_REQUEST, 'Body must be a JSON-RPC 2.0 object with "jsonrpc": "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            return json_rpc_error(400, INVALID_REQUEST, '"method" must be a non-empty string')
        if "params" in message and not isinstance(message["params"], dict):
            return json_rpc_error(400, INVALID_REQUEST, '"params" must be an object')
    elif "result" not in message and "error" not in message:
        return json_rpc_error(400, INVALID_REQUEST, 'A message needs "method", "result" or "error"')
    if ("id" in message and not isinstance(message["id"], (str, int))) or isinstance(message.get("id"), bool):
        return json_rpc_error(400, INVALID_REQUEST, '"id" must be a string or an integer')
    return None


def _is_modern(request: Request) -> bool:
    return request.headers.get("mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then passes through (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _learn_session_id(stream_scope: StreamScope, send: Send) -> Send:
    async def watch(message: Message) -> None:
        if message["type"] == "http.response.start" and stream_scope.session_id is None:
            for name, value in message.get("headers", ()):
                if name.lower() == b"mcp-session-id":
                    stream_scope.session_id = value.decode("latin-1")
        await send(message)

    return watch


CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version",
                      "Mcp-Method", "Mcp-Name", "Last-Event-ID")
CORS_EXPOSE_HEADERS = ("Mcp-Session-Id", "WWW-Authenticate")


def with_cors(app: ASGIApp, policy: HostPolicy, methods: Sequence[str]) -> ASGIApp:
    """Let browser clients on the allowed origins call `app` and read the MCP headers."""
    return CORSMiddleware(app, allow_origin_regex=policy.origin_regex(), allow_methods=list(methods),
                          allow_headers=list(CORS_ALLOW_HEADERS), expose_headers=list(CORS_EXPOSE_HEADERS),
                          max_age=600)


def build_app(settings: Settings) -> Starlette:
    """The whole HTTP server as one Starlette app: the MCP endpoint behind its checks, and /healthz.

    Mount it in a bigger app with `Mount("/prefix", app)` and enter `app.router.lifespan_context(app)`
    in the parent's lifespan; set PUBLIC_URL to include the prefix.
    """
    state = Runtime(settings)
    policy = HostPolicy.from_settings(settings)
    sdk_app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=settings.stateless,
        json_response=settings.json_response,
        event_store=state.events,
        max_request_body_size=settings.max_request_bytes,
        session_idle_timeout=settings.session_idle_timeout_s,
        max_sessions=settings.max_sessions,
        transport_security=policy.transport_security(),
    )
    session_manager = mcp.session_manager
    gate = RequestGate(session_manager.handle_request, policy=policy, max_body_bytes=settings.max_request_bytes,
                       json_response=settings.json_response, stateless=settings.stateless)
    endpoint = with_cors(gate, policy, ["GET", "POST", "DELETE"])

    async def healthz(request: Request) -> Response:
        try:
            await state.store.ping()
        except StorageError as exc:
            logger.warning("health check: %s", exc)
            return JSONResponse({"status": "unavailable", "store": "down"}, status_code=503)
        return JSONResponse({"status": "ok", "store": "ok", "version": VERSION, "mode": settings.mode})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with state:
            token = _serving_runtime.set(state)
            try:
                async with session_manager.run():
                    gc.collect()
                    gc.freeze()  # start-up objects never die; sparing them from GC cuts latency spikes
                    logger.info("serving MCP at %s (%s)", settings.mcp_url, settings.mode)
                    yield
            finally:
                _serving_runtime.reset(token)

    routes = [
        Route(MCP_PATH, endpoint, methods=["GET", "POST", "DELETE", "OPTIONS"]),
        Route(MCP_PATH + "/", endpoint, methods=["GET", "POST", "DELETE", "OPTIONS"]),
        Route("/healthz", healthz, methods=["GET"]),
        Mount("/", sdk_app),  # whatever else the SDK serves, e.g. routes added with @mcp.custom_route
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# === 8. Command line =========================================================


def parse_args(argv: Sequence[str] | None) -> dict[str, str]:
    """Command-line flags, as overrides keyed by environment variable name."""
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="stream-http: a remote MCP server over Streamable HTTP. Every setting can also be "
        "given as an environment variable or in ./.env; flags win.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (environment variable, default):\n" + "\n".join(
            f"  {o.env:<24} {o.default or '-':<12} {o.help}" for o in OPTIONS),
    )
    for option in OPTIONS:
        if option.flag is None:
            continue
        if option.switch:
            parser.add_argument(option.flag, dest=option.env, action="store_const", const="true",
                                help=f"{option.help} [{option.env}]")
        else:
            parser.add_argument(option.flag, dest=option.env, metavar="VALUE",
                                help=f"{option.help} [{option.env}, default {option.default or 'derived'}]")
    args = parser.parse_args(argv)
    return {name: value for name, value in vars(args).items() if value is not None}


def configure_logging(level: str) -> None:
    """Plain log lines on stderr. The SDK logs every stateless request at INFO; keep it at WARNING
    unless debugging, since formatting those lines costs more than serving the request."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    logging.getLogger("mcp").setLevel(level if level == "DEBUG" else "WARNING")


def refuse_unsafe_bind(settings: Settings) -> str | None:
    """Why the server must not start as configured, or None."""
    if settings.binds_loopback or settings.auth_enabled:
        return None
    if settings.allow_unauthenticated:
        logger.warning("listening on %s WITHOUT sign-in (ALLOW_UNAUTHENTICATED): anyone who can reach "
                       "port %d can use every tool and read every note", settings.host, settings.port)
        return None
    return (f"refusing to listen on {settings.host} without sign-in: anyone who can reach port {settings.port} "
            "could use every tool. Set GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET to turn on sign-in, or pass "
            "--allow-unauthenticated (ALLOW_UNAUTHENTICATED=true) to accept the risk.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the HTTP server until SIGINT or SIGTERM; return the exit status."""
    overrides = parse_args(argv)
    try:
        settings = load_settings(overrides=overrides)
    except ConfigError as exc:
        print(f"server.py: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if reason := refuse_unsafe_bind(settings):
        print(f"server.py: {reason}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    # After its graceful shutdown uvicorn re-raises the signal that asked for it, which would end the
    # process as "killed by SIGTERM" (or a KeyboardInterrupt traceback); a finished shutdown is a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    with suppress(KeyboardInterrupt):
        asyncio.run(server.serve())
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
