"""A stdio MCP server that asks its client questions, written with the Python SDK
(`MCPServer`), for the tests of a stdio server spoken to in 2026-07-28. It serves no
`subscriptions/listen` (`subscriptions=False`), so it announces no list changes and a node
speaks 2026-07-28 to it: its questions come back as `input_required` results.

Tools: `greet()`, which asks the user for a name (elicitation, through a resolver) and greets
them; `survey()`, which asks three questions in one round; `capabilities()`, the client
capabilities its request carried; `echo(text)`.
`greet` needs the client's elicitation capability: a 2026-07-28 request whose client did not
declare it is refused with -32021.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve

server = MCPServer("questions", subscriptions=False)


class Name(BaseModel):
    name: str


def ask_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


@server.tool()
def greet(who: Annotated[Name, Resolve(ask_name)]) -> str:
    """Asks the user for a name and greets them."""
    return f"Hello, {who.name}!"


class Colour(BaseModel):
    colour: str


class City(BaseModel):
    city: str


def ask_colour() -> Elicit[Colour]:
    return Elicit("What is your favourite colour?", Colour)


def ask_city() -> Elicit[City]:
    return Elicit("Where do you live?", City)


@server.tool()
def survey(
    who: Annotated[Name, Resolve(ask_name)],
    colour: Annotated[Colour, Resolve(ask_colour)],
    city: Annotated[City, Resolve(ask_city)],
) -> str:
    """Asks three questions at once (one round) and sums up the answers."""
    return f"{who.name} likes {colour.colour} and lives in {city.city}"


@server.tool()
def capabilities(ctx: Context) -> str:
    """The client capabilities this request carried, as JSON."""
    caps = ctx.session.client_capabilities
    return json.dumps(caps.model_dump(mode="json", exclude_none=True) if caps else None)


@server.tool()
def echo(text: str) -> str:
    """Returns the text it was given."""
    return text


if __name__ == "__main__":
    server.run("stdio")
