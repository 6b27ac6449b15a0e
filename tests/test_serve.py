"""`qzoom serve`: the service through an in-process client, its queue and its limits."""

import base64
import json
import os
import re
import threading
import time

import pytest
from docmaker import make_encrypted_pdf, make_image, make_pdf
from fastapi.testclient import TestClient

from qzoom_cli.documents import open_document
from qzoom_cli.errors import UsageError
from qzoom_cli.serve import AskOptions, ServeSettings, create_app

OPTIONS = {"dpi": "72", "max_new_tokens": "3", "max_visual_tokens": "48", "min_visual_tokens": "16"}


def answers_without_timings(records):
    """Every field but the timings, flattened (compared with floats to 1e-4: a batch moves their last bits)."""
    def leaves(value, path=()):
        if isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if not (len(path) == 1 and key == "stats"):
                    yield from leaves(item, (*path, key))
        else:
            yield path, value

    return dict(leaves(records))


@pytest.fixture
def serve(qz):
    """A client of a service around the session's tiny model: `serve(**settings)`."""
    clients = []

    def start(**settings):
        client = TestClient(create_app(qz, ServeSettings(**settings)))
        clients.append(client.__enter__())
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def upload(client, document: bytes, *questions, headers=None, **options):
    form = {**OPTIONS, **options, "question": list(questions)}
    return client.post("/v1/ask", files={"file": ("doc", document)}, data=form, headers=headers)


def test_an_upload_is_answered_as_ask_answers_it(qz, serve):
    client = serve()
    pdf = make_pdf(2)
    response = upload(client, pdf, "total?", "date?", pages="2")
    assert response.status_code == 200, response.text
    records = response.json()["results"]
    with open_document(pdf, dpi=72, name="doc") as doc:  # named as the upload was
        expected = qz.ask(doc, ["total?", "date?"], pages="2", max_new_tokens=3, budget=qz.resolve_budget(16, 48))
    want = answers_without_timings([r.to_dict() for r in expected])
    assert answers_without_timings(records) == pytest.approx(want, abs=1e-4)
    assert [r["schema"] for r in records] == ["qzoom.result/v1"] * 2 and records[0]["input"]["pages"] == [2]
    assert records[0]["input"]["file"] == "doc"
    assert client.get("/health").json()["status"] == "ok"


