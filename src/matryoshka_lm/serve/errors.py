"""Errors as OpenAI answers them: a status and {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from .protocol import MAX_STOPS


class APIError(Exception):
    """An error answered as OpenAI does: status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        # ASCII JSON: a message quoting the client's input stays encodable even with a lone surrogate in it
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=headers, media_type="application/json"
        )


def invalid(param: str, why: str) -> APIError:
    """A 400 on one field: "Invalid value for 'PARAM': WHY."."""
    return APIError(400, f"Invalid value for '{param}': {why}.", param, "invalid_value")


def shutting_down() -> APIError:
    return APIError(
        503, "The server shut down before this request finished; retry it.", None, "shutting_down", "server_error"
    )


def overloaded() -> APIError:
    return APIError(503, "The server is overloaded; retry shortly.", None, "overloaded", "server_error")


def generation_failed() -> APIError:
    return APIError(500, "Generation failed inside the server.", None, "generation_failed", "server_error")


def client_disconnected() -> APIError:
    # nobody reads this answer; 499 (nginx's "client closed request") keeps it apart in /metrics
    return APIError(499, "The client closed the request.", None, "client_disconnected")


# union-typed fields get one message instead of pydantic's one-per-branch
TYPE_HINTS = {
    "prompt": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "input": "a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "stop": f"a string or an array of up to {MAX_STOPS} strings",
    "content": "a string or an array of text parts",
}


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content' (pydantic's union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "function-after", "constrained-str"):
            break  # a union branch tag: the rest is about one alternative
        else:
            out += f".{part}" if out else part
    return out


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming the parameter."""
    e = errors[0]
    loc = tuple(x for x in e["loc"] if x != "body")
    param = _param(loc) or None
    if not loc and e["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return APIError(400, "The request body must be a JSON object.", None, "invalid_type")
    if e["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    field = param.rsplit(".", 1)[-1].split("[")[0] if param else ""
    hint = TYPE_HINTS.get(field)
    if hint and (len(errors) > 1 or e["type"].endswith("_type")):
        return APIError(400, f"Invalid type for '{param}': expected {hint}.", param, "invalid_type")
    if e["type"].endswith("_type") or e["type"] in ("literal_error", "enum"):
        return APIError(400, f"Invalid type for '{param}': {e['msg']}.", param, "invalid_type")
    return APIError(400, f"Invalid value for '{param}': {e['msg']}.", param, "invalid_value")
