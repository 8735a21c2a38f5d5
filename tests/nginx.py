"""Debian's nginx on a loopback port, running README's reverse-proxy block (or a variant of it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for_port

LISTEN = "listen 443 ssl;"


def readme_nginx_block() -> str:
    """The reverse-proxy configuration README documents, verbatim."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"```nginx\n(.*?)```", readme, re.DOTALL).group(1)


def readme_config(upstream_ports: list[int], *, extra: str = "") -> str:
    """README's block with these replicas as upstreams, without TLS, and `extra` directives added to
    its `location /` (to misconfigure it the ways deployments go wrong)."""
    block = readme_nginx_block()
    upstreams = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in upstream_ports)
    block, replaced = re.subn(r"(    server 10\.0\.0\.\d+:8000 .*;\n)+", upstreams, block)
    assert replaced == 1, "README's upstream block changed shape"
    assert LISTEN in block and "location / {" in block, "README's server block changed shape"
    block = block.replace("location / {", "location / {\n" + extra)
    return "\n".join(line for line in block.splitlines() if "ssl_certificate" not in line)


@dataclass
class Nginx:
    workdir: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, workdir: Path, config: str, *, tls: bool = False) -> Nginx:
        executable = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(executable).exists():
            pytest.fail("nginx is needed for these tests: apt-get install nginx")
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        temp = "\n".join(f"    {name}_temp_path {workdir}/{name};" for name in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$status $upstream_addr $upstream_status';
    access_log {workdir}/access.log upstreams;
{temp}
{config.replace(LISTEN, f"listen 127.0.0.1:{port}{' ssl' if tls else ''};")}
}}
""")
        log = (workdir / "nginx.out").open("wb")
        process = subprocess.Popen([executable, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                                    "-e", str(workdir / "error.log")], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port)
        return cls(workdir, port, process)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> list[tuple[int, str]]:
        """(status, upstream addresses tried) of every request nginx answered."""
        lines = (self.workdir / "access.log").read_text().splitlines()
        return [(int(status), upstream) for status, upstream, _ in (line.split(" ", 2) for line in lines)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