def test_a_json_request_with_a_base64_document_or_a_path_under_the_root(qz, serve, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(make_image("PNG"))
    (tmp_path / "secret.png").write_bytes(make_image("PNG"))
    client = serve(root=tmp_path / "docs")
    options = {"max_new_tokens": 3, "max_visual_tokens": 48, "zoom": "never"}
    by_path = client.post("/v1/ask", json={"path": "a.png", "question": "what?", "options": options})
    inline = client.post("/v1/ask", json={"document": base64.b64encode(make_image("PNG")).decode(),
                                          "questions": ["what?"], "options": options})
    assert by_path.status_code == inline.status_code == 200, by_path.text + inline.text
    assert by_path.json()["results"][0]["answer"] == inline.json()["results"][0]["answer"]
    assert by_path.json()["results"][0]["input"]["file"] == "a.png"  # as the request named it, not the server's path
    assert inline.json()["results"][0]["input"]["file"] == "<bytes>"
    named = client.post("/v1/ask", json={"document": base64.b64encode(b"%PDF-1.7 broken").decode(),
                                         "name": "../scans/broken.pdf", "question": "what?"})
    assert named.status_code == 422 and named.json()["error"]["message"].startswith("broken.pdf ")
    outside = client.post("/v1/ask", json={"path": "../secret.png", "question": "what?"})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "forbidden"
    missing = client.post("/v1/ask", json={"path": "b.png", "question": "what?"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
    for odd in ("a.png\0", ["a.png"]):
        refused = client.post("/v1/ask", json={"path": odd, "question": "what?"})
        assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("path must be a file")
    no_root = serve().post("/v1/ask", json={"path": str(tmp_path / "docs" / "a.png"), "question": "what?"})
    assert no_root.status_code == 403 and "without --root" in no_root.json()["error"]["message"]


@pytest.mark.parametrize("request_, status, code", [
    (lambda c: upload(c, b"%PDF-1.7 broken", "q?"), 422, "pdf_corrupt"),
    (lambda c: upload(c, b"hello", "q?"), 422, "unsupported_type"),
    (lambda c: upload(c, make_pdf(2), "q?", pages="5"), 422, "page_out_of_range"),
    (lambda c: upload(c, make_pdf(1), "q?", zoom="sometimes"), 400, "usage"),
    (lambda c: upload(c, make_pdf(1), "q?", max_new_tokens="many"), 400, "usage"),
    (lambda c: upload(c, make_pdf(1), "q?", colour="red"), 400, "usage"),
    (lambda c: upload(c, make_pdf(1), " "), 400, "usage"),
    (lambda c: c.post("/v1/ask", content=b"[1]", headers={"content-type": "application/json"}), 400, "usage"),
    (lambda c: c.post("/v1/ask", json={"document": "not base64!", "question": "q?"}), 400, "usage"),
    (lambda c: c.post("/v1/ask", json={"document": "AA==", "questions": ["q?", 3]}), 400, "usage"),
])
def test_bad_requests_get_the_cli_error_code_and_the_service_keeps_serving(serve, request_, status, code):
    client = serve()
    response = request_(client)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert response.headers["x-qzoom-error"] == code
    assert upload(client, make_image("PNG"), "what?").status_code == 200


def test_documents_over_the_limits_are_refused_with_413(serve):
    client = serve(max_upload_mb=0.01, max_pages=2)
    big = upload(client, make_image("PNG", size=(900, 900), color=(1, 2, 3)) + bytes(20_000), "q?")
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    pages = upload(client, make_pdf(3), "q?")
    assert pages.status_code == 413 and "at most 2" in pages.json()["error"]["message"]
    assert upload(client, make_pdf(3), "q?", pages="1-2").status_code == 200
    announced = client.post("/v1/ask", content=b"{}", headers={"content-type": "application/json",
                                                                "content-length": str(2**18)})
    assert announced.status_code == 413  # refused by its length, before the body is read
    streamed = client.post("/v1/ask", content=iter([b"x" * 2**14] * 16), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"  # no length: counted


def test_routes_and_methods_that_do_not_exist_answer_in_the_error_shape(serve):
    client = serve()
    for response, status, code in [(client.get("/v1/nothing"), 404, "not_found"),
                                   (client.get("/v1/ask"), 405, "method_not_allowed")]:
        assert response.status_code == status and response.headers["x-qzoom-error"] == code
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    for made_up in ("/a", "/b", "/v1/models/any/thing", "/static/app.js"):
        client.get(made_up)
    metrics = client.get("/metrics").text
    assert 'qzoom_failures_total{code="not_found"} 3.0' in metrics  # /v1/nothing, /a, /b
    assert 'qzoom_requests_total{endpoint="other",status="404"} 3.0' in metrics  # no label per made-up path
    assert 'qzoom_requests_total{endpoint="/v1/models/{name:path}",status="404"} 1.0' in metrics
    assert 'qzoom_requests_total{endpoint="/static",status="200"} 1.0' in metrics


def test_the_page_picker_gets_the_page_count_and_a_picture_of_each_page(serve, tmp_path):
    import io

    from PIL import Image

    (tmp_path / "a.pdf").write_bytes(make_pdf(3, size=(300, 600)))
    client = serve(root=tmp_path, api_key="k3y")
    key = {"Authorization": "Bearer k3y"}
    uploaded = client.post("/v1/pages", files={"file": ("a.pdf", make_pdf(3, size=(300, 600)))}, headers=key).json()
    by_path = client.post("/v1/pages", json={"path": "a.pdf"}, headers=key).json()
    assert uploaded == by_path and uploaded["pages"] == 3 and uploaded["kind"] == "pdf"
    pictures = [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in uploaded["thumbnails"]]
    assert [picture.size for picture in pictures] == [(80, 160)] * 3  # the long side 160 px, the page's shape
    image = client.post("/v1/pages", files={"file": ("a.png", make_image("PNG"))}, headers=key).json()
    assert image["pages"] == 1 and len(image["thumbnails"]) == 1
    locked = client.post("/v1/pages", files={"file": ("l.pdf", make_encrypted_pdf("pw"))}, headers=key)
    assert locked.status_code == 422 and locked.json()["error"]["code"] == "pdf_encrypted"
    opened = client.post("/v1/pages", files={"file": ("l.pdf", make_encrypted_pdf("pw"))}, data={"password": "pw"},
                         headers=key)
    assert opened.status_code == 200 and opened.json()["pages"] >= 1
    assert client.post("/v1/pages", json={"path": "a.pdf"}).status_code == 401


def test_the_page_picker_draws_the_first_pages_of_a_long_document(serve, monkeypatch):
    from qzoom_cli.serve import app

    monkeypatch.setattr(app, "THUMBNAIL_PAGES", 2)
    reply = serve().post("/v1/pages", files={"file": ("a.pdf", make_pdf(3))}).json()
    assert reply["pages"] == 3 and len(reply["thumbnails"]) == 2


def test_an_api_key_guards_the_api_but_not_the_health_check(serve):
    client = serve(api_key="k3y")
    refused = upload(client, make_image("PNG"), "what?")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert upload(client, make_image("PNG"), "what?", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert upload(client, make_image("PNG"), "what?", headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert client.get("/metrics").status_code == 401 and client.get("/health").status_code == 200
    metrics = client.get("/metrics", headers={"Authorization": "Bearer k3y"}).text
    assert 'qzoom_requests_total{endpoint="/v1/ask",status="401"} 2.0' in metrics


def test_concurrent_requests_share_engine_batches_and_get_their_own_answers(qz, serve):
    client = serve(batch_wait_ms=300, batch_size=4)
    images = [make_image("PNG", color=(40 * i, 200, 90)) for i in range(4)]
    single = [upload(client, image, f"colour {i}?").json()["results"] for i, image in enumerate(images)]
    batched = [None] * 4

    def ask(i):
        batched[i] = upload(client, images[i], f"colour {i}?").json()["results"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, together in zip(single, batched, strict=True):
        assert [r["answer"] for r in one] == [r["answer"] for r in together]
        assert [r["id"] for r in one] == [r["id"] for r in together]
    metrics = client.get("/metrics").text
    assert 'qzoom_batch_requests_bucket{le="1.0"} 4.0' in metrics  # the four single ones
    assert "qzoom_batch_requests_count 5.0" in metrics or "qzoom_batch_requests_count 6.0" in metrics
    assert 'qzoom_requests_total{endpoint="/v1/ask",status="200"} 8.0' in metrics
    assert "qzoom_answers_total" in metrics and "qzoom_visual_tokens_count 8.0" in metrics


def test_a_full_queue_answers_503_and_out_of_memory_fails_only_its_request(qz, serve, monkeypatch):
    import torch

    release, started, original = threading.Event(), threading.Event(), qz.engine.answer_batch

    def slow(items, *args):
        started.set()
        release.wait(30)
        if any(text.startswith("boom?") for _, text in items):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", slow)
    client = serve(max_queue=1, batch_size=1, batch_wait_ms=0)
    results = {}

    def ask(name):
        results[name] = upload(client, make_image("PNG"), f"{name}?")

    first = threading.Thread(target=ask, args=("boom",))
    first.start()
    assert started.wait(30)  # the engine holds the first request
    queued = threading.Thread(target=ask, args=("queued",))
    queued.start()
    while client.get("/health").json()["queue"] < 1:
        time.sleep(0.01)
    full = upload(client, make_image("PNG"), "one too many?")
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "busy"
    release.set()
    first.join()
    queued.join()
    assert results["boom"].status_code == 503 and results["boom"].json()["error"]["code"] == "oom"
    assert results["queued"].status_code == 200


def test_closing_answers_what_is_queued_then_refuses(qz):
    from qzoom_cli.documents import open_document
    from qzoom_cli.errors import Busy
    from qzoom_cli.serve.scheduler import Job, Scheduler

    options = AskOptions(dpi=72, max_new_tokens=2, max_visual_tokens=32)
    scheduler = Scheduler(qz, batch_size=2, max_queue=8, wait_s=0.05)
    futures = [scheduler.submit(Job(open_document(make_image("PNG")), [f"q{i}?"], options)) for i in range(3)]
    scheduler.close()
    assert all(f.done() and f.result()[0].answer is not None for f in futures)
    doc = open_document(make_image("PNG"))
    with pytest.raises(Busy, match="shutting down"):
        scheduler.submit(Job(doc, ["late?"], options))
    assert doc._image is None or doc._image.fp is None  # closed: nothing is left open


def test_options_from_a_form_or_json_are_typed_and_checked():
    from qzoom_cli.errors import UsageError

    base = AskOptions(dpi=100)
    assert base.updated({"max_new_tokens": "7", "roi_native": "true", "roi_threshold": "0.25", "pages": "2-3"}) == \
        AskOptions(dpi=100, max_new_tokens=7, roi_native=True, roi_threshold=0.25, pages="2-3")
    assert base.updated({"explain": False, "gate_threshold": 1, "instruction": ""}) == \
        AskOptions(dpi=100, gate_threshold=1.0, instruction="")
    assert base.updated({"max_visual_tokens": ""}).max_visual_tokens is None
    for values, message in [({"roi_native": "maybe"}, "roi_native must be true or false"),
                            ({"dpi": "1.5"}, "dpi must be a number"), ({"dpi": 2.5}, "dpi must be a number"),
                            ({"dpi": True}, "dpi must be a number"), ({"dpi": ""}, "dpi needs a value"),
                            ({"zoom": "sometimes"}, "unknown zoom mode"), ({"dpi": 0}, "dpi must be between 1 and 1200"),
                            ({"min_visual_tokens": 50, "max_visual_tokens": 10}, "visual"),
                            ({"max_new_tokens": 0}, "at least 1"), ({"size": 3}, "unknown option")]:
        with pytest.raises(UsageError, match=message):
            base.updated(values)


def start_server(app):
    """(server, its URL, its thread): uvicorn serving `app` on a free localhost port."""
    import socket

    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{listener.getsockname()[1]}", thread


def test_over_a_real_socket_a_shutdown_first_answers_every_request_in_flight(qz, monkeypatch):
    """SIGTERM/Ctrl-C make uvicorn stop listening and wait for open requests; the engine thread
    answers the queued ones before the app's lifespan ends."""
    import httpx

    release, original = threading.Event(), qz.engine.answer_batch
    monkeypatch.setattr(qz.engine, "answer_batch", lambda items, *args: release.wait(30) and original(items, *args))
    server, url, thread = start_server(create_app(qz, ServeSettings(batch_size=1, batch_wait_ms=0)))
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    document = base64.b64encode(make_image("PNG")).decode()
    answers = {}

    def ask(i):
        answers[i] = httpx.post(f"{url}/v1/ask", json={"document": document, "question": f"q{i}?",
                                                       "options": {"max_new_tokens": 2}}, timeout=60)

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for asker in askers:
        asker.start()
    while httpx.get(f"{url}/health").json()["queue"] < 2:
        time.sleep(0.01)
    server.should_exit = True
    release.set()
    for asker in askers:
        asker.join()
    thread.join(60)
    assert not thread.is_alive()
    assert [answers[i].status_code for i in range(3)] == [200] * 3
    assert [answers[i].json()["results"][0]["question"] for i in range(3)] == ["q0?", "q1?", "q2?"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_a_queued_request_whose_client_has_gone_is_withdrawn_unanswered(qz, monkeypatch):
    """A client that gives up (a timeout, a closed tab) takes its queued request with it: the engine
    answers only those still waited for."""
    import httpx

    release, asked, original = threading.Event(), [], qz.engine.answer_batch

    def held(items, *args):
        asked.extend(text for _, text in items)
        release.wait(30)
        return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", held)
    server, url, thread = start_server(create_app(qz, ServeSettings(batch_size=1, batch_wait_ms=0)))
    document = base64.b64encode(make_image("PNG")).decode()
    answers = {}

    def ask(question, timeout):
        try:
            answers[question] = httpx.post(f"{url}/v1/ask", json={"document": document, "question": question,
                                                                  "options": {"max_new_tokens": 2}}, timeout=timeout)
        except httpx.ReadTimeout:
            answers[question] = "gave up"

    try:
        first = threading.Thread(target=ask, args=("first?", 60))
        first.start()
        while not asked:  # the first request is in the engine, held there
            time.sleep(0.01)
        ask("impatient?", 0.5)  # queued behind it; its client leaves after half a second
        while httpx.get(f"{url}/health").json()["queue"]:
            time.sleep(0.05)
        release.set()
        first.join()
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)
    assert answers["impatient?"] == "gave up" and answers["first?"].status_code == 200
    assert [text.split("\n")[0] for text in asked] == ["first?"]  # the engine never saw the withdrawn one
    assert 'qzoom_failures_total{code="client_closed_request"} 1.0' in metrics


def test_a_bug_fails_its_request_with_500_and_the_service_goes_on(qz, serve, monkeypatch):
    original = qz.engine.answer_batch

    def buggy(items, *args):
        if any(text.startswith("bug?") for _, text in items):
            raise KeyError("x")
        return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", buggy)
    client = serve()
    failed = upload(client, make_image("PNG"), "bug?")
    assert failed.status_code == 500 and failed.json()["error"] == {
        "message": "KeyError: 'x'", "type": "server_error", "param": None, "code": "internal"}
    assert upload(client, make_image("PNG"), "fine?").status_code == 200
    assert 'qzoom_failures_total{code="internal"} 1.0' in client.get("/metrics").text


def data_url(document: bytes, kind="image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(document).decode()}"


def chat(client, content, **extra):
    return client.post("/v1/chat/completions", json={"model": "any", "messages": [
        {"role": "system", "content": "You read documents."}, {"role": "user", "content": content}], **extra})


def test_chat_completions_answer_the_image_in_the_last_user_message(qz, serve):
    client = serve()
    image = make_image("PNG")
    content = [{"type": "text", "text": "What is the total?"},
               {"type": "image_url", "image_url": {"url": data_url(image)}}]
    response = chat(client, content, max_tokens=3, qzoom={"max_visual_tokens": 48, "zoom": "never"})
    assert response.status_code == 200, response.text
    body = response.json()
    [expected] = qz.ask(image, "What is the total?", max_new_tokens=3, zoom="never", budget=qz.resolve_budget(None, 48))
    assert body["object"] == "chat.completion" and body["model"] == "qwen2_5_vl"  # the tiny folder's name
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.answer}
    assert choice["finish_reason"] == ("length" if expected.status == "truncated" else "stop")
    assert body["usage"]["completion_tokens"] == expected.stats.output_tokens
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + expected.stats.output_tokens
    assert body["qzoom"]["question"] == "What is the total?" and body["qzoom"]["answer"] == expected.answer

    pdf = chat(client, [{"type": "image_url", "image_url": {"url": data_url(make_pdf(2), "application/pdf")}},
                        {"type": "text", "text": "Which page?"}], max_completion_tokens=2)
    assert pdf.status_code == 200 and pdf.json()["qzoom"]["input"]["pages"] == [1, 2]
    stats = pdf.json()["qzoom"]["stats"]  # both pages' answers were generated: both are the completion
    assert pdf.json()["usage"]["completion_tokens"] == stats["total_output_tokens"] == sum(
        c["output_tokens"] for c in pdf.json()["qzoom"]["candidates"])
    assert pdf.json()["usage"]["prompt_tokens"] == stats["total_prompt_tokens"]


def test_chat_earlier_image_and_streamed_answer(serve):
    client = serve()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look at this."},
                                             {"type": "image_url", "image_url": {"url": data_url(make_image("PNG"))}}]},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "What is the total?"}]
    plain = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 2})
    streamed = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 2,
                                                         "stream": True})
    assert plain.status_code == streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        plain.json()["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain.json()["choices"][0]["finish_reason"]


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "non-empty 'messages'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": "what?"}]}, "exactly one image"),
    ({"messages": [{"role": "user", "content": [IMAGE_PART, IMAGE_PART, {"type": "text", "text": "q?"}]}]}, "has 2"),
    ({"messages": [{"role": "user", "content": [IMAGE_PART]}]}, "no question text"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unsupported message part"),
    ({"messages": [{"role": "user", "content": 3}]}, "string or a list"),
    ({"n": 2, "messages": [{"role": "user", "content": "q?"}]}, "n must be 1"),
    ({"tools": [{"type": "function"}], "messages": [{"role": "user", "content": "q?"}]}, "calls no tools"),
    ({"functions": [{"name": "f"}], "messages": [{"role": "user", "content": "q?"}]}, "calls no tools"),
    ({"response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "q?"}]}, "plain text"),
    ({"response_format": "json", "messages": [{"role": "user", "content": "q?"}]}, "plain text"),
    ({"logprobs": True, "messages": [{"role": "user", "content": "q?"}]}, "logprobs are not given"),
    ({"qzoom": "zoom=never", "messages": [{"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "q?"}]}]},
     "must be a JSON object"),
])
def test_chat_requests_that_cannot_be_answered_say_why(serve, body, message):
    response = serve().post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


ODD_VALUES = [None, 1, 1.5, True, "x", "", [], {}, ["x"], {"a": 1}, "\0", -1]


def test_no_json_a_client_can_send_is_a_server_error(serve, tmp_path):
    """Every field of both APIs given every odd JSON value: a 4xx that names it, or an answer; never a 500."""
    (tmp_path / "a.png").write_bytes(make_image("PNG"))
    client = serve(root=tmp_path)
    image = data_url(make_image("PNG"))
    ask = {"document": base64.b64encode(make_image("PNG")).decode(), "question": "q?",
           "options": {"max_new_tokens": 1, "zoom": "never"}}
    part = {"type": "image_url", "image_url": {"url": image}}
    chat_ = {"model": "m", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "q?"}]}],
             "max_tokens": 1, "qzoom": {"zoom": "never"}}
    bodies = [("/v1/ask", {**ask, key: value}) for key in [*ask, "path", "questions", "overlay", "name"]
              for value in ODD_VALUES]
    bodies += [("/v1/chat/completions", {**chat_, key: value})
               for key in [*chat_, "n", "stream", "tools", "response_format", "logprobs"] for value in ODD_VALUES]
    bodies += [("/v1/chat/completions", {**chat_, "messages": [{"role": "user", "content": content}]})
               for value in ODD_VALUES for content in ([part, {"type": "text", "text": value}],
                                                       [{"type": "image_url", "image_url": value}, "q?"], value)]
    for url, body in bodies:
        response = client.post(url, json=body)
        assert response.status_code < 500, (body, response.text)
        assert response.status_code == 200 or response.json()["error"]["code"] != "internal"


