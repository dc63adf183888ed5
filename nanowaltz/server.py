"""An OpenAI-compatible chat endpoint for the two WaltzRL agents: `python infer.py --serve`.

    POST /v1/chat/completions   messages (system / user / assistant), temperature, max_tokens, seed, stream
    GET  /v1/models             the one model served
    GET  /health                status, queued and in-flight requests (no API key needed)

The method stays in infer.py: it hands this module a Backend, a function that answers a batch of chats with both
agents and one that counts what a chat needs of the context window. This module is only the HTTP layer around it:
checking requests, a bounded queue, one worker thread that decodes queued requests together, and the replies.

- The message is the reviewed final answer (the revision when the feedback agent flagged the first answer). A stream
  therefore starts once the feedback agent has spoken; its chunks carry that final answer, word by word.
- usage: prompt_tokens counts the conversation agent's first context (the chat in its template, with the agent's
  system prompt); completion_tokens counts every token the two agents generated for the request (answer, feedback,
  revision), since the client pays for all of them. The extra field `waltzrl` carries the trace: the first answer,
  the feedback labels and text, revised or not, tokens and seconds per agent, and the time spent in the queue.
- Batching: the sampler decodes many rows at once, with one temperature and one length limit per batch, so a batch
  holds requests with the same (temperature, max_tokens). A sampled request with a seed is decoded alone, right
  after seeding, so it gives what `infer.py --seed S --temperature T` gives.
- The queue is bounded: a request that finds it full gets 503 at once. A client that leaves before its batch starts
  is taken out of the queue; one that leaves later costs only its own row. Ctrl-C or SIGTERM: the queued requests get
  503, the batch being decoded finishes and is answered, then the process exits; a second signal exits at once.
- Bad input is a 400 in the OpenAI error shape, naming the field ({"error": {"message", "type", "param", "code"}});
  an unexpected failure is a 500 with a one-line message (the traceback goes to the server's stderr only).

Why the standard library's http.server and not a framework: there are three routes, JSON in and out, and server-sent
events are a few writes. The work is one model behind one worker thread, which a thread per connection feeds as well
as an event loop would, and the server then needs nothing beyond the project's own dependencies.
"""
import hmac
import json
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from nanowaltz.data import unicode_problem

ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 1 << 20  # a chat that fits a small model's context is far smaller than this
# Request fields that would change the answer and that the agents cannot honour, with the values that mean "not used".
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
               "logprobs": (None, False), "top_logprobs": (None, 0), "stop": (None, [], ""),
               "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "top_p": (None, 1),
               "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "modalities": (None, ["text"]),
               "audio": (None,), "prediction": (None,)}


@dataclass
class Backend:
    """What the server needs from the method; infer.chat_backend builds it."""

    answer: Callable  # (chats, temperature, max_tokens, seed) -> one infer.Reply per chat, decoded together; seed None
    # keeps the random stream going
    needs: Callable  # (chat, max_tokens) -> the most tokens one forward pass of its trajectory can hold
    context_window: int | None  # the model's, in tokens (None: unknown, not checked)
    max_tokens: int  # the answer length limit when a request gives none
    temperature: float = 0.0  # when a request gives none (greedy: the deployed default)
    model_id: str = "nanowaltz"
    details: dict = field(default_factory=dict)  # shown in /v1/models: base model, adapters, feedback on or off


