"""stream-http: a remote MCP server over Streamable HTTP, behind Sign in with Google.

One file is the whole server: an MCP Python SDK `MCPServer` (what SDK 1.x called FastMCP) with
tools, resources and prompts, served over Streamable HTTP by Starlette and uvicorn. With
GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET set it is also the OAuth 2.1 authorization server its
MCP clients sign in with, handing the person's sign-in to Google.

Run it:
    uv run server.py                 # http://127.0.0.1:8000/mcp, stateful, no configuration
    uv run server.py --stateless     # every POST stands alone: for replicas behind a balancer
    uv run server.py --help          # every setting, its environment variable and default
    uv run mcp dev server.py         # the MCP Inspector, over stdio
    uv run mcp run server.py         # stdio, for clients that launch their servers

Map (`grep -n '^# ===' server.py`). Section 1 is yours; the machinery after it is in layers, each
using only the sections above it (tests/test_layers.py holds it to that):
    1. Your server         the server object, then its tools, resources, views (MCP Apps), prompts,
                           completions and the notes demo's data: what you edit to make it yours
    2. Settings            every knob, declared once: Settings, load_settings, ConfigError
    3. Telemetry           metrics, spans, text or JSON logs with request ids, audit()
    4. Storage             typed records with expiry (Store) in SQLite or Redis; new_id; event stores
    5. What handlers reach current_user(), runtime(), can_ask_user(), send_log(), the change bus,
                           rate limits
    6. Google              the only code that talks to Google: sign-in, the person's tokens, a tool's
                           scopes asked for when it is called, call_google()
    7. OAuth provider      this server as the authorization server: Clients, SignIns, Grants and
                           the SDK's OAuthProvider over them (no HTTP)
    8. Pages and errors    consent, account and message pages; views' style and bridge; the OAuth,
                           JSON-RPC and 503 answers
    9. OAuth routes        discovery documents, the OAuth endpoints, /account, Google grant pages
    10. Serving MCP        Runtime (what the server runs on), the MCP middleware, the request gate,
                           the drain, build_app()
    11. Command line       main(), claude-config, doctor
"""


import argparse
import asyncio
import base64
import dataclasses
import datetime
import errno
import fnmatch
import gc
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import ssl
import string
import sys
import time
import warnings
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    asynccontextmanager,
    nullcontext,
    suppress,
)
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from functools import cache, lru_cache, partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit

import anyio
import httpx2
import pydantic_core
import uvicorn
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dotenv import dotenv_values
from mcp.server import MCPServer, ServerRequestContext
from mcp.server.apps import APP_MIME_TYPE, Apps, client_supports_apps
from mcp.server.auth.handlers.metadata import MetadataHandler
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.auth_context import auth_context_var, get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.middleware.client_auth import AuthenticationError, ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    RegistrationError,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.routes import build_metadata
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.server.context import CallNext, HandlerResult
from mcp.server.mcpserver import Context, Elicit, ElicitationResult, Resolve
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp.server.session import ServerSession
from mcp.server.streamable_http import GET_STREAM_KEY, EventCallback, EventMessage, EventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent
from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthMetadata, OAuthToken, ProtectedResourceMetadata
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError, UrlElicitationRequiredError
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    CallToolResult,
    ClientCapabilities,
    Completion,
    CompletionArgument,
    CompletionContext,
    ElicitationCapability,
    ElicitRequest,
    ElicitRequestURLParams,
    InputRequiredResult,
    JSONRPCMessage,
    PromptReference,
    ResourceTemplateReference,
    TextContent,
    ToolAnnotations,
    jsonrpc_message_adapter,
)
from mcp_types import Tool as MCPTool
from mcp_types.methods import SPEC_CLIENT_METHODS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from opentelemetry import propagate, trace
from pydantic import AnyHttpUrl, AnyUrl, BaseModel, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

# Authlib, itsdangerous, redis, prometheus-client and OpenTelemetry's SDK are imported where used: with
# sign-in off and SQLite, `mcp run` needs only the MCP SDK (all that `mcp install --name` installs).

logger = logging.getLogger("stream_http")

SERVER_NAME = "stream-http"
VERSION = "0.2.0"
NOTE_TITLE_MAX_CHARS = 200
NOTE_BODY_MAX_CHARS = 20_000
NOTE_TAGS_MAX = 10
NOTE_TAG_MAX_CHARS = 32
SEARCH_LIMIT_MAX = 100
LONG_TASK_STEPS_MAX = 50
GOOGLE_SCOPES = "stream-http/google-scopes"  # a tool's meta: the Google scopes it needs, asked for when called
CALENDAR_READONLY = "https://www.googleapis.com/auth/calendar.readonly"
DRIVE_METADATA_READONLY = "https://www.googleapis.com/auth/drive.metadata.readonly"
GOOGLE_SCOPE_LABELS = {  # what a person is asked to allow (and sees on /account): one per scope a tool needs
    CALENDAR_READONLY: "See the events on your Google Calendar",
    DRIVE_METADATA_READONLY: "See the names and details of your Google Drive files (not their contents)",
}


# === 1. Your server: tools, resources, prompts (edit here) ===================
#
# `mcp` is what `mcp run server.py` and `mcp dev server.py` load, and what `build_app` serves over
# HTTP. The SDK takes the server's lifespan and its change feed when `mcp` is built, here at import;
# both belong to the running server, which exists only once it starts (section 10), so the two below
# reach it when they are called.


class ChangeFeed:
    """The SDK's subscription bus behind `subscriptions/listen`: the running server's change bus."""

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        return runtime().changes.subscribe(listener)

    async def publish(self, event: ServerEvent) -> None:
        await runtime().changes.publish(event)


APPS = Apps()  # MCP Apps: hosts that render views learn that this server has some (the views are below)

mcp: "MCPServer[Runtime]" = MCPServer(
    SERVER_NAME,
    title="stream-http",
    version=VERSION,
    instructions=(
        "A personal notebook and a few utilities. Use search_notes before add_note to avoid "
        "duplicates; notes belong to the signed-in user and nobody else sees them."
    ),
    # What `mcp install` and `mcp dev` install to run this file outside the project: pyproject.toml's
    # dependencies (a test keeps the two lists equal), bounded with ~= rather than < and >: the Inspector
    # that Node 20 gets (0.15) passes them through a shell parser, where < and > are redirections.
    dependencies=["mcp[cli]~=2.3", "authlib~=1.9", "starlette~=1.0", "uvicorn[standard]~=0.54.0",
                  "python-dotenv~=1.2", "itsdangerous~=2.2", "httpx2~=2.16", "redis~=8.1", "rich~=15.0",
                  "prometheus-client~=0.26", "opentelemetry-sdk~=1.45", "opentelemetry-exporter-otlp-proto-http~=1.45"],
    lifespan=lambda server: serving_runtime(),
    subscriptions=ChangeFeed(),
    extensions=[APPS],
)

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)

# A tool can name a view: an interactive document (the "views" resources below) that hosts rendering MCP
# Apps (Claude, ChatGPT, VS Code, Cursor, Goose...) show for its result. Every other client gets the same
# text and structured content as ever.
NOTES_VIEW = "ui://stream-http/notes.html"
CALENDAR_VIEW = "ui://stream-http/calendar.html"


def shown_in(view: str) -> dict[str, Any]:
    """A tool's `_meta` naming its view: `ui.resourceUri`, and the flat key hosts from before MCP Apps 1.0
    read. (The SDK's `Apps.tool` stamps the same, but it registers its tools when `mcp` is built, above.)"""
    return {"ui": {"resourceUri": view}, "ui/resourceUri": view}


FOR_VIEWS_ONLY = {"ui": {"visibility": ["app"]}}  # a tool only views call: hosts keep it from the model
VIEW_META = {"ui": {"csp": {}, "prefersBorder": False}}  # a view's: no outside script, style, font or connection


# --- tools
#
# Plain functions: their docstrings and `Field` descriptions are what the model reads. A tool that
# does no blocking work is `async def`: the SDK runs a plain `def` tool in a worker thread, a hop
# that costs more than these tools themselves. What a tool may call:
#   current_user()          who is calling (.subject is stable; .email, .name with sign-in on)
#   runtime()               the running server: .store (keep data: see the notes demo below), .settings
#   call_google(request)    call a Google API as the person (declare its scopes: meta={GOOGLE_SCOPES: [...]})
#   send_log(ctx, text)     a log message to the client, at the level its session asked for
#   can_ask_user(ctx)       whether this connection can put a question to the person mid-call (Elicit)
#   raise ToolError(text)   a problem the model can fix, as a tool result it reads


@mcp.tool(title="Echo", annotations=READ_ONLY)
async def echo(
    message: Annotated[str, Field(description="Text to send back.", max_length=10_000)],
) -> str:
    """Return the message unchanged. Useful to check that the connection works."""
    return message


@mcp.tool(title="Add two numbers", annotations=READ_ONLY)
async def add(
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
async def whoami() -> Identity:
    """Describe the account this conversation acts for: who owns the notes and which client is
    connected. Without sign-in, everyone is the same local user."""
    user = current_user()
    return Identity(**dataclasses.asdict(user), authenticated=user is not LOCAL_USER)


class NoteView(BaseModel):
    id: str = Field(description="Identifier to pass to delete_note or read as notes://{id}.")
    title: str = Field(description="The note's short title.")
    body: str = Field(description="The note itself, in Markdown.")
    tags: list[str] = Field(description="The note's labels, lower-case.")
    created_at: float = Field(description="Unix time the note was written.")


class NoteList(BaseModel):
    notes: list[NoteView] = Field(description="The matching notes, newest first.")
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
    await save_note(current_user().subject, note)
    return note.view()


@mcp.tool(title="Search notes", annotations=READ_ONLY, meta=shown_in(NOTES_VIEW))
async def search_notes(
    query: Annotated[str, Field(description="Words to look for in titles and bodies; "
                                "empty matches every note.", max_length=200)] = "",
    tag: Annotated[str | None, Field(description="Only notes with this tag.", max_length=NOTE_TAG_MAX_CHARS)] = None,
    limit: Annotated[int, Field(description="Most notes to return.", ge=1, le=SEARCH_LIMIT_MAX)] = 20,
) -> NoteList:
    """Find the user's notes by words and tag, newest first."""
    found = await find_notes(current_user().subject, query=query, tag=tag.lower() if tag else None)
    return NoteList(notes=[note.view() for note in found[:limit]], total=len(found))


class TagCount(BaseModel):
    tag: str = Field(description="The tag.")
    notes: int = Field(description="How many notes carry it.")


class NoteTags(BaseModel):
    tags: list[TagCount] = Field(description="Every tag in use, most used first.")


@mcp.tool(title="Note tags", annotations=READ_ONLY, meta=FOR_VIEWS_ONLY)
async def note_tags() -> NoteTags:
    """Every tag on the user's notes with how many notes carry it, most used first (then A to Z): the
    notes view's tag filter."""
    counts = Counter(tag for note in await find_notes(current_user().subject) for tag in note.tags)
    most_used = sorted(counts.items(), key=lambda tag_count: (-tag_count[1], tag_count[0]))
    return NoteTags(tags=[TagCount(tag=tag, notes=count) for tag, count in most_used])


class DeleteConfirmation(BaseModel):
    confirm: bool = Field(description="Delete this note for good?")


NOT_ASKED = "not asked"


async def ask_before_deleting(note_id: str, ctx: Context) -> Elicit[DeleteConfirmation] | str:
    """Ask the user to confirm, where this connection can carry the question."""
    note = await get_note(current_user().subject, note_id)
    if note is None:
        raise ToolError(f"There is no note {note_id!r}. search_notes lists the ids.")
    if not can_ask_user(ctx):
        return NOT_ASKED
    return Elicit(f"Delete the note {note.title!r} ({note_id})? This cannot be undone.", DeleteConfirmation)


class DeleteOutcome(BaseModel):
    deleted: bool = Field(description="Whether the note is gone now (false: it was kept, or did not exist).")
    note_id: str = Field(description="The note asked about.")
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
    deleted = await remove_note(current_user().subject, note_id)
    return DeleteOutcome(deleted=deleted, note_id=note_id, confirmation=verdict)


class TaskReport(BaseModel):
    steps_completed: int = Field(description="How many steps ran.")
    seconds: float = Field(description="How long the task took, in seconds.")


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


class GoogleProfile(BaseModel):
    subject: str = Field(description="The Google account's stable id.")
    email: str | None = Field(description="The account's email address.")
    email_verified: bool | None = Field(description="Whether Google has verified that address.")
    name: str | None = Field(description="The person's name as Google shows it.")
    picture: str | None = Field(description="URL of the profile picture.")
    hosted_domain: str | None = Field(description="Google Workspace domain, when there is one.")
    locale: str | None = Field(None, description="The person's language, e.g. en-GB.")


GOOGLE_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                   open_world_hint=True)


@mcp.tool(title="Google profile", annotations=GOOGLE_READ_ONLY, meta={GOOGLE_SCOPES: ["openid", "email", "profile"]})
async def google_profile() -> GoogleProfile:
    """Fetch the signed-in person's profile from Google (name, email, picture, Workspace domain) with
    their own Google authorization, which this server keeps and refreshes. Shows how a tool reaches a
    Google API on the user's behalf. Needs the "google" scope; on a server without sign-in it says so."""
    info = await call_google(lambda google, token: google.userinfo(token))
    return GoogleProfile(subject=str(info.get("sub", current_user().subject)), email=info.get("email"),
                         email_verified=info.get("email_verified"), name=info.get("name"),
                         picture=info.get("picture"), hosted_domain=info.get("hd"), locale=info.get("locale"))


class CalendarEvent(BaseModel):
    id: str = Field(description="Google Calendar's id of the event.")
    summary: str = Field(description="The event's title ('(no title)' when it has none).")
    start: str = Field(description="When it starts: an RFC 3339 time, or a date for an all-day event.")
    end: str = Field(description="When it ends, in the same form as start.")
    location: str | None = Field(None, description="Where it takes place, as written in the event.")
    link: str | None = Field(None, description="The event in Google Calendar.")

    @classmethod
    def from_google(cls, item: Mapping[str, Any]) -> "CalendarEvent":
        """An event as Calendar API v3 gives it (events.list)."""
        def when(edge: Mapping[str, Any] | None) -> str:  # a time, or a date for an all-day event
            return (edge or {}).get("dateTime") or (edge or {}).get("date") or ""

        return cls(id=str(item.get("id")), summary=item.get("summary") or "(no title)", start=when(item.get("start")),
                   end=when(item.get("end")), location=item.get("location"), link=item.get("htmlLink"))


class UpcomingEvents(BaseModel):
    events: list[CalendarEvent] = Field(description="Soonest first.")
    until: str = Field(description="The end of the period looked at (RFC 3339).")


@mcp.tool(title="Upcoming calendar events", annotations=GOOGLE_READ_ONLY,
          meta={GOOGLE_SCOPES: [CALENDAR_READONLY], **shown_in(CALENDAR_VIEW)})
async def calendar_upcoming(
    days: Annotated[int, Field(description="How many days ahead to look.", ge=1, le=90)] = 7,
    limit: Annotated[int, Field(description="Most events to return.", ge=1, le=100)] = 10,
) -> UpcomingEvents:
    """List the events on the person's primary Google Calendar from now until `days` days ahead, soonest
    first (recurring events as their single occurrences). The first time, the person is asked to let this
    server see their calendar."""
    now = datetime.datetime.now(datetime.UTC)
    until = (now + datetime.timedelta(days=days)).isoformat()
    events = f"{runtime().settings.google_calendar_api}/calendars/primary/events"
    query = {"timeMin": now.isoformat(), "timeMax": until, "singleEvents": "true", "orderBy": "startTime",
             "maxResults": limit}
    found = await call_google(lambda google, token: google.api(events, token, query))
    return UpcomingEvents(events=[CalendarEvent.from_google(item) for item in found.get("items", [])[:limit]],
                          until=until)


class DriveFile(BaseModel):
    id: str = Field(description="Google Drive's id of the file.")
    name: str = Field(description="The file's name.")
    mime_type: str = Field(description="Google's kind of file, e.g. application/vnd.google-apps.document.")
    modified: str | None = Field(None, description="When it last changed (RFC 3339).")
    link: str | None = Field(None, description="The file in Google Drive.")

    @classmethod
    def from_google(cls, item: Mapping[str, Any]) -> "DriveFile":
        """A file as Drive API v3 gives it (files.list)."""
        return cls(id=str(item.get("id")), name=item.get("name") or "", mime_type=item.get("mimeType") or "",
                   modified=item.get("modifiedTime"), link=item.get("webViewLink"))


class DriveFiles(BaseModel):
    files: list[DriveFile] = Field(description="The matching files, most recently changed first.")


@mcp.tool(title="Search Google Drive", annotations=GOOGLE_READ_ONLY, meta={GOOGLE_SCOPES: [DRIVE_METADATA_READONLY]})
async def drive_search(
    query: Annotated[str, Field(description="Words in the file's name.", min_length=1, max_length=200)],
    limit: Annotated[int, Field(description="Most files to return.", ge=1, le=100)] = 10,
) -> DriveFiles:
    """Find files in the person's Google Drive whose name contains the words, most recently changed first.
    Returns names, kinds and links, never the files' contents. The first time, the person is asked to let
    this server see their Drive's file names."""
    words = query.strip().replace("\\", "\\\\").replace("'", "\\'")  # Drive's query language escapes these
    files = f"{runtime().settings.google_drive_api}/files"
    search = {"q": f"name contains '{words}' and trashed = false", "pageSize": limit, "orderBy": "modifiedTime desc",
              "fields": "files(id,name,mimeType,modifiedTime,webViewLink)"}
    found = await call_google(lambda google, token: google.api(files, token, search))
    return DriveFiles(files=[DriveFile.from_google(item) for item in found.get("files", [])[:limit]])


# --- resources


@mcp.resource("notes://index", name="Notes index", mime_type="application/json")
async def notes_index() -> str:
    """Every note of the user: id, title, tags and when it was written, newest first."""
    found = await find_notes(current_user().subject)
    return json.dumps([{"id": n.id, "title": n.title, "tags": list(n.tags), "created_at": n.created_at}
                       for n in found[:SEARCH_LIMIT_MAX]])


@mcp.resource("notes://{note_id}", name="Note", mime_type="text/markdown")
async def note_text(note_id: str) -> str:
    """One note of the user, as Markdown."""
    note = await get_note(current_user().subject, note_id)
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
            "store": settings.store_scheme,
        },
    })


# --- views: the documents hosts show for the tools that name them above (their markup and scripts
# are after the completions)

@mcp.resource(NOTES_VIEW, name="Notes view", mime_type=APP_MIME_TYPE, meta=VIEW_META)
def notes_view() -> str:
    """The notes search_notes found, as a list to filter by words or tag, open, and add to."""
    return view_page("Notes", NOTES_VIEW_BODY, NOTES_VIEW_SCRIPT)


@mcp.resource(CALENDAR_VIEW, name="Agenda view", mime_type=APP_MIME_TYPE, meta=VIEW_META)
def calendar_view() -> str:
    """The events calendar_upcoming found, as an agenda by day in the person's time zone."""
    return view_page("Upcoming events", CALENDAR_VIEW_BODY, CALENDAR_VIEW_SCRIPT)


# --- prompts

DRAFT_STYLES = ("email", "blog post", "summary", "tweet")


@mcp.prompt(title="Summarize notes")
async def summarize_notes(tag: str | None = None) -> list[UserMessage]:
    """Ask the model to summarize the user's notes, optionally only those with one tag."""
    found = await find_notes(current_user().subject, tag=tag)
    if not found:
        return [UserMessage(f"I have no notes{f' tagged {tag!r}' if tag else ''} yet. Say so briefly.")]
    notes = "\n\n".join(note.markdown() for note in found[:SEARCH_LIMIT_MAX])
    return [UserMessage(f"Summarize these notes in a few bullet points:\n\n{notes}")]


@mcp.prompt(title="Draft from a note")
async def draft_from_note(note_id: str, style: str = "email") -> list[UserMessage]:
    """Ask the model to turn one note into a draft in the given style."""
    note = await get_note(current_user().subject, note_id)
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
        candidates = [note.id for note in await find_notes(current_user().subject)]
    elif argument.name == "tag":
        candidates = sorted({tag for note in await find_notes(current_user().subject) for tag in note.tags})
    elif argument.name == "style":
        candidates = list(DRAFT_STYLES)
    else:
        return None
    matches = [value for value in candidates if value.lower().startswith(prefix)]
    return Completion(values=matches[:100], total=len(matches), has_more=len(matches) > 100)


# --- the views' markup and scripts: section 8's view_page() wraps each in the shared style and the
# bridge to the host (`view`, described there)

CALENDAR_VIEW_BODY = """<main aria-labelledby="title" aria-busy="true">
<header><h1 id="title">Upcoming</h1><p id="range" class="muted" role="status">Loading…</p></header>
<div id="agenda" class="scroll"></div></main>"""

CALENDAR_VIEW_SCRIPT = """
const $ = id => document.getElementById(id);
let days = 7, events = null;
const zone = () => view.context.timeZone || Intl.DateTimeFormat().resolvedOptions().timeZone;
function format(options, timeZone = zone()) {
  try { return new Intl.DateTimeFormat(view.context.locale || undefined, {timeZone, ...options}); }
  catch (badLocaleOrZone) { return new Intl.DateTimeFormat(undefined, options); }
}
const isDate = value => /^\\d{4}-\\d{2}-\\d{2}$/.test(value);
const isWeb = link => { try { return new URL(link).protocol === "https:"; } catch (notAUrl) { return false; } };
function dayOf(event) {
  if (isDate(event.start)) return event.start;
  const digits = {year: "numeric", month: "2-digit", day: "2-digit", calendar: "gregory", numberingSystem: "latn"};
  const parts = format(digits).formatToParts(new Date(event.start));
  const part = Object.fromEntries(parts.map(({type, value}) => [type, value]));
  return `${part.year}-${part.month}-${part.day}`;
}
function dayHeading(event) {
  const when = isDate(event.start) ? new Date(event.start + "T12:00:00Z") : new Date(event.start);
  return format({weekday: "long", day: "numeric", month: "long"}, isDate(event.start) ? "UTC" : zone()).format(when);
}
function timeOf(event) {
  if (isDate(event.start)) return "All day";
  const clock = format({hour: "2-digit", minute: "2-digit"});
  return clock.format(new Date(event.start)) + (event.end ? "\\u2013" + clock.format(new Date(event.end)) : "");
}
function eventItem(event) {
  const item = document.createElement("li"), when = document.createElement("span");
  const what = isWeb(event.link) ? document.createElement("a") : document.createElement("span");
  item.style.cssText = "display:flex;gap:10px;padding:6px 2px";
  when.className = "muted";
  when.style.cssText = "flex:0 0 7.5em";
  when.textContent = timeOf(event);
  what.textContent = event.summary;
  if (isWeb(event.link)) {
    what.href = event.link;
    what.target = "_blank";
    what.title = "Open in Google Calendar";
    if (view.host.openLinks) {
      what.addEventListener("click", click => { click.preventDefault(); view.openLink(event.link).catch(() => {}); });
    }
  }
  const about = document.createElement("div");
  about.append(what);
  if (event.location) {
    const where = document.createElement("div");
    where.className = "muted";
    where.textContent = event.location;
    about.append(where);
  }
  item.append(when, about);
  return item;
}
function render() {
  if (events === null) return;
  const byDay = new Map();
  for (const event of events) {
    const key = dayOf(event);
    if (!byDay.has(key)) byDay.set(key, {heading: dayHeading(event), events: []});
    byDay.get(key).events.push(event);
  }
  const sections = [...byDay.values()].map(({heading, events: those}) => {
    const section = document.createElement("section"), title = document.createElement("h2");
    const list = document.createElement("ul");
    title.textContent = heading;
    list.append(...those.map(eventItem));
    section.append(title, list);
    return section;
  });
  $("agenda").replaceChildren(...sections);
  $("range").textContent = (events.length ? "" : "Nothing on your calendar. ") + "Next " + days +
    (days === 1 ? " day" : " days") + ", times in " + zone().replaceAll("_", " ");
  document.querySelector("main").removeAttribute("aria-busy");
}
view.on("input", args => { days = args.days || days; });
view.on("result", result => {
  if (result.isError) {
    $("range").textContent = view.textOf(result);
    $("range").className = "muted bad";
    return;
  }
  events = (result.structuredContent?.events || []).filter(event => event.start);
  $("range").className = "muted";
  render();
});
view.on("context", render);
view.on("cancelled", () => { $("range").textContent = "Cancelled."; });
"""

NOTES_VIEW_BODY = """<main aria-labelledby="title" aria-busy="true">
<header><h1 id="title">Notes</h1><p id="count" class="muted" role="status">Loading…</p></header>
<div style="display:flex;gap:6px"><label style="flex:1;display:flex"><span class="sr">Filter the notes</span>
<input id="filter" type="search" placeholder="Filter" autocomplete="off" style="flex:1"></label>
<label><span class="sr">Only notes tagged</span><select id="tag"><option value="">All tags</option></select></label>
</div>
<ul id="list" class="scroll" aria-label="Notes"></ul>
<details id="adding"><summary>Add a note</summary>
<form id="form" style="display:grid;gap:6px;padding-bottom:4px">
<label class="muted">Title <input name="title" required maxlength="200" style="width:100%"></label>
<label class="muted">Note <textarea name="body" rows="3" maxlength="20000" style="width:100%"></textarea></label>
<label class="muted">Tags, separated by commas <input name="tags" style="width:100%"></label>
<div><button type="submit">Add</button> <span id="added" role="status"></span></div>
</form></details></main>"""

NOTES_VIEW_SCRIPT = """
const $ = id => document.getElementById(id);
let notes = [], total = 0;
let query = "";
function day() {
  const options = {day: "numeric", month: "short", year: "numeric"};
  try { return new Intl.DateTimeFormat(view.context.locale || undefined, options); }
  catch (badLocale) { return new Intl.DateTimeFormat(undefined, options); }
}
function noteItem(note) {
  const item = document.createElement("li"), shown = document.createElement("details");
  const summary = document.createElement("summary"), body = document.createElement("div");
  const when = document.createElement("span"), tags = document.createElement("span");
  summary.textContent = note.title + " ";
  tags.className = when.className = "muted";
  tags.textContent = note.tags.map(tag => "#" + tag).join(" ") + " ";
  when.textContent = day().format(new Date(note.created_at * 1000));
  summary.append(tags, when);
  body.textContent = note.body || "(no text)";
  body.style.cssText = "white-space:pre-wrap;overflow-wrap:anywhere;padding:0 2px 8px";
  shown.append(summary, body);
  item.append(shown);
  return item;
}
function render() {
  const words = $("filter").value.toLowerCase().split(/\\s+/).filter(Boolean);
  const text = note => [note.title, note.body, ...note.tags].join("\\n").toLowerCase();
  const shown = notes.filter(note => words.every(word => text(note).includes(word)));
  $("list").replaceChildren(...shown.map(noteItem));
  $("count").textContent = notes.length === 0 ? "No notes yet" :
    (shown.length === notes.length ? "" : shown.length + " shown of ") + notes.length +
    (total > notes.length ? " of " + total : "") + (notes.length === 1 ? " note" : " notes");
  document.querySelector("main").removeAttribute("aria-busy");
}
function show(result) {
  if (result.isError) return fail(view.textOf(result));
  notes = result.structuredContent?.notes || [];
  $("count").className = "muted";
  total = result.structuredContent?.total ?? notes.length;
  render();
}
function fail(message) {
  $("count").textContent = message;
  $("count").className = "muted bad";
}
view.on("input", args => { query = args.query || ""; });
view.on("result", show);
view.on("cancelled", () => fail("The search was cancelled."));
view.ready.then(async () => {
  try {
    const {structuredContent} = await view.callTool("note_tags", {});
    for (const {tag, notes: count} of structuredContent.tags) $("tag").add(new Option(`#${tag} (${count})`, tag));
  } catch (error) { $("tag").hidden = true; }
});
$("filter").addEventListener("input", render);
$("tag").addEventListener("change", async () => {
  const tag = $("tag").value;
  try { show(await view.callTool("search_notes", tag ? {query, tag, limit: 100} : {query, limit: 100})); }
  catch (error) { fail(error.message); }
});
$("form").addEventListener("submit", async event => {
  event.preventDefault();
  const form = new FormData(event.target), button = event.target.querySelector("button");
  const tags = String(form.get("tags")).split(",").map(tag => tag.trim()).filter(Boolean);
  button.disabled = true;
  try {
    const result = await view.callTool("add_note", {title: form.get("title"), body: form.get("body"), tags});
    notes.unshift(result.structuredContent);
    total += 1;
    render();
    event.target.reset();
    $("added").textContent = "Added “" + result.structuredContent.title + "”.";
    $("added").className = "muted";
    await view.tellModel(result);
  } catch (error) {
    $("added").textContent = error.message;
    $("added").className = "bad";
  } finally { button.disabled = false; }
});
"""


# --- the notes demo's data: records in the server's store, one per note, listed per owner
#
# To drop the demo, delete these, the four note tools, the two notes resources and the two prompts.


@dataclass(frozen=True)
class Note:
    kind: ClassVar[str] = "note"  # its records' kind in the store

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

    def matches(self, words: Sequence[str], tag: str | None) -> bool:
        """Every word in the title or body (case-insensitive), and the tag if one is given."""
        text = f"{self.title}\n{self.body}".casefold()
        return all(word.casefold() in text for word in words) and (tag is None or tag in self.tags)


def note_key(owner: str, note_id: str) -> str:
    return f"{owner} {note_id}"


async def save_note(owner: str, note: Note) -> None:
    await runtime().store.put(Entry(note_key(owner, note.id), note, owner=owner, order=note.created_at))
    await runtime().announce_resources_changed(owner, ["notes://index", f"notes://{note.id}"])


async def get_note(owner: str, note_id: str) -> Note | None:
    return await runtime().store.get(Note, note_key(owner, note_id))


async def find_notes(owner: str, *, query: str = "", tag: str | None = None) -> list[Note]:
    """The owner's notes with every word of `query` and the tag, newest first."""
    words = query.split()
    return [note for note in await runtime().store.find(Note, owner) if note.matches(words, tag)]


async def remove_note(owner: str, note_id: str) -> bool:
    deleted = await runtime().store.delete(Note, note_key(owner, note_id))
    if deleted:
        await runtime().announce_resources_changed(owner, ["notes://index", f"notes://{note_id}"])
    return deleted


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(tag.strip().lower() for tag in tags if tag.strip()))


def confirmation_of(answer: Any) -> Literal["confirmed", "declined", "cancelled", "not asked"]:
    if getattr(answer, "action", None) == "accept":
        data = answer.data
        if data == NOT_ASKED:
            return NOT_ASKED
        return "confirmed" if isinstance(data, DeleteConfirmation) and data.confirm else "declined"
    return "declined" if getattr(answer, "action", None) == "decline" else "cancelled"


# === The server's machinery below: adding a tool, resource or prompt needs none of it ===
#
# Settings, storage, the MCP plumbing, sign-in with Google, the OAuth provider, the pages, the HTTP
# app and the command line. Read on to change how the server runs, not what it offers.


# === 2. Settings =============================================================
#
# Every knob, declared once: each field of `Settings` names its environment variable, default, help
# text, parser and optional flag, and `load_settings` is a loop over that table (the environment,
# then ./.env, under the command line's flags), collecting every problem into one ConfigError.
# Offers below: Settings, load_settings, ConfigError, Secret, derive_key, is_loopback_host, MCP_PATH.

MCP_PATH = "/mcp"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
GOOGLE_DISCOVERY_URL = "https://accounts.google.com/.well-known/openid-configuration"
GOOGLE_RISC_DISCOVERY_URL = "https://accounts.google.com/.well-known/risc-configuration"
SECRET_KEY_FILE = "secret_key"  # noqa: S105 - a file name, not a secret
HERE = Path(__file__).resolve().parent  # where server.py is
STORE_SCHEMES = ("sqlite", "redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster",
                 "rediss+cluster")  # what STORE_URL may start with (section 4 opens each)
REPLICA_WAIT_DEFAULT_MS = 100  # with Sentinel or Cluster: how long a durable write waits for a replica
ICON_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon", ".jpg": "image/jpeg",
              ".jpeg": "image/jpeg", ".webp": "image/webp"}
ICON_MAX_BYTES = 32 * 1024


class ConfigError(Exception):
    """The configuration cannot work; the message names every problem found."""


@dataclass(frozen=True)
class Secret:
    """A setting that must never reach a log, a page or a repr."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')"


# A parser turns a setting's text into its value, adding what is wrong to `problems`.
Parser = Callable[[str, str, list[str]], Any]


def as_text(name: str, raw: str, problems: list[str]) -> str:
    return raw


def whole_number(minimum: int = 0, maximum: int = 2**31) -> Parser:
    def parse(name: str, raw: str, problems: list[str]) -> int:
        try:
            number = int(raw)
        except ValueError:
            problems.append(f"{name}={raw!r} is not a whole number")
            return minimum
        if not minimum <= number <= maximum:
            problems.append(f"{name}={number} is outside {minimum}..{maximum}")
        return number

    return parse


def true_or_false(name: str, raw: str, problems: list[str]) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        problems.append(f"{name}={value!r} is not true or false")
    return False


def comma_list(name: str, raw: str, problems: list[str]) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def lowercase_set(name: str, raw: str, problems: list[str]) -> frozenset[str]:
    return frozenset(item.lower() for item in comma_list(name, raw, problems))


def secret_text(name: str, raw: str, problems: list[str]) -> Secret | None:
    return Secret(raw) if raw else None


def one_of(*choices: str) -> Parser:
    """One of `choices`, in any case, as `choices` spells it."""
    def parse(name: str, raw: str, problems: list[str]) -> str:
        spelled = {choice.upper(): choice for choice in choices}
        if raw.upper() not in spelled:
            problems.append(f"{name}={raw.upper()!r} is not one of {', '.join(choices)}")
        return spelled.get(raw.upper(), choices[0])

    return parse


HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$",
                       re.IGNORECASE)


def url_problem(url: str) -> str | None:
    """What keeps `url` from being an http(s) URL a client can reach, said so that it can be fixed; or None."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address, say
        return f"is not a URL ({exc}; an IPv6 address goes in brackets: http://[::1]:8000)"
    try:
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 1 to 65535 (write it as http://host:8000)"
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL with a host, such as https://mcp.example.com"
    if not (HOST_NAME.match(host) or is_address(host)):
        return f"has {host!r} for a host, which is neither a name nor an address"
    if port == 0:
        return "has port 0, which no client can reach"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def http_url(name: str, raw: str, problems: list[str]) -> str:
    """An http(s) URL with a host and no query or fragment, without its trailing slash ("" stays "")."""
    if raw and (problem := url_problem(raw)):
        problems.append(f"{name}={raw!r} {problem}")
    return raw.rstrip("/")


def http_urls(name: str, raw: str, problems: list[str]) -> tuple[str, ...]:
    return tuple(http_url(name, item, problems) for item in comma_list(name, raw, problems))


def image_file(name: str, raw: str, problems: list[str]) -> str:
    """A small image file, as a data: URI the pages embed."""
    if not raw:
        return ""
    path = Path(raw)
    kind = ICON_TYPES.get(path.suffix.lower())
    try:
        data = path.read_bytes() if kind else b""
    except OSError as exc:
        problems.append(f"{name}={str(path)!r} cannot be read ({exc.strerror})")
        return ""
    if kind is None:
        problems.append(f"{name}={str(path)!r} must be one of {', '.join(ICON_TYPES)}")
    elif len(data) > ICON_MAX_BYTES:
        problems.append(f"{name}={str(path)!r} is {len(data)} bytes; at most {ICON_MAX_BYTES}")
    else:
        return f"data:{kind};base64,{base64.b64encode(data).decode()}"
    return ""


# --- STORE_URL's Redis forms

RedisMode = Literal["standalone", "sentinel", "cluster"]
REDIS_FORMS: dict[str, RedisMode] = {"redis": "standalone", "redis+sentinel": "sentinel", "redis+cluster": "cluster"}
REDIS_DEFAULT_PORTS: dict[RedisMode, int] = {"standalone": 6379, "sentinel": 26379, "cluster": 6379}
REDIS_HA_QUERY = ("prefix", "replica_wait_ms", "sentinel_username", "sentinel_password", "ssl_ca_certs")
REDIS_FORMS_HELP = ("redis://[user:password@]host:port/db, redis+sentinel://[user:password@]host:port[,host:port...]"
                    "/service_name[/db] or redis+cluster://[user:password@]host:port[,host:port...] (rediss for TLS)")
REPLICA_WAIT_MAX_MS = 1_000  # well under the client's 2 s read timeout: a WAIT that outlived it would be retried


@dataclass(frozen=True)
class RedisAddress:
    """A Redis STORE_URL taken apart. The user name and password are the data nodes'; sentinels with a
    password of their own take `?sentinel_password=` (and `?sentinel_username=`). `options` is the rest of
    the query: for the plain form whatever redis-py's URLs take, for the others `ssl_ca_certs`."""

    mode: RedisMode
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: Secret | None = None
    service: str = ""
    db: int = 0
    prefix: str = SERVER_NAME
    replica_wait_ms: int = 0  # WAIT for one replica after each durable write, at most this long (0: never)
    options: Mapping[str, str] = field(default_factory=dict)


class UrlParts(NamedTuple):
    scheme: str
    userinfo: str
    hosts: str
    rest: str  # the path, query and fragment


def url_parts(url: str) -> UrlParts:
    """A Redis URL cut by hand: its host list may hold several hosts and bracketed IPv6 addresses, which
    urlsplit refuses, and its password a raw @ (the last @ before the path ends the user information)."""
    scheme, _, rest = url.partition("://")
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query_at)
    userinfo, after = (rest[:at], rest[at + 1:]) if at >= 0 else ("", rest)
    cut = min((i for i in (after.find("/"), after.find("?"), after.find("#")) if i >= 0), default=len(after))
    return UrlParts(scheme, userinfo, after[:cut], after[cut:])


def scheme_of(url: str) -> str:
    """A URL's scheme, lower-case ("" without one): what urlsplit gives, for URLs it refuses too."""
    return url_parts(url).scheme.lower() if "://" in url else ""


def redacted(url: str) -> str:
    """`url` with every password in it replaced (the user information's and any *password* query value), for
    error messages and logs."""
    parts = url_parts(url)
    user, colon, _ = parts.userinfo.partition(":")
    userinfo = f"{user}:********@" if colon else f"{parts.userinfo}@" if parts.userinfo else ""
    rest = re.sub(r"([?&][^=&#]*password[^=&#]*=)[^&#]*", r"\1********", parts.rest, flags=re.IGNORECASE)
    return f"{parts.scheme}://{userinfo}{parts.hosts}{rest}"


def parse_redis_url(url: str) -> RedisAddress:
    """STORE_URL's Redis forms taken apart; ValueError says what is wrong, without the password."""
    cut = url_parts(url)
    parts = urlsplit(f"{cut.scheme}://host{cut.rest}")
    scheme = cut.scheme.lower()
    mode = REDIS_FORMS.get(scheme.replace("rediss", "redis", 1))
    if mode is None:
        raise ValueError(f"must be one of {REDIS_FORMS_HELP}")
    userinfo, hostlist = cut.userinfo, cut.hosts
    username, _, password = (unquote(text) for text in userinfo.partition(":"))
    hosts = tuple(redis_host(host, REDIS_DEFAULT_PORTS[mode]) for host in hostlist.split(",")) \
        if hostlist or mode != "standalone" else (("localhost", REDIS_DEFAULT_PORTS[mode]),)  # as redis-py reads it
    if mode == "standalone" and len(hosts) > 1:
        raise ValueError("names several hosts, but redis:// takes one: several sentinels are "
                         "redis+sentinel://host:port,.../service_name, several cluster nodes redis+cluster://host:port,...")
    path = [unquote(step) for step in parts.path.split("/") if step]
    service, db = redis_path(mode, path)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix, wait = query.pop("prefix", SERVER_NAME), query.pop("replica_wait_ms", None)
    if mode != "standalone" and (unknown := sorted(set(query) - set(REDIS_HA_QUERY))):
        raise ValueError(f"has {', '.join(unknown)} in its query, which takes only {', '.join(REDIS_HA_QUERY)}")
    if not prefix or any(mark in prefix for mark in "{}"):
        raise ValueError(f"has prefix={prefix!r}: a prefix is a non-empty name without braces")
    return RedisAddress(mode, scheme.startswith("rediss"), hosts, username or None,
                        Secret(password) if password else None, service, db, prefix,
                        replica_wait(wait, default=0 if mode == "standalone" else REPLICA_WAIT_DEFAULT_MS),
                        query)


def redis_host(text: str, default_port: int) -> tuple[str, int]:
    """One `host[:port]` of a Redis URL (an IPv6 address in brackets)."""
    if text.startswith("[") != ("]" in text):
        raise ValueError(f"has {text!r} for a host, which is neither a name nor an address (an IPv6 address goes "
                         "in brackets: [::1]:6379)")
    host, bracket, rest = text.rpartition("]") if text.startswith("[") else ("", "", text)
    name, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    host = host.lstrip("[") if bracket else name
    if not host:
        raise ValueError(f"names no host in {text!r}: write host:port")
    if not (HOST_NAME.match(host) or is_address(host)):
        raise ValueError(f"has {host!r} for a host, which is neither a name nor an address")
    if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"has port {port!r} for {host}, which is not a number from 1 to 65535")
    return host, int(port) if colon else default_port


def redis_path(mode: RedisMode, path: list[str]) -> tuple[str, int]:
    """The service name (Sentinel only) and database number a Redis URL's path names."""
    if mode == "sentinel":
        if not path:
            raise ValueError("names no service: write redis+sentinel://host:port[,host:port...]/service_name[/db] "
                             "(the name sentinels monitor the primary under)")
        service, path = path[0], path[1:]
    else:
        service = ""
    if mode == "cluster" and path:
        raise ValueError(f"has /{'/'.join(path)} after its hosts, but Redis Cluster has only database 0")
    if len(path) > 1 or (path and not path[0].isdigit()):
        raise ValueError(f"has /{'/'.join(path)} for its database, which must be one number, such as /0")
    return service, int(path[0]) if path else 0


def replica_wait(raw: str | None, *, default: int) -> int:
    """`?replica_wait_ms=` in milliseconds, or `default` without it."""
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > REPLICA_WAIT_MAX_MS:
        raise ValueError(f"has replica_wait_ms={raw!r}, which must be a number of milliseconds from 0 to "
                         f"{REPLICA_WAIT_MAX_MS}")
    return int(raw)


def store_url_problem(url: str) -> str | None:
    """What is wrong with STORE_URL, in one line that names no password; or None."""
    scheme = scheme_of(url)
    if scheme not in STORE_SCHEMES:
        return f"STORE_URL={redacted(url)!r} must be sqlite:///path/to/file.db or {REDIS_FORMS_HELP}"
    if scheme == "sqlite":
        return None
    try:
        parse_redis_url(url)
    except ValueError as exc:  # urlsplit's own errors included (a bad bracket)
        return f"STORE_URL={redacted(url)!r} {exc}"
    return None


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, default, help text, parser and optional flag."""

    env: str
    default: str
    help: str
    parse: Parser = as_text
    flag: str | None = None
    switch: bool = False  # a flag that takes no value and means "true"


def option(env: str, default: str, help: str, parse: Parser = as_text, *, flag: str | None = None,
           switch: bool = False) -> Any:
    """A field of Settings, read from the setting `env`."""
    return field(metadata={"option": Option(env, default, help, parse, flag, switch)})


@dataclass(frozen=True)
class Settings:
    """Everything configurable, parsed and checked. Build it with `load_settings`."""

    host: str = option("HOST", "127.0.0.1", "Address to listen on. Anything but loopback needs sign-in or "
                       "ALLOW_UNAUTHENTICATED.", flag="--host")
    port: int = option("PORT", "8000", "TCP port to listen on.", whole_number(0, 65535), flag="--port")
    public_url: str = option("PUBLIC_URL", "", "The URL clients reach this server at (scheme, host, port, any "
                             "path prefix); the MCP endpoint is PUBLIC_URL/mcp. Default: http://HOST:PORT.", http_url,
                             flag="--public-url")
    data_dir: Path = option("DATA_DIR", "", "Directory for the embedded SQLite store and the generated SECRET_KEY. "
                            "Default: data/ beside server.py, or the per-user data folder where that is not "
                            "writable.", flag="--data-dir")
    store_url: str = option("STORE_URL", "", "Where state lives: sqlite:///path/to/file.db, or a Redis shared by "
                            "several replicas: redis://[user:password@]host:port/db, Sentinel as "
                            "redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db], Cluster as "
                            "redis+cluster://[user:password@]host:port[,host:port...] (rediss for TLS); ?prefix=name "
                            "shares one Redis between deployments. Default: a SQLite file in DATA_DIR.",
                            flag="--store-url")
    stateless: bool = option("MCP_STATELESS", "false", "Serve every POST on its own, without Mcp-Session-Id (for "
                             "several replicas).", true_or_false, flag="--stateless", switch=True)
    json_response: bool = option("MCP_JSON_RESPONSE", "false", "Answer each POST with one JSON body instead of an "
                                 "SSE stream; progress and mid-call questions are dropped.", true_or_false,
                                 flag="--json-response", switch=True)
    cors_origins: tuple[str, ...] = option("CORS_ORIGINS", "", "Comma-separated browser origins allowed besides "
                                           "localhost, e.g. https://inspector.example.com.", http_urls)
    allowed_hosts: tuple[str, ...] = option("ALLOWED_HOSTS", "", "Comma-separated extra Host header values to "
                                            "accept (host, host:port, or host:* for any port).", comma_list)
    trusted_proxies: tuple[str, ...] = option("TRUSTED_PROXIES", "127.0.0.1,::1", "Comma-separated addresses or "
                                              "networks of the reverse proxies whose X-Forwarded-For and "
                                              "X-Forwarded-Proto are believed; * believes anyone.", comma_list)
    log_level: str = option("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.",
                            one_of("DEBUG", "INFO", "WARNING", "ERROR"), flag="--log-level")
    log_format: str = option("LOG_FORMAT", "text", "text (one readable line per event) or json (one JSON object "
                             "per line, for a log collector).", one_of("text", "json"), flag="--log-format")
    metrics_port: int = option("METRICS_PORT", "0", "Serve Prometheus metrics at /metrics on this port, apart from "
                               "the public one, for operators only; 0: off.", whole_number(0, 65535),
                               flag="--metrics-port")
    metrics_host: str = option("METRICS_HOST", "127.0.0.1", "Address the metrics port listens on (0.0.0.0 in a "
                               "container, so the scraper reaches it).")
    allow_unauthenticated: bool = option("ALLOW_UNAUTHENTICATED", "false", "Serve a non-loopback address without "
                                         "sign-in: anyone who reaches the port can use every tool.", true_or_false,
                                         flag="--allow-unauthenticated", switch=True)
    max_request_bytes: int = option("MAX_REQUEST_BYTES", "1048576", "Largest request body accepted, in bytes.",
                                    whole_number(1024))
    session_idle_timeout_s: int = option("SESSION_IDLE_TIMEOUT", "1800", "Seconds before an idle stateful session "
                                         "is closed.", whole_number(1))
    max_sessions: int = option("MAX_SESSIONS", "10000", "Most stateful sessions open at once.", whole_number(1))
    event_store_max_events: int = option("EVENT_STORE_MAX_EVENTS", "10000", "Most stream events kept for clients "
                                         "that reconnect with Last-Event-ID.", whole_number(10))
    shutdown_grace_s: int = option("SHUTDOWN_GRACE", "5", "Seconds the server takes to stop when asked to (SIGTERM): "
                                   "calls in flight get all of it but 1.5 s (what closing takes) to finish, then are "
                                   "answered with an error. Open streams end at once.", whole_number(1, 3600))
    google_client_id: str = option("GOOGLE_CLIENT_ID", "", "OAuth client id of your Google Cloud web application. "
                                   "With GOOGLE_CLIENT_SECRET it turns on sign-in: every MCP request then needs a "
                                   "token from this server.")
    google_client_secret: Secret | None = option("GOOGLE_CLIENT_SECRET", "", "Its client secret.", secret_text)
    google_discovery_url: str = option("GOOGLE_DISCOVERY_URL", GOOGLE_DISCOVERY_URL, "Google's OpenID discovery "
                                       "document (a stand-in's, for tests).", http_url)
    google_risc: bool = option("GOOGLE_RISC", "false", "Receive Google's Cross-Account Protection (RISC) security "
                               "events at /oauth/google/risc: when Google says a person's account was taken over, "
                               "disabled or deleted, or their tokens revoked, their access here ends at once. "
                               "Register the receiver with Google too (README, Sign in with Google).", true_or_false)
    google_risc_discovery_url: str = option("GOOGLE_RISC_DISCOVERY_URL", GOOGLE_RISC_DISCOVERY_URL, "Google's RISC "
                                            "configuration (a stand-in's, for tests).", http_url)
    google_calendar_api: str = option("GOOGLE_CALENDAR_API", "https://www.googleapis.com/calendar/v3", "Where "
                                      "Google's Calendar API v3 answers (a stand-in's, for tests).", http_url)
    google_drive_api: str = option("GOOGLE_DRIVE_API", "https://www.googleapis.com/drive/v3", "Where Google's "
                                   "Drive API v3 answers (a stand-in's, for tests).", http_url)
    secret_key: Secret | None = option("SECRET_KEY", "", "Signs cookies and encrypts stored Google tokens. "
                                       "Default: generated once into DATA_DIR/secret_key (owner-only).", secret_text)
    allowed_emails: frozenset[str] = option("ALLOWED_EMAILS", "", "Comma-separated email addresses allowed to sign "
                                            "in (verified addresses only). Empty with ALLOWED_DOMAINS empty: any "
                                            "verified Google account.", lowercase_set)
    allowed_domains: frozenset[str] = option("ALLOWED_DOMAINS", "", "Comma-separated Google Workspace domains "
                                             "(the verified hd claim) allowed to sign in.", lowercase_set)
    access_token_ttl_s: int = option("ACCESS_TOKEN_TTL", "3600", "Seconds an access token lives.", whole_number(1))
    refresh_token_ttl_s: int = option("REFRESH_TOKEN_TTL", "2592000", "Seconds a refresh token lives (it rotates "
                                      "on every use).", whole_number(60))
    redirect_uri_patterns: tuple[str, ...] = option(
        "REDIRECT_URI_PATTERNS", "", "Comma-separated patterns (* wildcards) a client's redirect URI must match to "
        "register, e.g. https://claude.ai/*,http://127.0.0.1:*/*, or clients by name, e.g. claude,chatgpt,cursor "
        "(server.py connect --help lists them). A pattern may also admit an app scheme such as myapp://*. Empty: "
        "any https or loopback URI, and the app callbacks of the known clients (Cursor, Claude, Grok).", comma_list)
    pinned_client_documents: bool = option("PINNED_CLIENT_DOCUMENTS", "true", "Use the metadata documents of "
                                           "Claude, Claude Code, ChatGPT, VS Code and Cursor that ship with the "
                                           "server, without fetching them (a blocked or challenged fetch then "
                                           "cannot make them unknown); false: fetch them like any other.",
                                           true_or_false)
    cimd_allow_local: bool = option("CIMD_ALLOW_LOCAL", "false", "Accept client metadata documents from loopback "
                                    "and private addresses, over http too. For developing a client only.",
                                    true_or_false)
    server_icon: str = option("SERVER_ICON", "", "A small image file (PNG, SVG, ICO, JPEG or WebP, up to 32 KB) "
                              "shown beside the server's name on every page; embedded in the page, never fetched.",
                              image_file)
    rate_limit_mcp: int = option("RATE_LIMIT_MCP", "1200", "MCP requests per minute per signed-in grant (token); "
                                 "0: no limit.", whole_number())
    rate_limit_client: int = option("RATE_LIMIT_CLIENT", "600", "Requests per minute per client at /authorize, "
                                    "/token and /revoke (hosted clients share one client_id among their users); 0: "
                                    "no limit.", whole_number())
    rate_limit_person: int = option("RATE_LIMIT_PERSON", "120", "Sign-ins and token refreshes per hour per person; "
                                    "0: no limit.", whole_number())
    rate_limit_register: int = option("RATE_LIMIT_REGISTER", "120", "Client registrations per minute, all clients "
                                      "together; 0: no limit.", whole_number())
    data_dir_is_default: bool = False  # DATA_DIR was not set
    public_url_is_default: bool = True  # PUBLIC_URL was not set

    @property
    def mcp_url(self) -> str:
        """The endpoint clients connect to."""
        return self.public_url + MCP_PATH

    @property
    def binds_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def auth_enabled(self) -> bool:
        """Sign-in with Google is on: every MCP request needs a token this server issued."""
        return bool(self.google_client_id and self.google_client_secret)

    @property
    def issuer(self) -> str:
        """This server as an OAuth authorization server (RFC 8414: compared as an exact string)."""
        return self.public_url

    @property
    def loopback_names(self) -> tuple[str, ...]:
        """The other names this server answers to as itself: on loopback without PUBLIC_URL, localhost,
        127.0.0.1 and [::1] are one server (clients connect to whichever their user typed); with an
        explicit PUBLIC_URL that is the only name."""
        public = urlsplit(self.public_url)
        if not self.public_url_is_default or not is_loopback_host(public.hostname or "") or public.path:
            return ()
        return tuple(f"{host}:{public.port}" for host in ("localhost", "127.0.0.1", "[::1]"))

    @property
    def public_urls(self) -> tuple[str, ...]:
        """Every URL this server is itself at: PUBLIC_URL, then its loopback names."""
        return (self.public_url, *(f"http://{name}" for name in self.loopback_names if name != self.public_netloc))

    @property
    def public_netloc(self) -> str:
        return urlsplit(self.public_url).netloc

    def public_url_for(self, host: str | None) -> str:
        """The public URL as the client that sent `Host: host` knows this server."""
        host = (host or "").lower()
        return f"http://{host}" if host in self.loopback_names else self.public_url

    @property
    def mode(self) -> str:
        if self.stateless:
            return "stateless+json" if self.json_response else "stateless"
        return "stateful+json" if self.json_response else "stateful"

    @property
    def store_scheme(self) -> str:
        return scheme_of(self.store_url)


OPTIONS: tuple[Option, ...] = tuple(spec.metadata["option"] for spec in fields(Settings) if "option" in spec.metadata)


ENV_FILE = "ENV_FILE"  # where the settings file is; read from the environment only, default ./.env


def read_environment() -> dict[str, str]:
    """The process environment over the values in the settings file, ./.env unless ENV_FILE names another (or,
    empty, none: the tests and the benchmark start servers whose settings they choose, whatever .env holds)."""
    path = os.environ.get(ENV_FILE, ".env")
    from_file = {key: value for key, value in dotenv_values(path).items() if value is not None} if path else {}
    return {**from_file, **os.environ}


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `environ` (default: the environment and .env) with `overrides` on top."""
    source = {**(read_environment() if environ is None else environ), **(overrides or {})}
    problems: list[str] = []
    values = {}
    for spec in fields(Settings):
        if (setting := spec.metadata.get("option")) is not None:
            values[spec.name] = setting.parse(setting.env, source.get(setting.env, setting.default).strip(), problems)
    data_dir = Path(values["data_dir"]) if values["data_dir"] else default_data_dir()
    settings = Settings(**{
        **values, "data_dir": data_dir, "data_dir_is_default": not values["data_dir"],
        "store_url": values["store_url"] or f"sqlite:///{data_dir / 'stream-http.db'}",
        "public_url": values["public_url"] or default_public_url(values["host"], values["port"]),
        "public_url_is_default": not values["public_url"]})
    problems += check_settings(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def check_settings(settings: Settings) -> list[str]:
    """The problems only visible when settings are seen together."""
    problems = []
    if problem := store_url_problem(settings.store_url):
        problems.append(problem)
    elif settings.store_scheme != "sqlite" and settings.secret_key is None:
        problems.append("STORE_URL is Redis, which several replicas share, so they need one SECRET_KEY: set it "
                        "to the same long random value on every replica (a generated one would differ)")
    for proxy in settings.trusted_proxies:
        if proxy != "*" and not is_address_or_network(proxy):
            problems.append(f"TRUSTED_PROXIES entry {proxy!r} is not an IP address or network")
    if settings.metrics_port and settings.metrics_port == settings.port:
        problems.append(f"METRICS_PORT={settings.metrics_port} is PORT too: metrics get a port of their own, "
                        "which only operators reach")
    if bool(settings.google_client_id) != bool(settings.google_client_secret):
        problems.append("GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET must be set together")
    public = urlsplit(settings.public_url)
    if public.path.endswith(MCP_PATH):
        problems.append(f"PUBLIC_URL={settings.public_url!r} ends in {MCP_PATH}, but the MCP endpoint is PUBLIC_URL"
                        f"{MCP_PATH}: write {settings.public_url.removesuffix(MCP_PATH)!r}")
    if settings.auth_enabled and public.scheme != "https" and not is_loopback_host(public.hostname or ""):
        problems.append(f"PUBLIC_URL={settings.public_url!r} must be https:// when sign-in is on "
                        "(only loopback may use http://)")
    problems += [f"ALLOWED_EMAILS entry {email!r} is not an email address"
                 for email in sorted(settings.allowed_emails) if "@" not in email]
    problems += [f"ALLOWED_DOMAINS entry {domain!r} must be a domain, not an address"
                 for domain in sorted(settings.allowed_domains) if "@" in domain or "." not in domain]
    return problems


def with_secret_key(settings: Settings) -> Settings:
    """`settings` with a SECRET_KEY: the configured one, or one generated once into DATA_DIR."""
    if settings.secret_key is not None:
        return settings
    path = settings.data_dir / SECRET_KEY_FILE
    try:
        if not path.exists():
            make_private(settings.data_dir)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_urlsafe(48))
            logger.info("generated a SECRET_KEY in %s (owner-only); keep it, or set SECRET_KEY yourself", path)
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read or create {path} for SECRET_KEY: {exc}") from exc
    return dataclasses.replace(settings, secret_key=Secret(key))


def make_private(folder: Path, *files: Path) -> None:
    """The data folder 0700 and the server's files in it 0600, whatever the umask: other local users must
    read no note, token or client record. A folder or file left readable by an earlier version is
    tightened, and the log says so once."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    loose = [path for path in (folder, *files) if path.exists() and path.stat().st_mode & 0o077]
    for path in loose:
        path.chmod(0o700 if path.is_dir() else 0o600)
    if loose:
        logger.warning("made %s readable by their owner only (they were readable by others)",
                       ", ".join(str(path) for path in loose))


def default_data_dir(here: Path = HERE,
                     writable: Callable[[Path], bool] = lambda path: os.access(path, os.W_OK)) -> Path:
    """Where data lives without DATA_DIR: beside server.py, which is the same folder whichever directory the
    server is started from (Claude Desktop starts `mcp run` elsewhere), or else the per-user data folder."""
    beside = here / "data"
    if writable(beside if beside.exists() else here):
        return beside
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / SERVER_NAME
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / SERVER_NAME
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / SERVER_NAME


def data_dir_reason(settings: Settings) -> str:
    if not settings.data_dir_is_default:
        return "DATA_DIR"
    if settings.data_dir == HERE / "data":
        return "beside server.py; set DATA_DIR to keep it elsewhere"
    return "the per-user data folder, as the folder beside server.py is not writable; set DATA_DIR to choose"


def default_public_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
        host = "localhost"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_address_or_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def derive_key(secret_key: Secret, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, so SECRET_KEY itself is never used directly."""
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=purpose).derive(secret_key.value.encode())


# === 3. Telemetry: metrics, traces, logs =====================================
#
# What operators watch. Metrics are prometheus-client's: counters and histograms kept in this process
# and served on METRICS_PORT, a port of their own that only operators reach (off by default). Security
# events are counted where they are audited: COUNTED_EVENTS maps each audit event to its counter.
# Traces are OpenTelemetry's: the SDK opens a span per MCP message; this server adds one per HTTP request
# (continuing the caller's W3C `traceparent`; the OAuth steps are such requests), every call to Google and
# every store operation. They leave the process over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set;
# without an OpenTelemetry SDK no span is made at all. Every log line of a request names its id.

try:
    import prometheus_client
except ImportError:  # `mcp install --name` installs the SDK alone: then the metrics count nothing
    prometheus_client = None

METRICS_REGISTRY = prometheus_client.CollectorRegistry() if prometheus_client else None
if prometheus_client is not None:  # the process's CPU, memory, descriptors, and Python's GC and version
    for collector in (prometheus_client.ProcessCollector, prometheus_client.PlatformCollector,
                      prometheus_client.GCCollector):
        collector(registry=METRICS_REGISTRY)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # what a proxy's id may be for us to adopt it
tracer = trace.get_tracer("stream_http", VERSION)
_request_id: ContextVar[str | None] = ContextVar("stream_http_request_id", default=None)
# The address of the request's caller, set by section 10's RequestContext, for audit lines. (Not the request's
# scope: a stateful session's task keeps the context of the request that opened it, for as long as it lives.)
_request_client: ContextVar[str | None] = ContextVar("stream_http_request_client", default=None)
REQUEST_ID_PREFIX = secrets.token_hex(4)  # this process's; a counter follows, cheaper than randomness per request
_request_numbers = itertools.count(1)


class NoMetric:
    """What a metric is without prometheus-client: accepts everything, keeps nothing."""

    def labels(self, *values: str) -> "NoMetric":
        return self

    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def observe(self, amount: float) -> None: ...
    def set_function(self, function: Callable[[], float]) -> None: ...


def metric(kind: str, name: str, documentation: str, labels: Sequence[str] = (), **options: Any) -> Any:
    """A Counter, Gauge or Histogram in this server's registry (one registry per loaded copy of this
    file, so `mcp run` loading it beside an import cannot register a name twice)."""
    if prometheus_client is None:
        return NoMetric()
    return getattr(prometheus_client, kind)(name, documentation, labels, registry=METRICS_REGISTRY, **options)


MCP_REQUESTS = metric("Counter", "stream_http_mcp_requests", "MCP requests answered, by method, tool and outcome "
                      "(ok; error: a JSON-RPC error; tool_error: a tool result marked isError)",
                      ["method", "tool", "outcome"])
MCP_DURATION = metric("Histogram", "stream_http_mcp_request_duration_seconds", "Time to answer an MCP request",
                      ["method"], buckets=LATENCY_BUCKETS)
MCP_REFUSED = metric("Counter", "stream_http_mcp_http_refusals", "MCP HTTP requests refused before the MCP "
                     "server saw them (bad Host or Origin, no token, over budget, store down), by status", ["status"])
MCP_EXCHANGES = metric("Gauge", "stream_http_mcp_exchanges_open", "MCP HTTP requests being answered now, "
                       "open SSE streams included")
STREAMS_OPEN = metric("Gauge", "stream_http_streams_open", "Notification streams open now (2025-era GET streams, "
                      "2026-07-28 subscriptions/listen)")
SESSIONS_OPEN = metric("Gauge", "stream_http_sessions_open", "Handshake-era sessions this process keeps")
REGISTRATIONS = metric("Counter", "stream_http_client_registrations", "Clients registered at /register")
CONSENTS = metric("Counter", "stream_http_consents", "Answers on the consent page, by decision", ["decision"])
SIGN_INS = metric("Counter", "stream_http_sign_ins", "Sign-ins with Google, by outcome (allowed, refused) and "
                  "reason (cancelled, google_failed, unverified_email, not_allowed)", ["outcome", "reason"])
TOKENS_ISSUED = metric("Counter", "stream_http_tokens_issued", "Token pairs issued for an authorization code")
TOKENS_REFRESHED = metric("Counter", "stream_http_tokens_refreshed", "Token pairs issued for a refresh token")
GRANTS_REVOKED = metric("Counter", "stream_http_grants_revoked", "Grants ended (every token of each), by reason",
                        ["reason"])
REFRESH_REUSE = metric("Counter", "stream_http_refresh_token_reuse", "Rotated refresh tokens used again "
                       "(each ends its grant)")
CODE_REPLAYS = metric("Counter", "stream_http_code_replays", "Authorization codes used twice (each ends its grant)")
RATE_LIMITED = metric("Counter", "stream_http_rate_limited", "Requests refused for a used-up budget, by budget "
                      "(mcp, client, person, register)", ["budget"])
GOOGLE_REQUESTS = metric("Counter", "stream_http_google_requests", "Requests to Google, by API and outcome",
                         ["api", "outcome"])
GOOGLE_DURATION = metric("Histogram", "stream_http_google_request_duration_seconds", "Time Google took to answer",
                         ["api"], buckets=LATENCY_BUCKETS)
GOOGLE_REFRESH_FAILURES = metric("Counter", "stream_http_google_refresh_failures", "Google access tokens that "
                                 "could not be refreshed, by reason (revoked, failed)", ["reason"])
STORE_UP = metric("Gauge", "stream_http_store_up", "1 while the store answers, 0 during an outage")
STORE_DURATION = metric("Histogram", "stream_http_store_operation_duration_seconds", "Time a store operation "
                        "took (its _count: the operations)", ["operation"], buckets=LATENCY_BUCKETS)
STORE_FAILURES = metric("Counter", "stream_http_store_failures", "Store operations that failed, by operation and "
                        "error", ["operation", "error"])

COUNTED_EVENTS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "client_registered": lambda fields: REGISTRATIONS.inc(),
    "consent_given": lambda fields: CONSENTS.labels("given").inc(),
    "consent_denied": lambda fields: CONSENTS.labels("denied").inc(),
    "sign_in_allowed": lambda fields: SIGN_INS.labels("allowed", "").inc(),
    "sign_in_refused": lambda fields: SIGN_INS.labels("refused", fields.get("cause", "")).inc(),
    "token_issued": lambda fields: TOKENS_ISSUED.inc(),
    "token_refreshed": lambda fields: TOKENS_REFRESHED.inc(),
    "grant_revoked": lambda fields: GRANTS_REVOKED.labels(str(fields.get("reason", "")).partition(" (")[0]).inc(),
    "refresh_token_reused": lambda fields: REFRESH_REUSE.inc(),
    "code_replayed": lambda fields: CODE_REPLAYS.inc(),
    "rate_limited": lambda fields: RATE_LIMITED.labels(fields.get("budget", "")).inc(),
}


class Tracing:
    """Whether an OpenTelemetry SDK records spans (configure_tracing's, or an embedding app's), noted when
    the server starts. Without one, spans are skipped: even a no-op span costs a context switch."""

    on = False

    @classmethod
    def notice(cls) -> None:
        cls.on = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


class Metrics:
    """Whether the per-request metrics are recorded: only while METRICS_PORT serves them (`serve_metrics`; an
    app that embeds this one and exports METRICS_REGISTRY itself sets `Metrics.on`). Counting what nobody can
    read would cost every request."""

    on = False


@cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus-client takes a lock for each lookup. Every
    caller passes labels from a closed set (a caller can never mint one), so the cache stays small."""
    return metric.labels(*labels)


class Measured:
    """`with Measured(...)`: the block's latency under `label`, its outcome counted (every outcome, or
    only failures: the exception's class), inside a span named "`system` `what`" while tracing is on."""

    __slots__ = ("counter", "duration", "every_outcome", "kind", "label", "span", "started", "system", "what")

    def __init__(self, system: str, what: str, label: str, duration: Any, counter: Any, *, every_outcome: bool,
                 kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> None:
        self.system, self.what, self.label, self.duration, self.counter = system, what, label, duration, counter
        self.every_outcome, self.kind = every_outcome, kind
        self.span: AbstractContextManager[trace.Span] | None = None
        self.started = 0.0

    def __enter__(self) -> None:
        if Tracing.on:
            self.span = tracer.start_as_current_span(f"{self.system} {self.what}", kind=self.kind)
            self.span.__enter__()
        self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        if Metrics.on:
            child(self.duration, self.label).observe(time.perf_counter() - self.started)
        if kind is not None or self.every_outcome:
            child(self.counter, self.label, "ok" if kind is None else kind.__name__).inc()
        if self.span is not None:
            self.span.__exit__(kind, exc, traceback)


def store_operation(action: str) -> Measured:
    """Measure one store operation; `action` ("taking code") is counted by its verb."""
    return Measured("store", action, action.partition(" ")[0], STORE_DURATION, STORE_FAILURES, every_outcome=False)


GOOGLE_APIS = frozenset({"token", "refresh", "userinfo", "revoke", "calendar", "drive", "tasks", "gmail", "people"})


def google_request(api: str) -> Measured:
    """Measure one call to Google; an API not named in GOOGLE_APIS is counted as "other" (labels stay few)."""
    label = api if api in GOOGLE_APIS else "other"
    return Measured("google", label, label, GOOGLE_DURATION, GOOGLE_REQUESTS, every_outcome=True,
                    kind=trace.SpanKind.CLIENT)


def serve_metrics(settings: Settings) -> None:
    """Serve /metrics on METRICS_PORT from a thread of its own (prometheus-client's server)."""
    if not settings.metrics_port:
        return
    if prometheus_client is None:
        raise ConfigError("METRICS_PORT is set but prometheus-client is not installed: uv sync installs it")
    prometheus_client.start_http_server(settings.metrics_port, settings.metrics_host, registry=METRICS_REGISTRY)
    Metrics.on = True
    logger.info("serving Prometheus metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


def configure_tracing() -> None:
    """Export spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or its traces variant) is set; the
    exporter reads the other standard OTEL_* variables itself. Otherwise leave OpenTelemetry's no-op default."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry's SDK is not installed ({exc}): "
                          "uv sync installs it") from None

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVER_NAME),
                                "service.version": VERSION})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    logger.info("exporting traces over OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])


class RequestLogFields(logging.Filter):
    """Adds the request id and trace id to every log record, for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        return True


LOG_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what could end a line, or hide what follows


def one_line(text: str) -> str:
    """`text` with every control character (line breaks above all) written as its escape, so that a value a
    caller chose can never end a log line or start a record of its own (CWE-117)."""
    return LOG_UNSAFE.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


class TextLogFormat(logging.Formatter):
    """A readable line, ending with the request's id when there is one. Whatever a message holds, it stays
    on its line; a traceback's lines are indented, so only a record starts a line. An audit line stays
    the JSON object it is, which names the request itself (`request_id`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(logging.makeLogRecord({**record.__dict__, "message": one_line(record.message)}))

    def formatException(self, ei: Any) -> str:
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request {request_id}]" if request_id and not hasattr(record, "audit") else line


class JsonLogFormat(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request and trace ids, and an audit
    line's own fields at the top level, for a log collector to index."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in ("request_id", "trace_id"):
            if value := getattr(record, name, None):
                line[name] = value
        if audited := getattr(record, "audit", None):
            line.update(audited, message=audited["event"])
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")  # W3C Trace Context
TRACESTATE_MEMBER = re.compile(r"^[a-z0-9][a-z0-9_\-*/@]{0,255}=[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
                               r"(?:[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,254}[\x21-\x2b\x2d-\x3c\x3e-\x7e])?$")


def trace_carrier(traceparent: bytes | None, tracestate: bytes | None) -> dict[str, str] | None:
    """A caller's W3C trace headers as OpenTelemetry reads them, or None when traceparent is not one: an
    invalid header is ignored here, before OpenTelemetry would log it (a line the caller could fill). A
    tracestate is kept only when every member is well formed, at most 32, each key once."""
    parent = (traceparent or b"").decode("latin-1").strip()
    if not TRACEPARENT.match(parent):
        return None
    members = [member.strip() for member in (tracestate or b"").decode("latin-1").split(",") if member.strip()]
    keys = [member.partition("=")[0] for member in members]
    valid = len(members) <= 32 and len(set(keys)) == len(keys) and all(map(TRACESTATE_MEMBER.match, members))
    return {"traceparent": parent, "tracestate": ",".join(members)} if valid and members else {"traceparent": parent}


def client_address() -> str | None:
    """The caller's address: the forwarded one when a proxy in TRUSTED_PROXIES sent the request."""
    return _request_client.get()


audit_log = logging.getLogger("stream_http.audit")


def audit(event: str, **fields: Any) -> None:
    """One structured log line per security event, counted in the metrics. Never pass a token, code or secret."""
    if address := client_address():
        fields["ip"] = address
    if request_id := _request_id.get():
        fields["request_id"] = request_id
    if count := COUNTED_EVENTS.get(event):
        count(fields)
    line = {"event": event, **fields}
    audit_log.info("%s", json.dumps(line, sort_keys=True, default=str), extra={"audit": line})


# === 4. Storage ==============================================================
#
# One small API for everything the server keeps: typed records, each with a kind, a key, an
# expiry, and optionally an owner (who lists them, newest first) and a group (ended together).
# A record type is a dataclass or pydantic model with a `kind` class attribute; values go in and
# come out typed. The tools of section 1 and the OAuth provider keep their data this way. Every
# change is atomic: `take` reads and deletes in one step, so a one-time value cannot be used twice,
# and `swap` is compare-and-swap; the `then` entries either call writes (or, with `Gone`, deletes)
# are saved in the same step, or not at all. Offers below: Store and its two backends (`open_store`),
# Entry, Gone, StorageError, new_id, and the event stores behind Last-Event-ID.

SERVER_UNAVAILABLE = -32000  # JSON-RPC's implementation-defined server error; over HTTP, 503
STORE_FAILED = "The server's storage is unavailable right now; retry in a few seconds"
RETRY_AFTER_S = 2
PURGE_INTERVAL_S = 600


def new_id() -> str:
    """A random key for a record: 192 bits, URL-safe."""
    return secrets.token_urlsafe(24)


class StorageError(MCPError):
    """The store failed. `str()` says what was being done and why, for the log. Raised inside an MCP
    handler it is the JSON-RPC error the client gets, which only says to retry (-32000, STORE_FAILED);
    over HTTP it is a 503 (`store_failure_handler`)."""

    def __init__(self, detail: str) -> None:
        super().__init__(SERVER_UNAVAILABLE, STORE_FAILED)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class StoreUnavailable(StorageError):
    """The store cannot be reached; requests get 503 until it is back."""


class StoredRecord(Protocol):
    """What a record type has: the kind its records are stored under."""

    kind: ClassVar[str]


R = TypeVar("R", bound=StoredRecord)


class Entry(NamedTuple):
    """A record to save: `value` under `key`, living `ttl_s` (None: until deleted). With an `owner`,
    `find(type, owner)` lists it, highest `order` first; with a `group`, `delete_group` ends it."""

    key: str
    value: Any
    ttl_s: float | None = None
    owner: str | None = None
    group: str | None = None
    order: float = 0.0

    @property
    def kind(self) -> str:
        return type(self.value).kind


class Swap(NamedTuple):
    """One more record a `swap` changes in the same step: `key` from `expected` (compared as a value) to
    `replacement`; if any record is no longer as expected, nothing changes."""

    key: str
    expected: Any
    replacement: Any


class Gone(NamedTuple):
    """A record to delete as part of a `take` or `swap`."""

    record_type: type[StoredRecord]
    key: str

    @property
    def kind(self) -> str:
        return self.record_type.kind


@cache
def record_adapter(record_type: type[Any]) -> TypeAdapter[Any]:
    return TypeAdapter(record_type)


def to_json(value: Any) -> str:
    """The one serialisation of stored values; sorted keys so equal values compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_json(text: str | bytes, **options: Any) -> Any:
    """JSON someone else wrote (a request body, a fetched document, a message): a value nested too deeply for
    the parser (a nesting bomb) is a ValueError like any other bad JSON, never a RecursionError."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def encode_record(value: Any) -> str:
    return to_json(record_adapter(type(value)).dump_python(value, mode="json"))


def decode_record(record_type: type[R], text: str | bytes) -> R | None:
    """A stored value as `record_type`, or None (logged) for one this version cannot read: an unusable
    record is treated as absent, so a bad token is refused and a bad registration registers again."""
    try:
        return record_adapter(record_type).validate_json(text)
    except ValidationError as exc:
        logger.error("store error: a stored %s does not read as %s: %s", record_type.kind, record_type.__name__,
                     exc.errors(include_input=False, include_url=False))
        return None


def decode_records(record_type: type[R], texts: Iterable[str]) -> list[R]:
    return [record for record in (decode_record(record_type, text) for text in texts) if record is not None]


class Store(Protocol):
    """Where state lives. A store shared by several processes also carries their change
    announcements (`publish` and `messages`), their locks and their rate counters; the embedded
    one keeps all three within its process.

    `messages()` yields what every process publishes, and FEED_LISTENING or FEED_LOST whenever it
    starts or stops hearing it: while lost, what is published is missed. `publish` returns how many
    processes heard the message and, with `confirmed_within_s`, waits that long at most for each to
    `confirm` the message's "ticket", returning how many did."""

    @property
    def available(self) -> bool: ...
    @property
    def shared(self) -> bool: ...  # by several processes: rate counters, locks and announcements reach them all
    @property
    def mode(self) -> str: ...  # sqlite, or Redis' standalone, sentinel or cluster
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def put(self, *entries: Entry) -> None: ...
    async def get(self, record_type: type[R], key: str) -> R | None: ...
    async def take(self, record_type: type[R], key: str, then: Sequence[Entry | Gone] = ()) -> R | None: ...
    async def swap(self, key: str, expected: R, replacement: R, then: Sequence[Entry | Gone] = (),
                   *, also: Sequence[Swap] = ()) -> bool: ...
    async def delete(self, record_type: type[StoredRecord], key: str) -> bool: ...
    async def find(self, record_type: type[R], owner: str) -> list[R]: ...
    async def delete_group(self, group: str) -> int: ...
    async def purge_expired(self) -> int: ...
    async def hit(self, bucket: str, window_s: float, count: int = 1) -> tuple[int, float]: ...
    def lock(self, name: str, ttl_s: float) -> AbstractAsyncContextManager[None]: ...
    async def publish(self, message: dict[str, Any], *, confirmed_within_s: float = 0) -> tuple[int, int]: ...
    async def confirm(self, ticket: str) -> None: ...
    def messages(self) -> AsyncIterator[dict[str, Any]]: ...
    def event_store(self, max_events: int, ttl_s: float) -> EventStore: ...


# What `Store.messages()` yields when this process starts, or stops, hearing what the others publish.
FEED_LISTENING: dict[str, Any] = {"feed": "listening"}
FEED_LOST: dict[str, Any] = {"feed": "lost"}

# --- SQLite: the embedded store

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at REAL,
    owner TEXT,
    grp TEXT,
    ord REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_owner ON records (kind, owner, ord DESC) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_by_group ON records (grp) WHERE grp IS NOT NULL;
"""
# Version 0.1 named the columns after grants and people.
SQLITE_UPGRADE_FROM_0_1 = """
ALTER TABLE records RENAME COLUMN grant_id TO grp;
ALTER TABLE records RENAME COLUMN subject TO owner;
ALTER TABLE records ADD COLUMN ord REAL NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS records_by_grant;
DROP INDEX IF EXISTS records_by_subject;
"""
LIVE = "(expires_at IS NULL OR expires_at > ?)"


class SQLiteStore:
    """The embedded store: one SQLite file. Changes run in one worker thread, so they are serialised;
    a record is read by its key on the event loop itself through a second, read-only connection
    (a primary-key lookup in WAL mode takes microseconds and never waits for a writer, while a hop to
    the worker thread would cost more than the whole lookup on every authenticated request)."""

    available = True  # a local file: when it fails, each request says why
    shared = False
    mode = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._locks: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()
        self._hits: dict[str, tuple[float, int]] = {}  # rate counters: this process is the only one

    async def _run(self, action: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def call() -> Any:
            if self._db is None:
                raise StorageError(f"{action}: the store is not open")
            try:
                with self._db:
                    return fn(self._db)
            except sqlite3.Error as exc:
                logger.error("store error: %s: %s", action, exc)
                raise StorageError(f"{action}: {exc}") from exc

        with store_operation(action):
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            make_private(self.path.parent, self.path, *(self.path.with_name(self.path.name + end)
                                                         for end in ("-wal", "-shm")))
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite gives -wal and -shm its mode
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            upgrade_sqlite(db)
            db.executescript(SQLITE_SCHEMA)
            db.isolation_level = ""  # back to implicit transactions, committed by `with db`
            return db

        try:
            self._db = await anyio.to_thread.run_sync(connect, limiter=self._limiter)
            self._reader = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"opening {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._reader is not None:
            self._reader, reader = None, self._reader
            reader.close()
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def ping(self) -> None:
        await self._run("ping", lambda db: db.execute("SELECT 1").fetchone())

    async def put(self, *entries: Entry) -> None:
        await self._run(f"saving {', '.join(e.kind for e in entries)}", lambda db: _write(db, entries))

    async def get(self, record_type: type[R], key: str) -> R | None:
        if self._reader is None:
            raise StorageError(f"reading {record_type.kind}: the store is not open")
        try:
            with store_operation(f"reading {record_type.kind}"):
                row = self._reader.execute(f"SELECT value FROM records WHERE kind = ? AND key = ? AND {LIVE}",  # noqa: S608
                                           (record_type.kind, key, time.time())).fetchone()
        except sqlite3.Error as exc:
            logger.error("store error: reading %s: %s", record_type.kind, exc)
            raise StorageError(f"reading {record_type.kind}: {exc}") from exc
        return decode_record(record_type, row[0]) if row else None

    async def take(self, record_type: type[R], key: str, then: Sequence[Entry | Gone] = ()) -> R | None:
        def take(db: sqlite3.Connection) -> str | None:
            row = db.execute("DELETE FROM records WHERE kind = ? AND key = ? RETURNING value, expires_at",
                             (record_type.kind, key)).fetchone()
            if row is None or (row[1] is not None and row[1] <= time.time()):
                return None
            _write(db, then)
            return row[0]

        value = await self._run(f"taking {record_type.kind}", take)
        return decode_record(record_type, value) if value is not None else None

    async def swap(self, key: str, expected: R, replacement: R, then: Sequence[Entry | Gone] = (),
                   *, also: Sequence[Swap] = ()) -> bool:
        swaps = [Swap(key, expected, replacement), *also]

        def swap(db: sqlite3.Connection) -> bool:  # in the one writer's transaction: nothing changes in between
            for one in swaps:
                row = db.execute(f"SELECT value FROM records WHERE kind = ? AND key = ? AND {LIVE}",  # noqa: S608
                                 (type(one.expected).kind, one.key, time.time())).fetchone()
                if row is None or decode_record(type(one.expected), row[0]) != one.expected:
                    return False
            for one in swaps:
                db.execute("UPDATE records SET value = ? WHERE kind = ? AND key = ?",
                           (encode_record(one.replacement), type(one.expected).kind, one.key))
            _write(db, then)
            return True

        return await self._run(f"updating {type(expected).kind}", swap)

    async def delete(self, record_type: type[StoredRecord], key: str) -> bool:
        cursor = await self._run(f"deleting {record_type.kind}", lambda db: db.execute(
            "DELETE FROM records WHERE kind = ? AND key = ?", (record_type.kind, key)))
        return cursor.rowcount > 0

    async def find(self, record_type: type[R], owner: str) -> list[R]:
        rows = await self._run(f"listing {record_type.kind}", lambda db: db.execute(
            f"SELECT value FROM records WHERE kind = ? AND owner = ? AND {LIVE} "  # noqa: S608 - fixed text
            "ORDER BY ord DESC, key DESC", (record_type.kind, owner, time.time())).fetchall())
        return decode_records(record_type, (row[0] for row in rows))

    async def delete_group(self, group: str) -> int:
        cursor = await self._run("ending a group", lambda db: db.execute(
            "DELETE FROM records WHERE grp = ?", (group,)))
        return cursor.rowcount

    async def purge_expired(self) -> int:
        """Drop expired records (Redis expires them by itself)."""
        cursor = await self._run("purging expired records", lambda db: db.execute(
            "DELETE FROM records WHERE expires_at <= ?", (time.time(),)))
        self._hits = {bucket: hit for bucket, hit in self._hits.items() if hit[0] > time.monotonic()}
        return cursor.rowcount

    async def hit(self, bucket: str, window_s: float, count: int = 1) -> tuple[int, float]:
        """Count `count` more hits on `bucket` in its current window: the total, and seconds to the window's end."""
        now = time.monotonic()
        ends, hits = self._hits.get(bucket, (0.0, 0))
        if ends <= now:
            ends, hits = now + window_s, 0
        self._hits[bucket] = (ends, hits + count)
        return hits + count, ends - now

    @asynccontextmanager
    async def lock(self, name: str, ttl_s: float) -> AsyncIterator[None]:
        """One holder at a time in this process: the only process using this file."""
        async with self._locks.setdefault(name, anyio.Lock()):
            yield

    async def publish(self, message: dict[str, Any], *, confirmed_within_s: float = 0) -> tuple[int, int]:
        """Nothing to do: no other process shares this store."""
        return 0, 0

    async def confirm(self, ticket: str) -> None:
        """Nothing to do: nobody waits."""

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        yield FEED_LISTENING  # this process hears everything there is: its own changes
        await anyio.sleep_forever()

    def event_store(self, max_events: int, ttl_s: float) -> EventStore:
        return MemoryEventStore(max_events)


def upgrade_sqlite(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version to this one's schema, keeping every record."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
    if "grant_id" in columns:
        db.executescript(SQLITE_UPGRADE_FROM_0_1)
        logger.info("upgraded the store's records table from version 0.1")
    others = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'records'")]
    if others:
        logger.warning("the store holds tables this version does not read, left as they are: %s", ", ".join(others))


def _write(db: sqlite3.Connection, entries: Sequence[Entry | Gone]) -> None:
    now = time.time()
    for entry in entries:
        if isinstance(entry, Gone):
            db.execute("DELETE FROM records WHERE kind = ? AND key = ?", (entry.kind, entry.key))
            continue
        db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", (
            entry.kind, entry.key, encode_record(entry.value), None if entry.ttl_s is None else now + entry.ttl_s,
            entry.owner, entry.group, entry.order))


# --- Redis: the store replicas share
#
# Redis runs each script atomically. `write` saves records with their TTLs (or deletes them) and
# adds them to their group's set and their owner's sorted set, which live as long as their
# longest-lived member. Every script is given each key it computes in KEYS (Redis Cluster routes a
# script by its keys, and refuses one that touches a key on another node); all of a store's keys
# share one hash tag in Cluster, so they live in one slot.
REDIS_WRITE = """
local function extend(index, ttl)
  local left = redis.call('PTTL', index)
  if ttl == 0 then redis.call('PERSIST', index)
  elseif left == -2 or (left >= 0 and left < ttl) then redis.call('PEXPIRE', index, ttl) end
end
local function write(entries)
  for _, e in ipairs(entries) do
    local key, value, ttl, group, owner, order = e[1], e[2], e[3], e[4], e[5], e[6]
    if value == cjson.null then redis.call('DEL', key)
    else
      if ttl > 0 then redis.call('SET', key, value, 'PX', ttl) else redis.call('SET', key, value) end
      if group ~= '' then redis.call('SADD', group, key); extend(group, ttl) end
      if owner ~= '' then redis.call('ZADD', owner, order, key); extend(owner, ttl) end
    end
  end
end
"""
REDIS_SCRIPTS = {
    "write": REDIS_WRITE + "write(cjson.decode(ARGV[1]))",
    "take": REDIS_WRITE + """
local value = redis.call('GETDEL', KEYS[1])
if value then write(cjson.decode(ARGV[1])) end
return value""",
    "swap": REDIS_WRITE + """
local expected, replacements = cjson.decode(ARGV[1]), cjson.decode(ARGV[2])
for i = 1, #expected do
  if redis.call('GET', KEYS[i]) ~= expected[i] then return 0 end
end
for i = 1, #expected do redis.call('SET', KEYS[i], replacements[i], 'KEEPTTL') end
write(cjson.decode(ARGV[3]))
return 1""",
    "delete": "return redis.call('DEL', KEYS[1])",
    "delete_group": """
local removed = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do removed = removed + redis.call('DEL', key) end
redis.call('DEL', KEYS[1])
return removed""",
    "hit": """
local hits = redis.call('INCRBY', KEYS[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {hits, redis.call('PTTL', KEYS[1])}""",
}
REDIS_TIMEOUT_S = 2
REDIS_RETRY_EVERY_S = 1
REDIS_CLUSTER_MAX_CONNECTIONS = 1000  # per node; past redis-py's default of 100 a call fails at once, unqueued
REPLICA_UNHEARD_PAUSE_S = 5  # after a replica failed to confirm a write in time, writes stop waiting this long


def redis_retry(times: int) -> Any:
    """Retry a failed call `times` more times at once: a pooled socket may be stale, and a Sentinel or Cluster
    client finds the new primary on a retry. Never more: while Redis is away, callers get a 503 quickly."""
    import redis.asyncio.retry
    import redis.backoff

    return redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), times)


def redis_options(address: RedisAddress, retries: int) -> dict[str, Any]:
    """What every connection to a data node takes: credentials, timeouts, TLS and retries."""
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": REDIS_TIMEOUT_S,
                               "socket_connect_timeout": REDIS_TIMEOUT_S, "retry": redis_retry(retries),
                               "username": address.username,
                               "password": address.password.value if address.password else None}
    if address.tls:
        options["ssl"] = True
        if "ssl_ca_certs" in address.options:
            options["ssl_ca_certs"] = address.options["ssl_ca_certs"]
    return options


def connect_redis(address: RedisAddress, url: str, retries: int) -> Any:
    """A client of the Redis `address` names, in its mode; it connects on first use."""
    import redis.asyncio

    if address.mode == "standalone":  # redis-py reads the URL itself: its query may carry any of its options
        parts = urlsplit(url)
        ours = ("prefix", "replica_wait_ms")
        query = urlencode([(name, value) for name, value in parse_qsl(parts.query) if name not in ours])
        return redis.asyncio.Redis.from_url(urlunsplit(parts._replace(query=query)), decode_responses=True,
                                            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                            retry=redis_retry(retries))
    options = redis_options(address, retries)
    if address.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        # Sentinels get only the socket options unless told more: their own credentials, and TLS.
        sentinel_options = {**options, "username": address.options.get("sentinel_username"),
                            "password": address.options.get("sentinel_password"), "retry": redis_retry(0)}
        sentinels = Sentinel(list(address.hosts), sentinel_kwargs=sentinel_options)
        return sentinels.master_for(address.service, db=address.db, **options)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in address.hosts],
                        max_connections=REDIS_CLUSTER_MAX_CONNECTIONS, **options)


def redis_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """What redis-py raises when Redis cannot serve now (a 503 until it can), and when a call failed at all.
    A failover raises more than connection errors: the cluster is down or its slot not yet covered, a node
    says try again, a demoted primary is read-only; and redis-py's cluster errors are not all RedisErrors."""
    import redis.exceptions

    unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
                   redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError, redis.exceptions.SlotNotCoveredError,
                   redis.exceptions.RedisClusterException)
    return unreachable, (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


def redis_misuse() -> tuple[type[BaseException], ...]:
    """The cluster client's refusals of a call it could never make (keys of several slots): this server's
    mistake, never Redis being away."""
    import redis.exceptions

    return redis.exceptions.CrossSlotTransactionError, redis.exceptions.InvalidPipelineStack


class RedisStore:
    """The shared store: one Redis for every replica, through the `redis` package's asyncio client and
    its connection pool: a single server, a primary that Sentinel fails over, or a Cluster. Expiry is
    Redis's own; a one-time value is consumed with GETDEL and every change of several keys runs as one
    script, so replicas racing on the same code or refresh token get exactly one winner. When Redis
    cannot be reached (or is failing over) every call fails fast with StoreUnavailable (the app answers
    503) until a ping gets through again; the log says so once each way.

    Keys start with the prefix from STORE_URL's `?prefix=` (default "stream-http"); in Cluster the prefix
    is a hash tag, `{stream-http}`, so every key is in one slot: Cluster buys failover, not sharding.
    With Sentinel or Cluster each record written waits for one replica to have it too (WAIT, at most
    `?replica_wait_ms=`), so a failover right after loses no acknowledged write.
    """

    shared = True

    def __init__(self, url: str) -> None:
        address = parse_redis_url(url)
        self.mode: RedisMode = address.mode
        self.prefix = f"{{{address.prefix}}}" if address.mode == "cluster" else address.prefix
        self.where = ",".join(f"{host}:{port}" for host, port in address.hosts) + (
            f"/{address.service}" if address.service else "")  # no password
        self.address = address
        self.unreachable, self.failed = redis_errors()
        self.misuse = redis_misuse()
        import redis.exceptions

        self.no_script = redis.exceptions.NoScriptError
        self.client: Any = connect_redis(address, url, retries=1)
        # The subscription's own client never retries: a retry would subscribe again without a word, and
        # what was published in between would be missed unseen (see `messages`). In Cluster it is made
        # for the node serving the channel, each time the subscription starts.
        self.listener: Any = connect_redis(address, url, retries=0) if address.mode != "cluster" else None
        self.channel = f"{self.prefix}:changes"
        self._scripts = {name: self.client.register_script(text) for name, text in REDIS_SCRIPTS.items()}
        self._down: str | None = None
        self._replica_unheard_until = 0.0

    @property
    def available(self) -> bool:
        return self._down is None

    async def call(self, action: str, operation: Callable[[], Awaitable[Any]], *, probe: bool = False) -> Any:
        """Run `operation` against Redis, naming `action` in any error; fail fast while Redis is down
        unless this is the `probe` that finds it back."""
        if self._down is not None and not probe:
            raise StoreUnavailable(f"{action}: Redis at {self.where} is unreachable ({self._down})")
        try:
            with store_operation(action):
                result = await operation()
        except (*self.failed, OSError, RuntimeError) as exc:
            if not self.is_unreachable(exc):
                if isinstance(exc, RuntimeError):
                    raise  # not Redis's doing
                logger.error("store error: %s: %s", action, exc)
                raise StorageError(f"{action}: {exc}") from exc
            if not is_overloaded(exc):  # this process's own pool is full: Redis itself is fine
                self._went_down(str(exc) or type(exc).__name__)
            raise StoreUnavailable(f"{action}: Redis at {self.where} is unreachable ({exc})") from exc
        self._came_back()
        return result

    def is_unreachable(self, exc: BaseException) -> bool:
        """Whether `exc` means Redis cannot serve now, but will: gone, failing over, or refusing writes
        until its replicas are back (NOREPLICAS, with min-replicas-to-write). At a cluster's failover redis-py
        closes every connection of the client, other calls' in flight too, which then fail as the socket
        layer says (an OSError, or uvloop's RuntimeError on a closed transport)."""
        if isinstance(exc, self.misuse):  # our mistake, not Redis being away: a store error, logged
            return False
        return (isinstance(exc, (*self.unreachable, OSError)) or "NOREPLICAS" in str(exc)
                or (isinstance(exc, RuntimeError) and "closed" in str(exc))
                or isinstance(exc.__cause__, self.unreachable))  # "Redis Cluster cannot be connected" says why

    def _went_down(self, reason: str) -> None:
        if self._down is None:
            logger.error("store unavailable: Redis at %s: %s; MCP and sign-in requests get 503 until it is back",
                         self.where, reason)
        self._down = reason

    def _came_back(self) -> None:
        if self._down is not None:
            self._down = None
            logger.warning("store available again: Redis at %s answers; serving requests", self.where)

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}:r:{kind}:{key}"

    def _owner_index(self, kind: str, owner: str) -> str:
        return f"{self.prefix}:o:{kind}:{owner}"

    def _group(self, group: str) -> str:
        return f"{self.prefix}:g:{group}"

    def _encode(self, entries: Sequence[Entry | Gone]) -> tuple[list[str], str]:
        """Entries as the `write` script takes them: every key they touch, and the entries as JSON (key, value
        (null: delete), TTL in ms (0: none), group set, owner index, order)."""
        rows = [
            [self._key(e.kind, e.key), None, 0, "", "", 0] if isinstance(e, Gone) else
            [self._key(e.kind, e.key), encode_record(e.value), max(1, int(e.ttl_s * 1000)) if e.ttl_s else 0,
             self._group(e.group) if e.group else "", self._owner_index(e.kind, e.owner) if e.owner else "",
             e.order]
            for e in entries]
        keys = [key for row in rows for key in (row[0], row[3], row[4]) if key]
        return list(dict.fromkeys(keys)), json.dumps(rows)

    def _on_node_of(self, key: str) -> dict[str, Any]:
        """For a command without keys: in Cluster, aimed at the node serving `key` (else a random one)."""
        return {"target_nodes": self.client.get_node_from_key(key)} if self.mode == "cluster" else {}

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any] = (), *,
                      durable: bool = False) -> Any:
        """Run script `name`; when `durable`, and replicas are to confirm writes, WAIT for one on the same
        connection (Redis replicates asynchronously: a primary that dies right after acknowledging a write
        may take it along, unless a replica had it)."""
        script = self._scripts[name]
        if not (durable and self.address.replica_wait_ms and time.monotonic() >= self._replica_unheard_until):
            return await script(keys=keys, args=args)
        result, replicas = await self._script_then_wait(script, keys, args)
        if isinstance(result, self.no_script):  # a new primary after a failover: scripts are not replicated
            await self.client.execute_command("SCRIPT LOAD", script.script, **self._on_node_of(keys[0]))
            result, replicas = await self._script_then_wait(script, keys, args)
        if isinstance(result, Exception):
            raise result
        self._replicated(replicas)
        return result

    async def _script_then_wait(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """The script's result (or error) and how many replicas had its writes in time, from one connection."""
        async with self.client.pipeline(transaction=False) as pipe:
            # EVALSHA as a raw command: the cluster pipeline's evalsha method refuses scripts (it cannot know
            # their keys share a slot, which ours do)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", 1, self.address.replica_wait_ms, **self._on_node_of(keys[0]))
            return await pipe.execute(raise_on_error=False)

    def _replicated(self, replicas: Any) -> None:
        """Note whether a replica confirmed the last write; while none does, writes stop waiting for one."""
        if isinstance(replicas, int) and replicas > 0:
            if self._replica_unheard_until:
                self._replica_unheard_until = 0.0
                logger.warning("store: a replica confirms writes again (Redis at %s)", self.where)
            return
        if not self._replica_unheard_until:
            logger.warning("store: no replica confirmed a write within %d ms (Redis at %s): until one does, writes "
                           "are acknowledged before a replica has them, and a failover could lose them",
                           self.address.replica_wait_ms, self.where)
        self._replica_unheard_until = time.monotonic() + REPLICA_UNHEARD_PAUSE_S

    async def open(self) -> None:
        with suppress(StoreUnavailable):  # a replica may start before Redis: it answers 503 until then
            await self.ping()
            if self.mode != "cluster":  # version 0.1 never ran on a cluster
                await self.call("upgrading the store", self._upgrade_from_0_1)

    async def close(self) -> None:
        await self.client.aclose()
        if self.listener is not None:
            await self.listener.aclose()

    async def ping(self) -> None:
        """Whether Redis answers; in Cluster, the node serving this store's slot (a PING would ask them all)."""
        if self.mode == "cluster":
            await self.call("ping", partial(self.client.exists, self.channel), probe=True)
        else:
            await self.call("ping", self.client.ping, probe=True)

    async def put(self, *entries: Entry) -> None:
        keys, rows = self._encode(entries)
        await self.call(f"saving {', '.join(e.kind for e in entries)}",
                        lambda: self._script("write", keys, [rows], durable=True))

    async def get(self, record_type: type[R], key: str) -> R | None:
        value = await self.call(f"reading {record_type.kind}",
                                lambda: self.client.get(self._key(record_type.kind, key)))
        return decode_record(record_type, value) if value is not None else None

    async def take(self, record_type: type[R], key: str, then: Sequence[Entry | Gone] = ()) -> R | None:
        keys, rows = self._encode(then)
        value = await self.call(f"taking {record_type.kind}", lambda: self._script(
            "take", [self._key(record_type.kind, key), *keys], [rows], durable=True))
        return decode_record(record_type, value) if value is not None else None

    async def swap(self, key: str, expected: R, replacement: R, then: Sequence[Entry | Gone] = (),
                   *, also: Sequence[Swap] = ()) -> bool:
        swaps = [Swap(key, expected, replacement), *also]
        kind = type(expected).kind
        keys = [self._key(type(one.expected).kind, one.key) for one in swaps]
        # Compared as values, not as text: a record an earlier version wrote spells the same value otherwise.
        # The script then swaps only if every text is still the one read, so the swap stays atomic.
        stored = await self.call(f"reading {kind}", lambda: self.client.mget(keys))
        if any(text is None or decode_record(type(one.expected), text) != one.expected
               for one, text in zip(swaps, stored, strict=True)):
            return False
        replacements = [encode_record(one.replacement) for one in swaps]
        written, rows = self._encode(then)
        swapped = await self.call(f"updating {kind}", lambda: self._script(
            "swap", [*keys, *written], [to_json(stored), to_json(replacements), rows], durable=True))
        return swapped == 1

    async def delete(self, record_type: type[StoredRecord], key: str) -> bool:
        removed = await self.call(f"deleting {record_type.kind}", lambda: self._script(
            "delete", [self._key(record_type.kind, key)], durable=True))
        return removed > 0

    async def find(self, record_type: type[R], owner: str) -> list[R]:
        index = self._owner_index(record_type.kind, owner)

        async def find() -> list[str]:
            keys = await self.client.zrevrange(index, 0, -1)
            values = await self.client.mget(keys) if keys else []
            if gone := [key for key, value in zip(keys, values, strict=True) if value is None]:
                await self.client.zrem(index, *gone)  # expired or deleted since they were listed
            return [value for value in values if value is not None]

        return decode_records(record_type, await self.call(f"listing {record_type.kind}", find))

    async def delete_group(self, group: str) -> int:
        return await self.call("ending a group", lambda: self._script(
            "delete_group", [self._group(group)], durable=True))

    async def purge_expired(self) -> int:
        """Nothing to do: Redis expires records by itself."""
        return 0

    async def hit(self, bucket: str, window_s: float, count: int = 1) -> tuple[int, float]:
        """Count `count` more hits on `bucket` in its current window, across every replica: the total, and
        seconds to the window's end."""
        hits, left_ms = await self.call("counting requests", lambda: self._script(
            "hit", [f"{self.prefix}:c:{bucket}"], [max(1, int(window_s * 1000)), count]))
        return int(hits), max(0, int(left_ms)) / 1000

    @asynccontextmanager
    async def lock(self, name: str, ttl_s: float) -> AsyncIterator[None]:
        """One holder at a time across every replica; a holder that dies releases it after `ttl_s`."""
        lock = self.client.lock(f"{self.prefix}:lock:{name}", timeout=ttl_s, sleep=0.05, blocking_timeout=ttl_s + 1)
        if not await self.call(f"locking {name}", lock.acquire):
            logger.error("store error: %s stayed locked for more than %.0f s", name, ttl_s + 1)
            raise StorageError(f"locking {name}: still held after {ttl_s + 1:.0f} s")
        try:
            yield
        finally:
            # expired meanwhile, or Redis went away: the lock ends by its TTL
            with suppress(*self.failed, OSError, RuntimeError):
                await lock.release()

    async def publish(self, message: dict[str, Any], *, confirmed_within_s: float = 0) -> tuple[int, int]:
        """Publish to every replica; with `confirmed_within_s`, wait for each one that heard it to confirm.
        In Cluster the message is sharded (SPUBLISH), heard on the node serving the channel's slot, where
        every replica listens: its count of listeners is exact (a PUBLISH counts only one node's)."""
        ticket = f"{self.prefix}:ack:{new_id()}"
        if confirmed_within_s:
            message = {**message, "ticket": ticket}
        send = self.client.spublish if self.mode == "cluster" else self.client.publish
        heard = await self.call("announcing a change", lambda: send(self.channel, to_json(message)))
        confirmed, deadline = 0, time.monotonic() + confirmed_within_s
        while confirmed < heard and (left := deadline - time.monotonic()) > 0:
            wait = partial(self.client.blpop, [ticket], timeout=min(left, REDIS_TIMEOUT_S / 4))  # within the socket's
            if await self.call("waiting for replicas", wait):
                confirmed += 1
        return heard, confirmed if confirmed_within_s else heard

    async def confirm(self, ticket: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            await self.call("confirming a change", lambda: pipe.rpush(ticket, 1).expire(ticket, 60).execute())

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """What every replica publishes, this one included, for as long as it runs. FEED_LOST when the
        subscription breaks (Redis went away or failed over, or stopped answering its heartbeat),
        FEED_LISTENING once it is back: what was published in between is lost."""
        while True:
            listening = False
            try:
                async with self._subscription() as pubsub:
                    async for message in self._heard(pubsub):
                        if not listening:
                            listening = True
                            self._came_back()
                            yield FEED_LISTENING
                        if message is not None:
                            yield message
            except (*self.failed, ConnectionError, TimeoutError) as exc:  # calls say whether Redis is down
                logger.debug("subscription to %s ended: %s", self.channel, exc)
            if listening:
                yield FEED_LOST
            await anyio.sleep(REDIS_RETRY_EVERY_S)

    @asynccontextmanager
    async def _subscription(self) -> AsyncIterator[Any]:
        """A subscription to the channel: through the listener's own client, or in Cluster a sharded one on
        a client of its own for the node serving the channel, as the cluster now says (redis-py 8.1's
        cluster pub/sub stays stuck on a node that was partitioned away)."""
        client = self.listener
        if self.mode == "cluster":
            await self.client.nodes_manager.initialize()
            node = self.client.get_node_from_key(self.channel)
            client = self._node_client(node.host, node.port)
        pubsub = client.pubsub()
        try:
            await (pubsub.ssubscribe if self.mode == "cluster" else pubsub.subscribe)(self.channel)
            yield pubsub
        finally:
            with anyio.move_on_after(REDIS_TIMEOUT_S, shield=True):
                with suppress(*self.failed, OSError, RuntimeError):
                    await pubsub.aclose()
                if client is not self.listener:
                    with suppress(*self.failed, OSError, RuntimeError):
                        await client.aclose()

    def _node_client(self, host: str, port: int) -> Any:
        import redis.asyncio

        return redis.asyncio.Redis(host=host, port=port, **redis_options(self.address, retries=0))

    async def _heard(self, pubsub: Any) -> AsyncIterator[dict[str, Any] | None]:
        """The subscription's messages, and None once it is confirmed. Idle, it pings Redis every second and
        gives up (TimeoutError) when no answer has come for REDIS_TIMEOUT_S: a dead link is noticed too. With
        Sentinel it also asks, every second, whether the primary is still the one it listens to."""
        last_heard = last_checked = time.monotonic()
        subscribed = False
        while True:
            message = await pubsub.get_message(timeout=REDIS_RETRY_EVERY_S)
            now = time.monotonic()
            if now - last_checked >= REDIS_RETRY_EVERY_S:
                last_checked = now
                await self._check_primary(pubsub)
            if message is None:
                if now - last_heard > REDIS_TIMEOUT_S + REDIS_RETRY_EVERY_S:
                    raise TimeoutError("the subscription stopped answering its heartbeat")
                await pubsub.ping()
                continue
            last_heard = now  # any answer counts: Redis 7.0 answers a PING on a sharded subscription with a bare PONG
            if message["type"] in ("subscribe", "ssubscribe"):
                if subscribed:  # the connection was made again under us: messages may have been missed
                    raise ConnectionError("the subscription was renewed")
                subscribed = True
                yield None
            elif message["type"] in ("unsubscribe", "sunsubscribe"):  # a slot moved, or the node became a replica
                raise ConnectionError("Redis ended the subscription")
            elif message["type"] in ("message", "smessage"):
                try:
                    yield parse_json(message["data"])
                except ValueError:
                    logger.warning("ignored a message on %s that is not JSON", self.channel)

    async def _check_primary(self, pubsub: Any) -> None:
        """With Sentinel: ask the sentinels for the primary. The answer also drops the client's idle
        connections to a former primary (one back from a partition still takes writes, which its demotion
        then loses); a subscription still on it hears nothing more, so it is renewed."""
        if self.mode != "sentinel":
            return
        pool = self.client.connection_pool
        known = pool.master_address
        primary = await pool.get_master_address()
        if known is not None and tuple(primary) != tuple(known):  # connections busy just now went back unchanged
            await pool.update_active_connections_for_reconnect()
        connection = pubsub.connection
        if connection is not None and (connection.host, connection.port) != tuple(primary):
            raise ConnectionError(f"the primary is now {primary[0]}:{primary[1]}")

    def event_store(self, max_events: int, ttl_s: float) -> EventStore:
        return RedisEventStore(self, max_events, ttl_s)

    async def _upgrade_from_0_1(self) -> None:
        """Version 0.1 indexed records per owner in plain sets: move them into this version's sorted sets, once
        (each old set goes as it is moved)."""
        async with self.client.lock(f"{self.prefix}:lock:upgrade", timeout=60, blocking_timeout=61):
            moved = 0
            async for index in self.client.scan_iter(f"{self.prefix}:s:*"):
                kind, owner = index.removeprefix(f"{self.prefix}:s:").split(":", 1)
                members = await self.client.smembers(index)
                if members:
                    await self.client.zadd(self._owner_index(kind, owner), dict.fromkeys(members, 0))
                await self.client.delete(index)
                moved += 1
            if moved:
                logger.info("upgraded %d of version 0.1's Redis keys to this version's layout", moved)


def is_overloaded(exc: BaseException) -> bool:
    """redis-py's pool for one node is full: this process is too busy, not Redis away."""
    import redis.exceptions

    return isinstance(exc, redis.exceptions.MaxConnectionsError)


STORE_BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite": lambda url: SQLiteStore(Path(url.removeprefix("sqlite:///"))),
    **dict.fromkeys(STORE_SCHEMES[1:], RedisStore),
}


def open_store(settings: Settings) -> Store:
    """The store named by STORE_URL (not yet opened: that happens in the lifespan)."""
    return STORE_BACKENDS[settings.store_scheme](settings.store_url)


# --- stream events, for clients that resume with Last-Event-ID
#
# In stateful mode every SSE event gets an id; a client that loses its connection reconnects with
# `Last-Event-ID` and receives what it missed. The SDK ships only the `EventStore` interface, and
# one store serves every session, so events are tagged with the session that produced them
# (`StreamScope`, carried in a context variable from the request that opened the session) and a
# replay is only served to that same session.

@dataclass(eq=False, slots=True)
class StreamScope:
    """The session an HTTP request belongs to; learnt from the response when the request opens one."""

    session_id: str | None = None
    status: int | None = None  # of the response, once it has started


_stream_scope: ContextVar[StreamScope | None] = ContextVar("stream_http_stream_scope", default=None)


@dataclass(eq=False)
class _StoredEvent:
    event_id: str
    stream: tuple[str | None, str]  # (session, stream) as it was when the event was stored
    message: JSONRPCMessage | None


class MemoryEventStore(EventStore):
    """Keeps the latest `max_events` events in memory, each replayable only by its own session. A
    stream's events are filed under the session and the stream, not the request that wrote them: the
    first (priming) event of a POST stream is written by that request, the rest by the session's own task."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: dict[str, _StoredEvent] = {}
        self._order: deque[_StoredEvent] = deque()
        self._streams: dict[tuple[str | None, str], deque[_StoredEvent]] = {}

    @property
    def size(self) -> int:
        """How many events are kept. (Not `__len__`: the SDK tests the store for truth.)"""
        return len(self._events)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        scope = _stream_scope.get() or StreamScope()
        event = _StoredEvent(secrets.token_urlsafe(12), (scope.session_id, stream_id), message)
        self._events[event.event_id] = event
        self._order.append(event)
        self._streams.setdefault(event.stream, deque()).append(event)
        while len(self._order) > self.max_events:
            self._forget(self._order.popleft())
        return event.event_id

    def _forget(self, event: _StoredEvent) -> None:
        self._events.pop(event.event_id, None)
        stream = self._streams.get(event.stream)
        if stream and stream[0] is event:
            stream.popleft()
        if not stream:
            self._streams.pop(event.stream, None)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        last = self._events.get(last_event_id)
        asking = _stream_scope.get()
        session, stream_id = last.stream if last is not None else (None, "")
        if last is None or asking is None or session is None or asking.session_id != session:
            return None
        stream = list(self._streams.get(last.stream, ()))
        for event in stream[stream.index(last) + 1:]:
            if event.message is not None:
                await send_callback(EventMessage(event.message, event.event_id))
        return stream_id


class RedisEventStore(EventStore):
    """Events in the shared Redis, kept `ttl_s` (the session idle timeout) and at most `max_events` per
    stream, each replayable only by its own session. Best effort: while Redis is unreachable events
    still go out, they just cannot be replayed."""

    def __init__(self, store: RedisStore, max_events: int, ttl_s: float) -> None:
        self.store = store
        self.max_events = max_events
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def _event_key(self, event_id: str) -> str:
        return f"{self.store.prefix}:e:{event_id}"

    def _stream_key(self, session_id: str, stream_id: str) -> str:
        return f"{self.store.prefix}:es:{session_id}:{stream_id}"

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = secrets.token_urlsafe(12)
        scope = _stream_scope.get()
        if scope is None or scope.session_id is None:
            return event_id  # the answer that creates a session: nothing can resume it, it has no session yet
        event = to_json({"session": scope.session_id, "stream": stream_id, "message": None if message is None
                         else jsonrpc_message_adapter.dump_python(message, mode="json", by_alias=True,
                                                                  exclude_unset=True)})
        stream_key = self._stream_key(scope.session_id, stream_id)

        async def save() -> None:
            async with self.store.client.pipeline(transaction=True) as pipe:
                pipe.set(self._event_key(event_id), event, px=self.ttl_ms)
                pipe.rpush(stream_key, event_id)
                pipe.ltrim(stream_key, -self.max_events, -1)
                pipe.pexpire(stream_key, self.ttl_ms)
                await pipe.execute()

        try:
            await self.store.call("saving a stream event", save)
        except StorageError as exc:
            logger.debug("stream event not kept for replay: %s", exc)
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        asking = _stream_scope.get()
        try:
            found = await self._events_after(last_event_id, asking.session_id if asking else None)
        except StorageError as exc:
            logger.warning("cannot replay a stream: %s", exc)
            return None
        if found is None:
            return None
        stream_id, events = found
        for event_id, message in events:
            await send_callback(EventMessage(jsonrpc_message_adapter.validate_python(message), event_id))
        return stream_id

    async def _events_after(self, last_event_id: str, session_id: str | None,
                            ) -> tuple[str, list[tuple[str, Any]]] | None:
        client = self.store.client

        async def read() -> tuple[str, list[tuple[str, Any]]] | None:
            last = await client.get(self._event_key(last_event_id))
            if last is None or session_id is None or json.loads(last)["session"] != session_id:
                return None
            stream_id = json.loads(last)["stream"]
            ids = await client.lrange(self._stream_key(session_id, stream_id), 0, -1)
            if last_event_id not in ids:
                return None
            later = ids[ids.index(last_event_id) + 1:]
            values = await client.mget([self._event_key(event_id) for event_id in later]) if later else []
            messages = [(event_id, json.loads(value)["message"] if value else None)
                        for event_id, value in zip(later, values, strict=True)]
            return stream_id, [(event_id, message) for event_id, message in messages if message is not None]

        return await self.store.call("replaying a stream", read)


# === 5. What handlers reach ==================================================
#
# Tools, resources and prompts reach the running server through `current_user()` (who is calling) and
# `runtime()` (its settings, store and provider); `can_ask_user` and `send_log` talk back to the
# client. The change bus delivers resource notifications to the right person's connections in both
# protocol eras, and rate limits count requests in the store. Offers below: User, current_user,
# runtime, ChangeBus, RateLimits, can_ask_user, send_log, tool_error.

LIST_NOTIFY_TIMEOUT_S = 1.0
RATE_BUCKETS_MAX = 100_000  # past this many, the budgets of ended windows are dropped
OUTBOUND_TIMEOUT_S = 10
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
STDIO_SESSION = "stdio"


@dataclass(frozen=True)
class User:
    """The person behind the current request."""

    subject: str
    email: str | None = None
    name: str | None = None
    hosted_domain: str | None = None
    client_id: str | None = None


LOCAL_USER = User(subject="local", name="Local user")


def current_subject() -> str:
    """current_user().subject, without building the User."""
    token = get_access_token()
    return LOCAL_USER.subject if token is None else token.subject or token.client_id


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


# The runtime of the message being handled; the SDK hands it to the middleware as its lifespan
# context, and static resources and completions, which get no Context, read it from here.
_current_runtime: "ContextVar[Runtime]" = ContextVar("stream_http_runtime")


def runtime() -> "Runtime":
    """The running server's shared state (settings, store, provider) for the message being handled."""
    return _current_runtime.get()



@dataclass
class Budget:
    """One bucket's use in its current window, as this process knows it."""

    ends: float  # monotonic time the window ends
    counted: int = 0  # hits the store has counted, every replica's, when last asked
    unsent: int = 0  # hits of this process not yet added to the store's count


class RateLimits:
    """Request budgets per client, per person and per token, counted in the store: on Redis, across every
    replica (hosted clients such as claude.ai share egress addresses, so nothing here is per address).
    On a shared store this process adds its hits in small batches (a fiftieth of the limit), so a
    request costs a store round trip only now and then; the limit then holds to within that batch per
    replica."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.budgets: dict[str, Budget] = {}

    async def spend(self, bucket: str, limit: int, window_s: float) -> float | None:
        """Spend one request of `bucket`'s budget of `limit` per `window_s`: None while within it, else
        the seconds until the window starts over."""
        if limit <= 0:
            return None
        now = time.monotonic()
        budget = self.budgets.get(bucket)
        if budget is None or budget.ends <= now:
            if len(self.budgets) > RATE_BUCKETS_MAX:
                self.budgets = {key: kept for key, kept in self.budgets.items() if kept.ends > now}
            budget = self.budgets[bucket] = Budget(now + window_s)
        budget.unsent += 1
        if budget.unsent >= (max(1, limit // 50) if self.store.shared else 1):
            sending, budget.unsent = budget.unsent, 0  # before the await: other requests count on meanwhile
            total, left = await self.store.hit(bucket, window_s, sending)
            budget.counted, budget.ends = max(budget.counted, total), now + left
            return None if total <= limit else max(1.0, left)
        return None if budget.counted + budget.unsent <= limit else max(1.0, budget.ends - now)


@dataclass
class HandshakeSession:
    """A stateful 2025-era session: who owns it, its log level, the resources it subscribed to."""

    owner: str
    session: ServerSession  # the latest request's proxy; its connection channel outlives the request
    log_level: str = "debug"
    watched: set[str] = field(default_factory=set)
    last_active: float = field(default_factory=time.monotonic)  # when its last HTTP request ended


class ChangeBus:
    """Delivers change events to the connections they concern, in both protocol eras.

    It feeds the SDK's `subscriptions/listen` streams (2026-07-28, through `ChangeFeed`), and it
    keeps the handshake-era sessions whose GET stream receives `notifications/resources/list_changed`
    and `notifications/resources/updated`. A change announced for an owner reaches only that user.
    """

    def __init__(self) -> None:
        self._listeners: dict[object, tuple[str, Callable[[ServerEvent], None]]] = {}
        self._sessions: dict[str, HandshakeSession] = {}
        self._in_flight: dict[str, int] = {}  # HTTP requests being served, per session (GET streams included)
        self._swept = time.monotonic()

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        """Register a listen stream for the user who opened it."""
        token = object()
        self._listeners[token] = (current_user().subject, listener)

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    def session(self, session_id: str, owner: str, session: ServerSession, limit: int,
                idle_s: float) -> HandshakeSession:
        """The record of a handshake-era session, made on its first request (oldest dropped past `limit`)."""
        known = self._sessions.get(session_id)
        if known is None or known.owner != owner:
            self.forget_idle(idle_s)
            known = self._sessions[session_id] = HandshakeSession(owner, session)
            while len(self._sessions) > limit:
                self._sessions.pop(next(iter(self._sessions)))
        known.session = session
        return known

    # A record holds its session's objects, so it must go when the SDK ends the session: on a DELETE,
    # or once no request of it has been in flight (no POST, no open GET stream) for the idle timeout.

    def request_started(self, session_id: str) -> None:
        self._in_flight[session_id] = self._in_flight.get(session_id, 0) + 1

    def request_ended(self, session_id: str, *, deleted: bool) -> None:
        left = self._in_flight.pop(session_id, 1) - 1
        if left > 0:
            self._in_flight[session_id] = left
        if deleted:
            self._sessions.pop(session_id, None)
        elif known := self._sessions.get(session_id):
            known.last_active = time.monotonic()

    def forget_idle(self, idle_s: float) -> None:
        """Drop the records of sessions the SDK has closed for idling (looked for at most once a second)."""
        now = time.monotonic()
        if now - self._swept < 1:
            return
        self._swept = now
        for session_id, known in list(self._sessions.items()):
            if session_id not in self._in_flight and now - known.last_active > idle_s and session_id != STDIO_SESSION:
                del self._sessions[session_id]

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def log_level(self, session_id: str | None) -> str:
        known = self._sessions.get(session_id or "")
        return known.log_level if known else LOG_LEVELS[0]

    async def publish(self, event: ServerEvent) -> None:
        """An event for every listen stream (what the SDK publishes)."""
        self._deliver(None, event)
        await anyio.lowlevel.checkpoint()

    async def announce(self, owner: str, uris: Sequence[str]) -> None:
        """`owner`'s resource list changed, and the resources at `uris`: tell that user's connections."""
        for event in (ResourcesListChanged(), *(ResourceUpdated(uri=uri) for uri in uris)):
            self._deliver(owner, event)
            await self._notify_sessions(owner, event)
        await anyio.lowlevel.checkpoint()

    def _deliver(self, owner: str | None, event: ServerEvent) -> None:
        for listener_owner, listener in list(self._listeners.values()):
            if owner is None or owner == listener_owner:
                try:
                    listener(event)
                except Exception:  # one broken stream must not keep the event from the others
                    logger.exception("a listen stream failed to take an event")

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




def can_ask_user(ctx: Context) -> bool:
    """Whether this connection can put a question to the user in the middle of a tool call."""
    if not ctx.session.check_client_capability(ClientCapabilities(elicitation=ElicitationCapability())):
        return False
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS or ctx.session.can_send_request


async def send_log(ctx: Context, message: str, level: str = "info") -> None:
    """Send a log notification at or above the level the session asked for. Logging is deprecated from
    protocol 2026-07-28 on, where it only reaches clients that opt in; it still works everywhere, so
    the SDK's deprecation warning is silenced here."""
    session_id = ctx.headers.get("mcp-session-id") if ctx.headers else STDIO_SESSION
    if LOG_LEVELS.index(level) < LOG_LEVELS.index(runtime().changes.log_level(session_id)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        pending = ctx.session.send_log_message(level, message, SERVER_NAME, related_request_id=ctx.request_id)
    await pending


def tool_error(text: str) -> CallToolResult:
    """A tool result that failed, for the model to read (what the middleware answers in the tool's place)."""
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


# === 6. Google ===============================================================
#
# The only code that talks to Google. Authlib fetches Google's discovery document, builds the
# authorization URL (PKCE and nonce), exchanges the code and verifies the id_token (signature by
# `kid`, issuer, audience, nonce, expiry). The browser's trip through Google is bound to a
# server-side transaction through `state`, not to a cookie: embedded webviews and proxies drop those.
# Each person's Google tokens are kept encrypted in the store, refreshed when needed and revoked
# when no grant needs them any more; they never reach an MCP client.

GOOGLE_TIMEOUT_S = 10
GOOGLE_CALLBACK_PATH = "/oauth/google/callback"
GOOGLE_GRANT_PATH = "/oauth/google/grant"  # where a tool's link for more Google permissions lands
GOOGLE_SIGN_IN_SCOPES = ("openid", "email", "profile")
# Google answers with the long names of the sign-in scopes; both spellings are one scope.
GOOGLE_SCOPE_ALIASES = {"email": "https://www.googleapis.com/auth/userinfo.email",
                        "profile": "https://www.googleapis.com/auth/userinfo.profile"}
GOOGLE_SIGN_IN_SCOPE_LABELS = {
    "openid": "Know who you are on Google", GOOGLE_SCOPE_ALIASES["email"]: "See your email address",
    GOOGLE_SCOPE_ALIASES["profile"]: "See your name and picture",
}
GOOGLE_QUOTA_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded",
                                  "dailyLimitExceeded", "RATE_LIMIT_EXCEEDED"})
GOOGLE_CONSENT_WAIT_S = 180  # how long a tool call waits for the person to answer Google's consent
GOOGLE_CONSENT_POLL_S = 0.5
TRANSACTION_TTL_S = 600  # how long a trip through Google (a sign-in, or a grant of more scopes) may take
T = TypeVar("T")


class GoogleError(Exception):
    """Google refused, failed, or answered with something that does not verify."""


class GoogleRevoked(GoogleError):
    """Google no longer honours this person's authorization (invalid_grant)."""


class GoogleUnauthorized(GoogleError):
    """Google refused the access token (401): refreshed once, then the authorization counts as revoked."""


class GoogleScopeMissing(GoogleError):
    """Google says the token lacks a scope the call needs: the person withdrew it at Google."""


class GoogleQuota(GoogleError):
    """Google's quota or rate limit for this project or person is used up for now."""


@dataclass(frozen=True)
class GoogleIdentity:
    """Who Google says signed in, from the verified id_token."""

    subject: str
    email: str
    email_verified: bool
    name: str | None = None
    hosted_domain: str | None = None
    picture: str | None = None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> "GoogleIdentity":
        return cls(subject=str(claims["sub"]), email=str(claims.get("email") or "").lower(),
                   email_verified=claims.get("email_verified") in (True, "true"), name=claims.get("name"),
                   hosted_domain=claims.get("hd"), picture=claims.get("picture"))

    def claims(self) -> dict[str, Any]:
        """What tokens carry about the person (never Google's tokens themselves)."""
        return {"email": self.email, "name": self.name, "hd": self.hosted_domain, "picture": self.picture}


@cache
def tls_context() -> ssl.SSLContext:
    """The one TLS context of every outbound connection. Building one loads the system's CA certificates
    (milliseconds of CPU), and Authlib builds a new HTTP client for each call to Google: without a shared
    context that was two thirds of the CPU a sign-in costs (bench/rates.py)."""
    return httpx2.create_ssl_context()


class GoogleLogin:
    """Google as the identity provider: sign-in, token refresh, userinfo and revocation."""

    def __init__(self, settings: Settings, http: httpx2.AsyncClient) -> None:
        from authlib.integrations.starlette_client import OAuth, OAuthError
        from joserfc.errors import JoseError

        self.refused = OAuthError
        self.unverifiable = (JoseError, KeyError, ValueError, TypeError)
        secret = settings.google_client_secret.value if settings.google_client_secret else ""
        self.client = OAuth().register(
            "google", client_id=settings.google_client_id, client_secret=secret,
            server_metadata_url=settings.google_discovery_url,
            client_kwargs={"scope": "openid email profile", "code_challenge_method": "S256",
                           "timeout": GOOGLE_TIMEOUT_S, "verify": tls_context()},
        )
        self.credentials = (settings.google_client_id, secret)
        self.redirect_uri = settings.public_url + GOOGLE_CALLBACK_PATH
        # Google's account chooser then offers only that domain: right only when nobody else may sign in.
        only_domain = len(settings.allowed_domains) == 1 and not settings.allowed_emails
        self.domain_hint = next(iter(settings.allowed_domains)) if only_domain else None
        self.http = http

    async def authorization_url(self, state: str, *, login_hint: str | None, ask_consent: bool,
                                scopes: Sequence[str] = GOOGLE_SIGN_IN_SCOPES) -> tuple[str, str, str]:
        """The URL to send the browser to, and the nonce and PKCE verifier to check Google's answer with.
        `ask_consent` makes Google issue a refresh token again (it does so only on consent). With
        include_granted_scopes, Google's answer covers every scope the person granted this server before,
        so asking for more later (incremental authorization) asks only for what is new."""
        # Sign-in's scopes by their short names, as Google documents them (it takes both spellings).
        short = {url: name for name, url in GOOGLE_SCOPE_ALIASES.items()}
        extra = {"access_type": "offline", "include_granted_scopes": "true", "scope": " ".join(dict.fromkeys(
            short.get(scope, scope) for scope in ("openid", *scopes)))}
        if ask_consent:
            extra["prompt"] = "consent"
        if login_hint:
            extra["login_hint"] = login_hint
        if self.domain_hint:
            extra["hd"] = self.domain_hint  # a hint for Google's account chooser; enforced on the hd claim
        try:
            created = await self.client.create_authorization_url(self.redirect_uri, state=state, **extra)
        except (httpx2.HTTPError, ValueError, KeyError) as exc:
            raise GoogleError(f"Google's discovery document is unavailable: {exc}") from exc
        return created["url"], created["nonce"], created["code_verifier"]

    async def authorization_endpoint(self) -> str | None:
        """Where Google's sign-in pages live, or None while its discovery document is unavailable."""
        try:
            metadata = await self.client.load_server_metadata()
        except (httpx2.HTTPError, ValueError) as exc:
            logger.warning("Google's discovery document is unavailable: %s", exc)
            return None
        return metadata.get("authorization_endpoint")

    async def finish(self, code: str, *, nonce: str, verifier: str) -> tuple[GoogleIdentity, dict[str, Any]]:
        """Exchange Google's code and verify its id_token."""
        try:
            with google_request("token"):
                token = await self.client.fetch_access_token(redirect_uri=self.redirect_uri, code=code,
                                                             code_verifier=verifier)
                claims = await self.client.parse_id_token(token, nonce=nonce)
        except self.refused as exc:
            raise GoogleError(f"Google refused the sign-in: {exc.error}") from exc
        except self.unverifiable as exc:
            raise GoogleError(f"Google's id_token did not verify: {exc}") from exc
        except httpx2.HTTPError as exc:
            raise GoogleError(f"Google could not be reached: {exc}") from exc
        if claims is None:
            raise GoogleError("Google sent no id_token")
        return GoogleIdentity.from_claims(claims), dict(token)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A fresh Google access token. Raises GoogleRevoked on invalid_grant."""
        try:
            with google_request("refresh"):
                # scope=None: Authlib would otherwise send the sign-in scopes, narrowing a token the person widened.
                return dict(await self.client.fetch_access_token(grant_type="refresh_token",
                                                                 refresh_token=refresh_token, scope=None))
        except self.refused as exc:
            raise GoogleRevoked(exc.error) if exc.error == "invalid_grant" else GoogleError(str(exc.error)) from exc
        except httpx2.HTTPError as exc:
            raise GoogleError(f"Google could not be reached: {exc}") from exc

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        metadata = await self.client.load_server_metadata()
        with google_request("userinfo"):
            response = await self.http.get(metadata["userinfo_endpoint"], timeout=GOOGLE_TIMEOUT_S,
                                           headers={"Authorization": f"Bearer {access_token}"})
            if response.status_code == 401:
                raise GoogleRevoked("the Google access token was refused")
            response.raise_for_status()
            return dict(response.json())

    async def api(self, url: str, access_token: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """GET one of Google's REST APIs as the person; Google's errors are raised as `google_api_error` names them."""
        with google_request(next((part for part in urlsplit(url).path.split("/") if part), "api")):  # calendar…
            response = await self.http.get(url, params=params, timeout=GOOGLE_TIMEOUT_S,
                                           headers={"Authorization": f"Bearer {access_token}"})
            if response.status_code < 400:
                return dict(response.json())
            raise google_api_error(response)

    async def revoke(self, token: str) -> None:
        """Revoke a Google token (a refresh token revokes the whole authorization)."""
        metadata = await self.client.load_server_metadata()
        endpoint = metadata.get("revocation_endpoint")
        if not endpoint:
            raise GoogleError("Google's discovery document names no revocation endpoint")
        with google_request("revoke"):
            response = await self.http.post(endpoint, data={"token": token}, auth=self.credentials,
                                            timeout=GOOGLE_TIMEOUT_S)
            if response.status_code >= 400:
                raise GoogleError(f"Google's revocation endpoint answered {response.status_code}")


def google_api_error(response: httpx2.Response) -> GoogleError:
    """Google's error answer, named: GoogleUnauthorized (401), GoogleScopeMissing (403 for a scope not
    granted), GoogleQuota (quota and rate limits), else GoogleError with Google's message."""
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    reasons = {item.get("reason") for item in error.get("errors") or [] if isinstance(item, dict)}
    message = str(error.get("message") or response.reason_phrase)
    if response.status_code == 401:
        return GoogleUnauthorized(message)
    if response.status_code == 429 or reasons & GOOGLE_QUOTA_REASONS:
        return GoogleQuota(message)
    if response.status_code == 403 and reasons & {"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"}:
        return GoogleScopeMissing(message)
    return GoogleError(f"Google answered {response.status_code}: {message}")


def google_scope(name: str) -> str:
    return GOOGLE_SCOPE_ALIASES.get(name, name)


def google_scopes(names: str | Iterable[str]) -> frozenset[str]:
    """Scopes in one spelling, from Google's space-separated `scope` or a list."""
    return frozenset(google_scope(name) for name in (names.split() if isinstance(names, str) else names))


@dataclass(frozen=True)
class GoogleTokens:
    """A person's tokens from Google, as kept (encrypted) by this server."""

    access_token: str
    expires_at: float
    fresh_until: float | None = None  # renewed a little before it expires
    refresh_token: str | None = None
    scopes: tuple[str, ...] = tuple(sorted(google_scopes(GOOGLE_SIGN_IN_SCOPES)))  # what Google says was granted
    # Scopes the person withdrew on /account while Google's grant still holds them (Google revokes only
    # whole grants): never counted as granted until the person grants them here again.
    withdrawn: tuple[str, ...] = ()

    @classmethod
    def from_response(cls, token: Mapping[str, Any], held: "GoogleTokens | None") -> "GoogleTokens":
        """Google's token response, keeping the refresh token already held when it sends none. Its `scope`
        is what the person granted (under granular consent, maybe less than was asked): that is the record."""
        now = time.time()
        expires_at = float(token.get("expires_at") or now + float(token.get("expires_in") or 3600))
        # 30 s early, or halfway for a token shorter-lived than a minute.
        fresh_until = expires_at - min(30.0, max(0.0, expires_at - now) / 2)
        withdrawn = held.withdrawn if held else ()
        granted = google_scopes(token["scope"]) if token.get("scope") else (
            held.scopes if held else google_scopes(GOOGLE_SIGN_IN_SCOPES))
        return cls(access_token=token["access_token"], expires_at=expires_at, fresh_until=fresh_until,
                   refresh_token=token.get("refresh_token") or (held.refresh_token if held else None),
                   scopes=tuple(sorted(set(granted) - set(withdrawn))), withdrawn=withdrawn)

    @property
    def is_fresh(self) -> bool:
        """Whether the access token can still be used without a refresh first."""
        return time.time() < (self.fresh_until if self.fresh_until is not None else self.expires_at - 30)


@dataclass(frozen=True)
class GoogleScopeRequest:
    """A tool's request for Google scopes the person has not granted, answered at Google through `link`."""

    kind: ClassVar[str] = "google_scopes"

    id: str
    subject: str
    email: str
    scopes: tuple[str, ...]
    link: str
    status: Literal["waiting", "answered", "wrong_account"] = "waiting"
    missing: tuple[str, ...] = ()  # of `scopes`, those still not granted once answered


@dataclass(frozen=True)
class GoogleScopeTrip:
    """A person at Google answering a GoogleScopeRequest, with what checks Google's answer."""

    kind: ClassVar[str] = "google_scope_trip"

    request_id: str
    nonce: str
    verifier: str


@dataclass(frozen=True)
class SealedGoogleTokens:
    kind: ClassVar[str] = "google"

    sealed: str


class TokenCipher:
    """Encrypts Google tokens at rest with a key derived from SECRET_KEY (AES-256-GCM). The owner's
    subject is authenticated with each token, so one person's ciphertext cannot be swapped in for another's."""

    def __init__(self, secret_key: Secret) -> None:
        self.aead = AESGCM(derive_key(secret_key, b"stream-http/google-tokens"))

    def seal(self, subject: str, tokens: GoogleTokens) -> SealedGoogleTokens:
        nonce = os.urandom(12)
        sealed = self.aead.encrypt(nonce, encode_record(tokens).encode(), subject.encode())
        return SealedGoogleTokens(base64.urlsafe_b64encode(nonce + sealed).decode())

    def open(self, subject: str, record: SealedGoogleTokens) -> GoogleTokens:
        raw = base64.urlsafe_b64decode(record.sealed)
        return record_adapter(GoogleTokens).validate_json(self.aead.decrypt(raw[:12], raw[12:], subject.encode()))


class GoogleGrants:
    """Each person's authorization at Google: their tokens, kept encrypted and refreshed on demand."""

    def __init__(self, login: GoogleLogin, store: Store, cipher: TokenCipher) -> None:
        self.login = login
        self.store = store
        self.cipher = cipher

    async def tokens(self, subject: str) -> GoogleTokens | None:
        record = await self.store.get(SealedGoogleTokens, subject)
        return self.cipher.open(subject, record) if record else None

    async def save(self, subject: str, token_response: Mapping[str, Any], *, regranted: Iterable[str] = ()) -> None:
        """Keep Google's token response; `regranted`: scopes the person has just granted again here."""
        held = await self.tokens(subject)
        if held is not None and regranted:
            again = google_scopes(regranted)
            held = dataclasses.replace(held, withdrawn=tuple(s for s in held.withdrawn if s not in again))
        await self.keep(subject, GoogleTokens.from_response(token_response, held))

    async def holds_refresh_token(self, subject: str) -> bool:
        tokens = await self.tokens(subject)
        return bool(tokens and tokens.refresh_token)

    async def keep(self, subject: str, tokens: GoogleTokens) -> None:
        await self.store.put(Entry(subject, self.cipher.seal(subject, tokens), owner=subject))

    async def granted(self, subject: str) -> frozenset[str]:
        """The Google scopes the person has granted this server, as Google last said (none: no tokens)."""
        tokens = await self.tokens(subject)
        return frozenset(tokens.scopes) if tokens else frozenset()

    async def access_token(self, subject: str, *, refused: str | None = None) -> str:
        """A valid Google access token for `subject`, refreshed with the stored refresh token when needed, or
        when Google has `refused` that one. Raises GoogleRevoked when Google no longer honours the
        authorization."""
        tokens = await self.tokens(subject)
        if tokens is None:  # withdrawn on /account: a tool asks for its scopes again
            raise GoogleScopeMissing("no Google authorization is stored for you")
        if tokens.is_fresh and tokens.access_token != refused:
            return tokens.access_token
        # One refresh at a time per person, across replicas too; the others wait and use its result.
        async with self.store.lock(f"google-refresh:{subject}", ttl_s=GOOGLE_TIMEOUT_S + 5):
            tokens = await self.tokens(subject) or tokens
            if tokens.is_fresh and tokens.access_token != refused:
                return tokens.access_token
            if not tokens.refresh_token:
                raise GoogleRevoked("Google gave this server no refresh token")
            try:
                fresh = await self.login.refresh(tokens.refresh_token)
            except GoogleError as exc:
                GOOGLE_REFRESH_FAILURES.labels("revoked" if isinstance(exc, GoogleRevoked) else "failed").inc()
                raise
            await self.save(subject, fresh)
            return str(fresh["access_token"])

    async def revoke(self, subject: str) -> None:
        """Forget the person's Google tokens and revoke them at Google (best effort)."""
        record = await self.store.take(SealedGoogleTokens, subject)
        if record is None:
            return
        tokens = self.cipher.open(subject, record)
        try:
            await self.login.revoke(tokens.refresh_token or tokens.access_token)
        except (GoogleError, httpx2.HTTPError) as exc:
            logger.warning("could not revoke the Google token of %s at Google: %s", subject, exc)
            return
        audit("google_token_revoked", subject=subject)

    async def forget(self, subject: str) -> None:
        """Forget the person's Google tokens without asking Google (which has already withdrawn them)."""
        await self.store.delete(SealedGoogleTokens, subject)

    async def lost_at_google(self, subject: str, scopes: Iterable[str]) -> None:
        """Note that Google no longer grants `scopes` (the person withdrew them in their Google account)."""
        tokens = await self.tokens(subject)
        if tokens is not None:
            kept = tuple(scope for scope in tokens.scopes if scope not in google_scopes(scopes))
            await self.keep(subject, dataclasses.replace(tokens, scopes=kept))

    async def withdraw(self, subject: str, scopes: Iterable[str] | None) -> bool:
        """The person withdraws `scopes` (None: every Google permission) on /account. Google revokes only
        whole grants, so while other permissions beyond sign-in remain, the withdrawn ones are no longer
        counted or used (a tool needing one asks again); when nothing beyond sign-in remains, the
        authorization is revoked at Google and forgotten (a Google tool then asks afresh). True if
        it was revoked at Google."""
        tokens = await self.tokens(subject)
        if tokens is None:
            return False
        gone = set(tokens.scopes) if scopes is None else google_scopes(scopes) & set(tokens.scopes)
        extras_left = set(tokens.scopes) - gone - google_scopes(GOOGLE_SIGN_IN_SCOPES)
        audit("google_scopes_withdrawn", subject=subject, scopes=sorted(gone), revoked=not extras_left)
        if not extras_left:
            await self.revoke(subject)
            return True
        await self.keep(subject, dataclasses.replace(tokens, scopes=tuple(sorted(set(tokens.scopes) - gone)),
                                                     withdrawn=tuple(sorted(set(tokens.withdrawn) | gone))))
        return False

    async def ask(self, user: User, scopes: Iterable[str], public_url: str) -> GoogleScopeRequest:
        """A request for the person to grant `scopes` at Google, and its link, good for TRANSACTION_TTL_S."""
        request = GoogleScopeRequest(id=new_id(), subject=user.subject, email=user.email or "",
                                     scopes=tuple(sorted(google_scopes(scopes))), link="")
        request = dataclasses.replace(request, link=f"{public_url}{GOOGLE_GRANT_PATH}?{urlencode({'r': request.id})}")
        await self.store.put(Entry(request.id, request, ttl_s=TRANSACTION_TTL_S))
        return request

    async def send_for(self, request: GoogleScopeRequest) -> str:
        """Where the browser goes to grant `request`'s scopes: Google, for just those, as the same account."""
        state = new_id()
        url, nonce, verifier = await self.login.authorization_url(state, login_hint=request.email or None,
                                                                  ask_consent=True, scopes=request.scopes)
        await self.store.put(Entry(state, GoogleScopeTrip(request.id, nonce, verifier), ttl_s=TRANSACTION_TTL_S))
        return url

    async def scope_request(self, request_id: str) -> GoogleScopeRequest | None:
        return await self.store.get(GoogleScopeRequest, request_id) if request_id else None

    async def take_trip(self, state: str) -> GoogleScopeTrip | None:
        return await self.store.take(GoogleScopeTrip, state) if state else None

    async def finish_trip(self, trip: GoogleScopeTrip, code: str | None, error: str | None,
                          ) -> tuple[GoogleScopeRequest | None, GoogleIdentity | None]:
        """Google sent the browser back with the person's answer: check that the same account answered,
        record what it granted, and mark the request answered (the waiting tool call reads it)."""
        request = await self.store.get(GoogleScopeRequest, trip.request_id)
        if request is None:
            return None, None
        identity = None
        if code and not error:
            identity, tokens = await self.login.finish(code, nonce=trip.nonce, verifier=trip.verifier)
            if identity.subject != request.subject:
                answered = dataclasses.replace(request, status="wrong_account")
                await self.store.put(Entry(request.id, answered, ttl_s=TRANSACTION_TTL_S))
                return answered, identity
            await self.save(request.subject, tokens, regranted=request.scopes)
        missing = tuple(sorted(set(request.scopes) - await self.granted(request.subject)))
        answered = dataclasses.replace(request, status="answered", missing=missing)
        await self.store.put(Entry(request.id, answered, ttl_s=TRANSACTION_TTL_S))
        audit("google_scopes_answered", subject=request.subject, asked=list(request.scopes), missing=list(missing))
        return answered, identity

    async def answered(self, request_id: str, subject: str) -> GoogleScopeRequest | None:
        """The request once the person has answered Google (polling the store: the answer may reach another
        replica), or None if they have not within GOOGLE_CONSENT_WAIT_S."""
        with anyio.move_on_after(GOOGLE_CONSENT_WAIT_S):
            while True:
                request = await self.store.get(GoogleScopeRequest, request_id)
                if request is None or request.subject != subject:
                    return None
                if request.status != "waiting":
                    return request
                await anyio.sleep(GOOGLE_CONSENT_POLL_S)
        return None


class GoogleAccess:
    """Before a tool that acts on the person's Google account runs, the Google scopes it needs (its meta,
    GOOGLE_SCOPES), asked for only then and only those: sign-in asks Google for openid email profile and
    nothing more. A scope missing is asked for in the way the client can carry it: URL-mode elicitation
    mid-call on a 2025-era session (and the call then completes), an input request on 2026-07-28 (the
    client retries, and the call completes), the URL-elicitation-required error where the client takes
    links but cannot be asked mid-call, and otherwise a tool result carrying the link. The link lands on
    this server, which sends the person to Google for just those scopes (incremental authorization)."""

    def __init__(self, grants: GoogleGrants, settings: Settings) -> None:
        self.grants = grants
        self.settings = settings

    async def admit(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext,
                    needed: frozenset[str]) -> HandlerResult:
        user = current_user()
        params = {key: value for key, value in (ctx.params or {}).items()
                  if key not in ("requestState", "inputResponses")}
        retry = (ctx.params or {}).get("requestState")
        if isinstance(retry, str):  # 2026-07-28: the client sent the person to Google and retries
            accepted = ((ctx.params or {}).get("inputResponses") or {}).get("google", {}).get("action") == "accept"
            request = await self.grants.answered(retry, user.subject) if accepted else None
            return await self.proceed(dataclasses.replace(ctx, params=params), call_next, needed, request, accepted)
        missing = needed - await self.grants.granted(user.subject)
        if not missing:
            return await call_next(ctx)
        request = await self.grants.ask(user, missing, self.settings.public_url)
        audit("google_scopes_asked", subject=user.subject, scopes=sorted(missing))
        message = (f"{(ctx.params or {}).get('name')} needs your permission to {scope_labels(missing)}. Open the "
                   "link to grant it at Google, then come back here.")
        if not self.takes_links(ctx):
            return tool_error(f"{message} {request.link}")
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            elicit = ElicitRequest(params=ElicitRequestURLParams(message=message, url=request.link))
            return InputRequiredResult(input_requests={"google": elicit}, request_state=request.id)
        if not ctx.session.can_send_request:
            raise UrlElicitationRequiredError([ElicitRequestURLParams(message=message, url=request.link,
                                                                      elicitation_id=request.id)])
        answer = await ctx.session.elicit_url(message, request.link, request.id, related_request_id=ctx.request_id)
        answered = await self.grants.answered(request.id, user.subject) if answer.action == "accept" else None
        if answered is not None:
            await ctx.session.send_elicit_complete(request.id, related_request_id=ctx.request_id)
        return await self.proceed(ctx, call_next, needed, answered, answer.action == "accept")

    @staticmethod
    def takes_links(ctx: ServerRequestContext[Any, Any]) -> bool:
        capabilities = ctx.session.client_capabilities
        return bool(capabilities and capabilities.elicitation and capabilities.elicitation.url is not None)

    async def proceed(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, needed: frozenset[str],
                      request: GoogleScopeRequest | None, accepted: bool) -> HandlerResult:
        """After the person answered at Google (or did not): the call, or a tool result saying what is missing."""
        if not accepted:
            return tool_error("You did not open the link to Google, so this tool did not run. Call it again "
                              "when you want to grant the permission it needs.")
        if request is None:
            return tool_error(f"Google gave no answer within {GOOGLE_CONSENT_WAIT_S // 60} minutes; call the tool "
                              "again to get a new link.")
        if request.status == "wrong_account":
            return tool_error(f"Google was answered by a different account than {request.email}; call the tool "
                              "again and choose that account at Google.")
        missing = needed - await self.grants.granted(request.subject)
        if missing:
            return tool_error(f"You did not grant everything this tool needs: it still needs your permission to "
                              f"{scope_labels(missing)}. Call it again to be asked once more.")
        return await call_next(ctx)


def google_scopes_of(tool: MCPTool) -> frozenset[str]:
    """The Google scopes a tool declares it needs (its meta, GOOGLE_SCOPES)."""
    return google_scopes((tool.meta or {}).get(GOOGLE_SCOPES, ()))


def acts_with_sign_in_scopes_only(needed: frozenset[str]) -> bool:
    """Whether a tool that needs these Google scopes acts on the person's Google account with nothing but
    what they granted at sign-in (openid email profile). Google asks them nothing more for it, so this
    server asks instead: the client must hold the scope that lets it use the person's Google profile
    (GOOGLE_TOOLS_SCOPE, section 7). A tool that needs more is asked for at Google, on Google's own consent
    screen, when it is first called."""
    return bool(needed) and needed <= google_scopes(GOOGLE_SIGN_IN_SCOPES)


async def tools_by_google_scope() -> dict[str, list[str]]:
    """Each Google scope the tools declare, and the tools that need it."""
    users: dict[str, list[str]] = {}
    for tool in await mcp.list_tools():
        for scope in sorted(google_scopes_of(tool)):
            users.setdefault(scope, []).append(tool.name)
    return users


# The Google scopes of the tool being called, for call_google (the SDK hands a tool nothing of its own
# registration).
_tool_google_scopes: ContextVar[frozenset[str]] = ContextVar("stream_http_tool_google_scopes", default=frozenset())


async def call_google(request: Callable[[GoogleLogin, str], Awaitable[T]]) -> T:
    """Run `request` with the calling person's Google access token, for tools that act on their Google
    account (a tool declares the scopes it needs in its meta, GOOGLE_SCOPES: they are asked for before it
    runs). A token Google refuses is refreshed once; when Google has withdrawn the person's authorization,
    they are signed out of this server too. Every failure becomes a tool error the model can read."""
    provider, user = runtime().provider, current_user()
    if provider is None or user is LOCAL_USER:
        raise ToolError("This server runs without sign-in, so there is no Google account to ask. "
                        "Set GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET to turn sign-in on.")
    grants = provider.google
    try:
        token = await grants.access_token(user.subject)
        try:
            return await request(grants.login, token)
        except GoogleUnauthorized:
            return await request(grants.login, await grants.access_token(user.subject, refused=token))
    except (GoogleRevoked, GoogleUnauthorized) as exc:
        await provider.end_access(user.subject, reason=f"Google withdrew the authorization ({exc})")
        raise ToolError("Google no longer honours your sign-in, so this server has signed you out. "
                        "Connect again to sign in.") from exc
    except GoogleScopeMissing as exc:
        needed = _tool_google_scopes.get()
        await grants.lost_at_google(user.subject, needed)
        raise ToolError(f"Google says you no longer allow this server to {scope_labels(needed)}. Call the tool "
                        "again to be asked for that permission.") from exc
    except GoogleQuota as exc:
        raise ToolError(f"Google's quota for this is used up for now ({exc}); try again in a few minutes.") from exc
    except (GoogleError, httpx2.HTTPError) as exc:
        raise ToolError(f"Google could not be reached just now: {exc}") from exc


def scope_labels(scopes: Iterable[str]) -> str:
    """What scopes let this server do, for a person to read."""
    return "; ".join(scope_label(scope).lower() for scope in sorted(scopes)) or "do that"


def scope_label(scope: str) -> str:
    return GOOGLE_SCOPE_LABELS.get(scope) or GOOGLE_SIGN_IN_SCOPE_LABELS.get(scope) or scope


# --- Cross-Account Protection: Google's word that an account is at risk

RISC_PATH = "/oauth/google/risc"
RISC_MAX_AGE_S = 3600  # an event issued longer ago is refused (Google delivers within minutes, retries included)
RISC_SKEW_S = 300
RISC_CONFIG_TTL_S = 3600
SECEVENT = "https://schemas.openid.net/secevent/"
# The events that end a person's access here (their grants and Google tokens), and what the audit line says.
RISC_ENDS_ACCESS = {
    SECEVENT + "risc/event-type/sessions-revoked": "Google ended the account's sessions",
    SECEVENT + "oauth/event-type/tokens-revoked": "Google revoked the account's tokens",
    SECEVENT + "oauth/event-type/token-revoked": "Google revoked a token of the account",
    SECEVENT + "risc/event-type/account-disabled": "Google disabled the account",
    SECEVENT + "risc/event-type/account-purged": "Google deleted the account",
}


class SecurityEventError(Exception):
    """A security event token refused, with RFC 8935's error code (§2.3) for Google's delivery log."""

    def __init__(self, err: str, description: str) -> None:
        super().__init__(description)
        self.err = err
        self.description = description


@dataclass(frozen=True)
class SecurityEvent:
    """One event of a verified token: its type, the Google account it is about, and Google's reason."""

    type: str
    subject: str | None
    reason: str | None

    @property
    def name(self) -> str:
        return self.type.rsplit("/", 1)[-1]

    @property
    def ends_access(self) -> str | None:
        return RISC_ENDS_ACCESS.get(self.type)


def key_ids(jwks: Mapping[str, Any]) -> set[str]:
    """The key ids of a JWK Set."""
    keys = jwks.get("keys")
    return {key["kid"] for key in keys if isinstance(key, dict) and isinstance(key.get("kid"), str)} \
        if isinstance(keys, list) else set()


@dataclass(frozen=True)
class DeliveredSecurityEvent:
    """A security event token acted on (by its jti)."""

    kind: ClassVar[str] = "risc_jti"

    at: float


class SecurityEvents:
    """Google's Cross-Account Protection (RISC): verifies the security event tokens Google pushes (RFC 8417)
    against its RISC configuration and keys, both fetched and cached: RS256 signature, the configuration's
    issuer, our Google client id as audience, issued within RISC_MAX_AGE_S, each `jti` acted on once
    (remembered in the store, on every replica). joserfc checks the signature."""

    def __init__(self, settings: Settings, store: Store, http: httpx2.AsyncClient) -> None:
        self.settings = settings
        self.store = store
        self.http = http
        self._configuration: tuple[float, dict[str, Any]] | None = None
        self._keys: dict[str, Any] = {}
        self._keys_fetched = 0.0

    async def verify(self, token: str) -> tuple[str, list[SecurityEvent]]:
        """The token's jti and events, once it verifies; SecurityEventError says why it does not."""
        from joserfc import jwt
        from joserfc.errors import JoseError

        configuration = await self.configuration()
        try:
            decoded = jwt.decode(token, await self.key_set(token, configuration), algorithms=["RS256"])
        except (JoseError, ValueError, TypeError) as exc:
            raise SecurityEventError("invalid_key", f"the token does not verify ({type(exc).__name__})") from None
        claims = decoded.claims
        if claims.get("iss") != configuration.get("issuer"):
            raise SecurityEventError("invalid_issuer", "the token is not from Google's RISC issuer")
        audience = claims.get("aud")
        if not any(name == self.settings.google_client_id for name in (audience if isinstance(audience, list)
                                                                         else [audience])):
            raise SecurityEventError("invalid_audience", "the token is not for this server's Google client")
        issued, now = claims.get("iat"), time.time()
        if not isinstance(issued, int | float) or not now - RISC_MAX_AGE_S <= issued <= now + RISC_SKEW_S:
            raise SecurityEventError("invalid_request", f"the token was not issued in the last {RISC_MAX_AGE_S} s")
        events, jti = claims.get("events"), claims.get("jti")
        if not isinstance(events, dict) or not events or not isinstance(jti, str) or not jti:
            raise SecurityEventError("invalid_request", "the token needs events and a jti")
        if await self.store.get(DeliveredSecurityEvent, jti) is not None:
            raise SecurityEventError("invalid_request", "this token was delivered before (its jti)")
        return jti, [SecurityEvent(str(kind), *event_subject(body)) for kind, body in events.items()]

    async def acted_on(self, jti: str) -> None:
        """Remember a token acted on, so that a replay changes nothing. Only once acted on: a delivery that
        failed half-way is delivered again by Google, and must then be acted on."""
        await self.store.put(Entry(jti, DeliveredSecurityEvent(time.time()), ttl_s=RISC_MAX_AGE_S + RISC_SKEW_S))

    async def configuration(self) -> dict[str, Any]:
        if self._configuration and self._configuration[0] > time.monotonic():
            return self._configuration[1]
        configuration = await self.fetch_json(self.settings.google_risc_discovery_url)
        if not isinstance(configuration.get("issuer"), str) or not isinstance(configuration.get("jwks_uri"), str):
            raise GoogleError("Google's RISC configuration names no issuer and keys")
        self._configuration = (time.monotonic() + RISC_CONFIG_TTL_S, configuration)
        return configuration

    async def key_set(self, token: str, configuration: Mapping[str, Any]) -> Any:
        """Google's RISC keys, fetched again for a key id not seen before (Google rotates them)."""
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet
        from joserfc.jws import extract_compact

        try:
            kid = extract_compact(token.encode()).protected.get("kid")
        except JoseError:
            raise SecurityEventError("invalid_request", "the body is not a signed security event token") from None
        if not self._keys or (kid not in key_ids(self._keys) and time.monotonic() > self._keys_fetched + 60):
            self._keys = await self.fetch_json(str(configuration["jwks_uri"]))  # Google rotates its keys
            self._keys_fetched = time.monotonic()
        try:
            return KeySet.import_key_set(self._keys)
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise GoogleError(f"Google's RISC keys cannot be read ({type(exc).__name__})") from None

    async def fetch_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self.http.get(url, timeout=GOOGLE_TIMEOUT_S)
            response.raise_for_status()
            document = parse_json(response.content)
        except (httpx2.HTTPError, ValueError) as exc:
            raise GoogleError(f"{url} is unavailable: {exc}") from exc
        if not isinstance(document, dict):
            raise GoogleError(f"{url} is not a JSON object")
        return document


def event_subject(body: Any) -> tuple[str | None, str | None]:
    """The Google account an event is about (its `sub`, RFC 9493 iss-sub or id_token_claims) and Google's reason."""
    subject = body.get("subject") if isinstance(body, dict) else None
    sub = subject.get("sub") if isinstance(subject, dict) else None
    reason = body.get("reason") if isinstance(body, dict) else None
    return (sub if isinstance(sub, str) and sub else None), (reason if isinstance(reason, str) else None)


# === 7. OAuth provider =======================================================
#
# The server is the OAuth 2.1 authorization server MCP clients talk to: Google cannot register
# them. One authorization runs /authorize → consent page → Google → /oauth/google/callback → code →
# /token, and each step is a single-use record in the store. Tokens are random strings stored only
# as SHA-256 hashes; each belongs to a grant (one person, one client), and revocation ends a grant
# as a whole. The pure functions first decide; the records follow; then the provider in four parts,
# one per sub-banner: `Clients` (registrations and metadata documents), `SignIns` (consent, Google
# and back), `Grants` (codes, tokens, rotation, revocation) and `OAuthProvider`, the SDK's interface
# over them. Nothing here touches HTTP: section 9 holds the routes. Offers below: OAuthProvider
# (`build_provider`), SCOPES, the records /account shows, and the decisions the routes apply.

SCOPES = {
    "mcp": "Use this server's tools, notes and prompts as you",
    "google": "Read your Google profile (name, email, picture) through this server's tools",
}
REQUIRED_SCOPE = "mcp"  # every MCP request needs it
GOOGLE_TOOLS_SCOPE = "google"  # what a client needs to call a tool that uses the person's Google sign-in (section 6)
AUTH_CODE_TTL_S = 300
VERIFIED_TOKENS_MAX = 10_000  # tokens kept in memory, oldest dropped first
VERIFIED_TOKEN_MAX_AGE_S = 60  # read again from the store at least this often
GRANT_END_CONFIRM_S = 2  # how long a revocation waits for every replica to confirm it
REFRESH_RACE_GRACE_S = 2  # the same refresh token used twice this close together is a race, not theft
CLIENT_DOCUMENT_TTL_S = 3600
CLIENT_DOCUMENT_MAX_BYTES = 10_240
CLIENT_DOCUMENT_TIMEOUT_S = 5
REFUSALS_LOGGED_MAX = 1000
PKCE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # BASE64URL(SHA-256(verifier)), RFC 7636 §4.2
PKCE_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 §4.1
SUPPORTED_GRANT_TYPES = frozenset({"authorization_code", "refresh_token"})
PRIVATE_KEY_JWT = "private_key_jwt"  # RFC 7523 client assertions, from metadata-document clients with keys
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256")
ASSERTION_MAX_LIFETIME_S = 300  # an assertion that expires later than this is refused (RFC 7523 §3: bounded)
CLIENT_KEYS_TTL_S = 3600
SECRET_DIGEST_PREFIX = "sha256:"  # noqa: S105 - how a stored secret's hash begins, not a secret


# --- the MCP clients of late 2026: their callbacks and metadata documents


@dataclass(frozen=True)
class KnownClient:
    """An MCP client people connect with, as this server knows it: the redirect URIs it sends (fnmatch patterns,
    which REDIRECT_URI_PATTERNS may name it by), and the metadata documents it signs in with, pinned."""

    key: str  # how REDIRECT_URI_PATTERNS and `server.py connect` name it
    name: str
    callbacks: tuple[str, ...]
    documents: tuple[str, ...] = ()  # client_ids of its documents in PINNED_DOCUMENTS


KNOWN_CLIENTS: tuple[KnownClient, ...] = (
    KnownClient("claude", "Claude (web, desktop, mobile)", (
        "https://claude.ai/api/mcp/auth_callback", "https://claude.com/api/mcp/auth_callback",
        "claude://claude.ai/mcp-auth-callback/sdk"), ("https://claude.ai/oauth/mcp-oauth-client-metadata",)),
    KnownClient("claude-code", "Claude Code", (
        "http://localhost/callback", "http://127.0.0.1/callback", "http://localhost:*/callback",
        "http://127.0.0.1:*/callback"), ("https://claude.ai/oauth/claude-code-client-metadata",)),
    KnownClient("chatgpt", "ChatGPT", (
        "https://chatgpt.com/connector/oauth/*", "https://chatgpt.com/connector_platform_oauth_redirect"),
        ("https://chatgpt.com/oauth/client.json", "https://chatgpt.com/oauth/mcp/client.json")),
    KnownClient("vscode", "VS Code", (
        "https://vscode.dev/redirect", "https://insiders.vscode.dev/redirect", "http://127.0.0.1/",
        "http://127.0.0.1:*/"), ("https://vscode.dev/oauth/client-metadata.json",)),
    KnownClient("cursor", "Cursor", (
        "cursor://anysphere.cursor-mcp/oauth/callback", "cursor://anysphere.cursor-mcp/oauth/return",
        "https://www.cursor.com/agents/mcp/oauth/callback", "https://www.cursor.com/bot/mcp/oauth/callback",
        "http://localhost:*/callback", "http://127.0.0.1:*/callback"), ("https://cursor.com/oauth/mcp-client.json",)),
    KnownClient("gemini", "Gemini (gemini.google.com)", ("https://oauth-redirect.googleusercontent.com/r/*",)),
    KnownClient("gemini-cli", "Gemini CLI", ("http://localhost:*/oauth/callback", "http://127.0.0.1:*/oauth/callback")),
    KnownClient("antigravity", "Antigravity", ("https://antigravity.google/oauth-callback",)),
    KnownClient("grok", "Grok", ("https://grok.com/connectors-oauth-exchange-code/", "grokbot://mcp/oauth/callback")),
    KnownClient("mcp-remote", "mcp-remote (Claude Desktop's bridge)", (
        "http://localhost:*/oauth/callback", "http://127.0.0.1:*/oauth/callback")),
    KnownClient("inspector", "MCP Inspector", ("http://localhost:*/oauth/callback",
                                              "http://localhost:*/oauth/callback/debug")),
)
# Allowed while REDIRECT_URI_PATTERNS is empty, besides any https and loopback URI: the known clients'
# app-scheme callbacks (private-use schemes, RFC 8252 §7.1; PKCE protects them).
KNOWN_APP_CALLBACKS = tuple(callback for client in KNOWN_CLIENTS for callback in client.callbacks
                            if not callback.startswith(("http://", "https://")))

# The metadata documents of the well-known clients, as their vendors publish them (the date each copy was
# seen published; pinned here on 2026-12-06). Used without a fetch, so a blocked or bot-challenged fetch
# from a datacenter never makes these clients unknown; PINNED_CLIENT_DOCUMENTS=false fetches them instead.
PINNED_DOCUMENTS: dict[str, dict[str, Any]] = {
    "https://claude.ai/oauth/mcp-oauth-client-metadata": {  # seen 2026-09-29
        "client_id": "https://claude.ai/oauth/mcp-oauth-client-metadata", "client_name": "Claude",
        "client_uri": "https://claude.ai", "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
        "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:jwt-bearer"],
        "response_types": ["code"], "token_endpoint_auth_method": "none"},
    "https://claude.ai/oauth/claude-code-client-metadata": {  # seen 2026-09-21
        "client_id": "https://claude.ai/oauth/claude-code-client-metadata", "client_name": "Claude Code",
        "client_uri": "https://claude.ai", "redirect_uris": ["http://localhost/callback", "http://127.0.0.1/callback"],
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "token_endpoint_auth_method": "none"},
    "https://chatgpt.com/oauth/client.json": {  # seen 2026-09-08
        "client_id": "https://chatgpt.com/oauth/client.json", "client_uri": "https://chatgpt.com/",
        "redirect_uris": ["https://chatgpt.com/connector_platform_oauth_redirect"],
        "token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_methods_supported": ["none",
                                                                                                    "private_key_jwt"],
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"], "client_name": "ChatGPT",
        "logo_uri": "https://persistent.oaistatic.com/sonic/misc/openai-logo.png",
        "token_endpoint_auth_signing_alg": "RS256", "jwks_uri": "https://chatgpt.com/oauth/jwks.json"},
    "https://chatgpt.com/oauth/mcp/client.json": {  # seen 2026-08-03
        "client_id": "https://chatgpt.com/oauth/mcp/client.json", "client_uri": "https://chatgpt.com/",
        "redirect_uris": ["https://chatgpt.com/connector/oauth/mcp"],
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"], "client_name": "ChatGPT",
        "logo_uri": "https://persistent.oaistatic.com/sonic/misc/openai-logo.png",
        "token_endpoint_auth_signing_alg": "RS256", "jwks_uri": "https://chatgpt.com/oauth/jwks.json"},
    "https://vscode.dev/oauth/client-metadata.json": {  # seen 2026-09-08
        "client_name": "Visual Studio Code", "logo_uri": "https://code.visualstudio.com/assets/branding/code-stable.png",
        "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"], "token_endpoint_auth_method": "none", "application_type": "native",
        "client_id": "https://vscode.dev/oauth/client-metadata.json", "client_uri": "https://vscode.dev/product",
        "redirect_uris": ["http://127.0.0.1:33418/", "https://vscode.dev/redirect"]},
    # Seen October 2026 in a client's test fixture, perhaps trimmed: a redirect URI it lacks sends this server
    # to fetch the published document (see ClientDocuments.client).
    "https://cursor.com/oauth/mcp-client.json": {
        "client_id": "https://cursor.com/oauth/mcp-client.json", "client_name": "Cursor",
        "token_endpoint_auth_method": "none", "redirect_uris": [
            "https://www.cursor.com/agents/mcp/oauth/callback", "https://www.cursor.com/bot/mcp/oauth/callback",
            "https://grok.com/connectors-oauth-exchange-code/", "http://localhost:8787/callback",
            "http://127.0.0.1:8787/callback"]},
}


def known_client(key: str) -> KnownClient | None:
    return next((client for client in KNOWN_CLIENTS if client.key == key), None)


def redirect_patterns(entries: Sequence[str]) -> tuple[str, ...]:
    """REDIRECT_URI_PATTERNS with each client named (claude, chatgpt, cursor, ...) replaced by its callbacks;
    ConfigError for a bare word that names no client."""
    patterns: list[str] = []
    for entry in entries:
        if ":" in entry or "/" in entry or "*" in entry:
            patterns.append(entry)
        elif (client := known_client(entry.lower())) is not None:
            patterns.extend(client.callbacks)
        else:
            names = ", ".join(client.key for client in KNOWN_CLIENTS)
            raise ConfigError(f"REDIRECT_URI_PATTERNS names {entry!r}, which is neither a URL pattern nor a client "
                              f"this server knows ({names})")
    return tuple(dict.fromkeys(patterns))


# --- decisions: pure functions of what was asked and what is allowed


@cache  # a few distinct sets, one per kind of tool
def scopes_to_call(google_needed: frozenset[str]) -> tuple[str, ...]:
    """The scopes a client's token must hold to call a tool that needs these Google scopes."""
    return (REQUIRED_SCOPE, GOOGLE_TOOLS_SCOPE) if acts_with_sign_in_scopes_only(google_needed) else (REQUIRED_SCOPE,)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def canonical_url(url: str) -> str:
    """One spelling per URL: lower-case scheme and host, no default port, no trailing slash."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    port = parts.port
    netloc = host if port in (None, {"http": 80, "https": 443}.get(scheme)) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def redirect_uri_problem(uri: str, patterns: Sequence[str]) -> str | None:
    """Why `uri` may not be a client's redirect URI, or None: https, loopback http or a well-known MCP
    client's app callback, no fragment; with REDIRECT_URI_PATTERNS set, one of them (which may also admit
    an app scheme of your own: private-use schemes are for native apps, RFC 8252 §7.1, and PKCE protects them)."""
    try:
        parts = urlsplit(uri)
        _ = parts.port
    except ValueError:
        return f"{uri!r} is not a valid URI"
    if "#" in uri:
        return f"{uri!r} must not contain a fragment"
    listed = any(fnmatch.fnmatchcase(uri, pattern) for pattern in patterns)
    web = parts.scheme == "https" and bool(parts.hostname)
    loopback = parts.scheme == "http" and is_loopback_host(parts.hostname or "")
    if not (web or loopback):
        app_scheme = parts.scheme not in ("http", "https", "javascript", "data", "file", "")
        if app_scheme and (listed or (not patterns and uri in KNOWN_APP_CALLBACKS)):
            return None
        return (f"{uri!r} must be https://, a loopback http:// URI or a known MCP client's app callback; to allow "
                "it, add it to REDIRECT_URI_PATTERNS")
    if patterns and not listed:
        return f"{uri!r} matches none of REDIRECT_URI_PATTERNS; to allow it, add it (or a pattern) there"
    return None


class RedirectPolicy:
    """Which redirect URIs clients may register, logging each one refused once, with the setting to change."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = redirect_patterns(patterns)
        self._told: set[str] = set()

    def problem(self, uri: str, client: str) -> str | None:
        problem = redirect_uri_problem(uri, self.patterns)
        if problem and uri not in self._told and len(self._told) < REFUSALS_LOGGED_MAX:
            self._told.add(uri)
            logger.warning("refused the redirect URI %r of %s: %s", uri, client, problem)
        return problem


def pick_redirect_uri(registered: Sequence[str], requested: str | None) -> str | None:
    """The redirect URI to use, or None when `requested` is not registered. A loopback URI may differ
    from its registration only in port (RFC 8252 §7.3): native apps listen on whatever port is free."""
    if requested is None:
        return registered[0] if len(registered) == 1 else None
    try:
        wanted = str(AnyUrl(requested))
    except ValidationError:
        return None
    for uri in registered:
        if wanted == uri or same_loopback_redirect(wanted, uri):
            return wanted
    return None


def same_loopback_redirect(requested: str, registered: str) -> bool:
    a, b = urlsplit(requested), urlsplit(registered)
    return (a.scheme == b.scheme == "http" and is_loopback_host(a.hostname or "")
            and (a.hostname or "").lower() == (b.hostname or "").lower()
            and (a.path or "/") == (b.path or "/") and a.query == b.query)


def display_name(client: OAuthClientInformationFull) -> str:
    return (client.client_name or "").strip()[:80] or "An unnamed application"


def is_document_client_id(client_id: str) -> bool:
    return client_id.startswith(("https://", "http://"))


def refusal_reason(email: str, email_verified: bool, hosted_domain: str | None, settings: Settings) -> str | None:
    """Why this person may not sign in, or None. Checked on verified claims, never on URL hints."""
    if not email_verified:
        return f"Google has not verified the address {email or '(none)'}."
    if not settings.allowed_emails and not settings.allowed_domains:
        return None
    if email.lower() in settings.allowed_emails:
        return None
    if hosted_domain and hosted_domain.lower() in settings.allowed_domains:
        return None
    return f"{email} is not among the people allowed to use this server."


def check_authorization_request(params: Mapping[str, Any], redirect_uri: str,
                                resource: str) -> AuthorizationParams | tuple[str, str]:
    """The authorization request as SDK parameters, or the (error, description) to send back."""
    if params.get("response_type") != "code":
        return "unsupported_response_type", "response_type must be code"
    challenge = params.get("code_challenge")
    if not isinstance(challenge, str) or not challenge:
        return "invalid_request", "a PKCE code_challenge is required"
    if not PKCE_CHALLENGE.fullmatch(challenge):
        return "invalid_request", ("a PKCE code_challenge is required: 43 characters of base64url, the S256 "
                                   "hash of the code_verifier (RFC 7636 §4.2)")
    if params.get("code_challenge_method") != "S256":
        return "invalid_request", "code_challenge_method must be S256"
    # Any client may ask for any scope this server has (the scope it registered with is no limit, so it
    # can step up later); the person decides on the consent page.
    requested = str(params.get("scope") or "").split() or list(SCOPES)
    if unknown := [scope for scope in requested if scope not in SCOPES]:
        return "invalid_scope", f"unknown scope {' '.join(unknown)}; this server offers {' '.join(SCOPES)}"
    asked_for = params.get("resource")
    if asked_for is not None and not serves_resource(str(asked_for), resource):
        return "invalid_target", f"this server issues tokens only for {resource}"
    state = params.get("state")
    return AuthorizationParams(state=state if isinstance(state, str) else None, scopes=requested,
                               code_challenge=challenge, redirect_uri=AnyUrl(redirect_uri),
                               redirect_uri_provided_explicitly="redirect_uri" in params, resource=resource)


def resource_of(public_url: str) -> str:
    """The RFC 8707 resource a public URL's MCP endpoint is: the canonical spelling of PUBLIC_URL/mcp."""
    return canonical_url(public_url + MCP_PATH)


def serves_resource(asked_for: str, resource: str) -> bool:
    """Whether a client's RFC 8707 `resource` names this server (a trailing slash or case aside)."""
    try:
        return canonical_url(asked_for) == resource
    except ValueError:
        return False


def authorization_response(redirect_uri: str, *, issuer: str, state: str | None, **params: str) -> str:
    """An answer to an authorization request: `state` back, and `iss` per RFC 9207."""
    return construct_redirect_uri(redirect_uri, **params, state=state, iss=issuer)


def secret_digest(secret: str | None) -> str | None:
    """How a client secret is stored: its SHA-256 (a secret is 256 random bits, so a fast hash is enough)."""
    return SECRET_DIGEST_PREFIX + hashlib.sha256(secret.encode()).hexdigest() if secret else None


def repeated_parameter(params: Any) -> str | None:
    """The first parameter given more than once (RFC 6749 §3.1: none may be), or None."""
    seen: set[str] = set()
    for name, _ in params.multi_items():
        if name in seen:
            return name
        seen.add(name)
    return None


def registration_problem(metadata: Mapping[str, Any]) -> str | None:
    """Why client metadata asks for what this server does not do (RFC 7591 §3.2.2), or None."""
    grant_types = metadata.get("grant_types", ["authorization_code", "refresh_token"])
    response_types = metadata.get("response_types", ["code"])
    if not isinstance(grant_types, list) or not set(grant_types) <= SUPPORTED_GRANT_TYPES:
        return f"grant_types may only be {', '.join(sorted(SUPPORTED_GRANT_TYPES))}"
    if not isinstance(response_types, list) or not set(response_types) <= {"code"}:
        return "response_types may only be code"
    return None


def json_object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """For json.loads: an object, refusing a member given twice (which json.loads would quietly keep last)."""
    names = [name for name, _ in pairs]
    if repeated := next((name for name in names if names.count(name) > 1), None):
        raise ValueError(f"{repeated} is given more than once")
    return dict(pairs)


def consent_key(subject: str, client_id: str) -> str:
    return f"{subject} {client_id}"


# --- what the provider keeps


class RegisteredClient(OAuthClientInformationFull):
    """A client that registered itself (RFC 7591)."""

    kind: ClassVar[str] = "client"


@dataclass(frozen=True)
class RegistrationFingerprint:
    """Which public client registered with this metadata: registering it again gets the same client_id."""

    kind: ClassVar[str] = "client_fingerprint"

    client_id: str


class ClientDocument(OAuthClientInformationFull):
    """A client that describes itself at its https `client_id` (a Client ID Metadata Document), cached. Of the
    ways it offers to authenticate at /token, those this server supports (none; private_key_jwt with keys)."""

    kind: ClassVar[str] = "cimd"
    auth_methods: list[str] = Field(default_factory=lambda: ["none"])


@dataclass(frozen=True)
class PendingAuthorization:
    """One authorization in progress: what the client asked for, and how far it has got."""

    kind: ClassVar[str] = "txn"

    id: str
    client_id: str
    client_name: str
    redirect_uri: str
    redirect_uri_explicit: bool
    state: str | None
    code_challenge: str
    scopes: tuple[str, ...]
    resource: str
    csrf: str
    consented: bool = False
    remembered_for: str | None = None  # whose remembered approval skipped the consent page
    google_consent_asked: bool = False  # sent back to Google for a refresh token (see send_to_google)
    identity: GoogleIdentity | None = None  # the verified person, once back from Google
    purpose: Literal["authorize", "account"] = "authorize"  # "account": a person opening /account
    issuer: str = ""  # this server as the client knows it (PUBLIC_URL, or the loopback name it used)

    @property
    def client_domain(self) -> str | None:
        """The domain that vouches for a metadata-document client."""
        return urlsplit(self.client_id).hostname if is_document_client_id(self.client_id) else None

    @property
    def redirect_host(self) -> str:
        parts = urlsplit(self.redirect_uri)
        return parts.netloc or f"{parts.scheme}:"


@dataclass(frozen=True)
class GoogleSignIn:
    """An authorization while the person is at Google, with what checks Google's answer."""

    kind: ClassVar[str] = "login"

    pending: PendingAuthorization
    nonce: str
    verifier: str


class GrantCode(AuthorizationCode):
    """An authorization code: what the SDK checks at /token, and what the grant will be."""

    kind: ClassVar[str] = "code"
    grant_id: str
    claims: dict[str, Any]


class ClaimedCode(GrantCode):
    """A code being exchanged: claimed, so that it is never accepted again, whatever happens next."""

    kind: ClassVar[str] = "claimed_code"


@dataclass(frozen=True)
class UsedCode:
    """A code already exchanged, remembered while it would live, to spot a replay."""

    kind: ClassVar[str] = "used_code"

    grant_id: str


@dataclass(frozen=True)
class Grant:
    """One person's permission for one client: every token belongs to one, and ends with it."""

    kind: ClassVar[str] = "grant"

    id: str
    client_id: str
    client_name: str
    subject: str
    scopes: tuple[str, ...]
    resource: str
    claims: dict[str, Any]
    created_at: float
    last_used_at: float | None = None

    def entry(self, ttl_s: float) -> Entry:
        return Entry(self.id, self, ttl_s=ttl_s, owner=self.subject, group=self.id, order=self.created_at)


@dataclass(frozen=True)
class IssuedAccessToken:
    """An access token, stored under its hash."""

    kind: ClassVar[str] = "access"

    client_id: str
    subject: str
    scopes: tuple[str, ...]
    resource: str
    claims: dict[str, Any]
    grant_id: str
    expires_at: int
    used: bool = False  # the access token was presented: the client has this pair
    refresh: str | None = None  # the hash of the refresh token issued with it


@dataclass(frozen=True)
class IssuedRefreshToken(IssuedAccessToken):
    """A refresh token, stored under its hash: what the access tokens it buys carry, and where it stands
    in its rotation (it rotates on every use)."""

    kind: ClassVar[str] = "refresh"

    status: Literal["active", "rotated", "retired"] = "active"  # retired: replaced before it was ever used
    rotated_at: float | None = None
    successor: str | None = None  # the hash of the refresh token that replaced it
    access: str | None = None  # the hash of the access token issued with it


@dataclass(frozen=True)
class GooglePermission:
    """One Google scope a person has granted this server, as /account shows it."""

    scope: str
    label: str
    used_by: tuple[str, ...]  # the tools that need it
    for_sign_in: bool


@dataclass(frozen=True)
class Consent:
    """The scopes a person has approved for a client, so the consent page need not ask again."""

    kind: ClassVar[str] = "consent"

    scopes: tuple[str, ...]


class IssuedTokens(NamedTuple):
    """A fresh pair for a client, the records that make it valid, and the refresh token's key."""

    token: OAuthToken
    entries: list[Entry]
    refresh_key: str


class GrantAccessToken(AccessToken):
    grant_id: str


class GrantRefreshToken(RefreshToken):
    grant_id: str
    claims: dict[str, Any]


@dataclass(frozen=True)
class RefreshAnswer:
    """The pair a refresh token was answered with, kept for the race window and sealed with that token
    itself: the same token presented again meanwhile gets the same answer, and the store never holds a
    token it could hand out (only whoever presents the old token can open it)."""

    kind: ClassVar[str] = "refresh_answer"

    sealed: str


def answer_key(refresh_token: str) -> AESGCM:
    return AESGCM(HKDF(algorithm=SHA256(), length=32, salt=None, info=b"stream-http/refresh-answer").derive(
        refresh_token.encode()))


def answer_entry(key: str, refresh_token: str, answer: OAuthToken) -> Entry:
    nonce = os.urandom(12)
    sealed = nonce + answer_key(refresh_token).encrypt(nonce, answer.model_dump_json().encode(), key.encode())
    return Entry(key, RefreshAnswer(base64.urlsafe_b64encode(sealed).decode()), ttl_s=REFRESH_RACE_GRACE_S)


def open_answer(refresh_token: str, record: RefreshAnswer) -> OAuthToken | None:
    raw = base64.urlsafe_b64decode(record.sealed)
    try:
        opened = answer_key(refresh_token).decrypt(raw[:12], raw[12:], token_hash(refresh_token).encode())
    except InvalidTag:
        return None
    return OAuthToken.model_validate_json(opened)


def within_race_window(record: IssuedRefreshToken) -> bool:
    """Whether a rotated refresh token was rotated so recently that using it again is a duplicate request,
    not a retry after a lost answer, nor theft."""
    return record.status != "active" and time.time() - (record.rotated_at or 0) <= REFRESH_RACE_GRACE_S


@dataclass(frozen=True)
class LoginOutcome:
    """Where the browser goes after Google: `redirect`, plus a page to show when the person was refused."""

    redirect: str
    identity: GoogleIdentity | None = None
    refused: str | None = None
    status: int = 403  # of the page shown when refused
    retry_after_s: float | None = None  # when the refusal ends by itself (a used-up budget)


@dataclass(frozen=True)
class ConnectedApp:
    """One application a person has allowed, as /account shows it."""

    grant_id: str
    name: str
    vouched_by: str | None
    redirect_host: str
    scopes: tuple[str, ...]
    authorised_at: float
    last_used_at: float


class SignInFailed(Exception):
    """A sign-in step that cannot continue and cannot safely send the browser back to the client."""


class ClientDocumentError(Exception):
    """A Client ID Metadata Document that cannot be used."""


class ClientDocuments:
    """Client ID Metadata Documents: a client whose id is an https URL describes itself at that URL.
    Fetched without following redirects, size- and time-limited, from public addresses only (the
    address checked is the one connected to, so DNS cannot be switched between check and fetch),
    validated, and cached."""

    def __init__(self, settings: Settings, store: Store, http: httpx2.AsyncClient, redirects: RedirectPolicy) -> None:
        self.settings = settings
        self.store = store
        self.http = http
        self.redirects = redirects

    async def client(self, url: str, *, redirect_uri: str | None = None) -> ClientDocument:
        """The client at `url`: its pinned document (no fetch), else the one published there. A pinned document
        that does not list `redirect_uri` gives way to the published one, when that can be had: vendors add
        callbacks."""
        pinned = PINNED_DOCUMENTS.get(url) if self.settings.pinned_client_documents else None
        if pinned is None or await self.store.get(ClientDocument, url) is not None:
            return await self.published(url)  # once fetched (a callback the pin lacked), the same for every step
        client = self.validate(url, pinned)
        if redirect_uri is None or pick_redirect_uri([str(uri) for uri in client.redirect_uris or []], redirect_uri):
            return client
        with suppress(ClientDocumentError):
            return await self.published(url)
        return client

    async def published(self, url: str) -> ClientDocument:
        cached = await self.store.get(ClientDocument, url)
        if cached is not None:
            return cached
        client = self.validate(url, await self.fetch(url))
        await self.store.put(Entry(url, client, ttl_s=CLIENT_DOCUMENT_TTL_S))
        return client

    def url_problem(self, url: str) -> str | None:
        parts = urlsplit(url)
        schemes = ("https", "http") if self.settings.cimd_allow_local else ("https",)
        if parts.scheme not in schemes or not parts.hostname:
            return "a client_id URL must be https://"
        if parts.fragment or parts.username or parts.password:
            return "a client_id URL must not carry a fragment or credentials"
        if parts.path in ("", "/") or any(segment in (".", "..") for segment in parts.path.split("/")):
            return "a client_id URL needs a path without . or .. segments"
        return None

    async def fetch(self, url: str) -> dict[str, Any]:
        if problem := self.url_problem(url):
            raise ClientDocumentError(problem)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await self.public_address(parts.hostname or "", port)
        target = urlunsplit((parts.scheme, f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                             parts.path, parts.query, ""))
        try:
            async with self.http.stream("GET", target, headers={"Host": parts.netloc, "Accept": "application/json"},
                                        extensions={"sni_hostname": parts.hostname},
                                        timeout=CLIENT_DOCUMENT_TIMEOUT_S, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise ClientDocumentError(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > CLIENT_DOCUMENT_MAX_BYTES:
                        raise ClientDocumentError(f"{url} is larger than {CLIENT_DOCUMENT_MAX_BYTES} bytes")
        except httpx2.HTTPError as exc:
            raise ClientDocumentError(f"{url} could not be fetched: {exc}") from exc
        try:
            document = parse_json(body)
        except ValueError as exc:
            raise ClientDocumentError(f"{url} is not JSON") from exc
        if not isinstance(document, dict):
            raise ClientDocumentError(f"{url} is not a JSON object")
        return document

    async def public_address(self, host: str, port: int) -> str:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ClientDocumentError(f"{host} does not resolve: {exc}") from exc
        addresses = sorted({str(info[4][0]) for info in infos})
        if not self.settings.cimd_allow_local and not all(ipaddress.ip_address(a).is_global for a in addresses):
            raise ClientDocumentError(f"{host} resolves to a private, loopback or reserved address")
        return addresses[0]

    def validate(self, url: str, document: dict[str, Any]) -> ClientDocument:
        if document.get("client_id") != url:
            raise ClientDocumentError("the document's client_id must be its own URL")
        methods = auth_methods_offered(document)
        if not methods:
            raise ClientDocumentError("the document offers no client authentication this server supports: none, or "
                                      "private_key_jwt with jwks or jwks_uri")
        uris = document.get("redirect_uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(uri, str) for uri in uris):
            raise ClientDocumentError("the document needs a list of redirect_uris")
        for uri in uris:
            if problem := self.redirects.problem(uri, f"the metadata document {url}"):
                raise ClientDocumentError(problem)
        try:
            return ClientDocument.model_validate({
                **{key: document[key] for key in ("client_name", "client_uri", "logo_uri", "response_types", "scope",
                                                  "jwks", "jwks_uri") if key in document},
                # Grants it lists that this server does not offer (Claude's jwt-bearer) are no reason to refuse it.
                "grant_types": [grant for grant in document.get("grant_types") or sorted(SUPPORTED_GRANT_TYPES)
                                if grant in SUPPORTED_GRANT_TYPES] or ["authorization_code"],
                "client_id": url, "redirect_uris": uris, "auth_methods": methods,
                "token_endpoint_auth_method": "none" if "none" in methods else "private_key_jwt",
            })
        except ValidationError as exc:
            raise ClientDocumentError(f"the document is not valid client metadata: {exc.error_count()} problem(s)"
                                      ) from exc


@dataclass(frozen=True)
class ClientKeys:
    """A client's public keys, fetched from its document's jwks_uri (cached; fetched again for a key id not seen)."""

    kind: ClassVar[str] = "client_keys"

    jwks: dict[str, Any]


class ClientAssertionError(Exception):
    """A client assertion (RFC 7523) that does not prove who sent it."""


class ClientAssertions:
    """private_key_jwt (RFC 7523 §2.2, §3): a metadata-document client authenticates at /token with a JWT it
    signed: checked against the keys of its document (jwks, or jwks_uri fetched as documents are), with
    `iss` and `sub` its client_id, `aud` this server (its issuer or the endpoint called), an `exp` no more
    than ASSERTION_MAX_LIFETIME_S ahead, and a `jti` accepted once (counted in the store, on every replica).
    joserfc, Authlib's JOSE library, checks the signature."""

    def __init__(self, documents: ClientDocuments, store: Store) -> None:
        self.documents = documents
        self.store = store

    async def verify(self, client: ClientDocument, assertion: str, audiences: Sequence[str]) -> None:
        from joserfc import jwt
        from joserfc.errors import JoseError

        try:
            token = jwt.decode(assertion, await self.keys(client, assertion), algorithms=list(ASSERTION_ALGORITHMS))
        except (JoseError, ValueError, TypeError) as exc:
            raise ClientAssertionError(f"the client_assertion does not verify ({type(exc).__name__})") from None
        await self.check_claims(client.client_id, token.claims, audiences)

    async def check_claims(self, client_id: str, claims: Mapping[str, Any], audiences: Sequence[str]) -> None:
        now, expires = time.time(), claims.get("exp")
        audience = claims.get("aud")
        named = [name for name in (audience if isinstance(audience, list) else [audience]) if isinstance(name, str)]
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise ClientAssertionError("the client_assertion's iss and sub must both be the client_id")
        if not set(named) & set(audiences):
            raise ClientAssertionError(f"the client_assertion's aud must name this server ({audiences[0]})")
        if not isinstance(expires, int | float) or not now < expires <= now + ASSERTION_MAX_LIFETIME_S:
            raise ClientAssertionError(f"the client_assertion must expire within {ASSERTION_MAX_LIFETIME_S} s")
        if isinstance(claims.get("iat"), int | float) and claims["iat"] > now + 60:
            raise ClientAssertionError("the client_assertion was issued in the future")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise ClientAssertionError("the client_assertion needs a jti")
        uses, _ = await self.store.hit(f"jti {client_id} {jti}", max(1.0, expires - now + 60))
        if uses > 1:
            raise ClientAssertionError("this client_assertion was used before (its jti)")

    async def keys(self, client: ClientDocument, assertion: str) -> Any:
        from joserfc.jws import extract_compact

        kid = extract_compact(assertion.encode()).protected.get("kid")
        if client.jwks:
            return public_key_set(client.jwks)
        if client.jwks_uri is None:
            raise ClientAssertionError("the client's document names no keys")
        url = str(client.jwks_uri)
        kept = await self.store.get(ClientKeys, url)
        unknown_kid = kept is not None and kid and kid not in key_ids(kept.jwks)
        if unknown_kid and (await self.store.hit(f"jwks-fetch {url}", 60))[0] > 1:
            unknown_kid = False  # fetched again less than a minute ago: a kid unknown still is refused
        if kept is None or unknown_kid:
            try:
                kept = ClientKeys(await self.documents.fetch(url))
            except ClientDocumentError as exc:
                raise ClientAssertionError(f"the client's keys cannot be had: {exc}") from None
            public_key_set(kept.jwks)  # a malformed set is refused before it is kept
            await self.store.put(Entry(url, kept, ttl_s=CLIENT_KEYS_TTL_S))
        return public_key_set(kept.jwks)


def public_key_set(jwks: Any) -> Any:
    """A client's JWK Set (RFC 7517 §5) as joserfc keys, its public keys only: a symmetric key there could
    be read by anyone, so it proves nothing. ClientAssertionError for a set that is not one."""
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise ClientAssertionError("the client's keys are not a JWK Set")
    try:
        return KeySet.import_key_set({"keys": [key for key in keys if key.get("kty") in ("RSA", "EC", "OKP")]})
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise ClientAssertionError(f"the client's keys cannot be read ({type(exc).__name__})") from None


def assertion_subject(assertion: str) -> str:
    """The client an assertion says it is from (its `sub`, unverified: the client_id a request without one names)."""
    from joserfc.errors import JoseError
    from joserfc.jws import extract_compact

    try:
        claims = parse_json(extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError, TypeError):
        return ""
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else ""


def auth_methods_offered(document: Mapping[str, Any]) -> list[str]:
    """The ways to authenticate at /token a metadata document offers that this server supports: its
    token_endpoint_auth_method, and the list some put in token_endpoint_auth_methods_supported (ChatGPT's:
    none and private_key_jwt, RFC 7591 "metadata choices"); private_key_jwt only with keys to check it by."""
    offered = [document.get("token_endpoint_auth_method") or "none"]
    if isinstance(choices := document.get("token_endpoint_auth_methods_supported"), list):
        offered += [choice for choice in choices if isinstance(choice, str)]
    with_keys = bool(document.get("jwks") or document.get("jwks_uri"))
    return [method for method in dict.fromkeys(offered)
            if method == "none" or (method == PRIVATE_KEY_JWT and with_keys)]


class VerifiedTokens:
    """Access tokens this process has found valid in the store, so that the next request with the same
    token reads nothing. Revocation stays immediate: a grant that ends anywhere is published to every
    process (`OAuthProvider.end_grant`) and dropped here when heard, and the revoking request waits for
    every replica to confirm it. While this process does not hear the others (before its subscription
    starts, or after it broke) it trusts nothing kept and reads every token from the store. A token read
    while a grant ended is not kept (`epoch`), and none is kept longer than VERIFIED_TOKEN_MAX_AGE_S."""

    def __init__(self, *, shared: bool) -> None:
        # By the token itself (held in memory anyway, by the requests that carry it): a hit hashes nothing.
        self.tokens: dict[str, tuple[GrantAccessToken, float]] = {}  # the token, and until when it is kept
        self.epoch = 0  # counts the grant ends (and losses of the feed) heard
        self.trusted = False
        self.shared = shared  # other processes share the store: whether this one hears them is worth a log line

    def get(self, token: str) -> GrantAccessToken | None:
        kept = self.tokens.get(token) if self.trusted else None
        if kept is None:
            return None
        verified, until = kept
        if until <= time.time():
            del self.tokens[token]
            return None
        return verified

    def keep(self, verified: GrantAccessToken, read_in_epoch: int) -> None:
        if not self.trusted or read_in_epoch != self.epoch:
            return  # a grant ended while the token was read: it may be that one
        if len(self.tokens) >= VERIFIED_TOKENS_MAX:
            self.tokens.pop(next(iter(self.tokens)))
        until = min(float(verified.expires_at or 0), time.time() + VERIFIED_TOKEN_MAX_AGE_S)
        self.tokens[verified.token] = verified, until

    def forget_grant(self, grant_id: str) -> None:
        self.epoch += 1
        for key in [key for key, (token, _) in self.tokens.items() if token.grant_id == grant_id]:
            del self.tokens[key]

    def hear(self, message: Mapping[str, Any]) -> None:
        """One message of the store's feed: a grant that ended, or whether the feed is heard at all."""
        if isinstance(grant_id := message.get("ended_grant"), str):
            self.forget_grant(grant_id)
        elif message is FEED_LISTENING:
            self.trusted = True
            if self.shared:
                logger.info("hearing other replicas' revocations: verified tokens are kept in memory")
        elif message is FEED_LOST:
            self.trusted, self.epoch = False, self.epoch + 1
            self.tokens.clear()
            logger.warning("stopped hearing other replicas' revocations: every token is read from the store "
                           "until the subscription is back")


def build_provider(settings: Settings, store: Store, http: httpx2.AsyncClient,
                   limits: RateLimits) -> "OAuthProvider":
    if settings.secret_key is None:
        raise ConfigError("sign-in needs a SECRET_KEY: set it, or pass the settings through with_secret_key()")
    google = GoogleGrants(GoogleLogin(settings, http), store, TokenCipher(settings.secret_key))
    redirects = RedirectPolicy(settings.redirect_uri_patterns)
    clients = Clients(store, ClientDocuments(settings, store, http, redirects), redirects)
    grants = Grants(settings, store, google)
    return OAuthProvider(settings, clients, SignIns(settings, store, google, limits), grants, google, limits,
                         SecurityEvents(settings, store, http))


# --- clients: who may ask, by registration (RFC 7591) or metadata document


class Clients:
    """The MCP clients this server knows: those that registered, and those that describe themselves in a
    metadata document at their https client_id."""

    def __init__(self, store: Store, documents: ClientDocuments, redirects: RedirectPolicy) -> None:
        self.store = store
        self.documents = documents
        self.redirects = redirects
        self.assertions = ClientAssertions(documents, store)

    async def find(self, client_id: str, *, redirect_uri: str | None = None) -> OAuthClientInformationFull | None:
        """The client with this id, from its registration or its metadata document (which raises
        ClientDocumentError when it cannot be used; `redirect_uri`: the one it asks to return to)."""
        if is_document_client_id(client_id):
            return await self.documents.client(client_id, redirect_uri=redirect_uri)
        return await self.store.get(RegisteredClient, client_id)

    async def get(self, client_id: str) -> OAuthClientInformationFull | None:
        try:
            return await self.find(client_id)
        except ClientDocumentError as exc:
            logger.info("client metadata document %s refused: %s", client_id, exc)
            return None

    async def register(self, client_info: OAuthClientInformationFull) -> None:
        for uri in client_info.redirect_uris or []:
            if problem := self.redirects.problem(str(uri), f"the client registering as {client_info.client_name!r}"):
                raise RegistrationError("invalid_redirect_uri", problem)
        registered = RegisteredClient.model_validate({**client_info.model_dump(),
                                                      "client_secret": secret_digest(client_info.client_secret)})
        await self.store.put(Entry(client_info.client_id, registered))
        audit("client_registered", client_id=client_info.client_id, client_name=client_info.client_name,
              redirect_uris=[str(uri) for uri in client_info.redirect_uris or []])

    async def secret_matches(self, client: OAuthClientInformationFull, presented: str) -> bool:
        """Whether `presented` is the client's secret, compared by hash in constant time. A registration
        from before secrets were hashed holds it in clear: it is compared so, and then stored hashed."""
        stored = client.client_secret or ""
        if stored.startswith(SECRET_DIGEST_PREFIX):
            return hmac.compare_digest(stored.encode(), (secret_digest(presented) or "").encode())
        if not hmac.compare_digest(stored.encode(), presented.encode()):
            return False
        if isinstance(client, RegisteredClient):
            hashed = client.model_copy(update={"client_secret": secret_digest(presented)})
            await self.store.put(Entry(client.client_id, hashed))
            logger.info("stored the secret of client %s hashed, as every secret now is", client.client_id)
        return True

    async def registered_alike(self, fingerprint: str) -> OAuthClientInformationFull | None:
        """The public client registered before with the very same metadata, if it is still known."""
        earlier = await self.store.get(RegistrationFingerprint, fingerprint)
        return await self.store.get(RegisteredClient, earlier.client_id) if earlier else None

    async def remember_registration(self, fingerprint: str, client_id: str) -> None:
        await self.store.put(Entry(fingerprint, RegistrationFingerprint(client_id)))


# --- sign-ins: /authorize, the consent page, Google, and back to the client with a code


class SignIns:
    """The authorization in progress: where the browser goes at each step, and the code at the end."""

    def __init__(self, settings: Settings, store: Store, google: GoogleGrants, limits: RateLimits) -> None:
        self.settings = settings
        self.store = store
        self.google = google
        self.limits = limits

    async def start(self, client: OAuthClientInformationFull, params: AuthorizationParams,
                                  signed_in: Mapping[str, str] | None, issuer: str | None = None) -> str:
        """Start an authorization and return where the browser goes next: the consent page, or
        straight to Google when the person signed in here has already approved this client."""
        issuer = issuer or self.settings.issuer
        pending = PendingAuthorization(
            id=new_id(), client_id=client.client_id, client_name=display_name(client),
            redirect_uri=str(params.redirect_uri), redirect_uri_explicit=params.redirect_uri_provided_explicitly,
            state=params.state, code_challenge=params.code_challenge, scopes=tuple(params.scopes or ()),
            resource=resource_of(issuer), csrf=new_id(), issuer=issuer)
        subject = (signed_in or {}).get("sub")
        if subject and await self.remembers_consent(subject, client.client_id, pending.scopes):
            remembered = dataclasses.replace(pending, consented=True, remembered_for=subject)
            return await self.send_to_google(remembered, login_hint=(signed_in or {}).get("email"))
        await self.store.put(Entry(pending.id, pending, ttl_s=TRANSACTION_TTL_S))
        return self.consent_url(pending)

    def consent_url(self, pending: PendingAuthorization) -> str:
        return f"{pending.issuer or self.settings.public_url}/consent?{urlencode({'txn': pending.id})}"

    async def pending_consent(self, txn_id: str) -> PendingAuthorization | None:
        return await self.store.get(PendingAuthorization, txn_id)

    async def answer_consent(self, txn_id: str, csrf: str, approve: bool) -> str:
        """Apply the answer given on the consent page and return where the browser goes next."""
        pending = await self.pending_consent(txn_id)
        if pending is None or not hmac.compare_digest(pending.csrf, csrf):
            raise SignInFailed("This consent page has expired or was already answered. Start again from your app.")
        if await self.store.take(PendingAuthorization, txn_id) is None:
            raise SignInFailed("This consent page was already answered.")
        fields = {"client_id": pending.client_id, "scopes": pending.scopes}
        if not approve:
            audit("consent_denied", **fields)
            return self.back_to_client(pending, error="access_denied", error_description="The request was denied")
        audit("consent_given", subject=pending.identity and pending.identity.subject, **fields)
        approved = dataclasses.replace(pending, consented=True)
        return await self.issue_code(approved) if approved.identity else await self.send_to_google(approved)

    async def send_to_google(self, pending: PendingAuthorization, login_hint: str | None = None) -> str:
        """Google's sign-in page for this authorization. Google is made to ask for consent (and so to issue a
        refresh token) only on a second trip, when the first gave none and this server holds none for the
        person: it keeps at most 100 live refresh tokens per person and client, silently revoking the
        oldest, so a sign-in that minted one every time would end older ones that are still in use."""
        state = new_id()
        ask_consent = pending.google_consent_asked
        try:
            url, nonce, verifier = await self.google.login.authorization_url(state, login_hint=login_hint,
                                                                             ask_consent=ask_consent)
        except GoogleError as exc:
            logger.error("cannot start a Google sign-in: %s", exc)
            return self.back_to_client(pending, error="temporarily_unavailable",
                                       error_description="Google sign-in is unavailable right now")
        await self.store.put(Entry(state, GoogleSignIn(pending, nonce, verifier), ttl_s=TRANSACTION_TTL_S))
        return url

    async def return_from_google(self, state: str, code: str | None, error: str | None) -> LoginOutcome:
        """Google sent the browser back: verify who signed in, apply the access policy, and continue."""
        at_google = await self.store.take(GoogleSignIn, state) if state else None
        if at_google is None:
            raise SignInFailed("This sign-in has expired or was already completed. Start again from your app.")
        pending = at_google.pending
        if error or not code:
            audit("sign_in_refused", client_id=pending.client_id, reason=f"Google answered {error or 'no code'}",
                  cause="cancelled")
            return LoginOutcome(self.refusal_target(pending, error="access_denied",
                                                    error_description="Sign-in with Google was cancelled"),
                                refused="Sign-in with Google was cancelled or refused.")
        try:
            identity, google_tokens = await self.google.login.finish(code, nonce=at_google.nonce,
                                                                     verifier=at_google.verifier)
        except GoogleError as exc:
            audit("sign_in_refused", client_id=pending.client_id, reason=str(exc), cause="google_failed")
            return LoginOutcome(self.refusal_target(pending, error="server_error",
                                                    error_description="Google sign-in failed"),
                                refused=f"Sign-in with Google failed: {exc}")
        return await self.admit(pending, identity, google_tokens)

    async def admit(self, pending: PendingAuthorization, identity: GoogleIdentity,
                    google_tokens: Mapping[str, Any]) -> LoginOutcome:
        """Apply the access policy to the person Google vouched for, then continue where they were going."""
        who = {"subject": identity.subject, "email": identity.email, "client_id": pending.client_id}
        reason = refusal_reason(identity.email, identity.email_verified, identity.hosted_domain, self.settings)
        if reason:
            audit("sign_in_refused", reason=reason, cause="not_allowed" if identity.email_verified else
                  "unverified_email", **who)
            return LoginOutcome(self.refusal_target(pending, error="access_denied", error_description=reason),
                                identity=identity, refused=reason)
        if await self.needs_google_consent(pending, identity, google_tokens):
            again = dataclasses.replace(pending, google_consent_asked=True)
            return LoginOutcome(await self.send_to_google(again, login_hint=identity.email), identity=identity)
        if over := await self.over_sign_in_budget(pending, identity):
            return over
        audit("sign_in_allowed", **who)
        await self.google.save(identity.subject, google_tokens)
        if pending.purpose == "account":
            return LoginOutcome(pending.redirect_uri, identity=identity)
        known = dataclasses.replace(pending, identity=identity)
        if not known.consented or (known.remembered_for and known.remembered_for != identity.subject):
            # An approval belongs to a person: ask the one who actually signed in.
            known = dataclasses.replace(known, consented=False, remembered_for=None, csrf=new_id())
            await self.store.put(Entry(known.id, known, ttl_s=TRANSACTION_TTL_S))
            return LoginOutcome(self.consent_url(known), identity=identity)
        return LoginOutcome(await self.issue_code(known), identity=identity)

    async def needs_google_consent(self, pending: PendingAuthorization, identity: GoogleIdentity,
                                   google_tokens: Mapping[str, Any]) -> bool:
        """Whether to send the person back to Google to consent: Google gave no refresh token (it gives one
        only with consent) and this server holds none for them."""
        return pending.purpose == "authorize" and not pending.google_consent_asked and \
            not google_tokens.get("refresh_token") and not await self.google.holds_refresh_token(identity.subject)

    async def over_sign_in_budget(self, pending: PendingAuthorization, identity: GoogleIdentity) -> LoginOutcome | None:
        """A refusal (429) when this person has signed in too often this hour, else None."""
        wait = await self.limits.spend(f"person:{identity.subject}", self.settings.rate_limit_person, 3600)
        if wait is None:
            return None
        audit("rate_limited", budget="person", subject=identity.subject, client_id=pending.client_id)
        message = f"Too many sign-ins for {identity.email} this hour; try again in {int(wait) // 60 + 1} minutes."
        return LoginOutcome(self.refusal_target(pending, error="temporarily_unavailable", error_description=message),
                            identity=identity, refused=message, status=429, retry_after_s=wait)

    async def issue_code(self, pending: PendingAuthorization) -> str:
        """Issue the authorization code and send the browser back to the client with it."""
        if pending.identity is None:
            raise SignInFailed("This sign-in lost track of who signed in. Start again from your app.")
        subject = pending.identity.subject
        code, grant_id = secrets.token_urlsafe(32), new_id()
        record = GrantCode(
            code="", scopes=list(pending.scopes), expires_at=time.time() + AUTH_CODE_TTL_S,
            client_id=pending.client_id, code_challenge=pending.code_challenge,
            redirect_uri=AnyUrl(pending.redirect_uri), redirect_uri_provided_explicitly=pending.redirect_uri_explicit,
            resource=pending.resource,
            subject=subject, grant_id=grant_id, claims=pending.identity.claims())
        approved = sorted(set(pending.scopes) | set(await self.approved_scopes(subject, pending.client_id)))
        await self.store.put(Entry(token_hash(code), record, ttl_s=AUTH_CODE_TTL_S, group=grant_id),
                             Entry(consent_key(subject, pending.client_id), Consent(tuple(approved)), owner=subject))
        return self.back_to_client(pending, code=code)

    def refusal_target(self, pending: PendingAuthorization, **params: str) -> str:
        """Where a refused sign-in continues: back to the client, or nowhere for /account."""
        return self.back_to_client(pending, **params) if pending.purpose == "authorize" else ""

    def back_to_client(self, pending: PendingAuthorization, **params: str) -> str:
        issuer = pending.issuer or self.settings.issuer
        return authorization_response(pending.redirect_uri, issuer=issuer, state=pending.state, **params)

    async def approved_scopes(self, subject: str, client_id: str) -> list[str]:
        consent = await self.store.get(Consent, consent_key(subject, client_id))
        return list(consent.scopes) if consent else []

    async def remembers_consent(self, subject: str, client_id: str, scopes: Sequence[str]) -> bool:
        approved = await self.approved_scopes(subject, client_id)
        return bool(approved) and set(scopes) <= set(approved)

    async def start_account_sign_in(self, login_hint: str | None) -> str:
        """The Google URL that signs a person in to /account (the same access policy, no client)."""
        pending = PendingAuthorization(
            id=new_id(), client_id="", client_name="", redirect_uri=f"{self.settings.public_url}/account",
            redirect_uri_explicit=False, state=None, code_challenge="", scopes=(),
            resource=resource_of(self.settings.public_url), csrf=new_id(), consented=True, purpose="account")
        return await self.send_to_google(pending, login_hint=login_hint)


# --- grants: codes, tokens, their rotation and revocation


class Grants:
    """What signed-in clients hold: authorization codes, and access and refresh tokens, each belonging to a
    grant (one person, one client) that ends as a whole."""

    def __init__(self, settings: Settings, store: Store, google: GoogleGrants) -> None:
        self.settings = settings
        self.store = store
        self.google = google
        self.resource = resource_of(settings.public_url)
        self.verified = VerifiedTokens(shared=store.shared)


    async def load_authorization_code(self, client: OAuthClientInformationFull,
                                      authorization_code: str) -> GrantCode | None:
        """Claim the code: whatever the SDK then finds (wrong client, redirect URI or PKCE verifier),
        it is never accepted again. Of two requests racing with one code, only one claims it."""
        key = token_hash(authorization_code)
        record = await self.store.take(GrantCode, key)
        if record is None:
            used = await self.store.get(UsedCode, key)
            if used is not None:  # RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for
                audit("code_replayed", client_id=client.client_id, grant_id=used.grant_id)
                await self.revoke_grant(used.grant_id, reason="authorization code replayed")
            return None
        claimed = ClaimedCode.model_validate({**record.model_dump(), "code": authorization_code})
        await self.store.put(Entry(key, claimed.model_copy(update={"code": ""}), ttl_s=AUTH_CODE_TTL_S,
                                   group=record.grant_id))
        return claimed

    async def exchange_authorization_code(self, client: OAuthClientInformationFull,
                                          authorization_code: GrantCode) -> OAuthToken:
        """Turn the claimed code into a grant and its tokens, all saved in one step."""
        grant = Grant(id=authorization_code.grant_id, client_id=client.client_id, client_name=display_name(client),
                      subject=authorization_code.subject or "", scopes=tuple(authorization_code.scopes),
                      resource=authorization_code.resource or self.resource, claims=authorization_code.claims,
                      created_at=time.time())
        issued = self.issue_tokens(grant, authorization_code.scopes)
        key = token_hash(authorization_code.code)
        taken = await self.store.take(ClaimedCode, key, then=[
            Entry(key, UsedCode(grant.id), ttl_s=AUTH_CODE_TTL_S, group=grant.id),
            grant.entry(self.settings.refresh_token_ttl_s), *issued.entries])
        if taken is None:
            raise TokenError("invalid_grant", "this authorization code was already used")
        audit("token_issued", client_id=client.client_id, subject=grant.subject, grant_id=grant.id,
              scopes=authorization_code.scopes)
        await self.supersede_narrower(grant)
        return issued.token

    async def supersede_narrower(self, grant: Grant) -> None:
        """A step-up widens what a client holds rather than adding to it: the person's earlier grants to the
        same client whose scopes the new one covers and exceeds end, so one grant per person and client
        remains (the consent page showed the wider scopes). A sign-in with the same scopes ends nothing: a
        client_id may be shared by installations on several machines (a metadata document's always is)."""
        for earlier in await self.store.find(Grant, grant.subject):
            if earlier.client_id == grant.client_id and set(earlier.scopes) < set(grant.scopes):
                await self.revoke_grant(earlier.id, reason="widened by a step-up")

    def issue_tokens(self, grant: Grant, scopes: Sequence[str]) -> IssuedTokens:
        """A fresh access and refresh token for `grant`, and the records that make them valid."""
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now, settings = time.time(), self.settings
        access_record = IssuedAccessToken(
            client_id=grant.client_id, subject=grant.subject, scopes=tuple(scopes), resource=grant.resource,
            claims=grant.claims, grant_id=grant.id, expires_at=int(now + settings.access_token_ttl_s),
            refresh=token_hash(refresh))
        refresh_record = IssuedRefreshToken(**{**dataclasses.asdict(access_record), "access": token_hash(access),
                                               "expires_at": int(now + settings.refresh_token_ttl_s)})
        entries = [
            Entry(token_hash(access), access_record, ttl_s=settings.access_token_ttl_s, group=grant.id),
            Entry(token_hash(refresh), refresh_record, ttl_s=settings.refresh_token_ttl_s, group=grant.id),
        ]
        token = OAuthToken(access_token=access, expires_in=settings.access_token_ttl_s, scope=" ".join(scopes),
                           refresh_token=refresh)
        return IssuedTokens(token, entries, token_hash(refresh))

    async def refresh_token_owner(self, refresh_token: str) -> str | None:
        record = await self.store.get(IssuedRefreshToken, token_hash(refresh_token))
        return record.subject if record else None

    async def load_refresh_token(self, client: OAuthClientInformationFull,
                                 refresh_token: str) -> GrantRefreshToken | None:
        record = await self.store.get(IssuedRefreshToken, token_hash(refresh_token))
        if record is None:
            return None
        if not within_race_window(record) and await self.standing_of(record) == "reused" and \
                await self.store.get(RefreshAnswer, token_hash(refresh_token)) is None:
            # RFC 9700 §4.14.2: a rotated token whose successor was used is a stolen one. (Unless a request
            # with it has just been answered: then this is its twin, racing it, and gets the same answer.)
            audit("refresh_token_reused", client_id=record.client_id, subject=record.subject,
                  grant_id=record.grant_id)
            await self.revoke_grant(record.grant_id, reason="a rotated refresh token was used again")
            return None
        return GrantRefreshToken(token=refresh_token, client_id=record.client_id, scopes=list(record.scopes),
                                 expires_at=record.expires_at, subject=record.subject, grant_id=record.grant_id,
                                 claims=record.claims)

    async def standing_of(self, record: IssuedRefreshToken) -> Literal["current", "retry", "reused"]:
        """Where a presented refresh token stands: the current one; a retry by a client that lost the
        answer to its last refresh (the pair issued then has never been used, neither its refresh token
        nor its access token); or a stale token used again."""
        if record.status == "active":
            return "current"
        successor = await self.store.get(IssuedRefreshToken, record.successor) if record.successor else None
        if record.status == "retired" or successor is None or successor.status != "active" or successor.used:
            return "reused"
        return "retry"

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: GrantRefreshToken,
                                     scopes: list[str]) -> OAuthToken:
        """Rotate: mark the refresh token used and save its successors in one step. Requests with the same
        token within the race window (processes of one client sharing it, a retry on another replica) all
        get the one answer the first of them got. A client whose last refresh answer was lost retries with
        the previous token later: while its successor has never been used, it gets a fresh pair and the
        unused successor is retired, in one step too. Either way one token chain goes on, on every replica."""
        claims = refresh_token.claims
        if reason := refusal_reason(claims.get("email", ""), True, claims.get("hd"), self.settings):
            audit("refresh_refused", subject=refresh_token.subject, reason=reason)
            await self.revoke_grant(refresh_token.grant_id, reason="no longer allowed to sign in")
            raise TokenError("invalid_grant", reason)
        key = token_hash(refresh_token.token)
        if (answered := await self.answer_given(refresh_token)) is not None:
            return answered
        current = await self.store.get(IssuedRefreshToken, key)
        grant = await self.store.get(Grant, refresh_token.grant_id)
        if current is None or grant is None:
            raise TokenError("invalid_grant", "this refresh token was already used or revoked")
        issued = self.issue_tokens(grant, scopes)
        used = dataclasses.replace(grant, last_used_at=time.time()).entry(self.settings.refresh_token_ttl_s)
        then = [used, *issued.entries, answer_entry(key, refresh_token.token, issued.token)]
        if current.status == "active":
            rotated = dataclasses.replace(current, status="rotated", rotated_at=time.time(),
                                          successor=issued.refresh_key)
            won = await self.store.swap(key, current, rotated, then=then)
        else:
            won = await self.replace_unused_successor(key, current, issued, then=then)
            if won:
                audit("refresh_retried", client_id=client.client_id, subject=grant.subject, grant_id=grant.id)
        if not won:  # an identical request won meanwhile: its answer, or none for a stale token
            if (answered := await self.answer_given(refresh_token)) is not None:
                return answered
            raise TokenError("invalid_grant", "this refresh token was already used")
        audit("token_refreshed", client_id=client.client_id, subject=grant.subject, grant_id=grant.id)
        return issued.token

    async def answer_given(self, refresh_token: GrantRefreshToken) -> OAuthToken | None:
        """The pair this refresh token was answered with within the race window, or None."""
        record = await self.store.get(RefreshAnswer, token_hash(refresh_token.token))
        answered = open_answer(refresh_token.token, record) if record is not None else None
        if answered is not None:
            audit("refresh_repeated", client_id=refresh_token.client_id, subject=refresh_token.subject,
                  grant_id=refresh_token.grant_id)
        return answered

    async def replace_unused_successor(self, key: str, current: IssuedRefreshToken, issued: IssuedTokens,
                                       then: Sequence[Entry | Gone]) -> bool:
        """Retire `current`'s unused successor and its access token, and make `issued` its successor, in one
        step that fails if either record changed since it was read (a concurrent retry, or the successor
        used): one winner, on every replica. Only a retry after the race window counts as one."""
        if current.successor is None or within_race_window(current):
            return False
        successor = await self.store.get(IssuedRefreshToken, current.successor)
        if successor is None or successor.status != "active" or successor.used:
            return False
        renamed = dataclasses.replace(current, successor=issued.refresh_key, rotated_at=time.time())
        retired = dataclasses.replace(successor, status="retired", rotated_at=time.time())
        gone = [Gone(IssuedAccessToken, successor.access)] if successor.access else []
        won = await self.store.swap(key, current, renamed, then=[*gone, *then],
                                    also=[Swap(current.successor, successor, retired)])
        if won and gone:  # a replica reading the retired access token at that instant may have kept it
            await self.end_grant(current.grant_id)
        return won

    async def load_access_token(self, token: str) -> GrantAccessToken | None:
        if (verified := self.verified.get(token)) is not None:
            return verified
        epoch, key = self.verified.epoch, token_hash(token)
        record = await self.store.get(IssuedAccessToken, key)
        if record is None:
            return None
        if not record.used:
            record = await self.mark_pair_used(key, record)
        verified = GrantAccessToken(token=token, client_id=record.client_id, scopes=list(record.scopes),
                                    expires_at=record.expires_at, resource=record.resource,
                                    subject=record.subject, grant_id=record.grant_id,
                                    claims={**record.claims, "iss": self.settings.issuer})
        self.verified.keep(verified, epoch)
        return verified

    async def mark_pair_used(self, key: str, record: IssuedAccessToken) -> IssuedAccessToken:
        """Note, once, that the client has this pair: from now on the refresh token before it is stale
        (its successor was used), however long ago the access token expires."""
        used = dataclasses.replace(record, used=True)
        await self.store.put(Entry(key, used, ttl_s=max(1.0, record.expires_at - time.time()), group=record.grant_id))
        for _ in range(2):  # a concurrent rotation of the pair changes its record: read it again
            pair = await self.store.get(IssuedRefreshToken, record.refresh) if record.refresh else None
            if pair is None or pair.used or await self.store.swap(record.refresh or "", pair,
                                                                  dataclasses.replace(pair, used=True)):
                break
        return used

    async def revoke_grant(self, grant_id: str, *, reason: str) -> None:
        """End a grant: every token of it stops working at once. When it was the person's last grant,
        their Google authorization is revoked too (best effort)."""
        grant = await self.store.get(Grant, grant_id)
        removed = await self.store.delete_group(grant_id)
        await self.end_grant(grant_id)
        audit("grant_revoked", grant_id=grant_id, reason=reason, records=removed,
              subject=grant and grant.subject, client_id=grant and grant.client_id)
        if grant and not await self.store.find(Grant, grant.subject):
            await self.google.revoke(grant.subject)

    async def end_grant(self, grant_id: str) -> None:
        """Drop the grant's tokens from every replica's cache of verified tokens, this one first; return
        once each replica that heard it has confirmed (waiting GRANT_END_CONFIRM_S at most)."""
        self.verified.forget_grant(grant_id)
        heard, confirmed = await self.store.publish({"ended_grant": grant_id}, confirmed_within_s=GRANT_END_CONFIRM_S)
        if confirmed < heard:
            logger.warning("%d of %d replicas did not confirm the end of a grant within %d s (one that cannot "
                           "hear Redis stops trusting its kept tokens within %d s)", heard - confirmed, heard,
                           GRANT_END_CONFIRM_S, REDIS_TIMEOUT_S + REDIS_RETRY_EVERY_S)

    async def end_access(self, subject: str, *, reason: str) -> None:
        """End every grant of `subject` (when Google has withdrawn their authorization)."""
        for grant in await self.store.find(Grant, subject):
            await self.revoke_grant(grant.id, reason=reason)
        await self.google.forget(subject)

    async def connected_apps(self, subject: str) -> list[ConnectedApp]:
        """Every grant `subject` has given, newest first, with what the page shows about its client."""
        apps = []
        for grant in await self.store.find(Grant, subject):
            client = await self.store.get(RegisteredClient, grant.client_id)
            redirect_uri = str((client.redirect_uris or [""])[0]) if client else ""
            apps.append(ConnectedApp(
                grant_id=grant.id, name=grant.client_name or grant.client_id,
                vouched_by=urlsplit(grant.client_id).hostname if is_document_client_id(grant.client_id) else None,
                redirect_host=urlsplit(redirect_uri).netloc or redirect_uri,
                scopes=grant.scopes, authorised_at=grant.created_at,
                last_used_at=grant.last_used_at or grant.created_at))
        return sorted(apps, key=lambda app: app.authorised_at, reverse=True)

    async def disconnect(self, subject: str, which: str) -> int:
        """End grant `which` of `subject`, or all of them for "all" (never anyone else's); how many ended."""
        owned = [grant.id for grant in await self.store.find(Grant, subject)]
        ended = owned if which == "all" else [grant_id for grant_id in owned if grant_id == which]
        for grant_id in ended:
            await self.revoke_grant(grant_id, reason="disconnected by its owner on /account")
        return len(ended)


# --- the SDK's interface to all of it


class OAuthProvider:
    """The SDK's `OAuthAuthorizationServerProvider` for MCP clients, with Google as the identity provider:
    what its handlers ask of clients, sign-ins and grants, answered by the three parts above."""

    def __init__(self, settings: Settings, clients: Clients, sign_ins: SignIns, grants: Grants,
                 google: GoogleGrants, limits: RateLimits, security_events: SecurityEvents) -> None:
        self.settings = settings
        self.limits = limits
        self.security_events = security_events
        self.clients = clients
        self.sign_ins = sign_ins
        self.grants = grants
        self.google = google
        self.google_access = GoogleAccess(google, settings)
        # The resources its tokens are good for: the public URL's, and its loopback names' (one server).
        self.resources = frozenset(resource_of(url) for url in settings.public_urls)

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return await self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        await self.clients.register(client_info)

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        return await self.sign_ins.start(client, params, signed_in=None)

    async def load_authorization_code(self, client: OAuthClientInformationFull,
                                      authorization_code: str) -> GrantCode | None:
        return await self.grants.load_authorization_code(client, authorization_code)

    async def exchange_authorization_code(self, client: OAuthClientInformationFull,
                                          authorization_code: GrantCode) -> OAuthToken:
        return await self.grants.exchange_authorization_code(client, authorization_code)

    async def load_refresh_token(self, client: OAuthClientInformationFull,
                                 refresh_token: str) -> GrantRefreshToken | None:
        return await self.grants.load_refresh_token(client, refresh_token)

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: GrantRefreshToken,
                                     scopes: list[str]) -> OAuthToken:
        return await self.grants.exchange_refresh_token(client, refresh_token, scopes)

    async def load_access_token(self, token: str) -> GrantAccessToken | None:
        return await self.grants.load_access_token(token)

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        if grant_id := getattr(token, "grant_id", None):
            await self.grants.revoke_grant(grant_id, reason="revoked by the client")

    async def end_access(self, subject: str, *, reason: str) -> None:
        await self.grants.end_access(subject, reason=reason)


    async def google_permissions(self, subject: str) -> list[GooglePermission]:
        """The Google scopes `subject` has granted this server, sign-in's first, with the tools using each."""
        sign_in, users = google_scopes(GOOGLE_SIGN_IN_SCOPES), await tools_by_google_scope()
        granted = sorted(await self.google.granted(subject), key=lambda scope: (scope not in sign_in, scope))
        return [GooglePermission(scope, scope_label(scope), tuple(users.get(scope, ())),
                                 scope in sign_in) for scope in granted]


# === 8. Pages and error answers ==============================================
#
# Plain, self-contained pages: no script, no external asset, one stylesheet allowed by its hash.
# `Pages.render` escapes every value; a ready-made fragment is passed under a name ending in `_html`
# and is built by a method here that escapes its own parts. Then the views' shared style and bridge to
# their host (`view_page`, which section 1's views call), and the error answers every route shares:
# OAuth's, JSON-RPC's, and one 503 that says when to come back. Offers below: Pages, oauth_error,
# json_rpc_error, unavailable, origin_of.

PAGE_CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#f6f7f9;--card:#fff;--muted:#57606a;--accent:#1a5fd0;--line:#d0d7de}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--card:#161b22;--muted:#9da7b3;
--accent:#6ea8fe;--line:#30363d}}
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}main{max-width:32rem;margin:2rem auto;padding:1.5rem;background:var(--card);
border:1px solid var(--line);border-radius:12px}h1{font-size:1.35rem;margin:.2rem 0 1rem}
.brand{color:var(--muted);font-size:.9rem;margin:0;display:flex;align-items:center;gap:.5rem}
dl{display:grid;grid-template-columns:auto 1fr;gap:.3rem 1rem}
dt{color:var(--muted)}dd,code{margin:0;overflow-wrap:anywhere}ul{padding-left:1.2rem}.note{color:var(--muted);font-size:.9rem}
.actions{display:flex;gap:.75rem;flex-wrap:wrap;margin-top:1.5rem}
button,.button{font:inherit;padding:.6rem 1.2rem;border-radius:8px;border:1px solid var(--line);background:var(--card);
color:var(--fg);cursor:pointer;text-decoration:none;display:inline-block}
button.primary,.button.primary{background:var(--accent);border-color:var(--accent);color:#fff}
button:focus-visible,.button:focus-visible{outline:3px solid var(--accent);outline-offset:2px}
section{border-top:1px solid var(--line);margin-top:1rem}h2{font-size:1.1rem;margin:.75rem 0 .5rem}
@media (max-width:30rem){main{margin:0;border-radius:0;border-width:0 0 1px}.actions>*{flex:1;text-align:center}}
"""
PAGE_CSS_HASH = base64.b64encode(hashlib.sha256(PAGE_CSS.encode()).digest()).decode()

PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">$head_html<title>$title · $server</title><style>$css_html</style></head>
<body><main><p class="brand">$icon_html$server</p><h1>$title</h1>
$body_html
</main></body></html>
""")

CONSENT_BODY = string.Template("""<p><strong>$client_name</strong> asks to use $server on your behalf.</p>
<dl><dt>Sends you back to</dt><dd>$redirect_host</dd>$details_html</dl>
<p>If you allow it, it will be able to:</p><ul>$scopes_html</ul>
<p class="note">$next_step</p>
<form method="post" action="$action">
<input type="hidden" name="txn" value="$txn"><input type="hidden" name="csrf" value="$csrf">
<div class="actions"><button type="submit" name="decision" value="approve" class="primary">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button></div></form>""")

MESSAGE_BODY = string.Template("""<p>$message</p>$action_html""")

ACCOUNT_BODY = string.Template("""<p>Signed in as <strong>$email</strong>. These applications can use $server
on your behalf. Disconnecting one ends its access at once; it must ask you again to come back.</p>
$notice_html$apps_html$google_html""")

ACCOUNT_GOOGLE = string.Template("""<section aria-labelledby="google"><h2 id="google">Google permissions</h2>
<p>What $server may do in your Google account, for the tools that act as you there.</p>
<ul>$rows_html</ul>$all_html</section>""")

ACCOUNT_GOOGLE_WITHDRAW = string.Template("""<form method="post" action="$action"><input type="hidden"
name="csrf_token" value="$csrf"><button type="submit" name="google_scope" value="$scope"
aria-label="Withdraw: $label">Withdraw</button></form>""")

ACCOUNT_GOOGLE_ALL = string.Template("""<form method="post" action="$action"><input type="hidden" name="csrf_token"
value="$csrf"><div class="actions"><button type="submit" name="google_scope" value="all">Withdraw all Google
permissions</button></div></form><p class="note">Your applications stay connected; a tool that needs Google asks
you again.</p>""")

GOOGLE_WITHDRAWN_NOTICES = {
    "revoked": "Withdrawn: Google has revoked this server's access to your Google account. A tool that needs it "
               "will ask you again.",
    "kept": "Withdrawn: this server no longer uses that permission, and a tool that needs it will ask you again. "
            "Google ends an application's permissions only all at once, so your Google account lists it until "
            "you withdraw the others too.",
}

ACCOUNT_APP = string.Template("""<section aria-labelledby="app-$grant_id"><h2 id="app-$grant_id">$name</h2>
<dl>$details_html</dl>
<form method="post" action="$action"><input type="hidden" name="csrf_token" value="$csrf">
<button type="submit" name="grant" value="$grant_id" aria-label="Disconnect $name">Disconnect</button></form>
</section>""")

UNKNOWN_CLIENT_BODY = string.Template("""<p>Your application signed in here before as <strong>$client_id</strong>,
but $server no longer knows it: the server was reset or moved, or the registration was removed. Nothing is
wrong with your account; the application only needs to register again, which it does when it forgets
the old registration:</p>
<ul><li><strong>Claude and Claude Desktop</strong> (Settings, Connectors): remove this connector and add it again.</li>
<li><strong>Claude Code</strong>: run <code>/mcp</code>, choose this server and sign in again, or <code>claude mcp
remove</code> it and add it again.</li>
<li><strong>mcp-remote</strong> (Claude Desktop's config file): quit Claude Desktop, delete the folder
<code>~/.mcp-auth</code> (or the one MCP_REMOTE_CONFIG_DIR names), and start it again.</li>
<li><strong>Cursor</strong>: in its MCP settings, remove this server and add it again.</li>
<li><strong>VS Code</strong>: run <em>Authentication: Remove Dynamic Authentication Providers</em> from the Command
Palette, remove this server's entry, then start the server again.</li></ul>
<p class="note">Then connect again: you sign in once, as before.</p>""")
RECONNECT_HINT = ("this server does not know the client_id (it was reset or moved, or the registration was removed): "
                  "register again. mcp-remote: delete ~/.mcp-auth; VS Code: Authentication: Remove Dynamic "
                  "Authentication Providers; Claude: remove the connector and add it again")

ACCOUNT_ALL = string.Template("""<form method="post" action="$action"><input type="hidden" name="csrf_token"
value="$csrf"><div class="actions"><button type="submit" name="grant" value="all" class="primary">Disconnect all
$count</button></div></form>""")


def masked_email(email: str) -> str:
    """An address shown to someone who may not own it: enough to recognise it, not to learn it."""
    name, _, domain = email.partition("@")
    return f"{name[:1]}…@{domain}" if name and domain else "another account"


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def page_headers(form_targets: Sequence[str]) -> dict[str, str]:
    """No framing, no script, no foreign assets, forms only to here (and the redirects they lead to)."""
    targets = " ".join(dict.fromkeys(origin_of(target) for target in form_targets))
    policy = (f"default-src 'none'; style-src 'sha256-{PAGE_CSS_HASH}'; img-src data:; base-uri 'none'; "
              f"form-action 'self' {targets}; frame-ancestors 'none'")
    return {"Content-Security-Policy": " ".join(policy.split()), "X-Frame-Options": "DENY",
            "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") else f"{parts.scheme}:"


def definition_list(rows: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows)


class Pages:
    """Every page a person sees, drawn with this server's name and icon (SERVER_ICON)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        icon = settings.server_icon
        self.icon_html = f'<img src="{html.escape(icon, quote=True)}" alt="" width="28" height="28">' if icon else ""

    def render(self, title: str, body: string.Template, *, status: int = 200, head_html: str = "",
               form_targets: Sequence[str] = (), **values: str) -> HTMLResponse:
        """A full page; every value is HTML-escaped except those named `*_html`."""
        escaped = {name: value if name.endswith("_html") else html.escape(value, quote=True)
                   for name, value in values.items()}
        server = html.escape(SERVER_NAME)
        page = PAGE.substitute(title=html.escape(title), server=server, head_html=head_html, css_html=PAGE_CSS,
                               icon_html=self.icon_html, body_html=body.substitute(server=server, **escaped))
        return HTMLResponse(page, status_code=status, headers=page_headers(form_targets))

    def message(self, title: str, message: str, *, status: int, continue_to: str | None = None,
                continue_label: str = "Return to the application",
                retry_after_s: float | None = None) -> HTMLResponse:
        """A page that explains; with `continue_to` it also leads on (after 10 seconds on its own); with
        `retry_after_s`, its Retry-After says when to come back (RFC 9110 §10.2.3)."""
        action_html = head_html = ""
        if continue_to:
            link = html.escape(continue_to, quote=True)
            action_html = (f'<div class="actions"><a class="button primary" href="{link}">'
                           f"{html.escape(continue_label)}</a></div>")
            head_html = f'<meta http-equiv="refresh" content="10;url={link}">'
        page = self.render(title, MESSAGE_BODY, status=status, head_html=head_html, message=message,
                           action_html=action_html)
        if retry_after_s is not None:
            page.headers["Retry-After"] = str(int(retry_after_s + 0.999))
        return page

    def too_many(self, retry_after_s: float) -> HTMLResponse:
        wait = int(retry_after_s + 0.999)
        return self.message("Too many attempts", f"This application has started too many sign-ins just now. Try "
                            f"again in {wait} seconds.", status=429, retry_after_s=retry_after_s)

    def unknown_client(self, client_id: str) -> HTMLResponse:
        """For a client that kept a registration this server no longer has: what happened, how to reconnect."""
        return self.render("Connect your application again", UNKNOWN_CLIENT_BODY, status=400,
                           client_id=client_id[:100])

    def consent(self, pending: PendingAuthorization, *, google_origin: str) -> HTMLResponse:
        details = [("Vouched for by", pending.client_domain)] if pending.client_domain else []
        if pending.identity:
            details.append(("Signed in as", pending.identity.email or pending.identity.subject))
        next_step = ("Allowing sends you back to the application now." if pending.identity else
                     "Next you sign in with Google. Your Google password and tokens are never shown to the "
                     "application.")
        public_url = pending.issuer or self.settings.public_url
        return self.render(
            "Allow access?", CONSENT_BODY, client_name=pending.client_name, redirect_host=pending.redirect_host,
            details_html=definition_list(details),
            scopes_html="".join(f"<li>{html.escape(SCOPES.get(scope, scope))}</li>" for scope in pending.scopes),
            next_step=next_step, action=f"{public_url}/consent", txn=pending.id, csrf=pending.csrf,
            form_targets=[public_url, google_origin, pending.redirect_uri])

    def account(self, email: str, apps: Sequence[ConnectedApp], permissions: Sequence[GooglePermission], *,
                csrf: str, action: str, removed: int | None = None, withdrawn: str | None = None) -> HTMLResponse:
        """The account page: each connected application with what it may do and a way to disconnect it, then
        the Google permissions this server holds, with a way to withdraw them."""
        notice_html = ""
        if removed is not None:
            notice_html = f'<p role="status" class="note">Disconnected {removed} application{"s" * (removed != 1)}.</p>'
        if withdrawn in GOOGLE_WITHDRAWN_NOTICES:
            notice_html = f'<p role="status" class="note">{GOOGLE_WITHDRAWN_NOTICES[withdrawn]}</p>'
        sections = []
        for app in apps:
            details = [("Domain" if app.vouched_by else "Sends you back to", app.vouched_by or app.redirect_host),
                       ("Can", ", ".join(SCOPES.get(scope, scope) for scope in app.scopes)),
                       ("Authorised", when(app.authorised_at)), ("Last signed in", when(app.last_used_at))]
            sections.append(ACCOUNT_APP.substitute(
                grant_id=html.escape(app.grant_id, quote=True), name=html.escape(app.name), action=action, csrf=csrf,
                details_html=definition_list(details)))
        if sections:
            sections.append(ACCOUNT_ALL.substitute(action=action, csrf=csrf, count=f"({len(apps)})"))
        apps_html = "".join(sections) or "<p>No applications are connected to your account.</p>"
        return self.render("Connected applications", ACCOUNT_BODY, email=email, notice_html=notice_html,
                           apps_html=apps_html, google_html=self.google_permissions(permissions, csrf, action),
                           form_targets=[action])

    @staticmethod
    def google_permissions(permissions: Sequence[GooglePermission], csrf: str, action: str) -> str:
        if not permissions:
            nothing = "<li>None: a tool that needs your Google account asks you first.</li>"
            return ACCOUNT_GOOGLE.substitute(server=html.escape(SERVER_NAME), all_html="", rows_html=nothing)
        rows = []
        for permission in permissions:
            use = "Needed to sign in" if permission.for_sign_in else (
                "Used by " + ", ".join(permission.used_by) if permission.used_by else "Used by no tool now")
            withdraw = "" if permission.for_sign_in else ACCOUNT_GOOGLE_WITHDRAW.substitute(
                action=action, csrf=csrf, scope=html.escape(permission.scope, quote=True),
                label=html.escape(permission.label, quote=True))
            rows.append(f"<li><strong>{html.escape(permission.label)}</strong> ({html.escape(use)})"
                        f"<br><code>{html.escape(permission.scope)}</code>{withdraw}</li>")
        return ACCOUNT_GOOGLE.substitute(server=html.escape(SERVER_NAME), rows_html="".join(rows),
                                         all_html=ACCOUNT_GOOGLE_ALL.substitute(action=action, csrf=csrf))


# --- views (MCP Apps): the documents hosts render for a tool's result
#
# One self-contained document each, served as `text/html;profile=mcp-app` and shown by the host in a
# sandboxed frame: no external script, style or font, so the resource declares no CSP domain. VIEW_BRIDGE
# speaks the few ext-apps messages a view needs over postMessage (ui/initialize, the tool input and
# result, tools/call through the host, size changes, links), by hand: the reference `App` library is
# 540 KB with its dependencies, many times the views themselves. It offers each view's script `view`:
#   view.on("input" | "result" | "cancelled" | "context", fn)   what the host sends
#   await view.callTool(name, args)                              a tool of this server, through the host
#   view.openLink(url), view.tellModel(result), view.context     (the host's theme, locale, time zone...)

VIEW_CSS = """
:root{--fg0:#1f2328;--muted0:#59636e;--line0:#d1d9e0;--field0:#fff;--soft0:#eef1f4;--accent0:#0b57d0;--bad0:#b42318}
:root[data-theme=dark]{--fg0:#e6edf3;--muted0:#9da7b3;--line0:#3d444d;--field0:#0d1117;--soft0:#222830;
--accent0:#79b0ff;--bad0:#ff8a80}
:root{color-scheme:light;--fg:var(--color-text-primary,var(--fg0));--muted:var(--color-text-secondary,var(--muted0));
--line:var(--color-border-primary,var(--line0));--field:var(--color-background-primary,var(--field0));
--soft:var(--color-background-secondary,var(--soft0));--accent:var(--color-text-info,var(--accent0));
--bad:var(--color-text-danger,var(--bad0));--radius:var(--border-radius-md,8px);--max-h:500px}
:root[data-theme=dark]{color-scheme:dark}
*{box-sizing:border-box}html,body{margin:0;background:transparent}
body{color:var(--fg);font:var(--font-text-md-size,15px)/1.45 var(--font-sans,system-ui,-apple-system,"Segoe UI",
Roboto,sans-serif);padding:4px}
main{display:flex;flex-direction:column;gap:8px}
:root[data-mode=inline] main{max-height:calc(min(500px,var(--max-h)) - 8px)}
header{display:flex;align-items:baseline;justify-content:space-between;gap:8px;flex-wrap:wrap}
h1{font-size:var(--font-heading-sm-size,1.05rem);margin:0}h2{font-size:.85rem;margin:10px 0 4px;color:var(--muted);
text-transform:uppercase;letter-spacing:.04em}
.muted{color:var(--muted);font-size:.85rem;margin:0}.bad{color:var(--bad)}
.scroll{overflow:auto;min-height:0;flex:1 1 auto;margin:0;padding:0}
ul{list-style:none;margin:0;padding:0}li{border-bottom:1px solid var(--line)}
input,select,textarea,button{font:inherit;color:var(--fg);background:var(--field);border:1px solid var(--line);
border-radius:var(--radius);padding:6px 8px;min-width:0}
button{background:var(--accent);border-color:var(--accent);color:var(--field);cursor:pointer;font-weight:600}
:focus-visible{outline:2px solid var(--accent);outline-offset:2px}
a{color:var(--accent)}summary{cursor:pointer;padding:6px 2px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip-path:inset(50%);white-space:nowrap}
"""

VIEW_BRIDGE = """
const view = (() => {
  const root = document.documentElement, listeners = {}, waiting = new Map();
  let lastId = 0, lastHeight = 0;
  const post = message => window.parent.postMessage({jsonrpc: "2.0", ...message}, "*");
  const ask = (method, params) => new Promise((resolve, reject) => {
    waiting.set(++lastId, {resolve, reject});
    post({id: lastId, method, params});
  });
  const emit = (name, value) => (listeners[name] || []).forEach(listener => listener(value));
  const textOf = result => (result.content || []).map(block => block.text || "").join(" ");
  const view = {
    context: {}, host: {},
    on(name, listener) { (listeners[name] ||= []).push(listener); },
    async callTool(name, args) {
      const result = await ask("tools/call", {name, arguments: args});
      if (result.isError) throw new Error(textOf(result) || name + " failed");
      return result;
    },
    openLink: url => ask("ui/open-link", {url}),
    tellModel: result => view.host.updateModelContext
      ? ask("ui/update-model-context", {content: result.content, structuredContent: result.structuredContent})
      : Promise.resolve(),
    textOf,
  };
  function applyContext() {
    const context = view.context;
    root.dataset.theme = context.theme || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
    root.dataset.mode = context.displayMode || "inline";
    for (const [name, value] of Object.entries(context.styles?.variables || {})) {
      if (value) root.style.setProperty(name, value);
    }
    const most = context.containerDimensions?.maxHeight;
    if (most) root.style.setProperty("--max-h", most + "px");
  }
  function reportSize() {
    const height = Math.ceil(root.getBoundingClientRect().height);
    if (height !== lastHeight) post({method: "ui/notifications/size-changed", params: {height: lastHeight = height}});
  }
  const fromHost = {
    "ui/notifications/tool-input": params => emit("input", params.arguments || {}),
    "ui/notifications/tool-result": params => emit("result", params),
    "ui/notifications/tool-cancelled": params => emit("cancelled", params),
    "ui/notifications/host-context-changed": params => {
      Object.assign(view.context, params); applyContext(); emit("context", view.context);
    },
  };
  window.addEventListener("message", ({source, data}) => {
    if (source !== window.parent || data?.jsonrpc !== "2.0") return;
    if (data.method === undefined) {
      const call = waiting.get(data.id);
      waiting.delete(data.id);
      if (call) data.error ? call.reject(new Error(data.error.message)) : call.resolve(data.result);
    } else if (data.id !== undefined) {
      const known = data.method === "ping" || data.method === "ui/resource-teardown";
      post(known ? {id: data.id, result: {}} : {id: data.id, error: {code: -32601, message: "Method not found"}});
    } else {
      fromHost[data.method]?.(data.params || {});
    }
  });
  applyContext();
  view.ready = ask("ui/initialize", {
    protocolVersion: "2026-01-26", appInfo: {name: document.title, version: "1"},
    appCapabilities: {availableDisplayModes: ["inline", "fullscreen"]},
  }).then(answer => {
    view.host = answer.hostCapabilities || {};
    view.context = answer.hostContext || {};
    applyContext();
    post({method: "ui/notifications/initialized", params: {}});
    new ResizeObserver(() => requestAnimationFrame(reportSize)).observe(document.body);
    emit("context", view.context);
  });
  return view;
})();
"""


def view_page(title: str, body_html: str, script: str) -> str:
    """A view's whole document: the shared style and bridge, then its own markup and script."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{VIEW_CSS}</style></head>\n"
            f"<body>{body_html}\n<script>{VIEW_BRIDGE}{script}</script></body></html>\n")




def oauth_error(status: int, error: str, description: str, headers: Mapping[str, str] | None = None) -> Response:
    """An OAuth error response (RFC 6749 §5.2, RFC 6750 §3)."""
    return JSONResponse({"error": error, "error_description": description}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def json_rpc_error(status: int, code: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An HTTP error whose body is a JSON-RPC error a client can act on."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(message: str, form: Literal["json-rpc", "oauth", "page", "json"], *, pages: Pages | None = None,
                body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> Response:
    """503 with Retry-After (RFC 9110 §15.6.4), in the form the caller reads: a JSON-RPC error (the MCP
    endpoint), an OAuth error, a page for a person, or a JSON document (`body`, for probes). Nothing is
    half-done when this is sent, so a retry is safe."""
    wait = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    if form == "json-rpc":
        return json_rpc_error(503, SERVER_UNAVAILABLE, message, wait)
    if form == "oauth":
        return oauth_error(503, "temporarily_unavailable", message, wait)
    if form == "json":
        return JSONResponse(dict(body or {}), status_code=503, headers=wait)
    if pages is None:
        raise ValueError("a page needs the pages")
    page = pages.message("Try again in a moment", message, status=503)
    page.headers.update(wait)
    return page


def too_many(retry_after_s: float, whose: str) -> Response:
    """429 in the OAuth shape, saying when to come back (RFC 6585 §4)."""
    wait = int(retry_after_s + 0.999)
    return oauth_error(429, "temporarily_unavailable", f"Too many requests {whose}; retry in {wait} s",
                       headers={"Retry-After": str(wait)})


# === 9. OAuth routes =========================================================
#
# The provider's HTTP side. The SDK's handlers parse registrations and token requests, authenticate
# clients and check PKCE; what they cannot do (loopback ports, metadata-document clients, `iss` on every
# answer, consent pages, public-client revocation, the `resource` check at /token) is done here and in
# the provider. Three groups of routes, one class each: `OAuthEndpoints` (what MCP clients and the
# sign-in's browser call), `AccountPages` (/account) and `GoogleGrantPages` (a tool's link to Google
# for more scopes, and Google's answer). Offers below: oauth_routes, well_known_routes,
# resource_metadata_url.

OAUTH_BODY_MAX_BYTES = 65_536
SESSION_COOKIE = "stream_http_session"
SESSION_MAX_AGE_S = 30 * 24 * 3600
ACCOUNT_SIGN_IN_MAX_AGE_S = 3600  # /account asks Google again after this, so the access policy is fresh



def authorization_server_metadata(issuer: str) -> OAuthMetadata:
    """RFC 8414, with what the SDK leaves out: public clients, `iss` in responses, metadata documents."""
    metadata = build_metadata(AnyHttpUrl(issuer), None, ClientRegistrationOptions(
        enabled=True, valid_scopes=list(SCOPES)), RevocationOptions(enabled=True))
    methods = ["none", "client_secret_post", "client_secret_basic", PRIVATE_KEY_JWT]
    return OAuthMetadata.model_validate({  # from strings, so the issuer keeps its exact spelling (RFC 8414 §3.3)
        **metadata.model_dump(mode="json", exclude_none=True), "issuer": issuer,
        "token_endpoint_auth_methods_supported": methods, "revocation_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "authorization_response_iss_parameter_supported": True, "client_id_metadata_document_supported": True})


def protected_resource_metadata(public_url: str) -> ProtectedResourceMetadata:
    """RFC 9728: the canonical resource (no trailing slash) and who issues tokens for it."""
    return ProtectedResourceMetadata.model_validate({
        "resource": resource_of(public_url), "authorization_servers": [public_url],
        "scopes_supported": list(SCOPES), "resource_name": SERVER_NAME})


def resource_metadata_url(public_url: str) -> str:
    """Where RFC 9728 puts the metadata of PUBLIC_URL/mcp: /.well-known/oauth-protected-resource inserted
    between the origin and the path."""
    public = urlsplit(public_url)
    return f"{public.scheme}://{public.netloc}/.well-known/oauth-protected-resource{public.path}{MCP_PATH}"


def per_public_url(settings: Settings, document: Callable[[str], Any]) -> Callable[[Request], Awaitable[Response]]:
    """A discovery document's endpoint, naming this server as the requesting client knows it."""
    handlers = {url: MetadataHandler(document(url)) for url in settings.public_urls}

    async def handle(request: Request) -> Response:
        return await handlers[settings.public_url_for(request.headers.get("host"))].handle(request)

    return handle


def bounded(handler: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """A handler as an ASGI app with a bounded body, which drops quietly a request whose client left before
    sending all of it: nobody is there to answer, and nothing was done (no traceback floods the log)."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return Response(status_code=400)

    return RequestBodyLimitMiddleware(request_response(handle), OAUTH_BODY_MAX_BYTES)


def for_clients(handler: Callable[[Request], Awaitable[Response]], method: str) -> ASGIApp:
    """Endpoints MCP clients call directly, from browsers too (the Inspector): any origin, no cookie."""
    limited = bounded(handler)
    return CORSMiddleware(limited, allow_origins=["*"], allow_methods=[method],
                          allow_headers=["Authorization", "Content-Type", "MCP-Protocol-Version"])


def discovery_routes(settings: Settings, *, at_origin: bool = False) -> list[Route]:
    """The RFC 8414 and RFC 9728 documents: the protected resource at the path-aware URL, at the root
    for older clients, and with a trailing slash for clients that add one. With `at_origin`, for a parent
    app that mounts this server under PUBLIC_URL's path: both RFCs put the well-known segment before
    that path, so the documents live at the origin's root."""
    prefix = urlsplit(settings.public_url).path if at_origin else ""
    metadata = for_clients(per_public_url(settings, authorization_server_metadata), "GET")
    resource = for_clients(per_public_url(settings, protected_resource_metadata), "GET")
    resource_path = "/.well-known/oauth-protected-resource"
    resource_paths = [resource_path + prefix + MCP_PATH, resource_path + prefix + MCP_PATH + "/"]
    if not prefix:
        resource_paths.append(resource_path)
    return [Route("/.well-known/oauth-authorization-server" + prefix, metadata, methods=["GET", "OPTIONS"]),
            *[Route(path, resource, methods=["GET", "OPTIONS"]) for path in resource_paths]]


def well_known_routes(settings: Settings) -> list[Route]:
    """What a parent app that mounts this server under a path adds at its own root, with sign-in on."""
    return discovery_routes(settings, at_origin=True)


def redirect_to(url: str, status: int = 302) -> Response:
    return RedirectResponse(url, status_code=status, headers={"Cache-Control": "no-store"})


def from_this_site(request: Request, settings: Settings) -> bool:
    """Whether a form post came from this server's own page (browsers say so; other clients don't try).
    Fetch metadata decides where the browser sends it: our pages' no-referrer policy makes Chromium
    send `Origin: null` even for a same-origin form."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site == "same-origin"
    origin = request.headers.get("origin")
    return origin is None or origin == origin_of(settings.public_url_for(request.headers.get("host")))


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The client_id and secret of HTTP Basic client authentication (RFC 6749 §2.3.1), or None."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        user, _, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return unquote(user), unquote(password)


async def requested_client_id(request: Request) -> str:
    """The client_id a request to /token or /revoke names: in its form, as HTTP Basic's user, or as its client
    assertion's subject ("" if none)."""
    form = await request.form()
    basic = basic_credentials(request.headers.get("authorization"))
    assertion = form.get("client_assertion")
    client_id = form.get("client_id") or (basic[0] if basic else "") or (
        assertion_subject(assertion) if isinstance(assertion, str) else "")
    return client_id if isinstance(client_id, str) else ""




class ClientCredentials(ClientAuthenticator):
    """Client authentication at /token and /revoke (RFC 6749 §2.3), as the SDK's, but with secrets stored
    as hashes: the presented secret is hashed and compared in constant time."""

    provider: OAuthProvider

    async def authenticate_request(self, request: Request) -> OAuthClientInformationFull:
        form = await request.form()
        basic = basic_credentials(request.headers.get("authorization"))
        client_id = await requested_client_id(request)
        if not client_id:
            raise AuthenticationError("Missing client_id")
        client = await self.provider.get_client(client_id)
        if client is None:
            raise AuthenticationError("Invalid client_id")
        if isinstance(client, ClientDocument):
            return await self.document_client(client, form, request)
        method = client.token_endpoint_auth_method
        if method == "none":
            return client
        if method == "client_secret_basic":
            presented = basic[1] if basic and basic[0] == client_id else None
        elif method == "client_secret_post":
            presented = form.get("client_secret")
        else:
            raise AuthenticationError(f"Unsupported auth method: {method}")
        if not isinstance(presented, str) or not presented:
            raise AuthenticationError(f"The client_secret is required ({method})")
        if not await self.provider.clients.secret_matches(client, presented):
            raise AuthenticationError("Invalid client_secret")
        if client.client_secret_expires_at and client.client_secret_expires_at < time.time():
            raise AuthenticationError("The client_secret has expired")
        return client

    async def document_client(self, client: ClientDocument, form: Any, request: Request) -> ClientDocument:
        """A metadata-document client: with a client assertion, one that verifies (private_key_jwt); without,
        only if its document lets it be public."""
        assertion, assertion_type = form.get("client_assertion"), form.get("client_assertion_type")
        if assertion is None:
            if "none" in client.auth_methods:
                return client
            raise AuthenticationError("This client authenticates with a client_assertion (private_key_jwt)")
        if PRIVATE_KEY_JWT not in client.auth_methods or not isinstance(assertion, str):
            raise AuthenticationError("This client's metadata document offers no private_key_jwt keys")
        if assertion_type != JWT_BEARER_ASSERTION:
            raise AuthenticationError(f"client_assertion_type must be {JWT_BEARER_ASSERTION}")
        issuer = self.provider.settings.public_url_for(request.headers.get("host"))
        metadata = authorization_server_metadata(issuer)
        audiences = [issuer, str(metadata.token_endpoint), str(metadata.revocation_endpoint)]
        try:
            await self.provider.clients.assertions.verify(client, assertion, audiences)
        except ClientAssertionError as exc:
            raise AuthenticationError(str(exc)) from None
        return client


def client_budget(client_id: str) -> str:
    """The rate-limit budget a request from this client spends. A metadata document's client_id is shared by
    every installation of that client (all of Claude's users): there it is each address's own, or anyone
    could spend it for all of them."""
    return f"client:{client_id} {client_address()}" if is_document_client_id(client_id) else f"client:{client_id}"


def with_form_field(request: Request, form: FormData, name: str, value: str) -> Request:
    """The same request with one more field in its form (re-encoded as application/x-www-form-urlencoded)."""
    fields = [(key, item) for key, item in form.multi_items() if isinstance(item, str)] + [(name, value)]
    body = urlencode(fields).encode()
    headers = [(key, item) for key, item in request.scope["headers"] if key not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/x-www-form-urlencoded"), (b"content-length", b"%d" % len(body))]

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)


def browser_session(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Pages a person visits: they get the signed session cookie that remembers who signed in."""
    from starlette.middleware.sessions import SessionMiddleware

    secret_key = settings.secret_key or Secret("")
    return SessionMiddleware(
        app, secret_key=derive_key(secret_key, b"stream-http/cookies").hex(), session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE_S, same_site="lax", https_only=settings.public_url.startswith("https://"))


# --- the OAuth endpoints: registration, authorization, consent, Google's callback, tokens, revocation


class OAuthEndpoints:
    """The OAuth endpoints MCP clients call, and the consent step a person sees while signing in."""

    def __init__(self, provider: OAuthProvider, settings: Settings, pages: Pages,
                 granting: "GoogleGrantPages") -> None:
        self.provider = provider
        self.settings = settings
        self.pages = pages
        self.granting = granting
        self.authenticator = ClientCredentials(provider)
        self.tokens = TokenHandler(provider, self.authenticator)
        self.registration = RegistrationHandler(provider, options=ClientRegistrationOptions(
            enabled=True, valid_scopes=list(SCOPES), default_scopes=list(SCOPES)))

    def routes(self) -> list[Route]:
        api, page = for_clients, partial(browser_page, settings=self.settings)
        return [
            Route("/register", api(self.register, "POST"), methods=["POST", "OPTIONS"]),
            Route("/token", api(self.token, "POST"), methods=["POST", "OPTIONS"]),
            Route("/revoke", api(self.revoke, "POST"), methods=["POST", "OPTIONS"]),
            Route("/authorize", page(self.authorize), methods=["GET", "POST"]),
            Route("/consent", page(self.consent), methods=["GET", "POST"]),
            Route(GOOGLE_CALLBACK_PATH, page(self.google_callback), methods=["GET"]),
        ]


    async def authorize(self, request: Request) -> Response:
        """RFC 6749 §4.1.1. Until the client and its redirect URI are known, problems are shown to the
        person; after that they go back to the client with `state` and `iss`."""
        params = request.query_params if request.method == "GET" else await request.form()
        repeated = repeated_parameter(params)
        if repeated in ("client_id", "redirect_uri"):
            return self.pages.message("Ambiguous sign-in link", f"The application gave {repeated} more than once, "
                                      "so this sign-in stops here.", status=400)
        client_id = params.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            return self.pages.message("Incomplete sign-in link", "The application did not say who it is "
                                      "(client_id is missing).", status=400)
        if wait := await self.provider.limits.spend(client_budget(client_id), self.settings.rate_limit_client, 60):
            audit("rate_limited", client_id=client_id, budget="client")
            return self.pages.too_many(wait)
        try:
            requested = params.get("redirect_uri")
            client = await self.provider.clients.find(client_id, redirect_uri=requested if isinstance(requested, str)
                                                       else None)
        except ClientDocumentError as exc:
            return self.pages.message("Unknown application", f"The application's metadata document at "
                                      f"{client_id} cannot be used: {exc}", status=400)
        if client is None:
            logger.info("an authorization for the unknown client %r: sent to register again", client_id[:100])
            return self.pages.unknown_client(client_id)
        redirect_uri = pick_redirect_uri([str(uri) for uri in client.redirect_uris or []],
                                         str(params["redirect_uri"]) if "redirect_uri" in params else None)
        if redirect_uri is None:
            return self.pages.message("Unexpected return address", f"{display_name(client)} asked to return to "
                                      "an address it did not register, so this sign-in stops here.", status=400)
        issuer = self.settings.public_url_for(request.headers.get("host"))
        checked = check_authorization_request(params, redirect_uri, resource_of(issuer))
        if repeated and not isinstance(checked, tuple):
            checked = "invalid_request", f"{repeated} is given more than once"
        if isinstance(checked, tuple):
            error, description = checked
            state = params.get("state")
            return redirect_to(authorization_response(redirect_uri, issuer=issuer, error=error,
                                                      error_description=description,
                                                      state=state if isinstance(state, str) else None))
        return redirect_to(await self.provider.sign_ins.start(client, checked, request.session.get("user"),
                                                                   issuer=issuer))

    async def consent(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.answer_consent(request)
        pending = await self.provider.sign_ins.pending_consent(request.query_params.get("txn", ""))
        if pending is None:
            return self.pages.message("This page has expired", "This consent page has expired or was already "
                                      "answered. Start again from your application.", status=400)
        google = await self.provider.google.login.authorization_endpoint() or self.settings.google_discovery_url
        return self.pages.consent(pending, google_origin=google)

    async def answer_consent(self, request: Request) -> Response:
        if not from_this_site(request, self.settings):
            return self.pages.message("Request refused", "This answer did not come from this server's own "
                                      "consent page, so it was ignored.", status=403)
        form = await request.form()
        try:
            next_url = await self.provider.sign_ins.answer_consent(
                str(form.get("txn", "")), str(form.get("csrf", "")), approve=form.get("decision") == "approve")
        except SignInFailed as exc:
            return self.pages.message("This page has expired", str(exc), status=400)
        return redirect_to(next_url, status=303)

    async def google_callback(self, request: Request) -> Response:
        query = request.query_params
        if trip := await self.provider.google.take_trip(query.get("state", "")):
            return await self.granting.scopes_answered(trip, query.get("code"), query.get("error"))
        try:
            outcome = await self.provider.sign_ins.return_from_google(query.get("state", ""), query.get("code"),
                                                                      query.get("error"))
        except SignInFailed as exc:
            return self.pages.message("Sign-in could not finish", str(exc), status=400)
        if outcome.refused:
            return self.pages.message("Access refused", outcome.refused, status=outcome.status,
                                      continue_to=outcome.redirect or None, retry_after_s=outcome.retry_after_s)
        if outcome.identity is not None:
            request.session["user"] = {"sub": outcome.identity.subject, "email": outcome.identity.email,
                                       "at": int(time.time())}
        return redirect_to(outcome.redirect)

    async def register(self, request: Request) -> Response:
        """RFC 7591 registration through the SDK's handler, after refusing what this server does not support
        and members given twice. A public client that registers again with the very same metadata (Claude
        Desktop does on reconnects) gets its earlier registration back rather than a new one."""
        if wait := await self.provider.limits.spend("register", self.settings.rate_limit_register, 60):
            return too_many(wait, "to register clients")
        body = await request.body()
        try:
            metadata = parse_json(body, object_pairs_hook=json_object_without_repeats)
        except ValueError as exc:
            return oauth_error(400, "invalid_client_metadata", f"the registration is not a JSON object: {exc}")
        problem = registration_problem(metadata) if isinstance(metadata, dict) else "it must be a JSON object"
        if problem:
            return oauth_error(400, "invalid_client_metadata", problem)
        public = metadata.get("token_endpoint_auth_method") == "none"
        fingerprint = hashlib.sha256(to_json(metadata).encode()).hexdigest()
        if public and (earlier := await self.provider.clients.registered_alike(fingerprint)):
            return JSONResponse(earlier.model_dump(mode="json", exclude_none=True), status_code=201,
                                headers={"Cache-Control": "no-store"})
        response = await self.registration.handle(request)
        if public and response.status_code == 201:
            client_id = json.loads(bytes(response.body))["client_id"]
            await self.provider.clients.remember_registration(fingerprint, client_id)
        return response

    async def token(self, request: Request) -> Response:
        """The SDK's token endpoint, after checking the RFC 8707 `resource` (the SDK does not) and that the
        client is still known (the SDK's answer would not say how to recover)."""
        form = await request.form()
        if repeated := repeated_parameter(form):
            return oauth_error(400, "invalid_request", f"{repeated} is given more than once")
        if forgotten := await self.forgotten_client(request):
            return forgotten
        if limited := await self.over_budget(request):
            return limited
        verifier, code, client_id = form.get("code_verifier"), form.get("code"), await requested_client_id(request)
        if form.get("grant_type") == "authorization_code" and isinstance(verifier, str) and \
                not PKCE_VERIFIER.fullmatch(verifier):
            if isinstance(code, str) and (client := await self.provider.get_client(client_id)):
                await self.provider.grants.load_authorization_code(client, code)  # used up, as by any failed attempt
            return oauth_error(400, "invalid_grant", "code_verifier must be 43 to 128 characters of A-Z a-z 0-9 "
                               "- . _ ~ (RFC 7636 §4.1)")
        resource = form.get("resource")
        served = resource_of(self.settings.public_url_for(request.headers.get("host")))
        if isinstance(resource, str) and not serves_resource(resource, served):
            return oauth_error(400, "invalid_target", f"This server issues tokens only for {served}")
        if form.get("client_id") is None:  # named by Basic or its assertion: the SDK's handler wants it in the form
            request = with_form_field(request, form, "client_id", client_id)
        return await self.tokens.handle(request)

    async def over_budget(self, request: Request) -> Response | None:
        """429 when this client, or the person whose refresh token this is, has used up their budget."""
        form, client_id = await request.form(), await requested_client_id(request)
        limits, settings = self.provider.limits, self.settings
        if wait := await limits.spend(client_budget(client_id), settings.rate_limit_client, 60):
            audit("rate_limited", client_id=client_id, budget="client")
            return too_many(wait, "from this client")
        token = form.get("refresh_token")
        refreshing = form.get("grant_type") == "refresh_token" and isinstance(token, str)
        subject = await self.provider.grants.refresh_token_owner(token) if refreshing else None
        if subject and (wait := await limits.spend(f"person:{subject}", settings.rate_limit_person, 3600)):
            audit("rate_limited", client_id=client_id, subject=subject, budget="person")
            return too_many(wait, "for this account")
        return None

    async def forgotten_client(self, request: Request) -> Response | None:
        """invalid_client, saying how to recover, for a client_id this server does not know (or no client_id)."""
        client_id = await requested_client_id(request)
        if not client_id:
            return oauth_error(401, "invalid_client", "client_id is required")
        if await self.provider.get_client(client_id) is None:
            return oauth_error(401, "invalid_client", RECONNECT_HINT)
        return None

    async def revoke(self, request: Request) -> Response:
        """RFC 7009 for every client, public ones included (the SDK's requires a client_secret field)."""
        if repeated := repeated_parameter(await request.form()):
            return oauth_error(400, "invalid_request", f"{repeated} is given more than once")
        if forgotten := await self.forgotten_client(request):
            return forgotten
        if limited := await self.over_budget(request):
            return limited
        try:
            client = await self.authenticator.authenticate_request(request)
        except AuthenticationError as exc:
            return oauth_error(401, "invalid_client", exc.message)
        token = (await request.form()).get("token")
        if not isinstance(token, str) or not token:
            return oauth_error(400, "invalid_request", "token is required")
        found = await self.provider.load_access_token(token) or await self.provider.load_refresh_token(client, token)
        if found is not None and found.client_id == client.client_id:
            await self.provider.revoke_token(found)
        return Response(status_code=200, headers={"Cache-Control": "no-store"})


# --- /account: a person's own view of the applications and Google permissions connected to them


class AccountPages:
    """/account: the signed-in person's connected applications and Google permissions, and the forms that
    disconnect and withdraw them."""

    def __init__(self, provider: OAuthProvider, settings: Settings, pages: Pages) -> None:
        self.provider = provider
        self.settings = settings
        self.pages = pages

    def routes(self) -> list[Route]:
        return [Route("/account", browser_page(self.account, self.settings), methods=["GET", "POST"])]


    async def account(self, request: Request) -> Response:
        """/account: the signed-in person's connected applications (GET), or disconnecting some (POST)."""
        user = request.session.get("user") or {}
        if time.time() - user.get("at", 0) > ACCOUNT_SIGN_IN_MAX_AGE_S:  # sign in (again) with Google first
            sign_in = await self.provider.sign_ins.start_account_sign_in(login_hint=user.get("email"))
            return redirect_to(sign_in, status=303)
        action = f"{self.settings.public_url}/account"
        csrf = request.session.setdefault("account_csrf", new_id())
        if request.method == "POST":
            return await self.change_account(request, user["sub"], csrf=csrf, action=action)
        shown, withdrawn = request.query_params.get("removed", ""), request.query_params.get("withdrawn")
        apps = await self.provider.grants.connected_apps(user["sub"])
        permissions = await self.provider.google_permissions(user["sub"])
        return self.pages.account(user.get("email") or user["sub"], apps, permissions, csrf=csrf, action=action,
                                  removed=int(shown) if shown.isdigit() else None, withdrawn=withdrawn)

    async def change_account(self, request: Request, subject: str, *, csrf: str, action: str) -> Response:
        """A form on /account: disconnect applications, or withdraw Google permissions."""
        form = await request.form()
        if not from_this_site(request, self.settings) or not hmac.compare_digest(str(form.get("csrf_token", "")),
                                                                                  csrf):
            return self.pages.message("Request refused", "This did not come from your own account page, so "
                                      "nothing was changed.", status=403, continue_to=action,
                                      continue_label="Back to your account")
        if "google_scope" in form:
            return await self.withdraw_google(subject, str(form["google_scope"]), action=action)
        return await self.disconnect(subject, str(form.get("grant", "")), action=action)

    async def withdraw_google(self, subject: str, chosen: str, *, action: str) -> Response:
        granted = await self.provider.google.granted(subject)
        if chosen != "all" and chosen not in granted:
            return self.pages.message("Not found", "This server does not hold that Google permission (it may have "
                                      "been withdrawn already).", status=404, continue_to=action,
                                      continue_label="Back to your account")
        revoked = await self.provider.google.withdraw(subject, None if chosen == "all" else [chosen])
        return redirect_to(f"{action}?{urlencode({'withdrawn': 'revoked' if revoked else 'kept'})}", status=303)

    async def disconnect(self, subject: str, chosen: str, *, action: str) -> Response:
        removed = await self.provider.grants.disconnect(subject, chosen)
        if chosen != "all" and not removed:
            return self.pages.message("Not found", "That application is not connected to your account (it may "
                                      "have been disconnected already).", status=404, continue_to=action,
                                      continue_label="Back to your account")
        audit("apps_disconnected", subject=subject, count=removed)
        return redirect_to(f"{action}?removed={removed}", status=303)


# --- Google grant pages: a tool's link to Google for more scopes, and what the person sees after


class GoogleGrantPages:
    """Where a tool's link for more Google permissions lands (on to Google, for just those), and the page
    the person sees when Google sends them back."""

    def __init__(self, provider: OAuthProvider, pages: Pages) -> None:
        self.provider = provider
        self.pages = pages

    def routes(self, settings: Settings) -> list[Route]:
        return [Route(GOOGLE_GRANT_PATH, browser_page(self.google_grant, settings), methods=["GET"])]


    async def google_grant(self, request: Request) -> Response:
        """A tool's link for more Google permissions: on to Google, for just those."""
        asked = await self.provider.google.scope_request(request.query_params.get("r", ""))
        if asked is None or asked.status != "waiting":
            return self.pages.message("This link has expired", "This link was already used, or it is too old. Ask "
                                      "your application to call the tool again for a new one.", status=400)
        try:
            return redirect_to(await self.provider.google.send_for(asked))
        except GoogleError as exc:
            logger.error("cannot send a person to Google for more scopes: %s", exc)
            return self.pages.message("Google is unavailable", "Google cannot be reached just now; try the link "
                                      "again in a moment.", status=503)

    async def scopes_answered(self, trip: GoogleScopeTrip, code: str | None, error: str | None) -> Response:
        try:
            answered, identity = await self.provider.google.finish_trip(trip, code, error)
        except GoogleError as exc:
            return self.pages.message("Google could not finish", f"Google did not complete this: {exc}", status=400)
        if answered is None:
            return self.pages.message("This link has expired", "Ask your application to call the tool again.",
                                      status=400)
        if answered.status == "wrong_account":  # whoever holds the link sees only their own address in full
            you = f"as {identity.email}" if identity and identity.email else "with another Google account"
            return self.pages.message("A different Google account", f"You answered Google {you}, but this link "
                                      f"was made for the Google account {masked_email(answered.email)}. Nothing "
                                      "was granted. Ask your application to call the tool again, and choose that "
                                      "account at Google.", status=403)
        if answered.missing:
            return self.pages.message("Not everything was granted", f"You did not allow this server to "
                                      f"{scope_labels(answered.missing)}, which the tool needs. Return to your "
                                      "application; calling the tool again asks once more.", status=200)
        return self.pages.message("You can return to your application", f"This server may now "
                                  f"{scope_labels(answered.scopes)}. Return to your application: the tool carries "
                                  "on by itself, or call it again if your application asks you to.", status=200)


def browser_page(handler: Callable[[Request], Awaitable[Response]], settings: Settings) -> ASGIApp:
    """A route a person's browser visits: a bounded body, and the session cookie."""
    return browser_session(bounded(handler), settings)


async def receive_security_events(request: Request, provider: OAuthProvider) -> Response:
    """RISC_PATH: Google's security event tokens, pushed (RFC 8935). A verified event that puts the account at
    risk ends the person's access on every replica (their grants, their Google tokens) before 202 is
    answered; a refused token changes nothing and gets 400 with RFC 8935's error code."""
    body = await request.body()
    try:
        jti, events = await provider.security_events.verify(body.decode("ascii").strip())
    except UnicodeDecodeError:
        jti, events, refused = "", [], SecurityEventError("invalid_request", "the body is not a security event token")
    except SecurityEventError as exc:
        jti, events, refused = "", [], exc
    except GoogleError as exc:
        logger.warning("cannot check a Google security event: %s", exc)
        return JSONResponse({"err": "temporarily_unavailable", "description": "Google's RISC keys are unavailable"},
                            status_code=503, headers={"Retry-After": "60"})
    else:
        refused = None
    if refused is not None:
        audit("security_event_refused", err=refused.err, reason=refused.description)
        return JSONResponse({"err": refused.err, "description": refused.description}, status_code=400)
    for event in events:
        if event.ends_access and event.subject:
            await provider.end_access(event.subject, reason=event.ends_access)
        audit("security_event", type=event.name, subject=event.subject, reason=event.reason,
              action="access ended" if event.ends_access and event.subject else "noted")
    await provider.security_events.acted_on(jti)
    return Response(status_code=202)


def oauth_routes(provider: OAuthProvider, settings: Settings, pages: Pages) -> list[Route]:
    """Every route of sign-in: the discovery documents, the OAuth endpoints, /account, the grant pages and,
    with GOOGLE_RISC on, Google's security events."""
    granting = GoogleGrantPages(provider, pages)
    risc = [Route(RISC_PATH, bounded(partial(receive_security_events, provider=provider)), methods=["POST"])] \
        if settings.google_risc else []
    return [*discovery_routes(settings), *OAuthEndpoints(provider, settings, pages, granting).routes(),
            *AccountPages(provider, settings, pages).routes(), *granting.routes(settings), *risc]


# === 10. Serving MCP over HTTP ===============================================
#
# The composition root: `Runtime` assembles what the server runs on (store, change bus, rate limits,
# the OAuth provider); the MCP middleware adds what the SDK leaves out; and everything a request meets
# before the SDK: the request gate on the MCP endpoint (Host, Origin, token, Content-Type, Accept,
# body), CORS for browser clients, the drain that shutdown runs, the request context every route
# gets (request id, forwarded address, span), and `build_app`, which assembles the MCP endpoint, the
# sign-in routes and the probes into one Starlette app. Offers below: build_app, Drain.


# --- the running server


class GetStreamEvents(EventStore):
    """The events worth keeping when POSTs are answered with JSON: the GET stream's. A JSON answer has no
    event id on the wire, so nothing can ask to replay it; storing it would cost a write per request
    (a round trip on Redis) for nothing."""

    def __init__(self, events: EventStore) -> None:
        self.events = events

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        if stream_id != GET_STREAM_KEY:
            return ""
        return await self.events.store_event(stream_id, message)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        return await self.events.replay_events_after(last_event_id, send_callback)

class Runtime:
    """What tools and routes share while the server runs: settings, the store, the event store, the
    change bus and, with sign-in on, the OAuth provider. Built without I/O; `async with runtime:` opens
    the store, starts housekeeping, and closes everything again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.events = None if settings.stateless else self.store.event_store(settings.event_store_max_events,
                                                                               settings.session_idle_timeout_s)
        if self.events is not None and settings.json_response:
            self.events = GetStreamEvents(self.events)
        self.changes = ChangeBus()
        self.limits = RateLimits(self.store)
        self.replica = new_id()  # tells this process's change announcements from other replicas'
        self.http = httpx2.AsyncClient(timeout=OUTBOUND_TIMEOUT_S, follow_redirects=False, verify=tls_context())
        self.provider = build_provider(settings, self.store, self.http, self.limits) if settings.auth_enabled else None
        self.tools: dict[str, MCPTool] = {}  # as listed: see tool_named
        self.tool_google_scopes: dict[str, frozenset[str]] = {}  # of each tool in `tools`
        self._exit = AsyncExitStack()

    async def __aenter__(self) -> "Runtime":
        await self._exit.__aenter__()
        try:
            await self.store.open()
            if isinstance(self.store, SQLiteStore):
                logger.info("keeping data in %s (%s)", self.settings.data_dir, data_dir_reason(self.settings))
            self._exit.push_async_callback(self.store.close)
            self._exit.push_async_callback(self.http.aclose)
            if self.settings.secret_key is not None:
                seal_request_state_with(derive_key(self.settings.secret_key, b"stream-http/request-state"))
            tasks = await self._exit.enter_async_context(anyio.create_task_group())
            self._exit.callback(tasks.cancel_scope.cancel)
            tasks.start_soon(self.purge_expired_records)
            tasks.start_soon(self.watch_store)
            tasks.start_soon(self.relay_changes)
            STORE_UP.set_function(lambda: 1.0 if self.store.available else 0.0)
            Tracing.notice()
            if not Tracing.on:
                drop_sdk_spans()
            SESSIONS_OPEN.set_function(lambda: self.changes.session_count)
        except BaseException:
            await self._exit.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._exit.aclose()

    async def purge_expired_records(self) -> None:
        while True:
            await anyio.sleep(PURGE_INTERVAL_S)
            try:
                removed = await self.store.purge_expired()
            except StorageError as exc:
                logger.warning("purging expired records failed: %s", exc)
                continue
            logger.debug("purged %d expired records", removed)

    async def watch_store(self) -> None:
        """While the store is unreachable, ping it every second so service resumes by itself."""
        while True:
            await anyio.sleep(REDIS_RETRY_EVERY_S)
            if not self.store.available:
                with suppress(StorageError):
                    await self.store.ping()

    async def announce_resources_changed(self, owner: str, uris: Sequence[str]) -> None:
        """Tell `owner`'s listening connections, here and on other replicas, that their resource list
        and the resources at `uris` changed."""
        await self.changes.announce(owner, uris)
        try:
            await self.store.publish({"owner": owner, "uris": list(uris), "from": self.replica})
        except StorageError as exc:
            logger.warning("other replicas were not told about a resource change: %s", exc)

    async def relay_changes(self) -> None:
        """Pass on what other replicas announce: resource changes to the connections listening here, a
        grant's end to the provider's cache of verified tokens, and whether this process hears them."""
        async for message in self.store.messages():
            if self.provider is not None:
                self.provider.grants.verified.hear(message)  # first, before anything awaits
                if isinstance(ticket := message.get("ticket"), str):
                    with suppress(StorageError):
                        await self.store.confirm(ticket)
            owner, uris = message.get("owner"), message.get("uris")
            if message.get("from") != self.replica and isinstance(owner, str) and isinstance(uris, list):
                await self.changes.announce(owner, [uri for uri in uris if isinstance(uri, str)])



# The HTTP app's runtime, which the MCP lifespan (run inside the app's lifespan) serves.
_serving_runtime: "ContextVar[Runtime]" = ContextVar("stream_http_serving_runtime")


@asynccontextmanager
async def serving_runtime() -> AsyncIterator["Runtime"]:
    """The MCP lifespan: the HTTP app's runtime, or under `mcp run` (stdio) one opened from the environment."""
    serving = _serving_runtime.get(None)
    if serving is not None:
        yield serving
        return
    async with Runtime(load_settings()) as opened:
        yield opened


def drop_sdk_spans() -> None:
    """With no OpenTelemetry SDK recording, take the SDK's span-per-message middleware out of the chain: it
    makes a no-op span for every message, about 25 µs of a 400 µs request (bench/run.py, 2026-07-28). The
    SDK documents this opt-out ("drop it from this list") but keeps the class in a private module: when
    that import fails, the chain is left exactly as the SDK made it."""
    try:
        from mcp.server._otel import OpenTelemetryMiddleware
    except ImportError:
        return
    mcp.middleware[:] = [layer for layer in mcp.middleware if not isinstance(layer, OpenTelemetryMiddleware)]


def seal_request_state_with(key: bytes) -> None:
    """Have the SDK's request-state boundary seal `requestState` with `key`, which every replica derives
    from SECRET_KEY, so that a replica opens what another sealed. The SDK builds its boundary with a key
    of this process's own when `mcp` is built; the middleware chain is public (`mcp.middleware`), so the
    boundary is replaced in place by one of the SDK's own class with the shared key."""
    chain = mcp.middleware
    for index, layer in enumerate(chain):
        if isinstance(layer, RequestStateBoundary):
            chain[index] = RequestStateBoundary(RequestStateSecurity(keys=[key]), default_audience=mcp.name)


# --- the MCP middleware: what every message gets beyond the SDK


async def serve_message(ctx: ServerRequestContext[Runtime, Any], call_next: CallNext) -> HandlerResult:
    """The server's MCP middleware, inside the SDK's own (OpenTelemetry's span, the request-state
    boundary). It makes the runtime reachable from every handler (static resources and completions get
    no Context), answers what 2025-era sessions need beyond the SDK (resource subscriptions, a log
    level), has the person grant the Google scopes a tool needs before it runs, names an unknown tool or
    prompt as the spec says, and counts requests."""
    token = _current_runtime.set(ctx.lifespan_context)
    started, outcome = time.perf_counter(), "error"
    try:
        handshake = ctx.request_id is not None and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS
        session = handshake_session(ctx) if handshake else None
        if ctx.request_id is None:  # a notification: nothing of ours to add
            result = await call_next(ctx)
        elif handshake and ctx.method in SESSION_METHODS:
            result = answer_for_session(ctx, session)
        elif ctx.method == "tools/call":
            result = await call_tool(ctx, call_next)
        elif ctx.method == "prompts/get":
            result = await get_prompt(ctx, call_next)
        else:
            result = await call_next(ctx)
        if ctx.method == "initialize" and isinstance(result, dict):
            advertise_notifications(result, ctx.lifespan_context.settings)
        elif ctx.method == "tools/list" and isinstance(result, dict):
            result["tools"] = tools_for_client(ctx, result.get("tools", []))
            describe_for_directories(result["tools"], ctx.lifespan_context.settings.auth_enabled)
        outcome = "tool_error" if is_tool_error(result) else "ok"
        return result
    finally:
        _current_runtime.reset(token)
        if ctx.request_id is not None:
            count_request(ctx, outcome, time.perf_counter() - started)


mcp.middleware.append(serve_message)
SESSION_METHODS = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe"})


def tools_for_client(ctx: ServerRequestContext[Runtime, Any], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools a client lists: those only views call (`visibility: ["app"]`) are left out for a client
    known to render no view, whose model would otherwise see them. A client that did not say (a 2025-era
    request on a stateless server carries no capabilities) gets them all, as hosts need them listed."""
    if ctx.session.client_capabilities is None or client_supports_apps(ctx):
        return tools
    return [tool for tool in tools if "model" in (tool.get("_meta") or {}).get("ui", {}).get("visibility", ["model"])]


def describe_for_directories(tools: list[dict[str, Any]], signed_in: bool) -> None:
    """What ChatGPT's and Claude's app directories read of each tool beyond the SDK's listing: its title among
    its annotations too, and the sign-in it needs as OpenAI's Apps SDK declares it, `securitySchemes` (in
    `_meta`, where MCP keeps extensions, and on the tool, where the Apps SDK documents it)."""
    for tool in tools:
        if "title" in tool:
            tool.setdefault("annotations", {}).setdefault("title", tool["title"])
        meta = tool.setdefault("_meta", {})
        needed = scopes_to_call(google_scopes(meta.get(GOOGLE_SCOPES, ())))
        schemes = [{"type": "oauth2", "scopes": list(needed)}] if signed_in else [{"type": "noauth"}]
        tool.setdefault("securitySchemes", meta.setdefault("securitySchemes", schemes))


def handshake_session(ctx: ServerRequestContext[Runtime, Any]) -> HandshakeSession | None:
    """The 2025-era session a request belongs to (a stateful HTTP session, or stdio's one), kept for its
    notifications; None when stateless."""
    running = ctx.lifespan_context
    if running.settings.stateless:
        return None
    request = ctx.request
    session_id = headers_of(request.scope).get(b"mcp-session-id", b"").decode("latin-1") if request else STDIO_SESSION
    if not session_id:
        return None
    settings = running.settings
    return running.changes.session(session_id, current_subject(), ctx.session, settings.max_sessions,
                                   settings.session_idle_timeout_s)


def answer_for_session(ctx: ServerRequestContext[Runtime, Any], session: HandshakeSession | None) -> dict[str, Any]:
    """logging/setLevel and resources/(un)subscribe for a 2025-era client, which the SDK leaves out: kept
    for its session (stateless, there is none to keep them in: accepted and forgotten)."""
    params = ctx.params or {}
    if ctx.method == "logging/setLevel":
        if params.get("level") not in LOG_LEVELS:
            raise MCPError(INVALID_PARAMS, f"level must be one of {', '.join(LOG_LEVELS)}")
        if session is not None:
            session.log_level = params["level"]
        return {}
    uri = params.get("uri")
    if not isinstance(uri, str) or not uri:
        raise MCPError(INVALID_PARAMS, "uri must be a non-empty string")
    if session is not None and ctx.method == "resources/subscribe":
        session.watched.add(uri)
    elif session is not None:
        session.watched.discard(uri)
    return {}


def advertise_notifications(result: dict[str, Any], settings: Settings) -> None:
    """What `initialize` adds to the SDK's capabilities: resource notifications (stateful), logging, and the
    extensions (MCP Apps), which the SDK advertises only on `server/discover`: hosts of the handshake era
    declare theirs in `initialize`, and read ours there."""
    capabilities = result.setdefault("capabilities", {})
    capabilities.setdefault("resources", {}).update(listChanged=not settings.stateless,
                                                    subscribe=not settings.stateless)
    capabilities["logging"] = {}
    capabilities.setdefault("extensions", {})[APPS.identifier] = APPS.settings()


async def call_tool(ctx: ServerRequestContext[Runtime, Any], call_next: CallNext) -> HandlerResult:
    """An unknown tool is the spec's -32602 (the SDK reports it as a tool result); before a tool that acts
    on the person's Google account runs, they grant the Google scopes it needs."""
    running, name = ctx.lifespan_context, (ctx.params or {}).get("name")
    tool = await tool_named(running, name) if isinstance(name, str) else None
    if isinstance(name, str) and tool is None:
        raise MCPError(INVALID_PARAMS, f"Unknown tool: {name}")
    needed = running.tool_google_scopes.get(tool.name, frozenset()) if tool is not None else frozenset()
    if not needed or running.provider is None or current_user() is LOCAL_USER:
        return plainer_argument_errors(await call_next(ctx))
    token = _tool_google_scopes.set(needed)
    try:
        return plainer_argument_errors(await running.provider.google_access.admit(ctx, call_next, needed))
    finally:
        _tool_google_scopes.reset(token)


# How pydantic words one problem with a tool's arguments, which the SDK passes on to the model as they are.
ARGUMENT_ERRORS = re.compile(r"^Error executing tool (?P<tool>\S+): \d+ validation errors? for \S+Arguments\n")
ARGUMENT_ERROR = re.compile(r"^(?P<where>\S[^\n]*)\n  (?P<what>[^\n]+?) \[type=(?P<kind>[^,\]]+)"
                            r"(?:, input_value=(?P<value>[^\n]*?))?(?:, input_type=\w+)?\]", re.MULTILINE)


def is_tool_error(result: HandlerResult) -> bool:
    """Whether a tools/call result is a failure the model reads (the SDK's answers come as dicts, ours as models)."""
    if isinstance(result, CallToolResult):
        return result.is_error
    return isinstance(result, dict) and result.get("isError") is True


def plainer_argument_errors(result: HandlerResult) -> HandlerResult:
    """A tool's arguments that do not fit its schema as the model and the person can read it: "add was called
    with arguments that do not fit: argument a: Input should be a valid number (got 'x')", without pydantic's
    type codes and links."""
    content = result.get("content") if isinstance(result, dict) and is_tool_error(result) else None
    text = content[0].get("text", "") if isinstance(content, list) and len(content) == 1 and isinstance(
        content[0], dict) else ""
    if not (header := ARGUMENT_ERRORS.match(text)):
        return result
    problems = [f"argument {found['where']}: {found['what']}" + (
        f" (got {found['value'][:60]})" if found["value"] and found["kind"] != "missing" else "")
        for found in ARGUMENT_ERROR.finditer(text)]
    if not problems:
        return result
    plain = f"{header['tool']} was called with arguments that do not fit: {'; '.join(problems)}."
    return {**result, "content": [{"type": "text", "text": plain}]}


async def get_prompt(ctx: ServerRequestContext[Runtime, Any], call_next: CallNext) -> HandlerResult:
    """A prompt that is unknown or cannot render is the spec's -32602 (the SDK reports error code 0)."""
    try:
        return await call_next(ctx)
    except ValueError as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from exc


async def tool_named(running: Runtime, name: str) -> MCPTool | None:
    """The tool called `name`, or None. Listing the tools builds every tool's schema, which cost more than
    the call itself, so they are remembered and listed again only for a name not seen before (a tool added
    while serving is found; a removed one is left to the SDK, which answers it as a tool error)."""
    if name not in running.tools:
        listed = await mcp.list_tools()
        running.tools = {tool.name: tool for tool in listed}
        running.tool_google_scopes = {tool.name: google_scopes_of(tool) for tool in listed}
    return running.tools.get(name)


def count_request(ctx: ServerRequestContext[Runtime, Any], outcome: str, seconds: float) -> None:
    """The request's metrics. A tool is named only once known, so a caller cannot mint label values."""
    if not Metrics.on:
        return
    tool = ""
    if ctx.method == "tools/call":
        name = (ctx.params or {}).get("name")
        tool = name if isinstance(name, str) and name in ctx.lifespan_context.tools else "unknown"
    method = ctx.method if ctx.method in SPEC_CLIENT_METHODS else "other"  # a caller names methods at will
    child(MCP_REQUESTS, method, tool, outcome).inc()
    child(MCP_DURATION, method).observe(seconds)


# --- who may reach the MCP endpoint


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


# --- the MCP endpoint's checks


class Bearer:
    """The MCP endpoint's bearer token when sign-in is on (RFC 6750, RFC 9728): who it stands for (a token
    this server issued, unexpired, for this server under any of its names; anything else is no one), and
    the 401 or 403 a request gets when it is not enough."""

    def __init__(self, provider: OAuthProvider, settings: Settings, running: Runtime) -> None:
        self.provider = provider
        self.settings = settings
        self.running = running

    async def identify(self, headers: Mapping[bytes, bytes]) -> GrantAccessToken | None:
        header = headers.get(b"authorization", b"").decode("latin-1")
        if header[:7].lower() != "bearer ":
            return None
        token = await self.provider.load_access_token(header[7:].strip())
        if token is None or (token.expires_at and token.expires_at < time.time()):
            return None
        if token.resource not in self.provider.resources:
            logger.warning("refused a token issued for %s, not this server", token.resource)
            return None
        return token

    def check(self, scope: Scope, headers: Mapping[bytes, bytes], token: GrantAccessToken | None,
              needed: Sequence[str] = (REQUIRED_SCOPE,)) -> Response | None:
        """401 without a token that stands for someone (its challenge naming the scopes `needed`), 403 without
        the scope every request needs, 400 for a token in the URL."""
        if b"access_token=" in scope.get("query_string", b"") and "access_token" in Request(scope).query_params:
            return oauth_error(400, "invalid_request", "Send the access token in the Authorization header, "
                               "never in the URL")
        if token is None:
            presented = headers.get(b"authorization", b"")[:7].lower() == b"bearer "
            problem = "The access token is invalid, expired or revoked" if presented else None
            return self.unauthorized(headers, problem, needed)
        if REQUIRED_SCOPE not in token.scopes:
            return self.insufficient(headers, set(token.scopes), REQUIRED_SCOPE, "every request")
        return None

    async def scopes_for(self, message: Mapping[str, Any] | None) -> tuple[str, ...]:
        """The scopes a message needs: every request's, and for a tool call, what the tool needs (`scopes_to_call`)."""
        params = (message or {}).get("params")
        name = params.get("name") if isinstance(params, dict) and (message or {}).get("method") == "tools/call" \
            else None
        tool = await tool_named(self.running, name) if isinstance(name, str) else None
        if tool is None:
            return (REQUIRED_SCOPE,)
        return scopes_to_call(self.running.tool_google_scopes.get(tool.name, frozenset()))

    async def check_tool(self, headers: Mapping[bytes, bytes], token: GrantAccessToken,
                         message: Mapping[str, Any]) -> Response | None:
        """Step-up (403 insufficient_scope) for a tool that uses the person's Google sign-in, when the client's
        token holds no GOOGLE_TOOLS_SCOPE."""
        if GOOGLE_TOOLS_SCOPE in token.scopes or GOOGLE_TOOLS_SCOPE not in await self.scopes_for(message):
            return None
        name = str(message["params"]["name"])
        return self.insufficient(headers, set(token.scopes), GOOGLE_TOOLS_SCOPE, name)

    def metadata_url(self, headers: Mapping[bytes, bytes]) -> str:
        host = headers.get(b"host", b"").decode("latin-1")
        return resource_metadata_url(self.settings.public_url_for(host))

    def unauthorized(self, headers: Mapping[bytes, bytes], problem: str | None, needed: Sequence[str]) -> Response:
        fields = [f'resource_metadata="{self.metadata_url(headers)}"', f'scope="{" ".join(needed)}"']
        if problem:  # RFC 6750 §3.1: no error code when the request carried no token at all
            fields = ['error="invalid_token"', f'error_description="{problem}"', *fields]
        return oauth_error(401, "invalid_token", problem or "This server needs a bearer token: sign in first",
                           headers={"WWW-Authenticate": "Bearer " + ", ".join(fields)})

    def insufficient(self, headers: Mapping[bytes, bytes], granted: set[str], needed: str, what: str) -> Response:
        wanted = " ".join(scope for scope in SCOPES if scope in granted | {needed})
        description = f"{what} needs the {needed} scope"
        challenge = (f'Bearer error="insufficient_scope", error_description="{description}", scope="{wanted}", '
                     f'resource_metadata="{self.metadata_url(headers)}"')
        return oauth_error(403, "insufficient_scope", description, headers={"WWW-Authenticate": challenge})


class Served:
    """One request on the MCP endpoint while it is served, as the drain sees it: whether it is a stream
    (a GET stream, or `subscriptions/listen`) or a call, and what has been sent of its response."""

    # One per request, and a stream's lives as long as the stream: slots and bound methods, not closures.
    __slots__ = ("answered", "app_receive", "body", "ended", "finished", "held", "hold_json", "raw_send",
                 "request_id", "session", "started", "stream", "vary", "waiting")

    def __init__(self, message: Mapping[str, Any] | None, method: str) -> None:
        self.stream = method == "GET" or (message or {}).get("method") == "subscriptions/listen"
        self.request_id = (message or {}).get("id")
        self.started: Message | None = None  # the response's start message, once sent
        self.held: Message | None = None  # a JSON answer's start, until its body shows whether it is a 503
        self.finished = False
        self.answered = False  # the drain answered for it: the app's own sends are dropped
        self.ended = False  # the app is told its client went away
        self.waiting: list[anyio.CancelScope] | None = None  # the app's receives that wait for the client

    def receive(self, receive: Receive, body: bytes | None) -> Receive:
        """The app's `receive`: first the `body` already read (a POST's), then the client's. A stream's is one
        that `end` interrupts with a disconnect; a call's needs none, as its answer ends its `receive` (uvicorn
        answers a disconnect once the response is complete, which is how the drain ends a late call)."""
        self.app_receive, self.body = receive, body
        return self.receive_body if body is not None else self.receive_until_ended

    async def receive_body(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await (self.receive_until_ended() if self.stream else self.app_receive())

    async def receive_until_ended(self) -> Message:
        if not self.ended:
            with anyio.CancelScope() as waiting:
                if self.waiting is None:
                    self.waiting = []
                self.waiting.append(waiting)
                try:
                    return await self.app_receive()
                finally:
                    if self.waiting is not None:
                        self.waiting.remove(waiting)
        return {"type": "http.disconnect"}

    def end(self) -> None:
        """Tell the app its client went away: what it waits to receive is a disconnect."""
        self.ended = True
        for waiting in self.waiting or ():
            waiting.cancel()

    def send(self, send: Send, *, vary: bool, hold_json: bool, session: StreamScope | None) -> Send:
        """The app's `send`, watched in one wrapper: `Vary: Origin` added (`vary`), what was sent noted; with
        `hold_json`, a JSON answer that is nothing but the store's failure turned into a 503 (see
        `store_failure_as_503`); with `session`, the response's status and new session id noted there."""
        self.raw_send, self.vary, self.hold_json, self.session = send, vary, hold_json, session
        return self.tracked

    async def tracked(self, message: Message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start":
            if self.vary:
                message["headers"] = [*message.get("headers", ()), VARY_ORIGIN]
            if self.session is not None:
                learn_session(self.session, message)
            if self.hold_json and message["status"] == 200 and JSON_CONTENT_TYPE in message.get("headers", ()):
                self.held = message
                return
            self.started = message
        elif message["type"] == "http.response.body":
            if not message.get("more_body", False):
                self.finished = True
            if self.held is not None:
                start, self.held = self.held, None
                self.started = store_failure_as_503(start, message) if self.finished else start
                await self.raw_send(self.started)
        await self.raw_send(message)

    async def finish(self) -> None:
        """End the response cleanly if the app left it open (its stream was ended under it). A JSON start still
        held was never sent: the failure that stopped the app before its body is answered as any other (500,
        or the store's 503), not as a 200 without a body."""
        self.held = None
        if self.started is not None and not self.finished and not self.answered:
            self.finished = True
            with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.raw_send({"type": "http.response.body", "body": b"", "more_body": False})

    def release(self) -> None:
        """Let go of the response's `send` once it is over. The SDK keeps a session's latest request for as long
        as the session lives, and through its `receive` this object: the rest of the response's chain need not
        stay with it."""
        self.raw_send, self.app_receive = _nothing_to_send, _nothing_to_receive
        self.waiting = self.started = self.held = self.session = self.body = None

    async def answer_shutdown(self) -> None:
        """Answer a call still running at the deadline with an error the client reads, then end it."""
        if self.finished:
            return
        error = {"jsonrpc": "2.0", "id": self.request_id, "error": {"code": SERVER_UNAVAILABLE, "message":
                 "The server is shutting down, so this call was stopped before it finished; retry it"}}
        self.answered = True
        with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            if self.started is None:  # a held JSON start was never sent: the error is the whole answer
                await unavailable(error["error"]["message"], "json-rpc")(
                    {"type": "http", "method": "POST", "headers": []}, _nothing_to_receive, self.raw_send)
            else:  # an SSE stream: the error is its last event
                event = b"event: message\r\ndata: " + json.dumps(error).encode() + b"\r\n\r\n"
                await self.raw_send({"type": "http.response.body", "body": event, "more_body": False})
        self.finished = True
        self.end()


VARY_ORIGIN = (b"vary", b"Origin")  # CORS headers depend on it, so caches must too
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


async def _nothing_to_send(message: Message) -> None:
    return None


DRAIN_MARGIN_S = 1.5  # of the grace, what closing takes once calls are answered (the SDK alone waits 1 s)


class Drain:
    """What shutdown does on the MCP endpoint: refuse new requests (503), end open streams at once and
    cleanly (clients reconnect, to another replica or to this one once it is back), let calls in flight
    finish within the grace (all of it but DRAIN_MARGIN_S, which closing connections takes, so that the
    process is gone within `grace_s`), then answer the rest with an error and end them."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.calls_get_s = max(0.5, grace_s - DRAIN_MARGIN_S)
        self.stopping = False
        self.served: set[Served] = set()
        self.calls_done: anyio.Event | None = None  # set once stopping and no call is left

    def calls(self) -> list[Served]:
        return [served for served in self.served if not served.stream]

    def open(self, message: Mapping[str, Any] | None, method: str) -> Served:
        served = Served(message, method)
        self.served.add(served)
        return served

    async def close(self, served: Served) -> None:
        self.served.discard(served)
        await served.finish()
        served.release()
        if self.calls_done is not None and not self.calls():
            self.calls_done.set()

    async def run(self) -> None:
        self.stopping, self.calls_done = True, anyio.Event()
        streams = [served for served in self.served if served.stream]
        logger.info("draining: %d open streams end now, %d calls in flight get %.1f s (SHUTDOWN_GRACE %d s, less "
                    "%.1f s to close connections)", len(streams), len(self.calls()), self.calls_get_s, self.grace_s,
                    self.grace_s - self.calls_get_s)
        for served in streams:
            served.end()
        if not self.calls():
            self.calls_done.set()
        with anyio.move_on_after(self.calls_get_s):
            await self.calls_done.wait()
        late = self.calls()
        for served in late:
            await served.answer_shutdown()
        if late:
            logger.warning("stopped %d calls still running after %.1f s of shutdown", len(late), self.calls_get_s)

class RequestGate:
    """Checks every request to the MCP endpoint before the SDK sees it, answering bad ones with the
    right status and error: a foreign Host or Origin, a missing or insufficient token, a wrong
    Content-Type or Accept, an oversized or malformed body. It also marks which session a request
    belongs to, for the event store."""

    def __init__(self, app: ASGIApp, *, running: Runtime, policy: HostPolicy, drain: Drain) -> None:
        self.app = app
        settings = running.settings
        self.bearer = Bearer(running.provider, settings, running) if running.provider is not None else None
        self.cors = with_cors(partial(self.__call__, vary=False), policy, ["GET", "POST", "DELETE"])
        self.store = running.store
        self.changes = running.changes
        self.limits, self.rate_limit = running.limits, settings.rate_limit_mcp
        self.drain = drain
        self.policy = policy
        self.max_body_bytes = settings.max_request_bytes
        self.json_response = settings.json_response
        self.stateless = settings.stateless

    async def __call__(self, scope: Scope, receive: Receive, send: Send, *, vary: bool = True) -> None:
        """Admit the request or answer why not; serve what is admitted. One function, not a layer per check:
        this runs for every request, and each layer an answer passes through costs on every await."""
        headers, method = headers_of(scope), scope["method"]
        if vary and b"origin" in headers:  # a browser's: CORS preflight and headers, then this without `vary`
            await self.cors(scope, receive, send)  # (CORS adds `Vary: Origin` itself)
            return
        token = await self.bearer.identify(headers) if self.bearer is not None else None
        problem = (self.check_origin(headers) or self.check_draining()
                   or await self.check_token(scope, receive, headers, token)
                   or self.check_method(method, headers) or self.check_store() or await self.check_budget(token))
        body, message = b"", None
        if problem is None and method == "POST":
            try:
                body, message, problem = await self.read_message(receive, headers)
            except ClientDisconnect:
                return  # the client left before its request was whole: nobody to answer, nothing done
            if problem is None and token is not None and message is not None and self.bearer is not None:
                problem = await self.bearer.check_tool(headers, token, message)
        if problem is not None:
            child(MCP_REFUSED, str(problem.status_code)).inc()
            await problem(scope, receive, send)
            return

        # Served as the caller (get_access_token()), watched by the drain, and in stateful mode as a request of
        # its session (the event store files events under it; the change bus knows the session is in use).
        served = self.drain.open(message, method)
        receive = served.receive(receive, body if method == "POST" else None)
        context = None
        if token is not None:  # as Starlette's AuthenticationMiddleware would, for the SDK's session binding
            user = AuthenticatedUser(token)
            scope["user"], scope["auth"] = user, AuthCredentials(token.scopes)
            context = auth_context_var.set(user)
        session_id, stream_scope, watching = None, None, None
        if not self.stateless:
            session_id = header_text(headers, b"mcp-session-id") or None
            stream_scope = StreamScope(session_id=session_id)
            watching = _stream_scope.set(stream_scope)
            if session_id:
                self.changes.request_started(session_id)
        # The response tells the session only when it opens one or ends one (a DELETE's status).
        learn = stream_scope if stream_scope is not None and (not session_id or method == "DELETE") else None
        answer = served.send(send, vary=vary, hold_json=method == "POST", session=learn)
        try:
            await self.app(scope, receive, answer)
        finally:
            if context is not None:
                auth_context_var.reset(context)
            if watching is not None:
                _stream_scope.reset(watching)
            if session_id:
                deleted = method == "DELETE" and stream_scope is not None and stream_scope.status == 200
                self.changes.request_ended(session_id, deleted=deleted)
            await self.drain.close(served)

    def check_origin(self, headers: Mapping[bytes, bytes]) -> Response | None:
        host = header_or_none(headers, b"host")
        if not self.policy.allows_host(host):
            return json_rpc_error(421, INVALID_REQUEST, f"Host {host!r} is not served here; "
                                  "add it to ALLOWED_HOSTS or set PUBLIC_URL")
        origin = header_or_none(headers, b"origin")
        if not self.policy.allows_origin(origin):
            return json_rpc_error(403, INVALID_REQUEST, f"Origin {origin!r} is not allowed; add it to CORS_ORIGINS")
        return None

    async def check_token(self, scope: Scope, receive: Receive, headers: Mapping[bytes, bytes],
                          token: GrantAccessToken | None) -> Response | None:
        if self.bearer is None:
            return None
        if token is not None or scope["method"] != "POST":
            return self.bearer.check(scope, headers, token)
        # Refused either way; its challenge names the scopes this very message needs, so that a client
        # whose first call is a Google tool signs in once with all it needs.
        with suppress(ClientDisconnect):
            _, message, _ = await self.read_message(receive, headers)
            return self.bearer.check(scope, headers, token, await self.bearer.scopes_for(message))
        return self.bearer.check(scope, headers, token)

    def check_draining(self) -> Response | None:
        if not self.drain.stopping:
            return None
        return unavailable("The server is shutting down; retry in a moment (another replica, or this one once "
                           "it is back)", "json-rpc")

    async def check_budget(self, token: GrantAccessToken | None) -> Response | None:
        """429, with a JSON-RPC error, for a grant that has used up its requests of the minute."""
        if token is None:
            return None
        wait = await self.limits.spend(f"mcp:{token.grant_id}", self.rate_limit, 60)
        if wait is None:
            return None
        audit("rate_limited", client_id=token.client_id, subject=token.subject, budget="mcp")
        seconds = int(wait + 0.999)
        return json_rpc_error(429, SERVER_UNAVAILABLE, f"Too many requests with this token: at most {self.rate_limit} "
                              f"a minute; retry in {seconds} s", headers={"Retry-After": str(seconds)})

    def check_store(self) -> Response | None:
        return None if self.store.available else unavailable(STORE_FAILED, "json-rpc")

    def check_method(self, method: str, headers: Mapping[bytes, bytes]) -> Response | None:
        if self.stateless and method in ("GET", "DELETE"):
            # Without sessions there is no stream to open or end; notifications come through
            # subscriptions/listen (2026-07-28) instead.
            return json_rpc_error(405, INVALID_REQUEST, f"{method} needs a session and this server is "
                                  "stateless; POST requests, and use subscriptions/listen for notifications",
                                  headers={"Allow": "POST"})
        if method != "POST":
            return None
        if not read_once(is_json_media, headers.get(b"content-type", b"")):
            return json_rpc_error(415, INVALID_REQUEST, "Content-Type must be application/json")
        has_json, has_sse = read_once(accepted_media, headers.get(b"accept", b""))
        modern = header_text(headers, b"mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS
        if not has_json or not (has_sse or self.json_response or modern):
            return json_rpc_error(406, INVALID_REQUEST,
                                  "Accept must include application/json and text/event-stream")
        return None

    async def read_message(self, receive: Receive, headers: Mapping[bytes, bytes],
                           ) -> tuple[bytes, dict[str, Any] | None, Response | None]:
        declared = header_text(headers, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", None, self.too_large()
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            part = await receive()
            if part["type"] == "http.disconnect":
                raise ClientDisconnect
            chunks.append(part.get("body", b""))
            size, more = size + len(chunks[-1]), part.get("more_body", False)
            if size > self.max_body_bytes:
                return b"", None, self.too_large()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        message, problem = parse_json_rpc(body)
        return body, message, problem

    def too_large(self) -> Response:
        return json_rpc_error(413, INVALID_REQUEST, f"Request body is larger than {self.max_body_bytes} bytes")


# Clients send the same few header values on every request: each is read once (lru_cache; a caller making
# up values only cycles the cache, and a long one is read every time rather than kept).
def read_once(read: Callable[[bytes], T], value: bytes) -> T:
    return read(value) if len(value) <= 256 else read.__wrapped__(value)  # type: ignore[attr-defined]


@lru_cache(maxsize=256)
def is_json_media(content_type: bytes) -> bool:
    return content_type.decode("latin-1").split(";")[0].strip().lower() == "application/json"


@lru_cache(maxsize=256)
def accepted_media(accept: bytes) -> tuple[bool, bool]:
    """Whether an Accept header takes JSON and SSE, wildcards included (RFC 9110 §12.5.1), as the SDK's
    check_accept_headers decides, from the header already read."""
    types = {media.split(";")[0].strip().lower() for media in accept.decode("latin-1").split(",")}
    anything = "*/*" in types
    takes_json = anything or bool(types & {"application/json", "application/*"})
    takes_sse = anything or bool(types & {"text/event-stream", "text/*"})
    return takes_json, takes_sse


def parse_json_rpc(body: bytes) -> tuple[dict[str, Any] | None, Response | None]:
    """The one JSON-RPC 2.0 message in `body`, or the specific error for a body that is not one."""
    try:
        message = pydantic_core.from_json(body)  # as the SDK parses it: what one accepts, so does the other
    except ValueError:
        return None, json_rpc_error(400, PARSE_ERROR, "Body is not valid JSON")
    if isinstance(message, list):
        return None, json_rpc_error(400, INVALID_REQUEST, "Batches are not supported; send one message per request")
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None, json_rpc_error(400, INVALID_REQUEST, 'Body must be a JSON-RPC 2.0 object with "jsonrpc": "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            return None, json_rpc_error(400, INVALID_REQUEST, '"method" must be a non-empty string')
        if "params" in message and not isinstance(message["params"], dict):
            return None, json_rpc_error(400, INVALID_REQUEST, '"params" must be an object')
    elif "result" not in message and "error" not in message:
        return None, json_rpc_error(400, INVALID_REQUEST, 'A message needs "method", "result" or "error"')
    if ("id" in message and not isinstance(message["id"], (str, int))) or isinstance(message.get("id"), bool):
        return None, json_rpc_error(400, INVALID_REQUEST, '"id" must be a string or an integer')
    return message, None


def store_failure_as_503(start: Message, body: Message) -> Message:
    """A JSON answer that is nothing but the store's failure (a call that met Redis going away, or failing
    over, after it was admitted) goes out as 503 with Retry-After, as the same failure met before the call:
    clients and balancers retry on the status. (An SSE stream has said 200 before its events.)"""
    if not is_store_failure(body.get("body", b"")):
        return start
    return {**start, "status": 503, "headers": [*start["headers"], (b"retry-after", str(RETRY_AFTER_S).encode())]}


STORE_FAILED_MARK = STORE_FAILED.encode()


def is_store_failure(body: bytes) -> bool:
    if len(body) > 512 or STORE_FAILED_MARK not in body:  # most answers are not read again
        return False
    try:
        error = parse_json(body).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return error.get("code") == SERVER_UNAVAILABLE and error.get("message") == STORE_FAILED


def learn_session(stream_scope: StreamScope, start: Message) -> None:
    """Note a response's status, and the id of the session it opens, where the event store finds them."""
    stream_scope.status = start["status"]
    if stream_scope.session_id is None:
        for name, value in start.get("headers", ()):
            if name.lower() == b"mcp-session-id":
                stream_scope.session_id = value.decode("latin-1")


# --- around every request: its headers, id, span and caller

OWS = (b" ", b"\t")
FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")
HEADERS_KEY = "stream_http.headers"  # where a request's scope keeps its headers, read once


def headers_of(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, read once per request and kept in its scope (the first of a
    repeated header, as Starlette's `Headers.get` gives it)."""
    headers = scope.get(HEADERS_KEY)
    if headers is None:
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        scope[HEADERS_KEY] = headers
    return headers


def caller_of(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def header_text(headers: Mapping[bytes, bytes], name: bytes) -> str:
    return headers.get(name, b"").decode("latin-1")


def header_or_none(headers: Mapping[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


class RequestContext:
    """Around every request: its header values without their optional whitespace (RFC 9110 §5.5:
    `Mcp-Name: echo  ` names echo; h11 strips it, httptools keeps what trails); the caller's address
    and scheme as a trusted proxy's X-Forwarded-For and -Proto give them (uvicorn's middleware, only
    for a request that carries them); its id (a trusted proxy's X-Request-Id, or a new one), sent back
    as X-Request-Id and named by every log line written meanwhile; an OpenTelemetry server span that
    continues the caller's W3C traceparent; and the caller's address for audit lines."""

    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[str], paths: Iterable[str]) -> None:
        self.app = app
        self.forwarded = ProxyHeadersMiddleware(self.as_forwarded, trusted_hosts=list(trusted_proxies))
        self.trust_everyone = "*" in trusted_proxies
        self.proxies = [ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies if proxy != "*"]
        self.paths = frozenset(paths)  # span names: a route's path, never what a scanner made up

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if any(value.endswith(OWS) for _, value in scope["headers"]):
            scope = {**scope, "headers": [(name, value.strip(b" \t")) for name, value in scope["headers"]]}
        headers = headers_of(scope)
        app = self.forwarded if FORWARDED[0] in headers or FORWARDED[1] in headers else self.app
        request_id = self.request_id(scope, headers.get(b"x-request-id"))
        tokens = _request_id.set(request_id), _request_client.set(caller_of(scope))
        try:
            if b"traceparent" not in headers and not Tracing.on:
                await app(scope, receive, self.with_id(send, request_id, None))
            else:
                with self.span(scope, headers, request_id) as span:
                    await app(scope, receive, self.with_id(send, request_id, span))
        finally:
            _request_client.reset(tokens[1])
            _request_id.reset(tokens[0])
            scope.pop(HEADERS_KEY, None)  # the SDK may keep the scope (see Served.release); not what was read of it

    async def as_forwarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, for a request whose caller a trusted proxy named (X-Forwarded-For): audit lines name them."""
        token = _request_client.set(caller_of(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            _request_client.reset(token)

    def span(self, scope: Scope, headers: Mapping[bytes, bytes], request_id: str) -> AbstractContextManager[Any]:
        """The request's server span, continuing the caller's traceparent. With tracing off, none, unless
        the caller sent a traceparent: its trace id then still reaches the log lines."""
        carrier = trace_carrier(headers.get(b"traceparent"), headers.get(b"tracestate"))
        if carrier is None and not Tracing.on:
            return nullcontext()
        parent = propagate.extract(carrier) if carrier is not None else None
        route = scope["path"] if scope["path"] in self.paths else "other"
        return tracer.start_as_current_span(f"{scope['method']} {route}", context=parent, kind=trace.SpanKind.SERVER,
                                            attributes={"http.request.method": scope["method"], "http.route": route,
                                                        "stream_http.request_id": request_id})

    @staticmethod
    def with_id(send: Send, request_id: str, span: trace.Span | None) -> Send:
        id_header = (b"x-request-id", request_id.encode())
        recording = span is not None and span.is_recording()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
                if recording:
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
            await send(message)

        return send_with_id

    def request_id(self, scope: Scope, offered: bytes | None) -> str:
        if offered and self.from_proxy(scope):
            text = offered.decode("latin-1").strip()
            if REQUEST_ID.match(text):
                return text
        return f"{REQUEST_ID_PREFIX}{next(_request_numbers) & 0xFFFFFFFF:08x}"

    def from_proxy(self, scope: Scope) -> bool:
        if self.trust_everyone:
            return True
        client = scope.get("client")
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:  # a Unix socket's peer
            return False
        return address is not None and any(address in network for network in self.proxies)



def store_failure_handler(policy: HostPolicy, pages: Pages) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Starlette's handler for a store failure during any request: 503 and Retry-After, in the form the
    caller reads. Nothing is half-written (every change the store makes is atomic), so a retry is safe."""

    async def answer(request: Request, exc: Exception) -> Response:
        message = STORE_FAILED  # the store has logged what failed (an outage once, not per request)
        origin = request.headers.get("origin")
        if request.url.path.rstrip("/").endswith(MCP_PATH):
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin and \
                policy.allows_origin(origin) else {}
            return unavailable(message, "json-rpc", headers=cors)
        if "text/html" in request.headers.get("accept", ""):
            return unavailable(message + ".", "page", pages=pages)
        # as for_clients answers these endpoints
        return unavailable(message, "oauth", headers={"Access-Control-Allow-Origin": "*"} if origin else {})

    return answer


CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version",
                      "Mcp-Method", "Mcp-Name", "Last-Event-ID")
CORS_EXPOSE_HEADERS = ("Mcp-Session-Id", "WWW-Authenticate", "X-Request-Id")


def with_cors(app: ASGIApp, policy: HostPolicy, methods: Sequence[str]) -> ASGIApp:
    """Let browser clients on the allowed origins call `app` and read the MCP headers."""
    return CORSMiddleware(app, allow_origin_regex=policy.origin_regex(), allow_methods=list(methods),
                          allow_headers=list(CORS_ALLOW_HEADERS), expose_headers=list(CORS_EXPOSE_HEADERS),
                          max_age=600)



# --- the app


def build_app(settings: Settings) -> Starlette:
    """The whole HTTP server as one Starlette app: the MCP endpoint behind its checks, /healthz, and with
    sign-in on, the OAuth endpoints and sign-in pages. No I/O happens until its lifespan starts.

    Mount it in a bigger app with `Mount("/prefix", app)` and enter `app.router.lifespan_context(app)`
    in the parent's lifespan; set PUBLIC_URL to include the prefix. With sign-in on, the parent also
    serves `well_known_routes(settings)` at its root.
    """
    running = Runtime(settings)
    policy = HostPolicy.from_settings(settings)
    pages = Pages(settings)
    sdk_app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=settings.stateless,
        json_response=settings.json_response,
        event_store=running.events,
        max_request_body_size=settings.max_request_bytes,  # the gate has already refused a larger body
        session_idle_timeout=settings.session_idle_timeout_s,
        max_sessions=settings.max_sessions,
        # The gate checks Host and Origin first, with errors that name the setting to change.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    drain = Drain(settings.shutdown_grace_s)
    endpoint = RequestGate(mcp.session_manager.handle_request, running=running, policy=policy, drain=drain)
    sign_in = oauth_routes(running.provider, settings, pages) if running.provider is not None else []
    routes: list[BaseRoute] = [
        *[Route(path, endpoint, methods=["GET", "POST", "DELETE", "OPTIONS"]) for path in (MCP_PATH, MCP_PATH + "/")],
        Route("/healthz", liveness_endpoint(running), methods=["GET"]),
        Route("/readyz", readiness_endpoint(running, drain), methods=["GET"]),
        *sign_in,
        # What else the SDK serves, such as routes added with @mcp.custom_route.
        *(route for route in sdk_app.routes if getattr(route, "path", None) != MCP_PATH),
    ]
    paths = [path for route in routes if isinstance(path := getattr(route, "path", None), str)]
    app = Starlette(routes=routes, lifespan=app_lifespan(running, mcp.session_manager, drain),
                    middleware=[Middleware(RequestContext, trusted_proxies=settings.trusted_proxies, paths=paths)],
                    exception_handlers={StorageError: store_failure_handler(policy, pages)})
    app.state.drain = drain  # for the server that runs the app, to drain it on shutdown
    return app


def liveness_endpoint(running: Runtime) -> Callable[[Request], Awaitable[Response]]:
    async def healthz(request: Request) -> Response:
        """Liveness: the process is up and answering. Nothing it depends on is asked, so an outage of the
        store does not get healthy replicas restarted; /readyz says whether this one can serve."""
        health: dict[str, Any] = {"status": "ok", "version": VERSION, "mode": running.settings.mode}
        if not running.settings.stateless:  # handshake-era sessions this process keeps for notifications
            health["sessions"] = running.changes.session_count
        return JSONResponse(health)

    return healthz


def readiness_endpoint(running: Runtime, drain: Drain) -> Callable[[Request], Awaitable[Response]]:
    async def readyz(request: Request) -> Response:
        """Readiness, for load balancers and orchestrators: 200 when this process can serve (the store
        answers; with sign-in on, Google's discovery document is loaded; not shutting down), else 503
        naming what is missing. Google's document is fetched once and then kept, so the probe stays cheap."""
        checks = {"store": "ok", "shutdown": "no"}
        mode = {"store_mode": running.store.mode}  # sqlite, or Redis' standalone, sentinel or cluster
        try:
            await running.store.ping()
        except StorageError:  # logged by the store, once per outage
            checks["store"] = "unavailable"
        if running.provider is not None:
            loaded = await running.provider.google.login.authorization_endpoint() is not None
            checks["google_discovery"] = "loaded" if loaded else "unavailable"
        if drain.stopping:
            checks["shutdown"] = "draining"
        missing = [name for name, state in checks.items() if state not in ("ok", "no", "loaded")]
        if missing:
            return unavailable("not ready", "json", body={"status": "not ready", "missing": missing, "checks": checks,
                                                          **mode})
        return JSONResponse({"status": "ready", "checks": checks, **mode})

    return readyz


def app_lifespan(running: Runtime, session_manager: StreamableHTTPSessionManager,
                 drain: Drain) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Open the runtime, hand it to the MCP server's lifespan, and run the SDK's session manager."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings = running.settings
        async with running:
            STREAMS_OPEN.set_function(lambda: sum(1 for served in list(drain.served) if served.stream))
            MCP_EXCHANGES.set_function(lambda: len(drain.served))  # read when scraped: nothing per request
            token = _serving_runtime.set(running)
            try:
                async with session_manager.run():
                    gc.collect()
                    gc.freeze()  # start-up objects never die; sparing them from GC cuts latency spikes
                    logger.info("serving MCP at %s (%s, %s)", settings.mcp_url, settings.mode,
                                "sign-in with Google" if settings.auth_enabled else "no sign-in")
                    yield
            finally:
                _serving_runtime.reset(token)

    return lifespan


# === 11. Command line ========================================================
#
# `main()` runs the HTTP server on uvicorn (with a bound on request heads and a draining shutdown);
# `claude-config` and `doctor` are commands of their own.

REQUEST_HEAD_MAX_BYTES = 32 * 1024  # the request line and headers together; nginx's default is 32 KB too
REQUEST_HEADERS_MAX = 100
REQUEST_HEAD_READ_MAX_BYTES = 256 * 1024  # what the parser may hold while one header is still arriving
# Lines read in a head's packets (a packet may carry the start of the body too, so well above the header bound)
REQUEST_HEAD_READ_MAX_LINES = 10 * REQUEST_HEADERS_MAX

def parse_args(argv: Sequence[str] | None) -> dict[str, str]:
    """Command-line flags, as overrides keyed by environment variable name."""
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="stream-http: a remote MCP server over Streamable HTTP. Every setting can also be "
        "given as an environment variable or in ./.env; flags win. Commands: `server.py claude-config "
        "--help` (connect Claude Desktop), `server.py doctor --help` (check a deployment).",
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


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log lines on stderr, readable text or JSON objects, each naming its request. The SDK logs every
    stateless request at INFO; keep it at WARNING unless debugging, since formatting those lines costs
    more than serving the request."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormat() if log_format == "json" else TextLogFormat())
    handler.addFilter(RequestLogFields())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The SDK logs every stateless request, and the HTTP client every call to Google, at INFO.
    for chatty in ("mcp", "httpx2", "httpcore2"):
        logging.getLogger(chatty).setLevel(level if level == "DEBUG" else "WARNING")


# What BoundedHead overrides in uvicorn's httptools protocol (uvicorn has no head-size limit of its own
# there): checked at start, so a uvicorn that renamed any of them is served by h11 instead of failing.
HTTPTOOLS_HOOKS = ("data_received", "on_headers_complete", "on_body",
                   "on_message_complete")


def httptools_hooks_missing(protocol: type[Any]) -> list[str]:
    """The hooks BoundedHead needs that this uvicorn's httptools protocol lacks (none, as tested)."""
    return [name for name in HTTPTOOLS_HOOKS if not callable(getattr(protocol, name, None))]


def bounded_http_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a bound on the request head (httptools has none: a 64 KB header, or
    200 headers, were served): past REQUEST_HEAD_MAX_BYTES or REQUEST_HEADERS_MAX it answers 431 and closes
    the connection before any work. Without httptools, or with a uvicorn whose protocol changed, h11, with
    its own bound (h11_max_incomplete_event_size)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"
    if missing := httptools_hooks_missing(HttpToolsProtocol):
        logger.warning("uvicorn %s's httptools protocol has no %s: serving with h11, whose head-size bound "
                       "needs no override (pyproject.toml pins the uvicorn versions tested)", uvicorn.__version__,
                       ", ".join(missing))
        return "h11"

    class BoundedHead(HttpToolsProtocol):
        # What arrives while a head is read is bounded as it comes, in bytes and in lines (at C speed: a flood
        # of tiny headers is cut off before the parser calls back for each); the head's exact size and header
        # count are judged once it is whole, so that no hook of ours runs per header.
        refused = False
        read_bytes = read_lines = 0
        tail = b""  # the last bytes of the head read so far, where its blank line may begin

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            if self.read_bytes >= 0:  # still in a request head: what follows it (a body, the next request) is not
                end = self.end_of_head(data)  # counted
                self.read_bytes += end
                self.read_lines += data.count(b"\n", 0, end)
                self.tail = data[-3:] if end == len(data) else b""
                if self.read_bytes > REQUEST_HEAD_READ_MAX_BYTES:
                    self.refuse(f"The request head is larger than {REQUEST_HEAD_MAX_BYTES} bytes")
                    return
                if self.read_lines > REQUEST_HEAD_READ_MAX_LINES:
                    self.refuse(f"A request may carry at most {REQUEST_HEADERS_MAX} header fields")
                    return
            super().data_received(data)

        def end_of_head(self, data: bytes) -> int:
            """How much of `data` belongs to the head being read: up to its blank line, else all of it."""
            if self.tail and (joint := (self.tail + data[:3]).find(b"\r\n\r\n")) >= 0:  # split between reads
                return joint + 4 - len(self.tail)
            found = data.find(b"\r\n\r\n")
            return found + 4 if found >= 0 else len(data)

        def on_headers_complete(self) -> None:
            if self.refused:
                return
            if self.head_size() > REQUEST_HEAD_MAX_BYTES:
                self.refuse(f"The request head is larger than {REQUEST_HEAD_MAX_BYTES} bytes")
            elif len(self.headers) > REQUEST_HEADERS_MAX:
                self.refuse(f"A request may carry at most {REQUEST_HEADERS_MAX} header fields")
            self.read_bytes = -1
            if not self.refused:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self.read_bytes, self.read_lines, self.tail = 0, 0, b""
            if not self.refused:
                super().on_message_complete()

        def head_size(self) -> int:
            return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

        def refuse(self, why: str) -> None:
            self.refused = True
            body = f"{why}.\n".encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                                 b"charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))
            self.transport.close()

    return BoundedHead


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or SIGINT first drains the MCP endpoint: it stops taking requests,
    ends open streams cleanly, and gives calls in flight SHUTDOWN_GRACE seconds (python-sdk#2150: an open
    stream otherwise holds the shutdown until uvicorn cuts every connection)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        from sse_starlette.sse import AppStatus

        super().__init__(config)
        self.drain = drain
        AppStatus.disable_automatic_graceful_drain()  # it would cut calls in flight: the drain ends streams

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listening in self.servers:
            listening.close()
        await self.drain.run()
        await super().shutdown(sockets)


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


# --- claude-config: connect Claude Desktop to this server through mcp-remote


def claude_config_path() -> Path:
    """Where Claude Desktop keeps its configuration on this platform."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "Claude" / \
            "claude_desktop_config.json"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "Claude" / "claude_desktop_config.json"


def claude_server_entry(mcp_url: str) -> dict[str, Any]:
    """The `mcpServers` entry: Claude Desktop starts mcp-remote, which signs in and bridges stdio to HTTP."""
    args = ["-y", "mcp-remote", mcp_url]
    if urlsplit(mcp_url).scheme == "http" and not is_loopback_host(urlsplit(mcp_url).hostname or ""):
        args.append("--allow-http")  # mcp-remote refuses plain http beyond localhost without it
    return {"command": "npx", "args": args}


def write_claude_config(path: Path, name: str, entry: dict[str, Any]) -> Path | None:
    """Merge `entry` into the config at `path` as server `name`, keeping everything else; the old file is
    kept beside it as a backup, whose path is returned. Raises ConfigError for a file that is not a JSON
    object (nothing is written then)."""
    config: dict[str, Any] = {}
    backup = None
    if path.exists():
        text = path.read_text(encoding="utf-8")
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); fix or move it, then run this again") from exc
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers", {}), dict):
            raise ConfigError(f"{path} does not hold a JSON object with an mcpServers object")
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
        backup.write_text(text, encoding="utf-8")
    config.setdefault("mcpServers", {})[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)  # atomic: Claude Desktop never reads a half-written file
    return backup


def claude_config(argv: Sequence[str]) -> int:
    """`server.py claude-config`: print, or with --write merge, Claude Desktop's entry for this server."""
    parser = argparse.ArgumentParser(prog="server.py claude-config",
                                     description="Connect Claude Desktop to this server through mcp-remote.")
    parser.add_argument("--name", default=SERVER_NAME, help=f"the server's name in Claude (default {SERVER_NAME})")
    parser.add_argument("--url", help="the MCP endpoint (default PUBLIC_URL/mcp from the settings)")
    parser.add_argument("--write", action="store_true", help="merge it into Claude Desktop's config file")
    parser.add_argument("--config-file", type=Path, default=claude_config_path(),
                        help="the file to merge into (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        mcp_url = args.url or load_settings().mcp_url
        if problem := url_problem(mcp_url):
            raise ConfigError(f"--url {mcp_url!r} {problem}")
        entry = claude_server_entry(mcp_url)
        if not args.write:
            print(json.dumps({"mcpServers": {args.name: entry}}, indent=2))
            print(f"\nAdd this to {args.config_file} (or run again with --write), then restart Claude Desktop.",
                  file=sys.stderr)
        else:
            backup = write_claude_config(args.config_file, args.name, entry)
            kept = f"; the previous file is kept as {backup}" if backup else ""
            print(f"added {args.name!r} ({mcp_url}) to {args.config_file}{kept}. Restart Claude Desktop to connect.")
    except (ConfigError, OSError) as exc:
        print(f"server.py claude-config: {exc}", file=sys.stderr)
        return 1
    if urlsplit(mcp_url).scheme == "https":  # Claude's own connectors reach only public https servers
        print(f"\nOr without mcp-remote, in Claude (claude.ai, and Claude Desktop signed in to it): Settings, "
              f"Connectors, Add custom connector, with the URL {mcp_url}", file=sys.stderr)
    return 0


# --- connect: what to do in each client, for this server's real URL


def connect_guide(client: str, name: str, mcp_url: str) -> tuple[str, ...]:
    """The steps that connect `client` to the server at `mcp_url` as `name`, config and commands included."""
    def config(document: dict[str, Any]) -> str:
        return json.dumps(document, indent=2)

    cursor_link = "cursor://anysphere.cursor-deeplink/mcp/install?" + urlencode({
        "name": name, "config": base64.b64encode(json.dumps({"url": mcp_url}).encode()).decode()})
    guides: dict[str, tuple[str, ...]] = {
        "claude": ("In Claude (claude.ai, and the desktop and mobile apps signed in to it): Settings, Connectors, "
                   "Add custom connector.", f"Name: {name}", f"Remote MCP server URL: {mcp_url}",
                   "Then Connect: Claude opens this server's sign-in in your browser."),
        "claude-desktop": ("Claude Desktop through mcp-remote, which signs in in your browser and bridges stdio to "
                           "this server. Add to claude_desktop_config.json (or run `uv run server.py claude-config "
                           f"--write --url {mcp_url}`), then restart Claude Desktop:",
                           config({"mcpServers": {name: claude_server_entry(mcp_url)}})),
        "claude-code": ("In a terminal (add --scope user to have it in every project):",
                        f"claude mcp add --transport http {shlex.quote(name)} {shlex.quote(mcp_url)}",
                        "Then, in Claude Code, /mcp and choose it to sign in."),
        "chatgpt": ("In ChatGPT: Settings, Apps & Connectors, Advanced settings: turn on Developer mode (in a "
                    "workspace, an admin allows it first).", "Then Settings, Apps & Connectors, Create:",
                    f"Name: {name}", f"MCP server URL: {mcp_url}", "Authentication: OAuth",
                    "In a chat: +, Developer mode, and turn the connector on."),
        "vscode": ("In .vscode/mcp.json (this workspace) or MCP: Open User Configuration (every workspace):",
                   config({"servers": {name: {"type": "http", "url": mcp_url}}}),
                   "or from a terminal: code --add-mcp " + shlex.quote(json.dumps(
                       {"name": name, "type": "http", "url": mcp_url})),
                   "Then Start above the entry: VS Code opens the sign-in in your browser."),
        "cursor": ("In ~/.cursor/mcp.json (every project) or .cursor/mcp.json (this one):",
                   config({"mcpServers": {name: {"url": mcp_url}}}),
                   f"or open this link to add it: {cursor_link}",
                   "Then Settings, MCP: Connect next to it signs you in."),
        "gemini-cli": ("In a terminal (add --scope user to have it in every project, in ~/.gemini/settings.json):",
                       f"gemini mcp add --transport http {shlex.quote(name)} {shlex.quote(mcp_url)}",
                       "which writes this to the project's .gemini/settings.json:",
                       config({"mcpServers": {name: {"url": mcp_url, "type": "http"}}}),
                       f"Then, in Gemini CLI: /mcp auth {shlex.quote(name)}"),
    }
    return guides[client]


CONNECT_CLIENTS = {"claude": "claude", "claude-desktop": "mcp-remote", "claude-code": "claude-code",
                   "chatgpt": "chatgpt", "vscode": "vscode", "cursor": "cursor", "gemini-cli": "gemini-cli"}
CLOUD_CLIENTS = frozenset({"claude", "chatgpt"})  # they connect from their vendor's servers, not your computer


def deployment_needs(client: str, mcp_url: str, settings: Settings) -> tuple[str, ...]:
    """What `client` needs of this deployment, and whether it has it."""
    known = next(known for known in KNOWN_CLIENTS if known.key == CONNECT_CLIENTS[client])
    parts = urlsplit(mcp_url)
    needs: list[str] = []
    if client in CLOUD_CLIENTS:
        public = parts.scheme == "https" and not is_loopback_host(parts.hostname or "")
        needs.append(f"{known.name} connects from its vendor's servers: the URL must be public https "
                     f"({'it is' if public else 'it is not: put the server behind https, see Running in production'}).")
    if settings.auth_enabled:
        patterns = redirect_patterns(settings.redirect_uri_patterns)
        refused = [uri for uri in example_callbacks(known) if redirect_uri_problem(uri, patterns)]
        needs.append(f"Its callbacks ({', '.join(known.callbacks)}) are allowed." if not refused else
                     f"REDIRECT_URI_PATTERNS refuses its callbacks: add {known.key} to it.")
        for document in known.documents:
            how = "pinned in server.py" if settings.pinned_client_documents else "fetched when it connects"
            needs.append(f"It signs in with its metadata document {document} ({how}).")
    else:
        needs.append("Sign-in is off: anyone who can reach the URL can use the server (set GOOGLE_CLIENT_ID and "
                     "GOOGLE_CLIENT_SECRET to turn it on).")
    return tuple(needs)


def connect(argv: Sequence[str]) -> int:
    """`server.py connect CLIENT`: print what to do in CLIENT to connect it to this server."""
    parser = argparse.ArgumentParser(prog="server.py connect", description="Print the steps that connect an MCP "
                                     "client to this server, with its real URL.")
    parser.add_argument("client", choices=list(CONNECT_CLIENTS), help="the client to connect")
    parser.add_argument("--name", default=SERVER_NAME, help=f"the server's name in the client (default {SERVER_NAME})")
    parser.add_argument("--url", help="the MCP endpoint (default PUBLIC_URL/mcp from the settings)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        mcp_url = args.url or settings.mcp_url
        if problem := url_problem(mcp_url):
            raise ConfigError(f"--url {mcp_url!r} {problem}")
        needs = deployment_needs(args.client, mcp_url, settings)
    except ConfigError as exc:
        print(f"server.py connect: {exc}", file=sys.stderr)
        return 1
    print("\n".join(connect_guide(args.client, args.name, mcp_url)))
    print("\nWhat it needs from this deployment:\n" + "\n".join(f"- {need}" for need in needs))
    return 0


# --- doctor: check a running deployment from outside, as its clients will meet it

def example_callbacks(client: KnownClient) -> tuple[str, ...]:
    """A redirect URI like each the client sends (a port of 8080, an id of `doctor` where its patterns vary)."""
    return tuple(dict.fromkeys(pattern.replace(":*", ":8080").replace("*", "doctor") for pattern in client.callbacks))


DOCTOR_ORIGIN = "http://localhost:6274"  # a browser client's origin: the Inspector's
DOCTOR_CALLBACK = "http://127.0.0.1:9/stream-http-doctor"  # never reached: the doctor stops before it
PORTLESS_CALLBACK = "http://127.0.0.1/stream-http-doctor"  # as Claude Code's metadata document lists its own
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
INTERNAL_SUFFIXES = (".local", ".internal", ".lan", ".localdomain", ".home.arpa", ".localhost", ".svc", ".cluster")
CheckStatus = Literal["ok", "warn", "fail"]
CHECK_MARKS: dict[CheckStatus, str] = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


@dataclass
class Check:
    """One line of the doctor's report: what was checked, and what was found or how to fix it. A failure
    breaks a client; a warning is something a person may want to change."""

    name: str
    status: CheckStatus
    detail: str

    def line(self) -> str:
        return f"{CHECK_MARKS[self.status]}  {self.name}: {self.detail}"


class PageForm(HTMLParser):
    """The first form of a page, as a browser would submit it: its action and its hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.forms = 0

    @classmethod
    def read(cls, page: str) -> "PageForm":
        reader = cls()
        reader.feed(page)
        reader.close()
        return reader

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms += 1
            if self.forms == 1:
                self.action = attributes.get("action")
        elif tag == "input" and self.forms == 1 and attributes.get("type") == "hidden" and "name" in attributes:
            self.fields[attributes["name"]] = attributes.get("value", "")


def is_internal_url(url: str) -> bool:
    """Whether clients elsewhere on the internet could not reach `url`: a loopback, private or link-local
    address, localhost, a single-label name or a name kept for internal networks."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(INTERNAL_SUFFIXES)
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


class Doctor:
    """Checks a deployment over HTTP the way MCP clients, browsers and Google will meet it, so that
    the failures people hit with remote MCP servers show up before a user does."""

    def __init__(self, mcp_url: str, http: httpx2.AsyncClient) -> None:
        self.url = mcp_url.rstrip("/")
        parts = urlsplit(self.url)
        self.origin, self.path = f"{parts.scheme}://{parts.netloc}", parts.path
        self.public = not is_internal_url(self.url)
        self.http = http
        self.checks: list[Check] = []

    def check(self, name: str, passed: bool, detail: str, *, otherwise: CheckStatus = "fail") -> bool:
        self.checks.append(Check(name, "ok" if passed else otherwise, detail))
        return passed

    def warn(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "warn", detail))

    async def run(self) -> list[Check]:
        try:
            await self.examine()
        except httpx2.HTTPError as exc:
            self.check("connection", False, f"{type(exc).__name__}: {exc or 'no answer'}; is the server up at "
                       f"{self.url}?")
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not what the protocol says
            self.check("answers", False, f"an unexpected answer ({type(exc).__name__}: {exc})")
        return self.checks

    async def examine(self) -> None:
        first = await self.post_initialize(self.url)
        if first.status_code in (404, 405) and await self.mcp_endpoint_elsewhere():
            return
        host_refused = first.status_code in (400, 403, 421) and "host" in first.text.lower()
        if not self.check("Host header", not host_refused, f"{self.origin} is accepted" if not host_refused else
                          f"answered {first.status_code} ({first.text[:80]!r}): set PUBLIC_URL={self.origin}"
                          f"{self.path.removesuffix('/mcp')} (the URL clients use) or add the host to ALLOWED_HOSTS"):
            return
        await self.check_readiness()
        await self.check_eras(first)
        await self.check_cors()
        if first.status_code != 401:
            self.check("sign-in", not self.public and is_loopback_host(urlsplit(self.url).hostname or ""),
                       f"off (answered {first.status_code} without a token): the sign-in checks are skipped; "
                       "set GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET for anything but this machine")
            return
        await self.check_sign_in(first)

    async def check_readiness(self) -> None:
        """What /readyz says, beside the MCP endpoint: whether this replica can serve, and on which store (a
        Redis Sentinel or Cluster as configured, say). Skipped where a proxy does not pass /readyz on."""
        answer = await self.http.get(f"{self.origin}{self.path.removesuffix(MCP_PATH)}/readyz")
        try:
            ready = answer.json()
        except ValueError:
            return
        if not isinstance(ready, dict) or "checks" not in ready:
            return
        store = f"the store is {ready.get('store_mode', 'not named')}"
        self.check("readiness", answer.status_code == 200,
                   f"ready; {store}" if answer.status_code == 200 else
                   f"not ready ({', '.join(map(str, ready.get('missing', [])))} missing); {store}")

    async def mcp_endpoint_elsewhere(self) -> bool:
        """When the URL answers 404 or 405, whether the MCP endpoint is at URL/mcp instead: a failure that
        names the right URL, rather than every check failing with the wrong fix."""
        if self.path.rstrip("/").endswith(MCP_PATH):
            return False
        suggested = self.url + MCP_PATH
        if (await self.post_initialize(suggested)).status_code not in (200, 401):
            return False
        self.check("MCP endpoint", False, f"{self.url} is no MCP endpoint, but {suggested} is: check {suggested}")
        return True

    async def check_sign_in(self, first: httpx2.Response) -> None:
        challenge = await self.check_challenge(first)
        advertised = [challenge.get("resource_metadata", "")]
        resource = await self.check_resource_metadata()
        metadata = await self.check_authorization_server(resource["authorization_servers"][0]) if resource else None
        advertised += [*self.urls_in(resource or {}), *self.urls_in(metadata or {})]
        self.check_public_urls(advertised)
        if metadata is None:
            return
        client_id = await self.check_known_clients(metadata["registration_endpoint"])
        await self.check_loopback_ports(metadata)
        await self.check_client_documents(metadata["authorization_endpoint"])
        if client_id is not None:
            await self.check_google(metadata["authorization_endpoint"], client_id)
        self.warn("Google publishing status", "if the app is in Testing at Google (OAuth consent screen), Google's "
                  "refresh tokens expire after 7 days and people must sign in again: publish it (In production)")

    async def post_initialize(self, url: str, **headers: str) -> httpx2.Response:
        return await self.http.post(url, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "stream-http doctor", "version": VERSION}}},
            headers={"accept": "application/json, text/event-stream", **headers})

    async def check_eras(self, first: httpx2.Response) -> None:
        """Clients of both protocol eras must be answered: a server that refuses one loses those clients."""
        legacy = first.status_code == 401 or (first.status_code == 200 and "protocolVersion" in first.text)
        self.check("2025-11-25 handshake", legacy, "initialize is answered" if legacy else
                   f"initialize answered {first.status_code} ({first.text[:80]!r}): 2025-era clients (Claude, "
                   "mcp-remote, most of today's clients) cannot connect")
        modern = await self.http.post(self.url, json={
            "jsonrpc": "2.0", "id": 2, "method": "server/discover", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}},
            headers={"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
                     "mcp-method": "server/discover"})
        answered = modern.status_code == 401 or (modern.status_code == 200 and "2026-07-28" in modern.text)
        self.check("2026-07-28 discover", answered, "server/discover is answered without a session" if answered
                   else f"server/discover answered {modern.status_code} ({modern.text[:80]!r}): 2026-07-28 clients "
                   "cannot connect; a proxy may be dropping the MCP-Protocol-Version or Mcp-Method header")

    async def check_challenge(self, response: httpx2.Response) -> dict[str, str]:
        challenge = response.headers.get("www-authenticate", "")
        params = dict(CHALLENGE_PARAM.findall(challenge))
        metadata_url = params.get("resource_metadata")
        self.check("401 challenge", challenge.lower().startswith("bearer") and bool(metadata_url)
                   and bool(params.get("scope")),
                   f"WWW-Authenticate: {challenge}" if metadata_url and params.get("scope") else
                   f"WWW-Authenticate is {challenge or 'missing'!r}: it needs resource_metadata= and scope= so "
                   "clients find the sign-in and ask for the right scope (a proxy may be stripping it)")
        if metadata_url:
            named = metadata_url.startswith(self.origin + "/")
            self.check("public URL", named, f"the server names itself {self.origin}" if named else
                       f"the server advertises {metadata_url}, not {self.origin}: behind a proxy, set PUBLIC_URL to "
                       "the URL clients use (scheme, host and port as they reach the proxy)")
        slash = await self.post_initialize(self.url + "/")
        self.check("trailing slash", slash.status_code == 401,
                   f"{self.url}/ is the same endpoint" if slash.status_code == 401 else
                   f"{self.url}/ answered {slash.status_code}: clients that add the slash would loop")
        return params

    async def check_resource_metadata(self) -> dict[str, Any] | None:
        """The protected resource's metadata (RFC 9728): the good document, or None."""
        found: dict[str, Any] | None = None
        for where, url in (("path-aware", f"{self.origin}/.well-known/oauth-protected-resource{self.path}"),
                           ("root", f"{self.origin}/.well-known/oauth-protected-resource")):
            response = await self.http.get(url)
            document = response.json() if response.status_code == 200 else {}
            resource = document.get("resource")
            good = resource == self.url and bool(document.get("authorization_servers"))
            self.check(f"resource metadata ({where})", good,
                       f"{url} names resource {resource}" if good else
                       f"{url} answered {response.status_code} with resource {resource!r}; it must be {self.url} "
                       "exactly (no trailing slash, not the bare origin), with authorization_servers; route "
                       "/.well-known/ to the server")
            found = found or (document if good else None)
        return found

    async def check_authorization_server(self, issuer: str) -> dict[str, Any] | None:
        parts = urlsplit(issuer)
        url = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"
        response = await self.http.get(url)
        metadata = response.json() if response.status_code == 200 else {}
        if not self.check("issuer", metadata.get("issuer") == issuer,
                          f"{issuer} at {url}" if metadata.get("issuer") == issuer else
                          f"{url} answered {response.status_code} with issuer {metadata.get('issuer')!r}, which "
                          f"must equal {issuer} exactly: set PUBLIC_URL to the URL clients use"):
            return None
        methods = metadata.get("code_challenge_methods_supported") or []
        self.check("PKCE", methods == ["S256"], f"code_challenge_methods_supported is {methods}" +
                   ("" if methods == ["S256"] else ": it must be exactly [\"S256\"]"))
        iss = metadata.get("authorization_response_iss_parameter_supported") is True
        self.check("iss in responses", iss, "authorization_response_iss_parameter_supported" +
                   (" is true" if iss else " is not true: clients cannot tell a mix-up attack"), otherwise="warn")
        return metadata

    @staticmethod
    def urls_in(document: Mapping[str, Any]) -> list[str]:
        values = [value for value in document.values() if isinstance(value, str)]
        values += [item for value in document.values() if isinstance(value, list) for item in value
                   if isinstance(item, str)]
        return [value for value in values if value.startswith(("http://", "https://"))]

    def check_public_urls(self, urls: Sequence[str]) -> None:
        """Behind a public name, every URL a client is sent to must be public too (clients on the internet,
        claude.ai among them, go silent on an internal address)."""
        if not self.public:
            return
        internal = sorted({url for url in urls if url and is_internal_url(url)})
        self.check("metadata URLs", not internal, "every URL in the challenge and the metadata is public" if not
                   internal else f"{', '.join(internal[:3])} {'is' if len(internal) == 1 else 'are'} internal, so "
                   "clients on the internet cannot reach them: set PUBLIC_URL to the public URL")

    async def check_cors(self) -> None:
        preflight = await self.http.options(self.url, headers={
            "origin": DOCTOR_ORIGIN, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, mcp-protocol-version, mcp-session-id"})
        allowed = preflight.headers.get("access-control-allow-origin") in (DOCTOR_ORIGIN, "*")
        allowed_headers = preflight.headers.get("access-control-allow-headers", "").lower()
        good = preflight.status_code < 300 and allowed and "authorization" in allowed_headers
        self.check("CORS preflight", good, f"{DOCTOR_ORIGIN} may send Authorization and Mcp-Session-Id" if good else
                   f"OPTIONS from {DOCTOR_ORIGIN} answered {preflight.status_code}, allow-origin "
                   f"{preflight.headers.get('access-control-allow-origin')!r}, allow-headers {allowed_headers!r}: "
                   "browser clients (the Inspector) cannot connect; add the origin to CORS_ORIGINS")
        response = await self.post_initialize(self.url, origin=DOCTOR_ORIGIN)
        exposed = {h.strip().lower() for h in response.headers.get("access-control-expose-headers", "").split(",")}
        missing = sorted({"www-authenticate", "mcp-session-id"} - exposed)
        self.check("CORS exposed headers", not missing, "WWW-Authenticate and Mcp-Session-Id are readable by browsers"
                   if not missing else f"{', '.join(missing)} not in Access-Control-Expose-Headers: a browser client "
                   "cannot see the sign-in challenge or its session (a proxy may be replacing the CORS headers)")

    async def register(self, endpoint: str, redirect_uris: Sequence[str]) -> httpx2.Response:
        return await self.http.post(endpoint, json={
            "client_name": "stream-http doctor (self-check)", "redirect_uris": list(redirect_uris),
            "token_endpoint_auth_method": "none", "grant_types": ["authorization_code"]})

    async def check_known_clients(self, registration_endpoint: str) -> str | None:
        """Register one client with every known callback (and the doctor's own), dropping each one the
        policy refuses; a refused callback is a client that cannot sign in, which REDIRECT_URI_PATTERNS
        may mean on purpose (a warning). Leaves one registered client."""
        examples = {client.name: example_callbacks(client) for client in KNOWN_CLIENTS}
        wanted = list(dict.fromkeys([DOCTOR_CALLBACK, *(uri for uris in examples.values() for uri in uris)]))
        refused: dict[str, str] = {}
        for _ in range(len(wanted)):
            response = await self.register(registration_endpoint, wanted)
            if response.status_code == 201:
                break
            reason = response.json().get("error_description", "") if response.status_code == 400 else ""
            culprit = next((uri for uri in wanted if repr(uri) in reason or uri in reason), None)
            if culprit is None or culprit == DOCTOR_CALLBACK:
                self.check("registration", False, f"{registration_endpoint} answered {response.status_code}: "
                           f"{response.text[:200]}")
                return None
            refused[culprit] = reason
            wanted.remove(culprit)
        for client, uris in examples.items():
            bad = [uri for uri in uris if uri in refused]
            self.check(f"callback for {client}", not bad, f"{', '.join(uris)} allowed" if not bad else
                       f"{client} cannot sign in ({refused[bad[0]]}); if it should, add {bad[0]} to "
                       "REDIRECT_URI_PATTERNS", otherwise="warn")
        return response.json()["client_id"] if response.status_code == 201 else None

    async def check_client_documents(self, authorization_endpoint: str) -> None:
        """The clients that sign in with a metadata document (Claude, ChatGPT, VS Code, ...): the server must
        know each one's document, pinned or fetched, or their sign-in stops at "Unknown application"."""
        for client in (client for client in KNOWN_CLIENTS if client.documents):
            unknown: dict[str, int] = {}
            for document in client.documents:
                callback = PINNED_DOCUMENTS[document]["redirect_uris"][0]
                answer = await self.http.get(authorization_endpoint, params={
                    "response_type": "code", "client_id": document, "redirect_uri": callback, "scope": "mcp",
                    "state": "doctor", "code_challenge": "A" * 43, "code_challenge_method": "S256",
                    "resource": self.url})
                if not answer.is_redirect:
                    unknown[document] = answer.status_code
            self.check(f"metadata document of {client.name}", not unknown, f"{', '.join(client.documents)} known"
                       if not unknown else f"{', '.join(unknown)}: /authorize answered {next(iter(unknown.values()))}; "
                       "with PINNED_CLIENT_DOCUMENTS=false the server must fetch it, which a blocked or challenged "
                       "network refuses, and REDIRECT_URI_PATTERNS must allow its callbacks", otherwise="warn")

    async def check_loopback_ports(self, metadata: Mapping[str, Any]) -> None:
        """A native client listens on whatever port is free: a loopback redirect URI registered without a
        port (Claude Code's metadata document lists them so) must be accepted on any (RFC 8252 §7.3)."""
        registered = await self.register(metadata["registration_endpoint"], [PORTLESS_CALLBACK])
        if registered.status_code != 201:
            self.check("loopback redirect on any port", False, f"registering {PORTLESS_CALLBACK} answered "
                       f"{registered.status_code}: {registered.text[:120]}")
            return
        on_a_port = PORTLESS_CALLBACK.replace("127.0.0.1", "127.0.0.1:8080")
        answer = await self.http.get(metadata["authorization_endpoint"], params={
            "response_type": "code", "client_id": registered.json()["client_id"], "redirect_uri": on_a_port,
            "scope": "mcp", "state": "doctor", "code_challenge": "A" * 43, "code_challenge_method": "S256",
            "resource": self.url})
        accepted = answer.is_redirect and "error=" not in answer.headers.get("location", "")
        self.check("loopback redirect on any port", accepted, f"{PORTLESS_CALLBACK} is honoured on port 8080" if
                   accepted else f"registered {PORTLESS_CALLBACK}, then {on_a_port} answered {answer.status_code}: "
                   "native clients that pick a free port (Claude Code, VS Code) cannot sign in")

    async def check_google(self, authorization_endpoint: str, client_id: str) -> None:
        """Start a sign-in up to Google's door (never through it): the consent page, then the redirect to
        Google with offline access, and Google's own answer to this server's client and callback."""
        challenge = base64.urlsafe_b64encode(hashlib.sha256(secrets.token_bytes(32)).digest()).rstrip(b"=").decode()
        response = await self.http.get(authorization_endpoint, params={
            "response_type": "code", "client_id": client_id, "redirect_uri": DOCTOR_CALLBACK, "scope": "mcp",
            "state": "doctor", "code_challenge": challenge, "code_challenge_method": "S256", "resource": self.url})
        if response.is_redirect:
            response = await self.http.get(urljoin(str(response.url), response.headers["location"]))
        page = PageForm.read(response.text)
        if not self.check("consent page", response.status_code == 200 and {"txn", "csrf"} <= set(page.fields),
                          "shown before Google" if {"txn", "csrf"} <= set(page.fields) else
                          f"{response.url} answered {response.status_code} without a consent form"):
            return
        target = urljoin(str(response.url), page.action) if page.action else str(response.url)
        approved = await self.http.post(target, data={**page.fields, "decision": "approve"})
        google = urlsplit(approved.headers.get("location", ""))
        query = dict(parse_qsl(google.query))
        expected_callback = self.url.removesuffix("/mcp") + GOOGLE_CALLBACK_PATH
        self.check("Google callback", query.get("redirect_uri") == expected_callback,
                   f"{expected_callback} (add it to the OAuth client's authorized redirect URIs at Google)"
                   if query.get("redirect_uri") == expected_callback else
                   f"the server sends Google {query.get('redirect_uri')!r}, not {expected_callback}: set PUBLIC_URL")
        self.check("offline access", query.get("access_type") == "offline" and "openid" in query.get("scope", ""),
                   f"access_type={query.get('access_type')}, scope={query.get('scope')}" +
                   ("" if query.get("access_type") == "offline" else ": without offline access sign-ins die "
                    "with Google's access token after an hour"))
        discovery = f"{google.scheme}://{google.netloc}/.well-known/openid-configuration"
        try:
            found = (await self.http.get(discovery)).json().get("authorization_endpoint")
        except (httpx2.HTTPError, ValueError) as exc:
            found = None
            self.check("Google discovery", False, f"{discovery}: {exc}")
        else:
            self.check("Google discovery", bool(found), f"{discovery} is reachable" if found else
                       f"{discovery} has no authorization_endpoint: check GOOGLE_DISCOVERY_URL")
        at_google = await self.http.get(approved.headers.get("location", ""))
        self.check("Google accepts the client", at_google.status_code < 400,
                   f"{google.netloc} answered {at_google.status_code} to client {query.get('client_id')}"
                   if at_google.status_code < 400 else f"{google.netloc} refused client {query.get('client_id')} "
                   f"or its redirect URI ({at_google.status_code}: {at_google.text[:120]!r}): check "
                   f"GOOGLE_CLIENT_ID and add {expected_callback} to its authorized redirect URIs")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def resolving(overrides: Sequence[str]) -> Callable[[httpx2.Request], Awaitable[None]]:
    """A request hook that sends HOST:PORT to ADDRESS, as curl's --resolve does, keeping the Host header and
    the TLS server name: to check a deployment before its DNS name points at it."""
    table: dict[tuple[str, int], str] = {}
    for override in overrides:
        host, port, address = override.rsplit(":", 2) if override.count(":") >= 2 else (override, "0", "")
        if not address or not port.isdigit():
            raise ConfigError(f"--resolve {override!r} must be HOST:PORT:ADDRESS")
        table[(host.lower(), int(port))] = address.strip("[]")

    async def hook(request: httpx2.Request) -> None:
        address = table.get(((request.url.host or "").lower(), request.url.port or
                             (443 if request.url.scheme == "https" else 80)))
        if address is not None:
            request.extensions["sni_hostname"] = request.url.host
            request.url = request.url.copy_with(host=address)

    return hook


def doctor(argv: Sequence[str]) -> int:
    """`server.py doctor [URL]`: check a running deployment; exit 1 when any check fails."""
    parser = argparse.ArgumentParser(prog="server.py doctor", description=Doctor.__doc__)
    parser.add_argument("url", nargs="?", help="the MCP endpoint (default PUBLIC_URL/mcp from the settings)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object, for machines")
    parser.add_argument("--resolve", action="append", default=[], metavar="HOST:PORT:ADDRESS",
                        help="connect to ADDRESS for HOST:PORT, as curl does (before DNS points at the server)")
    parser.add_argument("--cacert", type=Path, help="trust this CA certificate file too (a private CA's server)")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # the report is the doctor's lines only, not the HTTP client's
    try:
        url = args.url or load_settings().mcp_url
        hook = resolving(args.resolve)
    except ConfigError as exc:
        print(f"server.py doctor: configuration error: {exc}", file=sys.stderr)
        return 2
    if problem := url_problem(url):
        print(f"server.py doctor: {url!r} {problem}", file=sys.stderr)
        return 2
    verify: ssl.SSLContext = tls_context()
    if args.cacert:
        verify = ssl.create_default_context(cafile=str(args.cacert))

    async def examine() -> list[Check]:
        async with httpx2.AsyncClient(timeout=GOOGLE_TIMEOUT_S, verify=verify,
                                      event_hooks={"request": [hook]}) as http:
            return await Doctor(url, http).run()

    checks = asyncio.run(examine())
    counts = {status: sum(check.status == status for check in checks) for status in ("ok", "warn", "fail")}
    if args.json:
        print(json.dumps({"url": url, "checks": [dataclasses.asdict(check) for check in checks],
                          "passed": counts["ok"], "warnings": counts["warn"], "failed": counts["fail"]}, indent=2))
    else:
        print(f"checking {url}")
        for check in checks:
            print(check.line())
        print(f"{counts['ok']} passed, {plural(counts['warn'], 'warning')}, {counts['fail']} failed")
    return 1 if counts["fail"] else 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"claude-config": claude_config, "connect": connect,
                                                        "doctor": doctor}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the HTTP server until SIGINT or SIGTERM (or a command: claude-config, doctor); return the exit status.
    Whatever stops it from starting (a setting, a taken port) is one line on stderr and exit status 2, said
    before anything claims to serve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    try:
        settings = startup_settings(argv)
        start_telemetry(settings)
        listening = listening_socket(settings.host, settings.port)
    except ConfigError as exc:
        print(f"server.py: {exc}", file=sys.stderr)
        return 2
    return serve(settings, listening)


def startup_settings(argv: Sequence[str]) -> Settings:
    """The settings to run with (flags over the environment over .env), with logging configured and the
    warnings about what trades safety for convenience logged; ConfigError says why the server must not start."""
    try:
        settings = load_settings(overrides=parse_args(argv))
    except ConfigError as exc:
        raise ConfigError(f"configuration error: {exc}") from None
    configure_logging(settings.log_level, settings.log_format)
    if reason := refuse_unsafe_bind(settings):
        raise ConfigError(reason)
    try:
        redirect_patterns(settings.redirect_uri_patterns)  # a client named there must be one this server knows
    except ConfigError as exc:
        raise ConfigError(f"configuration error: {exc}") from None
    if settings.auth_enabled:
        try:
            settings = with_secret_key(settings)
        except ConfigError as exc:
            raise ConfigError(f"configuration error: {exc}") from None
    if "*" in settings.trusted_proxies:
        logger.warning("TRUSTED_PROXIES is *: any caller can claim another address with X-Forwarded-For; "
                       "list your proxies' addresses instead unless only they can reach this port")
    if settings.cimd_allow_local:
        logger.warning("CIMD_ALLOW_LOCAL is on: client metadata documents may come from loopback and private "
                       "addresses over http; turn it off outside development")
    return settings


def start_telemetry(settings: Settings) -> None:
    """Traces and the metrics port; either failing (a taken metrics port, an OTLP endpoint without the SDK)
    stops the server."""
    try:
        configure_tracing()
        serve_metrics(settings)
    except (ConfigError, OSError) as exc:
        raise ConfigError(f"cannot start telemetry: {exc}") from None


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything starts, so a taken port is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host.strip("[]"), port))
    except OSError as exc:
        listening.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is taken (is the server already running?): choose another "
                              f"with --port {port + 1} or PORT={port + 1}") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"not allowed to listen on port {port} (below 1024 needs privileges): choose "
                              "another with --port or PORT") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listening.set_inheritable(True)
    return listening


def serve(settings: Settings, listening: socket.socket) -> int:
    """Serve the app on uvicorn (uvloop and httptools, its `standard` extra: about twice the requests per core)
    until asked to stop, draining first."""
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        http=bounded_http_protocol(),
        h11_max_incomplete_event_size=REQUEST_HEAD_MAX_BYTES,  # the bound where h11 is what runs
        log_config=None,
        access_log=False,
        proxy_headers=False,  # build_app applies TRUSTED_PROXIES itself, after noting the proxy's request id
        # After the drain below has answered every call and ended every stream, what still runs (a tool
        # whose caller was answered) is cancelled this soon, inside the margin the drain left.
        timeout_graceful_shutdown=DRAIN_MARGIN_S / 2,
    )
    server = DrainingServer(config, app.state.drain)
    # After its graceful shutdown uvicorn re-raises the signal that asked for it, which would end the
    # process as "killed by SIGTERM" (or a KeyboardInterrupt traceback); a finished shutdown is a clean exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    with suppress(KeyboardInterrupt):
        server.run(sockets=[listening])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