@pytest.mark.parametrize("url, allow, status, message", [
    ("data:image/png,notbase64", False, 400, "must be base64"),
    ("data:image/png;base64,***", False, 400, "not valid base64"),
    ("https://example.invalid/a.png", False, 400, "--allow-remote-images"),
    ("file:///etc/passwd", True, 400, "must be data: URLs"),
    ("http://127.0.0.1:9/a.png", True, 422, "could not fetch"),
])
def test_chat_image_urls(serve, url, allow, status, message):
    response = chat(serve(allow_remote_images=allow), [{"type": "text", "text": "q?"},
                                                        {"type": "image_url", "image_url": {"url": url}}])
    assert response.status_code == status and message in response.json()["error"]["message"]


def test_a_remote_image_is_fetched_when_allowed(serve, tmp_path):
    import http.server
    import socketserver

    (tmp_path / "a.png").write_bytes(make_image("PNG"))
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/a.png"
        response = chat(serve(allow_remote_images=True, max_upload_mb=1), [
            {"type": "text", "text": "q?"}, {"type": "image_url", "image_url": {"url": url}}], max_tokens=2)
        files.shutdown()
    assert response.status_code == 200, response.text
    assert response.json()["qzoom"]["input"]["kind"] == "png"


def test_the_official_openai_client_reads_the_answers(qz):
    """Request and response shapes as OpenAI's own SDK builds and parses them, plain and streamed."""
    import openai

    server, url, thread = start_server(create_app(qz, ServeSettings(api_key="k3y")))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "What is the total?"},
            {"type": "image_url", "image_url": {"url": data_url(make_image("PNG")), "detail": "high"}}]}]
        answer = client.chat.completions.create(model="qzoom", messages=messages, max_tokens=3,
                                                extra_body={"qzoom": {"zoom": "never"}})
        assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
        assert answer.usage.completion_tokens >= 1 and answer.model == "qwen2_5_vl"
        assert answer.model_extra["qzoom"]["schema"] == "qzoom.result/v1"
        stream = client.chat.completions.create(model="qzoom", messages=messages, max_tokens=3, stream=True,
                                                extra_body={"qzoom": {"zoom": "never"}})
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="qzoom", messages=messages)
        with pytest.raises(openai.BadRequestError, match="exactly one image"):
            client.chat.completions.create(model="qzoom", messages=[{"role": "user", "content": "total?"}])
        served = "qwen2_5_vl"  # never the server's path to it
        assert [model.id for model in client.models.list()] == [served] and str(qz.model_info().id) != served
        assert client.models.retrieve(served).id == served
        with pytest.raises(openai.NotFoundError, match="not other/model"):
            client.models.retrieve("other/model")
    finally:
        server.should_exit = True
        thread.join(60)


