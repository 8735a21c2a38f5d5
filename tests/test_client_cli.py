"""client.py from the command line, as `uv run client.py ...` runs it, against a real server."""

from __future__ import annotations

import json
import subprocess

import pytest

import server
from tests.conftest import ServerProcess, assert_no_traceback, free_port, run_python


def client(server: ServerProcess | str, *args: str) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.mcp_url
    return run_python("client.py", "--url", url, *args)


def test_without_a_command_it_lists_everything(stateful_server: ServerProcess) -> None:
    result = client(stateful_server)
    assert result.returncode == 0, result.stderr
    assert f"stream-http {server.VERSION} (protocol 2026-07-28)" in result.stdout
    for line in ("Tools (10)", "Resources (4)", "Resource templates (1)", "Prompts (2)", "notes://{note_id}",
                 "add  Add two numbers and return the sum."):
        assert line in result.stdout


@pytest.mark.parametrize(("flag", "protocol"), [("--legacy", "2025-11-25"), ("--modern", "2026-07-28")])
def test_the_era_can_be_pinned(stateful_server: ServerProcess, flag: str, protocol: str) -> None:
    result = client(stateful_server, flag)
    assert f"(protocol {protocol})" in result.stdout


def test_call_read_and_prompt(stateful_server: ServerProcess) -> None:
    summed = client(stateful_server, "call", "add", "a=2", "b=3")
    assert summed.returncode == 0
    assert json.loads(summed.stdout) == {"result": 5.0}
    added = client(stateful_server, "call", "add_note", "title=Groceries", 'tags=["home"]', "body=milk")
    note = json.loads(added.stdout)
    assert note["tags"] == ["home"]
    index = client(stateful_server, "read", "notes://index")
    assert note["id"] in index.stdout
    prompt = client(stateful_server, "prompt", "summarize_notes", "tag=home")
    assert prompt.stdout.startswith("user: Summarize these notes") and "milk" in prompt.stdout


def test_progress_and_logs_are_shown_while_a_tool_runs(stateful_server: ServerProcess) -> None:
    result = client(stateful_server, "--legacy", "call", "long_task", "steps=2", "step_seconds=0")
    assert result.returncode == 0
    assert "progress 1/2: step 1 of 2" in result.stderr and "progress 2/2: step 2 of 2" in result.stderr
    assert "info: long_task finished step 2 of 2" in result.stderr


@pytest.mark.parametrize("era", ["--legacy", "--modern"])
def test_confirmation_questions_are_answered_with_yes(stateful_server: ServerProcess, era: str) -> None:
    note = json.loads(client(stateful_server, "call", "add_note", "title=Old").stdout)
    declined = client(stateful_server, era, "call", "delete_note", f"note_id={note['id']}")
    assert "declined: not a terminal; use --yes" in declined.stderr
    assert json.loads(declined.stdout)["confirmation"] == "declined"
    confirmed = client(stateful_server, era, "--yes", "call", "delete_note", f"note_id={note['id']}")
    assert json.loads(confirmed.stdout) == {"deleted": True, "note_id": note["id"], "confirmation": "confirmed"}


@pytest.mark.parametrize(("args", "message"), [
    (("call", "add", "a=two", "b=3"), "error: tool add failed: "),
    (("call", "nope"), "error: the server refused: Unknown tool: nope (error -32602)"),
    (("read", "notes://missing"), "error: the server refused: There is no note 'missing' (error -32602)"),
])
def test_failures_are_one_line_and_exit_1(stateful_server: ServerProcess, args: tuple[str, ...],
                                          message: str) -> None:
    result = client(stateful_server, *args)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1
    assert_no_traceback(result.stderr, result.stdout)


def test_an_unreachable_server_is_one_line(tmp_path: object) -> None:
    result = client(f"http://127.0.0.1:{free_port()}/mcp")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to http://127.0.0.1:")
    assert "start it with: uv run server.py" in result.stderr
    assert_no_traceback(result.stderr)


def test_an_http_error_is_one_line(stateful_server: ServerProcess) -> None:
    result = client(stateful_server.base_url + "/not-mcp")
    assert result.returncode == 1
    assert result.stderr.startswith("error: the server refused: Not Found")
    assert_no_traceback(result.stderr)


@pytest.mark.parametrize("tail", ["", "/"])
def test_a_url_without_the_mcp_path_names_the_one_that_answers(stateful_server: ServerProcess, tail: str) -> None:
    origin = stateful_server.base_url
    result = client(origin + tail)
    assert result.returncode == 1
    assert result.stderr == f"error: no MCP endpoint at {origin}{tail}; did you mean {origin}/mcp?\n"


@pytest.mark.parametrize(("args", "problem"), [
    (("call",), "'call' needs a name"),
    (("read",), "'read' needs a resource URI"),
    (("call", "add", "a"), "argument 'a' is not key=value"),
    (("call", "add", "=2"), "argument '=2' is not key=value"),
    (("frobnicate",), "argument command: invalid choice: 'frobnicate'"),
    (("--nope",), "unrecognized arguments: --nope"),
    (("--legacy", "--modern"), "argument --modern: not allowed with argument --legacy"),
])
def test_a_wrong_command_line_is_one_line_naming_help_and_exits_2(args: tuple[str, ...], problem: str) -> None:
    result = run_python("client.py", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {problem}"), result.stderr
    assert result.stderr.endswith(" (see: uv run client.py --help)\n"), result.stderr
    assert result.stderr.count("\n") == 1 and "usage:" not in result.stderr


def test_help_is_still_the_whole_usage() -> None:
    result = run_python("client.py", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: client.py") and "--no-browser" in result.stdout


def test_string_arguments_stay_strings_even_when_they_look_like_json(stateful_server: ServerProcess) -> None:
    echoed = client(stateful_server, "call", "echo", "message=12345678")
    assert json.loads(echoed.stdout) == {"result": "12345678"}
    exponent = client(stateful_server, "call", "echo", "message=1e5")
    assert json.loads(exponent.stdout) == {"result": "1e5"}
    prompt = client(stateful_server, "prompt", "draft_from_note", "note_id=2024", "style=tweet")
    assert "There is no note '2024'" in prompt.stderr
