"""Contender: FastMCP (PyPI `fastmcp`, run in its own environment by bench/run.py) with the same `add`
tool, stateless and JSON, under its defaults. Usage: python fastmcp_server.py PORT"""

import sys

from fastmcp import FastMCP

mcp = FastMCP("fastmcp")


@mcp.tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


if __name__ == "__main__":
    mcp.run(transport="http", host="127.0.0.1", port=int(sys.argv[1]), stateless_http=True, json_response=True)
