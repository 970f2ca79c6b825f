"""A fake OpenAI-compatible model server on loopback, for tests that drive the real `openai`
client over HTTP: the model is the only thing faked.

It answers `POST /v1/responses` and `POST /v1/chat/completions`, as JSON or, when the request
says `"stream": true`, as server-sent events in the order OpenAI sends them. Each request
takes the next scripted reply:

    with FakeOpenAI() as fake:
        fake.reply(ToolCall("calculate", {"expression": "6 * 7"}), Text("42", deltas=2))
        ...  # point OPENAI_BASE_URL at fake.url and run an agent
        fake.requests  # what the client sent, in order

Replies: `Text` (an assistant message, streamed in `deltas` pieces `delay` seconds apart,
the first after `first_delay` seconds),
`ToolCall` (a function call; handoffs are function calls too), `Failure` (an HTTP error status
with OpenAI's JSON error body), `Hang` (never answers) and `Stall` (streams part of a message,
then goes silent). A request with no reply left gets a 500 and is kept in `unexpected`; an
exception while answering is kept in `errors`.
Hung and stalled requests are let go when the server stops.
"""

from __future__ import annotations

import itertools
import json
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTES = {"/v1/responses": "responses", "/v1/chat/completions": "chat_completions"}


@dataclass(frozen=True)
class Text:
    """An assistant message, streamed as `deltas` pieces with `delay` seconds between them,
    the first `first_delay` seconds after the response started (the model thinking)."""

    text: str
    deltas: int = 1
    delay: float = 0.0
    first_delay: float = 0.0

    def pieces(self) -> list[str]:
        return split(self.text, self.deltas)


