"""`qzoom serve`: the service through an in-process client, its queue and its limits."""

import base64
import threading
import time

import pytest
from docmaker import make_image, make_pdf
from fastapi.testclient import TestClient

from qzoom_cli.serve import AskOptions, ServeSettings, create_app

OPTIONS = {"dpi": "72", "max_new_tokens": "3", "max_visual_tokens": "48", "min_visual_tokens": "16"}


def answers_without_timings(records):
    return [{k: v for k, v in r.items() if k != "stats"} for r in records]


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
    expected = qz.ask(pdf, ["total?", "date?"], pages="2", dpi=72, max_new_tokens=3,
                      budget=qz.resolve_budget(16, 48))
    assert answers_without_timings(records) == answers_without_timings([r.to_dict() for r in expected])
    assert [r["schema"] for r in records] == ["qzoom.result/v1"] * 2 and records[0]["input"]["pages"] == [2]
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
    outside = client.post("/v1/ask", json={"path": "../secret.png", "question": "what?"})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "forbidden"
    missing = client.post("/v1/ask", json={"path": "b.png", "question": "what?"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
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
    huge = client.post("/v1/ask", content=b"x" * 2**18, headers={"content-type": "application/json"})
    assert huge.status_code == 413  # refused by its length, before the body is read


def test_an_api_key_guards_the_api_but_not_the_health_check(serve):
    client = serve(api_key="k3y")
    refused = upload(client, make_image("PNG"), "what?")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert upload(client, make_image("PNG"), "what?", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert upload(client, make_image("PNG"), "what?", headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert client.get("/metrics").status_code == 401 and client.get("/health").status_code == 200


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
    for values, message in [({"roi_native": "maybe"}, "roi_native must be a bool"),
                            ({"dpi": "1.5"}, "dpi must be a number"), ({"dpi": 2.5}, "dpi must be a number"),
                            ({"dpi": True}, "dpi must be a number"), ({"dpi": ""}, "dpi needs a value"),
                            ({"zoom": "sometimes"}, "unknown zoom mode"), ({"dpi": 0}, "dpi must be positive"),
                            ({"min_visual_tokens": 50, "max_visual_tokens": 10}, "visual"),
                            ({"max_new_tokens": 0}, "at least 1"), ({"size": 3}, "unknown option")]:
        with pytest.raises(UsageError, match=message):
            base.updated(values)


def test_over_a_real_socket_a_shutdown_first_answers_every_request_in_flight(qz, monkeypatch):
    """SIGTERM/Ctrl-C make uvicorn stop listening and wait for open requests; the engine thread
    answers the queued ones before the app's lifespan ends."""
    import socket

    import httpx
    import uvicorn

    release, original = threading.Event(), qz.engine.answer_batch
    monkeypatch.setattr(qz.engine, "answer_batch", lambda items, *args: release.wait(30) and original(items, *args))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(qz, ServeSettings(batch_size=1, batch_wait_ms=0)),
                                           log_level="warning", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    while not server.started:
        time.sleep(0.01)
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