class RequestError(Exception):
    """A request the server answers with an error in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------------
# Reading a request
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    messages: list  # [{"role", "content": str}], checked
    temperature: float
    max_tokens: int
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def bad(param: str | None, message: str, code: str | None = None) -> RequestError:
    return RequestError(400, f"{param}: {message}" if param else message, param, code)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def message_text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{i}]", 'only text parts ({"type": "text", "text": "..."}) are supported')
            pieces.append(part["text"])
        content = "".join(pieces)
    if not isinstance(content, str):
        raise bad(where, f"must be a string or a list of text parts, got {type(content).__name__}")
    if not content.strip():
        raise bad(where, "is empty")
    if unicode_problem(content):
        raise bad(where, unicode_problem(content))
    return content


def read_messages(messages) -> list:
    if not isinstance(messages, list):
        raise bad("messages", f"must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise bad("messages", "is empty")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        for key in ("tool_calls", "function_call", "tool_call_id"):
            if message.get(key) is not None:
                raise bad(f"{where}.{key}", "tool calls are not supported")
        if "content" not in message:
            raise bad(f"{where}.content", "is missing")
        checked.append({"role": role, "content": message_text(message["content"], f"{where}.content")})
    if checked[-1]["role"] != "user":
        raise bad(f"messages[{len(checked) - 1}].role", "the last message must be the user's")
    return checked


def read_chat_request(payload, backend: Backend) -> ChatRequest:
    """Check a decoded request body; a RequestError names the first field that is wrong."""
    if not isinstance(payload, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {type(model).__name__}")
    if model is not None and model != backend.model_id:
        raise RequestError(404, f"model: {model!r} is not served here; this server serves {backend.model_id!r}",
                           "model", "model_not_found")
    if "messages" not in payload:
        raise bad("messages", "is missing")
    messages = read_messages(payload["messages"])
    for name, neutral in UNSUPPORTED.items():
        if name in payload and payload[name] not in neutral:
            raise bad(name, "is not supported by this server", "unsupported_parameter")
    n = payload.get("n")
    if n is not None and not (is_int(n) and n == 1):
        raise bad("n", f"only n = 1 is supported, got {n!r}", "unsupported_parameter")
    temperature = payload.get("temperature")
    if temperature is None:
        temperature = backend.temperature
    elif not is_number(temperature) or not 0 <= temperature <= 2:
        raise bad("temperature", f"must be a number from 0 to 2, got {temperature!r}")
    name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = payload.get(name)
    if max_tokens is None:
        max_tokens = backend.max_tokens
    elif not is_int(max_tokens) or max_tokens < 1:
        raise bad(name, f"must be an integer >= 1, got {max_tokens!r}")
    seed = payload.get("seed")
    if seed is not None and not is_int(seed):
        raise bad("seed", f"must be an integer, got {seed!r}")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}")
    options = payload.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options", 'must be an object like {"include_usage": true}')
    return ChatRequest(messages, float(temperature), max_tokens, seed, bool(stream),
                       bool(options and options.get("include_usage")))


# ---------------------------------------------------------------------------------------------------------------------
# The queue and the worker that decodes it
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)  # a job is itself: compared and hashed by identity
class Job:
    request: ChatRequest
    queued_at: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    reply: object = None  # an infer.Reply once answered
    error: RequestError | None = None
    started_at: float | None = None
    batch_rows: int = 0

    @property
    def key(self):
        """Requests that may share a batch have equal keys (a seeded sampled request shares with nobody)."""
        request = self.request
        if request.temperature > 0 and request.seed is not None:
            return ("alone", id(self))
        return (request.temperature, request.max_tokens)

    def finish(self, reply=None, error: RequestError | None = None) -> None:
        self.reply, self.error = reply, error
        self.done.set()


class JobQueue:
    """A bounded first-in first-out queue that hands out batches of requests with the same key."""

    def __init__(self, size: int):
        self.size, self.jobs, self.closed = size, [], False
        self.changed = threading.Condition()

    def put(self, job: Job) -> bool:
        """False when the queue is full or closed."""
        with self.changed:
            if self.closed or len(self.jobs) >= self.size:
                return False
            self.jobs.append(job)
            self.changed.notify()
            return True

    def cancel(self, job: Job) -> bool:
        """Take a job out before it is decoded (its client left); False when it is already being decoded."""
        with self.changed:
            if job in self.jobs:
                self.jobs.remove(job)
                return True
            return False

    def take(self, rows: int, timeout: float, gather: float) -> list | None:
        """The oldest job and the next ones with its key, up to `rows`: [] after `timeout` with nothing queued, None
        once closed. With fewer than `rows` queued it first waits up to `gather` seconds for more to share the batch
        (requests sent together rarely arrive in the same millisecond)."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.jobs or self.closed, timeout):
                return []
            if not self.closed and len(self.jobs) < rows:
                self.changed.wait_for(lambda: len(self.jobs) >= rows or self.closed, gather)
            if self.closed:
                return None
            if not self.jobs:  # its clients left while it gathered
                return []
            key = self.jobs[0].key
            batch = [job for job in self.jobs if job.key == key][:rows]
            self.jobs = [job for job in self.jobs if job not in batch]
            return batch

    def close(self) -> list:
        """Stop taking jobs; returns the ones still waiting."""
        with self.changed:
            self.closed, left = True, self.jobs
            self.jobs = []
            self.changed.notify_all()
            return left

    def __len__(self) -> int:
        return len(self.jobs)


