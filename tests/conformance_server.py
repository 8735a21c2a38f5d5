"""server.py plus the fixed test surface the MCP conformance suite's server scenarios call.

It runs exactly like server.py (`python tests/conformance_server.py --port N [--stateless ...]`): the
same `mcp` object, transport, checks and settings, with the scenarios' tools, resources and prompts
added here so they never reach the product.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import mcp_types as types
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcp.server.mcpserver import (
    Audio,
    Context,
    Elicit,
    ElicitationResult,
    Image,
    Resolve,
    Sample,
)
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.shared.message import ServerMessageMetadata

import server

mcp = server.mcp

RED_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
SILENT_WAV = (b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80>\x00\x00"
              b"\x02\x00\x10\x00data\x00\x00\x00\x00")


def embedded(uri: str, text: str, mime_type: str = "text/plain") -> types.EmbeddedResource:
    return types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
        uri=uri, mime_type=mime_type, text=text))


# --- tools


@mcp.tool(description="Returns simple text.")
def test_simple_text() -> str:
    return "This is a simple text response for testing."


@mcp.tool(description="Returns an image.")
def test_image_content() -> Image:
    return Image(data=RED_PIXEL_PNG, format="png")


@mcp.tool(description="Returns audio.")
def test_audio_content() -> Audio:
    return Audio(data=SILENT_WAV, format="wav")


@mcp.tool(description="Returns an embedded resource.")
def test_embedded_resource() -> list[types.EmbeddedResource]:
    return [embedded("test://embedded-resource", "This is an embedded resource content.")]


@mcp.tool(description="Returns text, an image and a resource.", structured_output=False)
def test_multiple_content_types() -> list[Any]:
    return ["Multiple content types test:", Image(data=RED_PIXEL_PNG, format="png"),
            embedded("test://mixed-content-resource", '{"test":"data","value":123}', "application/json")]


@mcp.tool(description="Sends three log messages while it runs.")
async def test_tool_with_logging(ctx: Context) -> str:
    for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await server.send_log(ctx, message)
        await anyio.sleep(0.05)
    return "Logging test completed"


@mcp.tool(description="Always fails.")
def test_error_handling() -> str:
    raise ToolError("This tool intentionally returns an error for testing")


@mcp.tool(description="Reports progress 0, 50 and 100 of 100.")
async def test_tool_with_progress(ctx: Context) -> str:
    for step in (0, 50, 100):
        await ctx.report_progress(step, 100)
        await anyio.sleep(0.05)
    return "Progress test completed"


def ask_llm(prompt: str) -> Sample:
    text = types.TextContent(type="text", text=prompt)
    return Sample([types.SamplingMessage(role="user", content=text)], max_tokens=100)


@mcp.tool(description="Asks the client's LLM.")
def test_sampling(prompt: str, reply: Annotated[types.CreateMessageResult, Resolve(ask_llm)]) -> str:
    content = reply.content
    return f"LLM response: {content.text if isinstance(content, types.TextContent) else content}"


class UserInfo(BaseModel):
    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


def ask_user(message: str) -> Elicit[UserInfo]:
    return Elicit(message, UserInfo)


@mcp.tool(description="Asks the user for their name and email.")
def test_elicitation(message: str, answer: Annotated[ElicitationResult[UserInfo], Resolve(ask_user)]) -> str:
    content = answer.data.model_dump() if answer.action == "accept" else None
    return f"User response: action={answer.action}, content={content}"


async def elicit_raw(ctx: Context, schema: dict[str, Any]) -> str:
    """Ask with a hand-written schema, for the scenarios that check its exact shape."""
    params = types.ElicitRequestFormParams(message="Please review", requested_schema=schema)
    result = await ctx.session.send_request(types.ElicitRequest(params=params), types.ElicitResult,
                                            metadata=ServerMessageMetadata(related_request_id=ctx.request_id))
    return f"Elicitation completed: action={result.action}, content={result.content}"


@mcp.tool(description="Asks with default values for every primitive type.")
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    return await elicit_raw(ctx, {"type": "object", "properties": {
        "name": {"type": "string", "default": "John Doe"},
        "age": {"type": "integer", "default": 30},
        "score": {"type": "number", "default": 95.5},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "default": True},
    }})


@mcp.tool(description="Asks with all five enum schema variants.")
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    titled = [{"const": f"value{n}", "title": title} for n, title in ((1, "First Option"), (2, "Second Option"))]
    return await elicit_raw(ctx, {"type": "object", "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {"type": "string", "oneOf": titled},
        "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                       "enumNames": ["Option One", "Option Two", "Option Three"]},
        "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {"type": "array", "items": {"anyOf": [
            {"const": "value1", "title": "First Choice"}, {"const": "value2", "title": "Second Choice"}]}},
    }})


@mcp.tool(description="Closes its SSE stream mid-call so the client reconnects with Last-Event-ID.")
async def test_reconnection(ctx: Context) -> str:
    await anyio.sleep(0.1)
    await ctx.close_sse_stream()
    await anyio.sleep(0.3)
    return "Reconnection test completed"


def json_schema_2020_12_tool(name: str = "", address: dict[str, Any] | None = None) -> str:
    return f"name={name}, address={address}"


SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"},
                                                          "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}
mcp.add_tool(json_schema_2020_12_tool, description="Tool with JSON Schema 2020-12 features")
mcp._tool_manager.get_tool("json_schema_2020_12_tool").parameters = SCHEMA_2020_12


# --- resources


@mcp.resource("test://static-text", name="Static text", description="A static text resource.",
              mime_type="text/plain")
def static_text() -> str:
    return "This is the content of the static text resource."


@mcp.resource("test://static-binary", name="Static binary", description="A static PNG.", mime_type="image/png")
def static_binary() -> bytes:
    return RED_PIXEL_PNG


@mcp.resource("test://watched-resource", name="Watched", description="A resource to subscribe to.",
              mime_type="text/plain")
def watched() -> str:
    return "Watched resource content."


@mcp.resource("test://template/{id}/data", name="Template data", description="Data for an id.",
              mime_type="application/json")
def template_data(id: str) -> str:
    return f'{{"id": "{id}", "data": "Data for ID: {id}"}}'


# --- prompts


@mcp.prompt(description="A simple prompt.")
def test_simple_prompt() -> str:
    return "This is a simple prompt for testing."


@mcp.prompt(description="A prompt with two arguments.")
def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@mcp.prompt(description="A prompt that embeds a resource.")
def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
    return [UserMessage(embedded(resourceUri, "Embedded resource content for testing.")),
            UserMessage("Please process the embedded resource above.")]


@mcp.prompt(description="A prompt with an image.")
def test_prompt_with_image() -> list[UserMessage]:
    image = types.ImageContent(type="image", data=base64.b64encode(RED_PIXEL_PNG).decode(), mime_type="image/png")
    return [UserMessage(image), UserMessage("Please analyze the image above.")]


if __name__ == "__main__":
    sys.exit(server.main())