def test_the_serve_command_checks_its_settings_before_loading_a_model(tiny_dir):
    from typer.testing import CliRunner

    from qzoom_cli import cli
    from qzoom_cli.errors import EXIT_USAGE

    runner = CliRunner()
    usage = runner.invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "240"})
    assert usage.exit_code == 0 and "--allow-remote-images" in usage.stdout and "--api-key" in usage.stdout
    for args, message in [(["--max-queue", "0"], "at least 1"), (["--root", "/no/such/folder"], "not a folder"),
                          (["--zoom", "sometimes"], "unknown zoom mode"),
                          (["--max-upload-mb", "nan"], "must be positive numbers"),
                          (["--batch-wait-ms", "inf"], "a number of at least 0"),
                          (["--body-timeout", "0"], "must be positive numbers"),
                          (["--max-questions", "0"], "at least 1"),
                          (["--port", "70000"], "--port must be between 0 and 65535, not 70000"),
                          (["--pages", "abc"], "bad page range 'abc'"),
                          (["--api-key", ""], "the API key is empty")]:
        result = runner.invoke(cli.app, ["serve", "--model", "/no/such/model", *args])
        assert result.exit_code == EXIT_USAGE and message in result.stderr, (args, result.stderr)
    empty = runner.invoke(cli.app, ["serve", "--model", "/no/such/model"], env={"QZOOM_API_KEY": ""})
    assert empty.exit_code == EXIT_USAGE and "an empty $QZOOM_API_KEY" in empty.stderr