@dataclass(frozen=True)
class ToolCall:
    """A call of the function tool `name` (a handoff is a call of `transfer_to_<agent>`)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    call_id: str = ""

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments)


@dataclass(frozen=True)
class Failure:
    """An HTTP error status with OpenAI's error body; `message` is the provider's own words."""

    status: int
    message: str = "The fake provider failed."
    type: str = "server_error"
    code: str | None = None
    # Lets the openai client retry at once instead of after its backoff.
    retry_after_ms: int | None = 10


@dataclass(frozen=True)
class Hang:
    """Reads the request and never answers it."""


@dataclass(frozen=True)
class Stall(Text):
    """Streams the first `after` of `deltas` pieces of `text`, then sends nothing more."""

    deltas: int = 4
    after: int = 2

    @property
    def sent(self) -> str:
        """The text the client received before the stream went silent."""
        return "".join(self.pieces()[: self.after])


@dataclass(frozen=True)
class Drop(Stall):
    """Streams the first `after` of `deltas` pieces of `text`, then closes the connection in
    the middle of the response (the provider or a proxy between went away)."""


@dataclass(frozen=True)
class Redirect:
    """A 307 to the same path (the client sends the request again there)."""


Reply = Text | ToolCall | Failure | Hang | Redirect  # a Stall (and a Drop) is a Text


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    api: str  # "responses" or "chat_completions"
    body: dict[str, Any]
    headers: dict[str, str]  # names in lower case

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    def tool_names(self) -> list[str]:
        """The names of the function tools (handoffs included) the client offered the model."""
        tools = self.body.get("tools") or []
        if self.api == "responses":
            return [tool.get("name", "") for tool in tools]
        return [tool.get("function", {}).get("name", "") for tool in tools]

    def tool_outputs(self) -> dict[str, str]:
        """Tool results the client sent back, by call id."""
        if self.api == "responses":
            items = self.body.get("input") or []
            return {
                item["call_id"]: item["output"]
                for item in items
                if isinstance(item, dict) and item.get("type") == "function_call_output"
            }
        return {
            message["tool_call_id"]: message["content"]
            for message in self.body.get("messages") or []
            if message.get("role") == "tool"
        }

    def text(self) -> str:
        """Everything the client sent, as text (to look for a message in it)."""
        return json.dumps(self.body)


def split(text: str, parts: int) -> list[str]:
    """`text` cut into `parts` pieces of nearly equal length (fewer for a short text)."""
    parts = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


@dataclass
class _Frame:
    """One server-sent event; `delta` frames are the ones `Text.delay` and `Stall` count."""

    data: dict[str, Any] | str
    event: str | None = None
    delta: bool = False


# --- Responses API -----------------------------------------------------------------------


class _ResponsesAnswer:
    """A reply as the Responses API gives it: one response object, or its event stream."""

    def __init__(self, request: dict[str, Any], reply: Text | ToolCall) -> None:
        self.request = request
        self.reply = reply
        self.response_id = _id("resp")
        self.created_at = int(time.time())
        self._sequence = itertools.count()

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        request = self.request
        response: dict[str, Any] = {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "model": request.get("model", ""),
            "output": output,
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": request.get("store", True),
            "temperature": request.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools", []),
            "top_p": request.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": {},
        }
        if status == "completed":
            input_tokens = _tokens(json.dumps(request.get("input", "")))
            output_tokens = _tokens(json.dumps(output))
            response["usage"] = {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            }
        return response

    def _item(self, done: bool) -> dict[str, Any]:
        reply = self.reply
        status = "completed" if done else "in_progress"
        if isinstance(reply, ToolCall):
            return {
                "type": "function_call",
                "id": self.item_id,
                "call_id": reply.call_id or self.call_id,
                "name": reply.name,
                "arguments": reply.arguments_json if done else "",
                "status": status,
            }
        content = [self._text_part(reply.text)] if done else []
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    @property
    def item_id(self) -> str:
        prefix = "fc" if isinstance(self.reply, ToolCall) else "msg"
        return f"{prefix}_{self.response_id.removeprefix('resp_')}"

    @property
    def call_id(self) -> str:
        return f"call_{self.response_id.removeprefix('resp_')}"

    def json(self) -> dict[str, Any]:
        return self._response("completed", [self._item(done=True)])

    def _event(self, type_: str, is_delta: bool = False, **fields: Any) -> _Frame:
        data = {"type": type_, "sequence_number": next(self._sequence), **fields}
        return _Frame(data, event=type_, delta=is_delta)

    def frames(self) -> Iterator[_Frame]:
        yield self._event("response.created", response=self._response("in_progress", []))
        yield self._event("response.in_progress", response=self._response("in_progress", []))
        where = {"item_id": self.item_id, "output_index": 0}
        yield self._event("response.output_item.added", output_index=0, item=self._item(False))
        reply = self.reply
        if isinstance(reply, ToolCall):
            arguments = reply.arguments_json
            yield self._event(
                "response.function_call_arguments.delta", True, **where, delta=arguments
            )
            yield self._event(
                "response.function_call_arguments.done",
                **where,
                arguments=arguments,
                name=reply.name,
            )
        else:
            text = {**where, "content_index": 0}
            yield self._event("response.content_part.added", **text, part=self._text_part(""))
            for piece in reply.pieces():
                yield self._event(
                    "response.output_text.delta", True, **text, delta=piece, logprobs=[]
                )
            yield self._event("response.output_text.done", **text, text=reply.text, logprobs=[])
            yield self._event(
                "response.content_part.done", **text, part=self._text_part(reply.text)
            )
        yield self._event("response.output_item.done", output_index=0, item=self._item(True))
        yield self._event("response.completed", response=self.json())


# --- Chat Completions API ----------------------------------------------------------------


class _ChatAnswer:
    """A reply as the Chat Completions API gives it: one completion, or its chunk stream."""

    def __init__(self, request: dict[str, Any], reply: Text | ToolCall) -> None:
        self.request = request
        self.reply = reply
        self.completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    @property
    def call_id(self) -> str:
        reply = self.reply
        assert isinstance(reply, ToolCall)
        return reply.call_id or f"call_{self.completion_id.removeprefix('chatcmpl-')}"

    def _usage(self) -> dict[str, Any]:
        prompt = _tokens(json.dumps(self.request.get("messages", [])))
        reply = self.reply
        completion = _tokens(reply.arguments_json if isinstance(reply, ToolCall) else reply.text)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _base(self, object_: str) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": object_,
            "created": self.created,
            "model": self.request.get("model", ""),
            "system_fingerprint": None,
        }

    def json(self) -> dict[str, Any]:
        reply = self.reply
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if isinstance(reply, ToolCall):
            message["tool_calls"] = [
                {
                    "id": self.call_id,
                    "type": "function",
                    "function": {"name": reply.name, "arguments": reply.arguments_json},
                }
            ]
            finish = "tool_calls"
        else:
            message["content"] = reply.text
            finish = "stop"
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**self._base("chat.completion"), "choices": [choice], "usage": self._usage()}

    def _chunk(
        self, changes: dict[str, Any], finish: str | None = None, is_delta: bool = False
    ) -> _Frame:
        choice = {"index": 0, "delta": changes, "finish_reason": finish, "logprobs": None}
        return _Frame({**self._base("chat.completion.chunk"), "choices": [choice]}, delta=is_delta)

    def frames(self) -> Iterator[_Frame]:
        reply = self.reply
        if isinstance(reply, ToolCall):
            call = {
                "index": 0,
                "id": self.call_id,
                "type": "function",
                "function": {"name": reply.name, "arguments": ""},
            }
            yield self._chunk({"role": "assistant", "content": None, "tool_calls": [call]})
            arguments = {"index": 0, "function": {"arguments": reply.arguments_json}}
            yield self._chunk({"tool_calls": [arguments]}, is_delta=True)
            yield self._chunk({}, "tool_calls")
        else:
            yield self._chunk({"role": "assistant", "content": ""})
            for piece in reply.pieces():
                yield self._chunk({"content": piece}, is_delta=True)
            yield self._chunk({}, "stop")
        if (self.request.get("stream_options") or {}).get("include_usage"):
            usage = {**self._base("chat.completion.chunk"), "choices": [], "usage": self._usage()}
            yield _Frame(usage)
        yield _Frame("[DONE]")


# --- The server --------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is dropped after this long
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read `FakeOpenAI.requests` instead

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, not in the accepting thread: one at a time
        super().setup()
        self.server.fake._connection_opened()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._connection_closed()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        api = ROUTES.get(self.path.split("?")[0].rstrip("/"))
        if api is None:
            self._send_json(404, error_body(f"Unknown path {self.path}", "invalid_request_error"))
            return
        body = json.loads(raw or b"{}")
        fake = self.server.fake
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = fake._next_reply(Request(api, body, headers))
        try:
            self._answer(api, body, reply)
            if fake.close_after_each_response:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its timeout): nothing to do
        except Exception as exc:
            fake.errors.append(exc)  # a bug in the fake or its script: the fixture reports it
            raise

    def _answer(self, api: str, body: dict[str, Any], reply: Reply | None) -> None:
        fake = self.server.fake
        if reply is None:
            self._send_json(500, error_body("No scripted reply left.", "server_error"))
        elif isinstance(reply, Redirect):
            self.send_response(307)
            self.send_header("Location", self.path.split("?")[0] + "?redirected=1")
            self.send_header("Content-Length", "0")
            self._send_cookie()
            self.end_headers()
        elif isinstance(reply, Failure):
            headers = {"x-request-id": _id("req")}
            if reply.retry_after_ms is not None:
                headers["retry-after-ms"] = str(reply.retry_after_ms)
            body_ = error_body(reply.message, reply.type, reply.code)
            self._send_json(reply.status, body_, headers)
        elif isinstance(reply, Hang) or (isinstance(reply, Stall) and not body.get("stream")):
            fake._released.wait()
            self.close_connection = True
        else:
            answer_class = _ResponsesAnswer if api == "responses" else _ChatAnswer
            answer = answer_class(body, reply)
            if body.get("stream"):
                self._stream(answer.frames(), reply)
            else:
                self._send_json(200, answer.json())

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._send_cookie()
        self.end_headers()
        self.wfile.write(data)

    def _send_cookie(self) -> None:
        if self.server.fake.set_cookie:
            self.send_header("Set-Cookie", self.server.fake.set_cookie)

    def _stream(self, frames: Iterator[_Frame], reply: Text | ToolCall) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", _id("req"))
        self._send_cookie()
        self.end_headers()
        deltas = 0
        delay = reply.delay if isinstance(reply, Text) else 0.0
        first_delay = reply.first_delay if isinstance(reply, Text) else 0.0
        for frame in frames:
            if frame.delta:
                if isinstance(reply, Stall) and deltas == reply.after:
                    if not isinstance(reply, Drop):
                        self.server.fake._released.wait()
                    self.close_connection = True  # no closing chunk: the body is cut short
                    return
                pause = delay if deltas else first_delay
                if pause:
                    time.sleep(pause)
                deltas += 1
            self._write_chunk(_encode(frame))
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _encode(frame: _Frame) -> bytes:
    data = frame.data if isinstance(frame.data, str) else json.dumps(frame.data)
    event = f"event: {frame.event}\n" if frame.event else ""
    return f"{event}data: {data}\n\n".encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung request never keeps the test process alive
    # Many runs at once connect together: a short accept queue would drop their connections
    # (the client's retry comes a second later).
    request_queue_size = 1024
    fake: FakeOpenAI


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 (a free port) answering scripted replies."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: serve HTTPS with this (server) context instead of plain HTTP."""
        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self.errors: list[Exception] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._connections = threading.Condition(self._lock)
        self._open_connections = 0
        # Connections clients opened in all (a kept-alive one counts once, however many
        # requests it carries).
        self.connections_opened = 0
        # Close each connection once its response is sent, without saying so in the response
        # (as a server whose idle timeout is shorter than the client's may do).
        self.close_after_each_response = False
        # A Set-Cookie header for every response while set (a gateway's affinity cookie).
        self.set_cookie: str | None = None
        self._released = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._scheme = "https" if tls is not None else "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """The base URL to give the client (OPENAI_BASE_URL)."""
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}/v1"

    def reply(self, *replies: Reply, repeat: int = 1) -> None:
        """Queue replies: each request takes the next one (`repeat` queues them that often)."""
        with self._lock:
            self._replies.extend(list(replies) * repeat)

    @property
    def pending(self) -> list[Reply]:
        """Scripted replies no request has taken yet."""
        with self._lock:
            return list(self._replies)

    def _next_reply(self, request: Request) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            if self._replies:
                return self._replies.popleft()
            self.unexpected.append(request)
            return None

    def _connection_opened(self) -> None:
        with self._connections:
            self._open_connections += 1
            self.connections_opened += 1

    def _connection_closed(self) -> None:
        with self._connections:
            self._open_connections -= 1
            self._connections.notify_all()

    def wait_until_no_connection_is_open(self, timeout: float = 10.0) -> bool:
        """Wait until clients have closed every connection; False if some stay open."""
        with self._connections:
            return self._connections.wait_for(lambda: self._open_connections == 0, timeout)

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Let go of hung and stalled requests, stop serving and free the port."""
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
