"""`server.py connect CLIENT`: what to do in each client, with the server's real URL; each printed config
checked against the schema its client documents, and Claude Desktop's against `claude-config`'s entry,
which tests/test_claude_config.py runs through the real mcp-remote."""

from __future__ import annotations

import base64
import json
import re
import shlex
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest

from tests.conftest import run_python
from tests.signin import env_without_settings

URL = "https://mcp.example.com/mcp"
SIGN_IN = {"GOOGLE_CLIENT_ID": "x.apps.googleusercontent.com", "GOOGLE_CLIENT_SECRET": "s"}

# The parts of each client's documented configuration that an HTTP server entry uses.
VSCODE_MCP_JSON = {  # code.visualstudio.com/docs/copilot/reference/mcp-configuration: "servers", type http|sse
    "type": "object", "required": ["servers"], "properties": {"servers": {"type": "object", "additionalProperties": {
        "type": "object", "required": ["type", "url"], "additionalProperties": False, "properties": {
            "type": {"enum": ["http", "sse"]}, "url": {"type": "string", "format": "uri"},
            "headers": {"type": "object"}}}}}}
CURSOR_MCP_JSON = {  # cursor.com/docs/context/mcp: remote servers are "url" (and optional "headers", "auth")
    "type": "object", "required": ["mcpServers"], "properties": {"mcpServers": {
        "type": "object", "additionalProperties": {"type": "object", "required": ["url"], "additionalProperties": False,
                                                   "properties": {"url": {"type": "string"}, "headers": {},
                                                                  "auth": {}}}}}}
GEMINI_SETTINGS = {  # gemini-cli docs/tools/mcp-server.md: "url" with "type": "http" (httpUrl is deprecated)
    "type": "object", "required": ["mcpServers"], "properties": {"mcpServers": {
        "type": "object", "additionalProperties": {"type": "object", "required": ["url", "type"],
                                                   "properties": {"url": {"type": "string"},
                                                                  "type": {"enum": ["http", "sse"]}}}}}}


def connect(*args: str, env: dict[str, str] | None = None) -> str:
    done = run_python("server.py", "connect", *args, env={**env_without_settings(), **(env or {})})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def printed_json(output: str) -> Any:
    """The JSON block a guide prints (from the line that is a lone `{` to its matching `}`)."""
    match = re.search(r"^\{\n.*?^\}$", output, re.S | re.M)
    assert match, output
    return json.loads(match.group(0))


def test_vscode_gets_an_mcp_json_entry_and_a_command(tmp_path: Any) -> None:
    output = connect("vscode", "--url", URL, "--name", "my server")
    config = printed_json(output)
    jsonschema.validate(config, VSCODE_MCP_JSON)
    assert config == {"servers": {"my server": {"type": "http", "url": URL}}}
    command = next(line for line in output.splitlines() if "code --add-mcp" in line)
    words = shlex.split(command.split(": ", 1)[1])
    assert words[:2] == ["code", "--add-mcp"] and json.loads(words[2]) == {"name": "my server", "type": "http",
                                                                          "url": URL}


def test_cursor_gets_its_mcp_json_and_an_install_link() -> None:
    output = connect("cursor", "--url", URL)
    config = printed_json(output)
    jsonschema.validate(config, CURSOR_MCP_JSON)
    assert config == {"mcpServers": {"stream-http": {"url": URL}}}
    link = re.search(r"cursor://\S+", output)
    assert link is not None
    query = parse_qs(urlsplit(link.group(0)).query)
    assert urlsplit(link.group(0)).path == "/mcp/install" and query["name"] == ["stream-http"]
    assert json.loads(base64.b64decode(query["config"][0])) == {"url": URL}


def test_gemini_cli_gets_its_command_and_settings() -> None:
    output = connect("gemini-cli", "--url", URL)
    jsonschema.validate(printed_json(output), GEMINI_SETTINGS)
    assert f"gemini mcp add --transport http stream-http {URL}" in output.splitlines()


def test_claude_code_gets_one_command() -> None:
    output = connect("claude-code", "--url", URL, "--name", "notes; rm -rf ~")
    command = next(line for line in output.splitlines() if line.startswith("claude mcp add"))
    assert shlex.split(command) == ["claude", "mcp", "add", "--transport", "http", "notes; rm -rf ~", URL]


def test_claude_desktop_gets_claude_configs_entry() -> None:
    output = connect("claude-desktop", "--url", URL)
    entry = run_python("server.py", "claude-config", "--url", URL, env=env_without_settings())
    assert printed_json(output) == json.loads(entry.stdout)


@pytest.mark.parametrize("client", ["claude", "chatgpt"])
def test_cloud_clients_are_told_they_need_public_https(client: str) -> None:
    assert "must be public https (it is)." in connect(client, "--url", URL)
    local = connect(client, "--url", "http://127.0.0.1:8000/mcp")
    assert "must be public https (it is not" in local and "http://127.0.0.1:8000/mcp" in local


def test_the_deployment_needs_follow_its_settings() -> None:
    narrow = connect("cursor", "--url", URL, env={**SIGN_IN, "REDIRECT_URI_PATTERNS": "claude"})
    assert "REDIRECT_URI_PATTERNS refuses its callbacks: add cursor to it." in narrow
    claude = connect("claude", "--url", URL, env={**SIGN_IN, "REDIRECT_URI_PATTERNS": "claude"})
    assert "callbacks (https://claude.ai/api/mcp/auth_callback" in claude and "are allowed" in claude
    assert "https://claude.ai/oauth/mcp-oauth-client-metadata (pinned in server.py)" in claude
    fetched = connect("chatgpt", "--url", URL, env={**SIGN_IN, "PINNED_CLIENT_DOCUMENTS": "false"})
    assert "https://chatgpt.com/oauth/client.json (fetched when it connects)" in fetched
    assert "Sign-in is off" in connect("vscode", "--url", URL)


def test_the_default_url_is_the_servers_own() -> None:
    output = connect("vscode", env={"PUBLIC_URL": "https://notes.example.org"})
    assert printed_json(output)["servers"]["stream-http"]["url"] == "https://notes.example.org/mcp"


def test_a_bad_client_or_url_is_one_line() -> None:
    unknown = run_python("server.py", "connect", "clippy", env=env_without_settings())
    assert unknown.returncode == 2 and "invalid choice: 'clippy'" in unknown.stderr
    bad = run_python("server.py", "connect", "cursor", "--url", "mcp.example.com", env=env_without_settings())
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "server.py connect: --url" in bad.stderr