def test_the_serve_command_hands_its_ask_options_to_every_request_as_defaults(monkeypatch):
    import importlib

    import uvicorn
    from typer.testing import CliRunner

    from qzoom_cli import cli, serve

    command = importlib.import_module("qzoom_cli.cli.serve")  # the package's `serve` is the command function
    made, ran = [], []
    monkeypatch.setattr(command, "load_model", lambda *args: "the model")
    monkeypatch.setattr(command, "preflight", lambda *args: None)  # no model to look for
    monkeypatch.setattr(serve, "create_app", lambda qz, settings: made.append((qz, settings)) or "the app")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: ran.append((self.config.app, sockets)))
    result = CliRunner().invoke(cli.app, [
        "serve", "--quiet", "--port", "0", "--pages", "2-3", "--password", "pw", "--dpi", "100", "--zoom", "never",
        "--explain", "--max-new-tokens", "5", "--instruction", "Answer.", "--max-pages", "7", "--api-key", "k"])
    assert result.exit_code == 0, result.stderr
    [(qz, settings)] = made
    assert qz == "the model" and settings.defaults == AskOptions(
        pages="2-3", dpi=100, password="pw", zoom="never", explain=True, max_new_tokens=5, instruction="Answer.")
    assert settings.max_pages == 7 and settings.api_key == "k"
    [(app, [listener])] = ran
    assert app == "the app" and listener.getsockname()[1] > 0
    listener.close()


