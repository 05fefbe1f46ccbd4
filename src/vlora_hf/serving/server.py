"""`vlora-hf serve MODEL`: vLLM's own OpenAI-compatible server, with each image served as a LoRA adapter.

    vlora-hf serve path/to/checkpoint --host 127.0.0.1 --port 8000 [--max-images-in-flight 16] [vLLM options]

vLLM does everything it already does (routes, validation, streaming, batching, /health, /v1/models). A thin ASGI
middleware in front of /v1/chat/completions and /v1/completions turns an `image_url` (base64 data URL; http(s)
only with --allow-url-fetch) into the request's adapter: it decodes and checks the image, runs the tower and the
generator (batched across concurrent requests), stores the adapter, and points the request's `model` at it.
Requests without an image get the all-zero null adapter. Answers carry the served model's name, not the adapter's.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import sys

from .adapters import image_key
from .engine import ServingCore, engine_defaults, resolve_model
from .platform import request_fused_lora
from .images import ImageInputError, ImagePolicy, load_image_url
from .store import NAME_PREFIX, NULL_KEY, Adapter, StoreFull

ROUTES = ("/v1/chat/completions", "/v1/completions")
# vLLM's other generating routes would run without the request's adapter (or the null one): refused, with a 404.
UNSERVED = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch", "/inference/v1/generate",
            "/cohere/v2/chat", "/invocations")
SETTINGS: dict = {}  # set by main() before vLLM builds the app, in this same process


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_json(message: str, status: int = 400, param: str | None = None) -> bytes:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


class ServerCore(ServingCore):
    """ServingCore whose adapters are also registered with vLLM's model list (by name) while they exist."""

    lora_requests: dict | None = None

    def register(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        if adapter.name not in self.lora_requests:
            self.lora_requests[adapter.name] = LoRARequest(adapter.name, adapter.int_id, str(adapter.path))

    def _forget(self, adapter: Adapter) -> None:
        if self.lora_requests is not None:
            self.lora_requests.pop(adapter.name, None)


class ImageBatcher:
    """Images that requests wait for, run through the tower and the generator together.

    A short window lets concurrent requests join one batch; the same image requested twice meanwhile is computed
    once. Each waiter gets the adapter pinned for it.
    """

    def __init__(self, core: ServingCore, window_s: float = 0.005):
        self.core = core
        self.window_s = window_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: dict[str, list] = {}  # key -> [future, number of waiters]
        self.worker: asyncio.Task | None = None

    async def adapter(self, image) -> Adapter:
        key = await asyncio.to_thread(image_key, image)
        found = self.core.store.acquire(key)
        if found is not None:
            return found
        if key in self.pending:
            self.pending[key][1] += 1
        else:
            self.pending[key] = [asyncio.get_running_loop().create_future(), 1]
            self.queue.put_nowait((key, image))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._run())
        future = self.pending[key][0]
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left: hand back the pin taken for it
            future.add_done_callback(lambda f: f.exception() or self.core.store.release(f.result()))
            raise

    async def _run(self) -> None:
        while not self.queue.empty():
            await asyncio.sleep(self.window_s)
            batch = []
            while not self.queue.empty() and len(batch) < self.core.factory.batch_size:
                batch.append(self.queue.get_nowait())
            try:
                adapters = await asyncio.to_thread(self.core.adapters_for, [image for _, image in batch])
            except Exception as err:  # noqa: BLE001 - every waiter of this batch gets the error
                for key, _ in batch:
                    self.pending.pop(key)[0].set_exception(err)
                continue
            for (key, _), adapter in zip(batch, adapters):
                future, waiters = self.pending.pop(key)
                for _ in range(waiters - 1):
                    self.core.store.acquire(key)
                future.set_result(adapter)