# ---------------------------------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------------------------------
def trace(job: Job) -> dict:
    """The `waltzrl` field: what the two agents did for this request."""
    reply = job.reply
    feedback = None
    if reply.feedback_output:
        labels = reply.labels
        feedback = {"unsafe": labels.unsafe if labels else None, "overrefuse": labels.overrefuse if labels else None,
                    "parsed": labels is not None, "text": reply.feedback, "output": reply.feedback_output}
    return {"first_answer": reply.first_answer, "revised": reply.triggered, "feedback": feedback,
            "conversation_agent": {"tokens": reply.tokens - reply.feedback_tokens,
                                   "seconds": round(reply.seconds - reply.feedback_seconds, 4)},
            "feedback_agent": {"tokens": reply.feedback_tokens, "seconds": round(reply.feedback_seconds, 4)},
            "queue_seconds": round(job.started_at - job.queued_at, 4), "batch_rows": job.batch_rows}


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}


def completion(job: Job, completion_id: str, created: int, model_id: str) -> dict:
    reply = job.reply
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.answer},
                         "finish_reason": "length" if reply.truncated else "stop", "logprobs": None}],
            "usage": usage(reply), "waltzrl": trace(job)}


def stream_chunks(job: Job, completion_id: str, created: int, model_id: str) -> list:
    """The server-sent events of a streamed reply: the role, the answer word by word, the finish reason with the
    trace, and the usage when asked for."""
    reply, request = job.reply, job.request

    def chunk(delta, finish_reason=None, **extra):
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in re.findall(r"\s*\S+|\s+$", reply.answer)]
    chunks.append(chunk({}, "length" if reply.truncated else "stop", waltzrl=trace(job)))
    if request.include_usage:
        chunks.append(dict(chunk({}), choices=[], usage=usage(reply)))
    return chunks


# ---------------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------------
class ChatServer:
    """The HTTP server, its queue and its one decoding worker. start() serves in background threads; stop() finishes
    the batch being decoded, answers the queued requests 503 and closes."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 queue_size: int = 64, max_batch: int = 8, gather_seconds: float = 0.02, log: bool = True):
        self.backend, self.api_key, self.max_batch, self.gather, self.log = (backend, api_key, max_batch,
                                                                             gather_seconds, log)
        self.queue = JobQueue(queue_size)
        self.in_flight = 0  # requests in the batch being decoded
        self.open_jobs = set()  # submitted and not yet written back to their client
        self.open_changed = threading.Condition()
        self.needs_lock = threading.Lock()  # backend.needs tokenizes: one HTTP thread at a time
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), handler_class(self))
        self.httpd.daemon_threads = True
        self.threads = []

    @property
    def address(self) -> tuple:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "ChatServer":
        self.threads = [threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True),
                        threading.Thread(target=self.work, name="decode", daemon=True)]
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, answer the queued ones 503, let the batch being decoded finish and its replies go
        out (at most `grace` seconds for the writing once it is decoded), then close."""
        self.stopping.set()
        self.httpd.shutdown()
        for job in self.queue.close():
            job.finish(error=RequestError(503, "the server is shutting down", kind="server_error",
                                          code="shutting_down"))
        self.threads[1].join()
        with self.open_changed:
            self.open_changed.wait_for(lambda: not self.open_jobs, grace)
        self.httpd.server_close()

    # The worker: the only thread that touches the model.
    def work(self) -> None:
        while True:
            batch = self.queue.take(self.max_batch, timeout=0.2, gather=self.gather)
            if batch is None:
                return
            if batch:
                self.decode(batch)

    def decode(self, batch: list) -> None:
        first = batch[0].request
        started = time.perf_counter()
        for job in batch:
            job.started_at, job.batch_rows = started, len(batch)
        self.in_flight = len(batch)
        try:
            replies = self.backend.answer([job.request.messages for job in batch], first.temperature,
                                          first.max_tokens, first.seed if first.temperature > 0 else None)
        except Exception as err:  # noqa: BLE001  (a failed batch must not take the worker down with it)
            traceback.print_exc(file=sys.stderr)
            failure = RequestError(500, f"the model failed on this request ({type(err).__name__})",
                                   kind="server_error")
            for job in batch:
                job.finish(error=failure)
        else:
            for job, reply in zip(batch, replies):
                job.finish(reply)
        finally:
            self.in_flight = 0

    # Called from the HTTP threads.
    def submit(self, request: ChatRequest) -> Job:
        if self.stopping.is_set():
            raise RequestError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        window = self.backend.context_window
        if window:
            with self.needs_lock:
                needs = self.backend.needs(request.messages, request.max_tokens)
            if needs > window:
                raise bad("messages", f"this conversation does not fit the model's {window}-token context with "
                          f"max_tokens {request.max_tokens}: its turns would need up to {needs} tokens "
                          f"(shorten the messages or lower max_tokens)", "context_length_exceeded")
        job = Job(request)
        with self.open_changed:
            self.open_jobs.add(job)
        if not self.queue.put(job):
            self.close_job(job)
            if self.queue.closed:
                raise RequestError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            raise RequestError(503, f"the server is busy: {self.queue.size} requests are already waiting; retry "
                               "later", kind="server_error", code="queue_full")
        return job

    def close_job(self, job: Job) -> None:
        with self.open_changed:
            self.open_jobs.discard(job)
            self.open_changed.notify_all()

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        return hmac.compare_digest(given, self.api_key.encode())  # constant time: no guessing the key byte by byte

    def health(self) -> dict:
        return {"status": "stopping" if self.stopping.is_set() else "ok", "model": self.backend.model_id,
                "queued": len(self.queue), "in_flight": self.in_flight, "queue_size": self.queue.size,
                "max_batch": self.max_batch}


