"""`qzoom serve`: the model loaded once, answering over HTTP until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EnvironmentProblem, UsageError
from ..refs import display_name
from .common import (
    AdapterOpt,
    AttnOpt,
    CompileOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    ExplainOpt,
    GateOpt,
    InstructionOpt,
    MaxNewOpt,
    MaxTokensOpt,
    MinTokensOpt,
    ModelOpt,
    NoMergeOpt,
    PagesOpt,
    PasswordOpt,
    Quiet,
    RevisionOpt,
    RoiNativeOpt,
    RoiOpt,
    RoiTokensOpt,
    ThinkOpt,
    Verbose,
    ZoomOpt,
    configure_logging,
    flag,
    instruction_text,
    load_model,
    preflight,
)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (localhost only by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    root: Annotated[str | None, typer.Option(help="Folder whose documents requests may name by path "
                                                  "(never outside it); without it, documents are uploaded.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="QZOOM_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on the API "
                                                     "(or $QZOOM_API_KEY).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest document accepted (413 beyond).")] = 50.0,
    max_pages: Annotated[int, typer.Option(help="Most pages one request may read (413 beyond).")] = 100,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get 503 + Retry-After.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Requests (and (page, question) pairs) answered together.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to share its "
                                                      "batch.")] = 5.0,
    allow_remote_images: Annotated[bool, flag(help="Let chat requests name http(s) image URLs (fetched by the "
                                                   "server).")] = False,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="A name a keyless service answers requests for, besides localhost and --host "
                               "(repeatable; '*' for any). Other Host headers get 403.")] = None,
    max_questions: Annotated[int, typer.Option(help="Most questions one request may ask (413 beyond).")] = 32,
    max_request_visual_tokens: Annotated[int, typer.Option(
        help="Most visual tokens a request may ask a page or region to be read at (413 beyond).")] = 4096,
    max_answer_tokens: Annotated[int, typer.Option(help="Largest max_new_tokens a request may ask for (413 "
                                                        "beyond).")] = 2048,
    max_instruction_chars: Annotated[int, typer.Option(help="Longest instruction a request may send (413 "
                                                            "beyond).")] = 1000,
    body_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its request's headers, "
                                                     "and between parts of its body (408 beyond).")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model's name in /v1/models and chat answers [default: its hub id, or its folder's name].")]
    = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_merge: NoMergeOpt = False,
    revision: RevisionOpt = None,
    zoom: ZoomOpt = "auto",
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    roi_native: RoiNativeOpt = False,
    explain: ExplainOpt = False,
    pages: PagesOpt = None,
    dpi: DpiOpt = 200,
    password: PasswordOpt = None,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    think: ThinkOpt = None,
    instruction: InstructionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Serve the model over HTTP: POST /v1/ask (qzoom.result/v1 records), POST /v1/chat/completions
    (OpenAI-compatible, images as data URLs), GET /health, GET /metrics, and a page at / to ask
    about a document and see where the model looked.

    The ask options given here are the defaults; each request may set its own.
    """
    try:
        import fastapi  # noqa: F401 (the extra's presence, checked before any work)
        import uvicorn

        from ..serve import AskOptions, ServeSettings
    except ImportError as exc:
        raise EnvironmentProblem(f"qzoom serve needs the serve extra ({exc.name} is missing): "
                                 "pip install 'qzoom[serve]'") from None

    defaults = AskOptions(pages=pages, dpi=dpi, password=password, zoom=zoom, gate_threshold=gate_threshold,
                          roi_threshold=roi_threshold, roi_max_visual_tokens=roi_max_visual_tokens,
                          roi_native=roi_native, explain=explain, min_visual_tokens=min_visual_tokens,
                          max_visual_tokens=max_visual_tokens, max_new_tokens=max_new_tokens,
                          instruction=instruction_text(instruction))
    if api_key is None and "QZOOM_API_KEY" in os.environ:  # click reads an empty variable as no key at all
        api_key = os.environ["QZOOM_API_KEY"]
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {port}")
    hosts = None if "*" in (allowed_host or []) else \
        tuple(dict.fromkeys(name.lower() for name in ("localhost", "127.0.0.1", "::1", host, *(allowed_host or []))))
    settings = ServeSettings(defaults=defaults, root=Path(root) if root else None, max_upload_mb=max_upload_mb,
                             max_pages=max_pages, max_queue=max_queue, batch_size=batch_size,
                             batch_wait_ms=batch_wait_ms, api_key=api_key, allow_remote_images=allow_remote_images,
                             max_questions=max_questions, max_request_visual_tokens=max_request_visual_tokens,
                             max_answer_tokens=max_answer_tokens, max_instruction_chars=max_instruction_chars,
                             allowed_hosts=hosts, body_timeout_s=body_timeout, served_model_name=served_model_name,
                             log_requests=not quiet)
    preflight(model, adapter, revision)
    from ..serve import create_app

    configure_logging(verbose, quiet)
    listener = listening_socket(host, port)  # a taken port is said before minutes of model loading
    qz = load_model(model, adapter, revision, device, dtype, attn, compile_mode, no_merge, think)
    listener.listen(2048)  # from here a request waits for the server instead of being refused (uvicorn's backlog)
    if not quiet:
        where = f"http://{host if ':' not in host else f'[{host}]'}:{listener.getsockname()[1]}/"
        name = served_model_name or display_name(qz.model_info().id)
        print(f"qzoom: serving {qz.model_info().id} as {name} at {where} (Ctrl-C to stop)", file=sys.stderr)
        if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
            print("qzoom: warning: listening beyond this machine without --api-key", file=sys.stderr)
    config = uvicorn.Config(create_app(qz, settings), host=host, port=port, log_level="info" if verbose else
                            "warning", timeout_graceful_shutdown=None, access_log=verbose,
                            http=header_deadline(body_timeout))
    announcing_server(uvicorn.Server, quiet)(config).run(sockets=[listener])


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it; `--port 0` takes a free port."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                                 "(choose another --port or --host)") from None
    return listener


def announcing_server(server: type, quiet: bool) -> type:
    """uvicorn's server, saying on stderr when a signal (Ctrl-C, SIGTERM) starts its shutdown
    (requests in flight are answered first, which may take a while) and when it is done (before
    uvicorn ends the process by that signal)."""
    class AnnouncingServer(server):
        def handle_exit(self, sig, frame) -> None:
            if not quiet and not self.should_exit:
                print("qzoom: stopping: answering the requests in flight first (again to force)", file=sys.stderr)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            if not quiet:
                print("qzoom: stopped", file=sys.stderr)

    return AnnouncingServer


def header_deadline(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers have not all come
    within `seconds` of it opening (or of its previous answer): uvicorn itself would wait for ever,
    and a few hundred slow clients would hold every connection."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._deadline.cancel()  # headers in: the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return DeadlineProtocol
