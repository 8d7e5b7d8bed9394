"""Tool-call parsers, one small file per model family, behind `ToolParser` (base.py).

    hermes       Qwen2.5, Hermes   <tool_call>{"name", "arguments"}</tool_call>
    llama3_json  Llama 3.x         {"name", "parameters"}; ...
    mistral      Mistral           [TOOL_CALLS][{"name", "arguments"}, ...]
"""

from __future__ import annotations

from scalellm.protocol.tool_parsers.base import ParsedCall, Snapshot, ToolParser
from scalellm.protocol.tool_parsers.hermes import HermesToolParser
from scalellm.protocol.tool_parsers.llama3_json import Llama3JsonToolParser
from scalellm.protocol.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)}
DEFAULT_TOOL_PARSER = "hermes"


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as `name`; ValueError naming the choices otherwise."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


def tool_parser_for_model(model_name: str | None) -> str:
    """The parser a model's name suggests: Llama 3 and Mistral families by name, Hermes otherwise."""
    name = (model_name or "").lower()
    if "llama-3" in name or "llama3" in name:
        return "llama3_json"
    if "mistral" in name or "mixtral" in name:
        return "mistral"
    return DEFAULT_TOOL_PARSER


__all__ = ["DEFAULT_TOOL_PARSER", "TOOL_PARSERS", "ParsedCall", "Snapshot", "ToolParser", "get_tool_parser",
           "tool_parser_for_model"]