def prepare_chat(request: dict, policy: ImagePolicy, image_token: str):
    """Check a chat request and take its image out: -> (the request with the image as a text placeholder, the
    image URL or None). The placeholder text is what the chat template writes for an image part."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of chat messages", "messages")
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        texts, images = [], []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                images.append(url.get("url") if isinstance(url, dict) else url)
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise BadRequest(f"messages[{i}] has a content part of type {kind!r}: this model takes 'text' and "
                                 "'image_url' parts", "messages")
        if any(image_token in t for t in texts):
            raise BadRequest(f"messages[{i}] contains the literal {image_token!r} placeholder: send the image as an "
                             "image_url part instead", "messages")
        if images and message.get("role") != "user":
            raise BadRequest(f"messages[{i}] ({message.get('role')!r}) carries an image: only user messages may",
                             "messages")
        found += images
        if images or isinstance(content, list):  # the template writes an image part as '<image>\n', before the text
            message["content"] = f"{image_token}\n" * len(images) + "".join(texts)
    if len(found) > 1:
        raise BadRequest(f"the request holds {len(found)} images, but this model takes one image per conversation "
                         "(VLoRA turns one image into the model's weights)", "messages")
    return request, (found[0] if found else None)


class ImageAdapterMiddleware:
    """ASGI middleware (vLLM's --middleware): image_url -> adapter, in front of vLLM's own handlers."""

    def __init__(self, app):
        self.app = app
        self.core = ServerCore(SETTINGS.get("model"), SETTINGS.get("max_images_in_flight", 16),
                               SETTINGS.get("adapter_cache_bytes"), adapter_dir=SETTINGS.get("adapter_dir"))
        atexit.register(self.core.close)
        self.policy = SETTINGS.get("policy") or ImagePolicy()
        self.slots = asyncio.Semaphore(self.core.max_images_in_flight)
        self.batcher = ImageBatcher(self.core)
        self.image_token = self.core.processor.image_token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTES:
            return await self._generate(scope, receive, send)
        if scope["type"] == "http" and any(scope["path"] == r or scope["path"].startswith(r + "/") for r in UNSERVED):
            return await _send_json(send, 404, error_json(f"{scope['path']} is not served here (it would bypass the "
                                                          "image adapters): use /v1/chat/completions", 404))
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            return await self.app(scope, receive, _rewriting(send, self._hide_adapters))
        return await self.app(scope, receive, send)

    def _served_names(self, state) -> list[str]:
        return [m.name for m in state.openai_serving_models.base_model_paths]

    def _hide_adapters(self, body: bytes) -> bytes:
        listing = json.loads(body)
        listing["data"] = [m for m in listing.get("data", []) if not self._is_adapter(m.get("id", ""))]
        return json.dumps(listing).encode()

    def _is_adapter(self, name: str) -> bool:
        return name.startswith(NAME_PREFIX) or name.startswith(f"{NULL_KEY}-")

    async def _generate(self, scope, receive, send):
        state = scope["app"].state
        self.core.lora_requests = state.openai_serving_models.lora_requests
        body = await _read_body(receive)
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise BadRequest("the request body must be a JSON object")
            served = self._served_names(state)
            model = request.get("model") or served[0]
            if model not in served:
                raise BadRequest(f"unknown model {model!r}: this server serves {served}", "model")
            url = None
            if scope["path"] == "/v1/chat/completions":
                request, url = prepare_chat(request, self.policy, self.image_token)
                self._check_length(request, state)
            elif self.image_token in json.dumps(request.get("prompt", "")):
                raise BadRequest(f"completion prompts cannot hold images ({self.image_token!r}); use "
                                 "/v1/chat/completions with an image_url part", "prompt")
            image = None if url is None else await asyncio.to_thread(load_image_url, url, self.policy)
        except json.JSONDecodeError as err:
            return await _send_json(send, 400, error_json(f"the request body is not valid JSON: {err}"))
        except ImageInputError as err:
            return await _send_json(send, 400, error_json(str(err), param="messages"))
        except BadRequest as err:
            return await _send_json(send, 400, error_json(str(err), param=err.param))

        if image is None:
            return await self._forward(scope, receive, send, request, self.core.null_adapter, model)
        async with self.slots:
            try:
                adapter = await self.batcher.adapter(image)
            except StoreFull as err:
                return await _send_json(send, 503, error_json(str(err), status=503))
            released = False

            def drop():  # a failed request leaves no adapter behind (unless another request uses it)
                nonlocal released
                released = True
                self.core.store.release(adapter)
                self.core.store.discard(adapter)

            try:
                return await self._forward(scope, receive, send, request, adapter, model, on_error=drop)
            finally:
                if not released:
                    self.core.store.release(adapter)

    def _check_length(self, request: dict, state) -> None:
        """Refuse a prompt longer than the context before any image work (vLLM checks again, with max_tokens)."""
        try:
            text = self.core.processor.apply_chat_template(request["messages"], add_generation_prompt=True,
                                                           tokenize=False)
        except Exception as err:  # noqa: BLE001 - the template's own message names the problem
            raise BadRequest(f"the chat template cannot render these messages: {err}", "messages") from None
        n = sum(1 for t in self.core.processor.tokenizer(text)["input_ids"] if t != self.core.image_token_id)
        limit = state.vllm_config.model_config.max_model_len
        if n >= limit:
            raise BadRequest(f"the prompt is {n} tokens long, but the model's context length is {limit} tokens",
                             "messages")

    async def _forward(self, scope, receive, send, request, adapter: Adapter, model: str, on_error=None) -> int:
        """Run vLLM's own handler on the request, addressed to `adapter`; answers name `model` again.
        `on_error()` runs before an error answer reaches the client."""
        self.core.register(adapter)
        request["model"] = adapter.name
        # Our chat templates write no BOS; the processor's tokenizer adds it, so vLLM must too.
        request.setdefault("add_special_tokens", True)
        body = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        old, new = json.dumps(adapter.name).encode(), json.dumps(model).encode()
        status = []
        await self.app(scope, _replay(body, receive),
                       _rewriting(send, lambda b: b.replace(old, new), status, on_error))
        return status[0] if status else 500


async def _read_body(receive) -> bytes:
    messages = [await receive()]
    while messages[-1].get("more_body", False):
        messages.append(await receive())
    return b"".join(m.get("body", b"") for m in messages)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # disconnect notices
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _rewriting(send, rewrite, status: list | None = None, on_error=None):
    """`send` with each response body passed through `rewrite`: chunk by chunk for event streams, whole (with the
    Content-Length fixed) otherwise. `status` collects the status; `on_error()` runs before an error body leaves."""
    start, chunks, streaming = {}, [], [False]

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if status is not None:
                status.append(message["status"])
            headers = dict(message.get("headers", []))
            streaming[0] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if streaming[0]:
                return await send(message)
            start.update(message)
            return None
        if message["type"] != "http.response.body":
            return await send(message)
        if streaming[0]:
            return await send({**message, "body": rewrite(message.get("body", b""))})
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = b"".join(chunks)
        try:
            body = rewrite(body)
        except (ValueError, KeyError):
            pass  # not what we expected to rewrite: pass it on as it is
        if on_error is not None and start.get("status", 200) >= 400:
            on_error()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


async def _send_json(send, status: int, body: bytes) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


# ----- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlora-hf serve", usage="vlora-hf serve [MODEL] [options] [vLLM server options]",
        description=__doc__.split("\n\n")[0],
        epilog="Every other option goes to vLLM's server (e.g. --tensor-parallel-size 2, --dtype bfloat16, "
               "--max-model-len 4096, --max-loras 32, --api-key KEY); see `python -m "
               "vllm.entrypoints.openai.api_server --help`.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-images-in-flight", type=int, default=16,
                   help="distinct images served at once (more wait); vLLM's --max-loras defaults to this + 1")
    p.add_argument("--adapter-cache-mb", type=float, default=None,
                   help="RAM for stored adapters (default: 4x what the images in flight need, at least 64)")
    p.add_argument("--adapter-dir", default=None,
                   help="folder the adapter store lives in (default: /dev/shm, a RAM-backed folder, where present)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted (encoded size)")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="fetch http(s) image URLs (default: only base64 data URLs are accepted)")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per remote image (--allow-url-fetch)")
    return p


def vllm_argv(args, model_dir, config, rest: list[str]) -> list[str]:
    """vLLM server options: ours first, the caller's after (argparse keeps the last value given)."""
    kwargs = engine_defaults(model_dir, config, args.max_images_in_flight)
    argv = ["--model", kwargs.pop("model"), "--host", args.host, "--port", str(args.port),
            "--served-model-name", args.model or "vlora-demo",
            "--middleware", f"{__name__}.ImageAdapterMiddleware",
            "--chat-template-content-format", "string"]  # the middleware turns every content list into a string
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv + rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # MODEL comes first, if given: vLLM's options after it are unknown here and may take values.
    model = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args, rest = build_parser().parse_known_args(argv)
    args.model = model
    if args.max_images_in_flight < 1:
        print("vlora-hf serve: error: --max-images-in-flight must be at least 1", file=sys.stderr)
        return 2
    request_fused_lora()  # before vLLM resolves its platform (the imports below do)
    try:
        import uvloop
        from vllm.entrypoints.launchers.api_server.entry import run_server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as err:
        print(f"vlora-hf serve: error: vLLM is not installed ({err}); `make serving-setup` makes a venv with it",
              file=sys.stderr)
        return 1
    try:
        from .. import VLoRAConfig

        model_dir = resolve_model(args.model)
        server_argv = vllm_argv(args, model_dir, VLoRAConfig.from_pretrained(model_dir), rest)
    except ValueError as err:
        print(f"vlora-hf serve: error: {err}", file=sys.stderr)
        return 1
    SETTINGS.update(
        model=model_dir, max_images_in_flight=args.max_images_in_flight, adapter_dir=args.adapter_dir,
        adapter_cache_bytes=None if args.adapter_cache_mb is None else int(args.adapter_cache_mb * (1 << 20)),
        policy=ImagePolicy(max_bytes=int(args.max_image_mb * (1 << 20)), allow_url_fetch=args.allow_url_fetch,
                           fetch_timeout_s=args.fetch_timeout),
    )
    parser = make_arg_parser(FlexibleArgumentParser(prog="vlora-hf serve"))
    server_args = parser.parse_args(server_argv)
    validate_parsed_serve_args(server_args)
    uvloop.run(run_server(server_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