def client_gone(connection) -> bool:
    """True when the client has closed its end: the socket is readable and reading would return nothing. (poll, not
    select: select cannot watch a file descriptor above 1023, which a busy server reaches.)"""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(connection, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([connection], [], [], 0)[0])
        return readable and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def handler_class(server: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
        server_version = "nanowaltz"
        timeout = 120  # seconds a connection may sit idle, or stop reading a reply, before it is closed

        def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
            if server.log:
                super().log_message(format, *args)

        def send_error(self, code, message=None, explain=None):
            """Errors found by http.server itself (a malformed request line, an unknown method) in the same shape."""
            self.close_connection = True
            self.send_json(code, RequestError(code, message or "bad request").body())

        def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True  # the client left (or stopped reading); nobody else is affected

        def fail(self, error: RequestError) -> None:
            self.send_json(error.status, error.body(), {"Retry-After": "1"} if error.status == 503 else None)

        def do_GET(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                status = server.health()
                self.send_json(200 if status["status"] == "ok" else 503, status)
            elif path == "/v1/models":
                if not self.check_key():
                    return
                self.send_json(200, {"object": "list", "data": [
                    {"id": server.backend.model_id, "object": "model", "created": 0, "owned_by": "nanowaltz",
                     **server.backend.details}]})
            else:
                self.fail(RequestError(404, f"no such endpoint: GET {path}", code="not_found"))

        def do_POST(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path != "/v1/chat/completions":
                self.close_connection = True
                self.fail(RequestError(404, f"no such endpoint: POST {path}", code="not_found"))
                return
            if not self.check_key():
                return
            try:
                self.chat()
            except RequestError as error:
                self.fail(error)
            except Exception:  # noqa: BLE001  (never a traceback to the client)
                traceback.print_exc(file=sys.stderr)
                self.fail(RequestError(500, "internal server error", kind="server_error"))

        def check_key(self) -> bool:
            if server.authorized(self.headers.get("Authorization")):
                return True
            self.close_connection = True
            self.fail(RequestError(401, "missing or wrong API key (send it as 'Authorization: Bearer <key>')",
                                   code="invalid_api_key"))
            return False

        def read_body(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise RequestError(411, "the request needs a Content-Length header")
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(int(length))
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                raise bad(None, f"the request body is not valid JSON ({err})", "invalid_json") from None

        def chat(self):
            request = read_chat_request(self.read_body(), server.backend)
            job = server.submit(request)
            try:
                while not job.done.wait(0.25):
                    if client_gone(self.connection):
                        server.queue.cancel(job)  # not decoded if it has not started; the others go on
                        self.close_connection = True
                        return
                if job.error is not None:
                    self.fail(job.error)
                    return
                completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
                if request.stream:
                    self.send_stream(stream_chunks(job, completion_id, created, server.backend.model_id))
                else:
                    self.send_json(200, completion(job, completion_id, created, server.backend.model_id))
            finally:
                server.close_job(job)

        def send_stream(self, chunks: list) -> None:
            self.close_connection = True  # the stream's end is the connection's end (no chunked encoding)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:
                pass  # the client left mid-stream

    return Handler


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          queue_size: int = 64, max_batch: int = 8) -> int:
    """Serve until Ctrl-C or SIGTERM: the first finishes the batch being decoded and answers the queued requests 503;
    a second one exits at once."""
    try:
        server = ChatServer(backend, host, port, api_key, queue_size, max_batch).start()
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        raise SystemExit(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    print(f"serving {backend.model_id} on {server.url}/v1 (queue {queue_size}, batches of up to {max_batch}"
          f"{', API key required' if api_key else ''}); Ctrl-C to stop", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            print("second signal: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(130)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
        print("stopping: finishing the requests being decoded", file=sys.stderr, flush=True)
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0
