"""Settings: one table drives the environment, .env, the command line, --help and .env.example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import server
from tests.conftest import REPO, run_python


def test_zero_configuration_defaults_are_safe() -> None:
    settings = server.load_settings({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.mcp_url == "http://127.0.0.1:8000/mcp"
    assert settings.store_url == f"sqlite:///{REPO / 'data' / 'stream-http.db'}", "beside server.py, from any directory"
    assert settings.binds_loopback and not settings.allow_unauthenticated
    assert settings.mode == "stateful"


def test_environment_then_flags_override_defaults() -> None:
    settings = server.load_settings(
        {"PORT": "9000", "MCP_STATELESS": "yes", "CORS_ORIGINS": "https://a.example, https://b.example/",
         "PUBLIC_URL": "https://mcp.example.com/tools/"},
        overrides={"PORT": "9100", "MCP_JSON_RESPONSE": "true"},
    )
    assert settings.port == 9100
    assert settings.mode == "stateless+json"
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.public_url == "https://mcp.example.com/tools"
    assert settings.mcp_url == "https://mcp.example.com/tools/mcp"


def test_public_url_follows_host_and_port_and_wildcard_binds_use_localhost() -> None:
    assert server.load_settings({"HOST": "::1", "PORT": "81"}).public_url == "http://[::1]:81"
    assert server.load_settings({"HOST": "0.0.0.0"}).public_url == "http://localhost:8000"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(server.ConfigError) as raised:
        server.load_settings({"PORT": "eighty", "MCP_STATELESS": "maybe", "PUBLIC_URL": "ftp://x",
                              "STORE_URL": "mysql://db", "LOG_LEVEL": "chatty", "MAX_REQUEST_BYTES": "10"})
    message = str(raised.value)
    for problem in ("PORT='eighty' is not a whole number", "MCP_STATELESS='maybe' is not true or false",
                    "PUBLIC_URL='ftp://x' must be an http:// or https:// URL", "STORE_URL='mysql://db'",
                    "LOG_LEVEL='CHATTY' is not one of", "MAX_REQUEST_BYTES=10 is outside"):
        assert problem in message


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PORT=9001\nLOG_LEVEL=DEBUG\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(server.ENV_FILE)  # the tests set it empty: here the file is read, as it is for users
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    for name in ("PORT", "HOST", "PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = server.load_settings()
    assert (settings.port, settings.log_level) == (9001, "WARNING")


def test_env_example_documents_every_setting() -> None:
    documented = set(re.findall(r"^# ([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert documented == {option.env for option in server.OPTIONS}


def test_help_lists_every_setting_with_its_default() -> None:
    result = run_python("server.py", "--help")
    assert result.returncode == 0
    for option in server.OPTIONS:
        assert option.env in result.stdout
        if option.flag:
            assert option.flag in result.stdout
    assert "MCP_STATELESS" in result.stdout and "--stateless" in result.stdout


def test_importing_server_binds_and_starts_nothing(tmp_path: Path) -> None:
    probe = ("import sys, threading; sys.path.insert(0, sys.argv[1]); import server; "
             "assert threading.active_count() == 1, threading.enumerate(); "
             "print(type(server.mcp).__name__, server.mcp.name)")
    result = run_python("-c", probe, str(REPO), cwd=tmp_path, env={"DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MCPServer stream-http"
    assert not (tmp_path / "data").exists(), "importing must not open the store"


def test_server_py_loads_the_way_mcp_run_and_mcp_dev_load_it(tmp_path: Path) -> None:
    """`mcp run`/`mcp dev` exec the file without registering it in sys.modules; dataclasses with
    string annotations crash there, so server.py must not use them."""
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('server_module', sys.argv[1]);"
             "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); print(module.mcp.name)")
    result = run_python("-c", probe, str(REPO / "server.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stream-http"


def test_a_server_icon_must_be_a_small_image(tmp_path: Path) -> None:
    small, big, text = tmp_path / "icon.png", tmp_path / "big.png", tmp_path / "icon.txt"
    small.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    big.write_bytes(b"0" * (server.ICON_MAX_BYTES + 1))
    text.write_text("not an image")
    assert server.load_settings({"SERVER_ICON": str(small)}).server_icon.startswith("data:image/png;base64,iVBORw0K")
    for path, problem in ((big, "is 32769 bytes; at most 32768"), (text, "must be one of .png"),
                          (tmp_path / "missing.svg", "cannot be read")):
        with pytest.raises(server.ConfigError) as raised:
            server.load_settings({"SERVER_ICON": str(path)})
        assert problem in str(raised.value)


def test_env_file_names_the_settings_file_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENV_FILE (from the environment only) points at another settings file; empty, none is read."""
    (tmp_path / ".env").write_text("PORT=9001\n")
    (tmp_path / "other.env").write_text("PORT=9002\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.setenv(server.ENV_FILE, str(tmp_path / "other.env"))
    assert server.load_settings().port == 9002
    monkeypatch.setenv(server.ENV_FILE, "")
    assert server.load_settings().port == 8000


@pytest.mark.parametrize(("value", "problem"), [
    ("http://exa mple.com", "has 'exa mple.com' for a host, which is neither a name nor an address"),
    ("http://127.0.0.1:abc", "has a port that is not a number"),
    ("http://example.com:80:80", "has a port that is not a number"),
    ("http://127.0.0.1:8000/mcp", "ends in /mcp, but the MCP endpoint is PUBLIC_URL/mcp: write 'http://127.0.0.1:8000'"),
    ("https://user:secret@mcp.example.com", "must not carry a user name or password"),
    ("mcp.example.com", "must be an http:// or https:// URL with a host"),
])
def test_a_malformed_public_url_stops_the_server_saying_what_to_write(value: str, problem: str) -> None:
    with pytest.raises(server.ConfigError) as raised:
        server.load_settings({"PUBLIC_URL": value})
    assert problem in str(raised.value)
    result = run_python("server.py", "--public-url", value)
    assert result.returncode == 2 and problem in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["CORS_ORIGINS", "GOOGLE_DISCOVERY_URL", "GOOGLE_CALENDAR_API", "GOOGLE_DRIVE_API"])
