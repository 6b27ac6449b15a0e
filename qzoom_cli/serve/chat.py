"""The OpenAI-compatible chat API: a chat request with an image becomes a qzoom question, the
answer a chat completion (streamed as server-sent events when asked) with the record in `qzoom`."""

from __future__ import annotations

import base64
import binascii
import time
import urllib.request
import uuid
from collections.abc import Iterator

from ..errors import InputError, TooLarge, UsageError
from ..results import Result, json_text

REMOTE_TIMEOUT_S = 20


def chat_question(body: object) -> tuple[str, str, dict]:
    """(question, image URL, qzoom options) of a chat request: the last user message's text and
    its one image (or, without one there, the latest image earlier in the conversation)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise UsageError("a chat request needs a non-empty 'messages' list")
    if body.get("n", 1) != 1:
        raise UsageError("n must be 1: answers are greedy, so every choice would be the same")
    if body.get("tools") or body.get("functions"):
        raise UsageError("this service answers questions about documents; it calls no tools or functions")
    wanted = body.get("response_format") or {}
    if not isinstance(wanted, dict) or wanted.get("type", "text") != "text":
        raise UsageError("answers are plain text: response_format must be {'type': 'text'}")
    if body.get("logprobs"):
        raise UsageError("logprobs are not given; the qzoom record's candidates carry each answer's mean "
                         "log-probability")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise UsageError("the conversation has no user message to answer")
    texts, images = _parts(users[-1])
    if not images:
        images = next((found for found in (_parts(m)[1] for m in reversed(users[:-1])) if found), [])
    if len(images) != 1:
        raise UsageError(f"send exactly one image (or PDF) per question; the message has {len(images)}")
    question = "\n".join(t for t in texts if t.strip())
    if not question.strip():
        raise UsageError("the last user message has no question text")
    options = body.get("qzoom") or {}
    if not isinstance(options, dict):
        raise UsageError("qzoom (the ask options) must be a JSON object")
    options = dict(options)
    length = body.get("max_completion_tokens", body.get("max_tokens"))
    if length is not None:
        options["max_new_tokens"] = length
    return question, images[0], options


def _parts(message: dict) -> tuple[list[str], list[str]]:
    content = message.get("content")
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise UsageError("message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise UsageError("an image_url part needs a url")
            images.append(url)
        else:
            raise UsageError(f"unsupported message part {kind!r}: use text and image_url parts")
    return texts, images


def image_bytes(url: str, limit: int, allow_remote: bool) -> bytes:
    """The document behind a data URL (base64), or an http(s) URL when the service allows them."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise UsageError("data URLs must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("the image's data URL is not valid base64") from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise UsageError("this service takes images as data URLs; remote URLs need --allow-remote-images")
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
                data = response.read(limit + 1)
        except OSError as exc:
            raise InputError(f"could not fetch {url}: {exc}") from None
    else:
        raise UsageError("image URLs must be data: URLs (or http(s) with --allow-remote-images)")
    if len(data) > limit:
        raise TooLarge(f"the image is larger than {limit / 2**20:g} MB, the most this service takes")
    return data


def completion(result: Result, model: str) -> dict:
    """A `chat.completion` object for one answer; the qzoom record rides along in `qzoom`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": _assistant(result),
                                         "finish_reason": _finish_reason(result), "logprobs": None}],
            "usage": _usage(result), "qzoom": result.to_dict()}


def completion_chunks(result: Result, model: str) -> Iterator[str]:
    """The same answer as server-sent `chat.completion.chunk` events, then `[DONE]`."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    first = {**base, "choices": [{"index": 0, "delta": _assistant(result),
                                  "finish_reason": None, "logprobs": None}]}
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish_reason(result), "logprobs": None}],
            "usage": _usage(result), "qzoom": result.to_dict()}
    for event in (first, last):
        yield f"data: {json_text(event)}\n\n"
    yield "data: [DONE]\n\n"


def _assistant(result: Result) -> dict:
    """The answer as an assistant message; a model that reasoned first adds its reasoning apart
    (`reasoning_content`, where vLLM's reasoning parsers put it)."""
    reasoning = {} if result.reasoning is None else {"reasoning_content": result.reasoning}
    return {"role": "assistant", "content": result.answer, **reasoning}


def _finish_reason(result: Result) -> str:
    return "length" if result.status == "truncated" else "stop"


def _usage(result: Result) -> dict:
    prompt = result.stats.total_prompt_tokens if result.stats else 0
    output = result.stats.total_output_tokens if result.stats else 0  # every page's answer was generated
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