def test_a_taken_port_is_said_before_the_model_loads(tiny_dir):
    import socket

    from typer.testing import CliRunner

    from qzoom_cli import cli
    from qzoom_cli.errors import EXIT_MODEL

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli.app, ["serve", "--model", str(tiny_dir), "--port", str(port)])
    assert result.exit_code == EXIT_MODEL
    assert result.stderr.strip() == (f"qzoom: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                     "(choose another --port or --host)")


def test_overlays_show_each_answer_on_its_page_with_the_box_it_read(qz, serve):
    import io

    from PIL import Image

    client = serve(batch_wait_ms=200)
    pdf, answers = make_pdf(2), {}

    def ask(name):
        answers[name] = upload(client, pdf, f"{name} total?", f"{name} date?", zoom="always", overlay="true")

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, response in answers.items():
        body = response.json()
        assert response.status_code == 200 and len(body["overlays"]) == 2, response.text
        for record, overlay in zip(body["results"], body["overlays"], strict=True):
            assert record["question"].startswith(name) and record["zoom"]["overlay"] is None
            image = Image.open(io.BytesIO(base64.b64decode(overlay.split(",", 1)[1]))).convert("RGB")
            assert image.size == (595, 842)  # the whole page, at the request's 72 dpi
            x0, y0, x1, y1 = record["zoom"]["roi"]["bbox_xyxy"]
            assert image.getpixel((x0, (y0 + y1) // 2)) == (0, 90, 255)  # the box, on the left edge
    assert "overlays" not in upload(client, pdf, "q?").json()
    assert upload(client, pdf, "q?", overlay="perhaps").status_code == 400


def test_an_overlay_that_could_not_be_drawn_is_null_in_its_answers_place(qz, serve, monkeypatch):
    from qzoom_cli import render

    drawn, write = [], render.write_overlay

    def full_disk_on_the_second(path, *args):
        drawn.append(path)
        if len(drawn) == 2:
            raise OSError(28, "No space left on device")
        return write(path, *args)

    monkeypatch.setattr(render, "write_overlay", full_disk_on_the_second)
    body = upload(serve(), make_pdf(1), "total?", "date?", zoom="always", overlay="true").json()
    assert [overlay is None for overlay in body["overlays"]] == [False, True]
    assert [any("overlay not written" in w for w in r["warnings"]) for r in body["results"]] == [False, True]


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("QZOOM_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_in_a_real_browser_shows_the_answer_and_the_box(qz, tmp_path):
    """Headless Chromium: drop the sample invoice on the page, pick its first page from the pictures,
    ask, see the answer, where it looked, the stats."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    invoice = Path(__file__).parent.parent / "samples" / "invoice.pdf"
    server, url, thread = start_server(create_app(qz, ServeSettings(defaults=AskOptions(
        dpi=72, max_new_tokens=3, max_visual_tokens=48, min_visual_tokens=16))))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
            page.evaluate("""([name, data]) => {  // dropped on the page, as a person drags it there
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const dropped = new DataTransfer();
                dropped.items.add(new File([bytes], name, { type: "application/pdf" }));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dropped }));
            }""", ["invoice.pdf", base64.b64encode(invoice.read_bytes()).decode()])
            page.wait_for_selector(".thumbnail img")
            assert page.text_content("#drop-text").startswith("invoice.pdf (")
            assert page.locator(".thumbnail").count() == 3 and "3 pages" in page.text_content("#picker-text")
            def chosen():
                return page.locator(".thumbnail.chosen").evaluate_all("nodes => nodes.map(n => n.dataset.page)")

            for number in (2, 1):
                page.click(f".thumbnail[data-page='{number}']")
            assert page.input_value("#pages") == "1-2" and chosen() == ["1", "2"]
            page.fill("#pages", "3,2")  # typed: the pictures follow
            assert chosen() == ["2", "3"]
            for number in (3, 2, 1):  # unchosen, unchosen, chosen: the invoice's first page
                page.click(f".thumbnail[data-page='{number}']")
            assert page.input_value("#pages") == "1" and chosen() == ["1"]
            page.fill("#questions", "What is the total due?")
            page.select_option("#zoom", "always")
            page.click("#submit")
            page.wait_for_selector(".result .answer", timeout=60_000)
            expected = qz.ask(invoice, "What is the total due?", pages="1", dpi=72, max_new_tokens=3, zoom="always",
                              budget=qz.resolve_budget(16, 48))[0]
            assert page.text_content(".result .question") == "What is the total due?"
            assert page.text_content(".result .answer") == expected.answer
            assert f"read the region {', '.join(map(str, expected.zoom.roi['bbox_xyxy']))}" in \
                page.text_content(".result .zoom")
            assert "Visual tokens" in page.text_content(".result .stats")
            page.wait_for_function("document.querySelector('.result img.overlay').naturalWidth > 0")
            image = tmp_path / "shown.png"
            page.locator(".result img.overlay").screenshot(path=str(image))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(60)
    from PIL import Image

    shown = Image.open(image).convert("RGB")
    data = shown.tobytes()
    blue = sum(1 for r, g, b in zip(data[0::3], data[1::3], data[2::3], strict=True) if b > 200 and r < 60 and g < 140)
    assert blue > 20  # the drawn box is on the page shown


@pytest.mark.processes
def test_the_serve_command_answers_then_drains_on_sigterm(tiny_dir, tmp_path):
    """`qzoom serve` as users start it: the model loaded once, requests answered, and SIGTERM
    answers what is in flight before the process ends (by the signal, as uvicorn re-raises it)."""
    import signal
    import subprocess
    import sys

    import httpx

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(make_image("PNG"))
    server = subprocess.Popen([sys.executable, "-m", "qzoom_cli", "serve", "--port", "0", "--model",
                               str(tiny_dir), "--device", "cpu", "--max-new-tokens", "2", "--root",
                               str(tmp_path / "docs"), "--batch-wait-ms", "0", "--batch-size", "2", "--max-questions", "40"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def engine_batches() -> float:
        metrics = httpx.get(f"{url}/metrics").text
        return float(re.search(r"^qzoom_batch_requests_count (\S+)$", metrics, re.MULTILINE).group(1))

    try:
        serving = next(line for line in server.stderr if "serving" in line)  # --port 0: the port it took
        assert f"serving {tiny_dir} as qwen2_5_vl at http://127.0.0.1:" in serving
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", serving).group(1)
        first = httpx.post(f"{url}/v1/ask", json={"path": "a.png", "question": "what?"}, timeout=60)
        assert first.status_code == 200 and first.json()["results"][0]["answer"] is not None
        answers, questions = [], [f"question {i}?" for i in range(40)]

        def ask():
            answers.append(httpx.post(f"{url}/v1/ask", json={"path": "a.png", "questions": questions}, timeout=120))
            answers.append(time.monotonic())

        asker = threading.Thread(target=ask)
        asker.start()
        while engine_batches() < 2:  # the long request is in the engine: its first batch is answered
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        asker.join()
        assert server.wait(60) == -signal.SIGTERM
        said = server.stderr.read()
    finally:
        server.kill()
    assert answers[0].status_code == 200 and len(answers[0].json()["results"]) == 40
    assert re.search(r"^qzoom: POST /v1/ask 200 \d+\.\d{3}s$", said, re.MULTILINE)  # one line per request
    assert said.index("qzoom: stopping: answering the requests in flight first") < said.index("qzoom: stopped")
    assert answers[1] > signalled  # it was still being answered when the signal came


# --- what a hostile client may send ----------------------------------------------------------------------

@pytest.mark.parametrize("options, questions, message", [
    ({}, 33, "33 questions asked for; this service takes at most 32 per request (--max-questions)"),
    ({"max_visual_tokens": "4097", "min_visual_tokens": "16"}, 1,
     "4097 visual tokens asked for; this service takes at most 4096 per request (--max-request-visual-tokens)"),
    ({"roi_max_visual_tokens": "5000"}, 1, "5000 visual tokens asked for"),
    ({"max_new_tokens": "2049"}, 1, "2049 answer tokens asked for; this service takes at most 2048 per request "
                                    "(--max-answer-tokens)"),
    ({"instruction": "x" * 1001}, 1, "1001 characters of instruction asked for; this service takes at most 1000 "
                                     "per request (--max-instruction-chars)"),
])
def test_a_request_beyond_the_services_caps_is_refused_with_413(serve, options, questions, message):
    client = serve()
    asked = [f"q{i}?" for i in range(questions)]
    response = upload(client, make_image("PNG"), *asked, **options)
    assert response.status_code == 413 and response.json()["error"]["message"].startswith(message)


def test_the_caps_are_the_services_settings_and_hold_for_chat_and_pages_too(serve):
    client = serve(max_questions=2, max_answer_tokens=3)
    assert upload(client, make_image("PNG"), "a?", "b?").status_code == 200
    assert upload(client, make_image("PNG"), "a?", "b?", "c?").status_code == 413
    assert upload(client, make_image("PNG"), "a?", max_new_tokens="4").status_code == 413
    assert chat(client, [{"type": "text", "text": "what?"}, IMAGE_PART], max_tokens=4).status_code == 413
    pages = client.post("/v1/pages", files={"file": ("doc", make_pdf(1))}, data={"max_visual_tokens": "5000"})
    assert pages.status_code == 413


def test_a_keyless_service_answers_only_the_host_names_it_serves(serve):
    """DNS rebinding: a page elsewhere reaches a local service by a name that points here, which the
    Host header still carries."""
    client = serve(allowed_hosts=("localhost", "127.0.0.1", "::1"))
    refused = upload(client, make_image("PNG"), "what?", headers={"host": "evil.example:8000"})
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == ("this service answers requests for localhost, 127.0.0.1, ::1 only "
                                                  "(not 'evil.example:8000'); start it with --allowed-host, or with "
                                                  "--api-key")
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert upload(client, make_image("PNG"), "what?", headers={"host": host}).status_code == 200, host
    keyed = serve(allowed_hosts=("localhost",), api_key="k")  # a key is what guards it then
    assert upload(keyed, make_image("PNG"), "what?", headers={"host": "evil.example", "authorization": "Bearer k"}
                  ).status_code == 200


def test_api_keys_are_never_empty_and_may_be_any_text():
    for empty in ("", "  "):
        with pytest.raises(UsageError, match="the API key is empty"):
            ServeSettings(api_key=empty)
    for odd in ("nan", "inf", "-1"):
        with pytest.raises(UsageError):
            ServeSettings(max_upload_mb=float(odd))
        with pytest.raises(UsageError):
            ServeSettings(batch_wait_ms=float(odd))


def test_a_key_beyond_ascii_is_compared_as_the_utf8_a_client_sends(serve):
    client = serve(api_key="clé-ключ")
    sent = {"authorization": "Bearer clé-ключ".encode()}
    assert upload(client, make_image("PNG"), "what?", headers=sent).status_code == 200
    assert upload(client, make_image("PNG"), "what?", headers={"authorization": b"Bearer cl\xe9"}).status_code == 401


def test_a_body_that_stops_arriving_is_timed_out():
    import asyncio

    from qzoom_cli.serve.app import BodyLimit, RequestTimeout

    async def reads_its_body(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    async def first_part_then_nothing():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)

    sent = []
    limit = BodyLimit(reads_its_body, 2**20, 1.0, timeout=0.05)
    with pytest.raises(RequestTimeout, match=r"^the request body stopped arriving for 0\.05 s$"):
        asyncio.run(limit({"type": "http", "headers": []}, first_part_then_nothing, None))


def test_a_connection_that_never_finishes_its_headers_is_closed(qz):
    import socket

    import uvicorn

    from qzoom_cli.cli.serve import header_deadline

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(qz, ServeSettings()), log_level="warning",
                                           http=header_deadline(0.3)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        slow = socket.create_connection(listener.getsockname())
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        slow.settimeout(10)
        started = time.monotonic()
        assert slow.recv(100) == b"" and time.monotonic() - started < 5  # closed by the server
        quick = socket.create_connection(listener.getsockname())
        quick.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        quick.settimeout(10)
        assert quick.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join()


def test_json_nested_beyond_reason_is_a_bad_request(serve):
    client = serve()
    for route in ("/v1/ask", "/v1/pages", "/v1/chat/completions"):
        response = client.post(route, content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert response.status_code == 400, (route, response.text)
        assert response.json()["error"]["message"] == "the body's JSON is nested too deeply"


def test_path_errors_name_only_what_the_request_sent(serve, tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    (root / "out").symlink_to(tmp_path)
    (tmp_path / "secret.pdf").write_bytes(make_pdf(1))
    with open(root / "huge.pdf", "wb") as handle:
        handle.truncate(2**30)  # sparse: refused by its size, not read
    client = serve(root=str(root))
    cases = [("x" * 300, 400, "cannot be read (File name too long)"), ("loop", 400, "loop: cannot be read ("),
             ("out/secret.pdf", 403, "out/secret.pdf is outside the folder this service may read"),
             ("out/no-such.pdf", 403, "out/no-such.pdf is outside the folder"),  # whether it exists: not said
             ("huge.pdf", 413, "huge.pdf is larger than"), ("nothing.pdf", 404, "nothing.pdf: no such file")]
    for path, status, message in cases:
        response = client.post("/v1/ask", json={"path": path, "question": "q?"})
        assert response.status_code == status and message in response.json()["error"]["message"], response.text
        assert str(tmp_path) not in response.text


def test_the_page_picker_of_a_page_of_enormous_user_units_stays_small(serve):
    from docmaker import make_raw_pdf

    response = serve().post("/v1/pages", files={"file": ("bomb.pdf", make_raw_pdf("/UserUnit 1000000"))})
    assert response.status_code == 200, response.text
    assert len(response.text) < 50_000  # a page-picker thumbnail, not the page


def test_the_served_model_name_is_what_clients_see_and_ask_for(serve):
    client = serve(served_model_name="invoices-7b")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["invoices-7b"]
    assert client.get("/v1/models/invoices-7b").json()["id"] == "invoices-7b"
    missing = client.get("/v1/models/qwen2_5_vl")
    assert missing.status_code == 404 and "serves invoices-7b" in missing.json()["error"]["message"]
    answer = chat(client, [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {
        "url": data_url(make_image("PNG"))}}], max_tokens=2)
    assert answer.json()["model"] == "invoices-7b"


def test_each_request_is_one_log_line_when_asked(serve, capfd):
    client = serve(log_requests=True)
    client.get("/health")
    client.get("/v1/nowhere%1B%5B2J")  # decoded, an escape sequence
    lines = capfd.readouterr().err.splitlines()
    assert re.fullmatch(r"qzoom: GET /health 200 \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"qzoom: GET /v1/nowhere\\x1b\[2J 404 \d+\.\d{3}s", lines[1])  # never raw to a terminal
    quiet = serve()
    quiet.get("/health")
    assert capfd.readouterr().err == ""