def test_every_url_setting_is_checked_as_strictly(name: str) -> None:
    with pytest.raises(server.ConfigError) as raised:
        server.load_settings({name: "http://127.0.0.1:abc"})
    assert f"{name}='http://127.0.0.1:abc' has a port that is not a number" in str(raised.value)



@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel://:hunter2@a:26379,b:26379", "names no service: write redis+sentinel://host:port[,host:port...]/"
                                                  "service_name[/db]"),
    ("redis+cluster://a:7000,b:7001/1", "has /1 after its hosts, but Redis Cluster has only database 0"),
    ("redis://a:6379,b:6379/0", "names several hosts, but redis:// takes one"),
    ("rediss+cluster://a:70000", "has port '70000' for a, which is not a number from 1 to 65535"),
    ("redis+sentinel://a/mymaster/zero", "has /zero for its database, which must be one number"),
    ("redis+cluster://a:7000?db=2", "has db in its query, which takes only prefix, replica_wait_ms,"),
    ("redis+cluster://a:7000?replica_wait_ms=soon", "has replica_wait_ms='soon', which must be a number of"),
    ("redis+cluster://a:7000?prefix={tag}", "has prefix='{tag}': a prefix is a non-empty name without braces"),
    ("redis+cluster://:hunter2@", "names no host"),
    ("memcached://:hunter2@a", "must be sqlite:///path/to/file.db or redis://"),
    ("redis+cluster://a:7000?sentinel_password=hunter2&db=1", "has db in its query"),  # a query's password too
    ("redis+sentinel://:hunt@er2@a:26379,b", "names no service"),  # a raw @ in the password
    ("redis+sentinel://:hunter2@a:26379,[2001:db8::1:26379/m", "for a host, which is neither"),  # a lone bracket
    ("redis+cluster://a:7000?replica_wait_ms=5000", "from 0 to 1000"),  # past the 2 s read timeout
])
def test_a_bad_store_url_is_one_line_naming_the_problem_and_never_the_password(url: str, problem: str) -> None:
    with pytest.raises(server.ConfigError) as raised:
        server.load_settings({"STORE_URL": url, "SECRET_KEY": "k" * 40})
    message = str(raised.value)
    assert problem in message and "\n" not in message
    assert "hunter2" not in message


def test_the_redis_forms_are_read_as_redis_py_needs_them() -> None:
    sentinel = server.parse_redis_url("rediss+sentinel://app:p%40ss@s1:26380,[::1],s3/mymaster/2"
                                      "?sentinel_password=sp&ssl_ca_certs=/ca.pem&prefix=blue")
    assert (sentinel.mode, sentinel.tls, sentinel.hosts) == ("sentinel", True, (("s1", 26380), ("::1", 26379),
                                                                                ("s3", 26379)))
    assert (sentinel.username, sentinel.password, sentinel.service, sentinel.db, sentinel.prefix) == (
        "app", server.Secret("p@ss"), "mymaster", 2, "blue")
    assert dict(sentinel.options) == {"sentinel_password": "sp", "ssl_ca_certs": "/ca.pem"}
    assert sentinel.replica_wait_ms == server.REPLICA_WAIT_DEFAULT_MS, "Sentinel waits for a replica by default"
    cluster = server.parse_redis_url("redis+cluster://:pw@n1:7000,n2?replica_wait_ms=0")
    assert (cluster.mode, cluster.tls, cluster.hosts, cluster.db, cluster.replica_wait_ms) == (
        "cluster", False, (("n1", 7000), ("n2", 6379)), 0, 0)
    ipv6 = server.parse_redis_url("redis+sentinel://:p@ss@h1:26379,[2001:db8::2]:26380/m")  # urlsplit refuses these
    assert (ipv6.hosts, ipv6.password) == ((("h1", 26379), ("2001:db8::2", 26380)), server.Secret("p@ss"))
    plain = server.parse_redis_url("redis://cache:6380/3?prefix=x")
    assert (plain.mode, plain.hosts, plain.db, plain.prefix, plain.replica_wait_ms) == (
        "standalone", (("cache", 6380),), 3, "x", 0)
    for url in ("redis+sentinel://a/m", "rediss+cluster://a", "redis://localhost/0"):
        assert server.load_settings({"STORE_URL": url, "SECRET_KEY": "k" * 40}).store_url == url


def test_a_bad_store_url_stops_the_server_with_one_line(tmp_path: Path) -> None:
    done = run_python("server.py", env={"STORE_URL": "redis+sentinel://:hunter2@a:26379", "SECRET_KEY": "k" * 40,
                                        "DATA_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "STORE_URL=" in done.stderr and "names no service" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
