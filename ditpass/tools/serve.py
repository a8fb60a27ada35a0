"""`ditpass serve`: an HTTP service that generates with a diffusers pipeline under a plan.

    torchrun --nproc_per_node=2 -m ditpass serve --use_cfg_parallel --port 6000
    curl -s localhost:6000/generate -H 'content-type: application/json' -d '{"prompt": "3"}' -o 3.png

Every rank loads the pipeline (``--model``: ``digits``, the built-in class-conditional DiT, or a
local diffusers folder) and parallelizes it with the plan of the same flags as ``ditpass
generate``; rank 0 also runs the HTTP server (FastAPI on uvicorn; ``pip install 'ditpass[serve]'``).
One process without torchrun works too. Before it listens, the service runs a 1-step generation
(the warm-up: it captures and builds the graph, and tells the model's picture size).

Endpoints:

- ``POST /generate``, a JSON object: ``prompt`` (a string, or a list of at most --max_batch; for a
  class-conditional model its class labels: "0".."9" for digits), ``negative_prompt``, ``height``,
  ``width``, ``num_frames``, ``num_inference_steps`` (default: the model's; required where that is
  over --max_steps), ``guidance_scale`` (0..100), ``seed`` (default 0: ``torch.Generator("cpu")
  .manual_seed(seed)`` as in ``ditpass generate``, so the same pixels) and ``output``: ``png``
  (default: the picture, several side by side) or ``json`` (``images`` as base64 PNG, ``seconds``,
  ``steps``, ``plan``, ...). Headers ``X-Seconds``, ``X-Steps``, ``X-Plan``. A field that the pipeline
  does not take accepts only null and says so (digits: no negative prompt, no frames; height and
  width only its own, 32). Unknown fields, wrong types (no "3" for 3) and values over the limits are
  a 422 that names the field (a body that is not text: 400); a full queue or a stopping service 503.
- ``GET /health``: 200 ``{"status": "ok"}`` while serving, 503 while stopping.
- ``GET /info``: model, pipeline, plan, world size, each rank's host and pid, the labels, the picture
  size, the default steps, the limits, the queue (length, bound), the running request (prompts,
  ``step`` of ``steps``, seconds), and the counts served and failed.
- ``GET /``: a page with a form that sends a request and shows the picture (no external assets).
- ``GET /openapi.json``: the schema, with this model's labels and the operator's limits in it.

Requests wait in a queue of --queue_size and run one at a time, on every rank: rank 0 checks a
request (the schema, then `call_kwargs`, so a bad one is answered before any rank sees it), then
broadcasts it on a gloo group of its own (also under NCCL); every rank generates, and all of them
gather each rank's outcome, so that they decide alike: all ranks succeeded (rank 0 answers 200),
all failed with the same error (422 for a bad value, a ValueError such as a plan that cannot run
this request; else 500: the ranks ran the same collectives, so the service goes on), or the ranks
differ (500, and the service stops on every rank with exit status 1: a rank that failed alone left
the others' collectives out of step, which nothing can realign; torchrun --max-restarts N starts
every rank again). The service writes no files.

Failures and stopping: while idle, rank 0 broadcasts a heartbeat every second; a rank that dies is
noticed at the next message (the other ranks' waits are bounded by --timeout, 60 s if unset; the
data collectives' timeout is ditpass's, which --timeout sets too through DITPASS_TIMEOUT) and
every rank exits with status 1 and a line that says so. SIGTERM (or SIGINT) to rank 0 finishes the
running request, answers the queued ones 503, tells the other ranks to stop, and every rank exits
0 (the others ignore these signals and wait for rank 0's word). Under torchrun, SIGTERM to the
launcher reaches all ranks, which stop so; torchrun itself then exits 1 (a signal is a failure to it).
"""
# No ``from __future__ import annotations``: FastAPI reads the request model from the endpoint's annotation,
# which must be the class itself (it is made at run time, from the pipeline and the limits).

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import html
import inspect
import io
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Annotated, Literal

from .generate import (GenerateError, add_plan_arguments, call_kwargs, check_plan_args, require_positive, run_plan,
                       start, steps_of)

# no torch, fastapi or pydantic at import time: ``ditpass --help`` stays instant

__all__ = ["add_arguments", "run", "Limits", "agree"]

HEARTBEAT_S = 1.0  # rank 0's idle broadcast: how soon the other ranks hear of a stop, and rank 0 of a dead rank
MAX_GUIDANCE = 100.0  # past this a typo, not a choice: the pictures would be noise or NaN
MAX_PROMPT_CHARS = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (rank 0); 0.0.0.0 for every interface")
    p.add_argument("--port", type=int, default=6000)
    p.add_argument("--max_steps", type=int, default=100, help="most num_inference_steps a request may ask")
    p.add_argument("--max_batch", type=int, default=4, help="most prompts in one request")
    p.add_argument("--max_height", type=int, default=2048, help="pixels")
    p.add_argument("--max_width", type=int, default=2048, help="pixels")
    p.add_argument("--max_pixels", type=int, default=2048 * 2048, help="most height x width")
    p.add_argument("--max_frames", type=int, default=129, help="most num_frames (video pipelines)")
    p.add_argument("--queue_size", type=int, default=8, help="requests that may wait behind the running one; "
                                                              "more are answered 503")
    add_plan_arguments(p)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the operator allows one request (flags of the same names)."""

    max_steps: int
    max_batch: int
    max_height: int
    max_width: int
    max_pixels: int
    max_frames: int
    queue_size: int

    @classmethod
    def from_args(cls, args) -> "Limits":
        limits = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        require_positive(limits, [f.name for f in dataclasses.fields(cls)])
        return limits


# ---- what every rank does -----------------------------------------------------------------------


class ServiceDown(Exception):
    """The ranks cannot go on together (one is gone, hangs, or failed alone); the message says which."""


def agree(statuses: list) -> str:
    """Every rank's outcome of one request (None: it succeeded; else ``(kind, message)``) -> what all decide:
    ``"ok"``, ``"error"`` (all failed alike: they ran the same collectives, the service goes on) or ``"split"``."""
    if all(s is None for s in statuses):
        return "ok"
    if all(s == statuses[0] for s in statuses):
        return "error"
    return "split"


class Worker:
    """This rank's pipeline, and the messages between rank 0 and the others on the control group (None in one
    process). ``progress`` is (steps done, steps) of the running generation."""

    def __init__(self, pipe, model: str, plan, rank: int, world: int, control, timeout: float):
        self.pipe, self.model, self.plan = pipe, model, plan
        self.rank, self.world, self.control, self.timeout = rank, world, control, timeout
        self.progress = (0, 0)

    def send(self, message: tuple) -> tuple:
        """Rank 0's message to every rank (what the others receive); a dead or stuck rank is a `ServiceDown`."""
        if self.control is None:
            return message
        import torch.distributed as dist

        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except Exception as e:  # noqa: BLE001 - gloo says "connection closed", "timed out", ...: any means the same
            raise ServiceDown(self._lost("rank 0's message did not reach every rank" if self.rank == 0 else
                                         f"no message from rank 0 (a wait is at most {self.timeout:g} s)", e)) from None
        return box[0]

    def receive(self) -> tuple:
        """The other ranks: rank 0's next message."""
        return self.send(None)

    def gather(self, status) -> list:
        if self.control is None:
            return [status]
        import torch.distributed as dist

        out = [None] * self.world
        try:
            dist.all_gather_object(out, status, group=self.control)
        except Exception as e:  # noqa: BLE001
            raise ServiceDown(self._lost("the ranks did not all report the request's outcome", e)) from None
        return out

    def _lost(self, what: str, e: Exception) -> str:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{what} (a rank died or hangs: {first[:300]})"

    def kwargs(self, request: dict) -> dict:
        """``pipe(...)``'s arguments for a checked request; a `GenerateError` for what the pipeline lacks."""
        return call_kwargs(self.pipe, self.model, request["prompts"], negative_prompt=request.get("negative_prompt"),
                           height=request.get("height"), width=request.get("width"),
                           num_frames=request.get("num_frames"), num_inference_steps=request.get("num_inference_steps"),
                           guidance_scale=request.get("guidance_scale"), seed=request.get("seed", 0))

    @contextlib.contextmanager
    def _counting_steps(self):
        """``progress`` counts the scheduler's steps: an instance attribute over ``scheduler.step`` for this call
        (ditpass's pipeline hook wraps it again inside the call, and removes the attribute after)."""
        scheduler = self.pipe.scheduler
        step = scheduler.step

        def counted(*a, **k):
            out = step(*a, **k)
            self.progress = (self.progress[0] + 1, self.progress[1])
            return out

        scheduler.step = counted
        try:
            yield
        finally:
            if vars(scheduler).get("step") is counted:
                del scheduler.step

    def steps(self, request: dict) -> int:
        return steps_of(self.pipe, self.kwargs(request))

    def handle(self, request: dict):
        """Generate one request with the other ranks and agree on the outcome: ``(verdict, statuses, reply)``
        (`agree`; reply: rank 0's pictures, seconds and steps where all succeeded, else None)."""
        import torch

        result, status, t0 = None, None, time.perf_counter()
        steps = 0
        try:
            kw = self.kwargs(request)
            steps = steps_of(self.pipe, kw)
            self.progress = (0, steps)
            with torch.no_grad(), self._counting_steps():
                result = self.pipe(**kw)
        except Exception as e:  # noqa: BLE001 - every failure is reported to all ranks, which decide together
            user = isinstance(e, (ValueError, *_user_errors()))
            status = ("user" if user else "error", f"{type(e).__name__}: {e}".strip())
        seconds = time.perf_counter() - t0
        statuses = self.gather(status)
        verdict = agree(statuses)
        reply = None
        if verdict == "ok" and self.rank == 0:
            reply = dict(pictures=_pictures(result), seconds=seconds, steps=steps)
        return verdict, statuses, reply


def split_message(statuses: list) -> str:
    failed = "; ".join(f"rank {r}: {s[1]}" for r, s in enumerate(statuses) if s is not None)
    fine = [str(r) for r, s in enumerate(statuses) if s is None]
    return (f"the ranks differ on a request ({failed}{'; ranks ' + ', '.join(fine) + ' succeeded' if fine else ''}): "
            "their collectives may be out of step, so the service stops")


def _user_errors() -> tuple:
    from ditpass.capture import CaptureError
    from ditpass.pass_base import PassError

    return GenerateError, CaptureError, PassError


def _pictures(result) -> list:
    """A pipeline output's pictures as PIL images (a video: its frames)."""
    from PIL import Image
    import numpy as np

    images = getattr(result, "images", None)
    if images is None:
        images = [frame for video in getattr(result, "frames", None) or [] for frame in video]
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            a = np.asarray(im)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(a.squeeze())
        out.append(im)
    return out


def _png(images) -> bytes:
    """One PNG: the pictures side by side, at their own pixels."""
    from PIL import Image

    if len(images) == 1:
        strip = images[0]
    else:
        strip = Image.new(images[0].mode, (sum(im.width for im in images), max(im.height for im in images)))
        x = 0
        for im in images:
            strip.paste(im.convert(images[0].mode), (x, 0))
            x += im.width
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


# ---- the request ------------------------------------------------------------------------------


def labels_of(pipe) -> list | None:
    """A class-conditional pipeline's labels (its prompts), else None; the same test as `call_kwargs`."""
    if hasattr(pipe, "get_label_ids") and "class_labels" in inspect.signature(pipe.__call__).parameters:
        return sorted(getattr(pipe, "labels", {}) or {})
    return None


def taken(pipe) -> set:
    """The optional request fields that this pipeline takes (the others accept only null)."""
    params = inspect.signature(pipe.__call__).parameters
    fields = {f for f in ("height", "width", "num_frames", "guidance_scale") if f in params}
    if "negative_prompt" in params and not labels_of(pipe):
        fields.add("negative_prompt")
    return fields


def request_model(pipe, limits: Limits, size: tuple[int, int], default_steps: int):
    """The pydantic model of a ``POST /generate`` body for this pipeline and these limits: unknown fields and
    loose types refused; a field the pipeline does not take accepts only null (height/width: also the model's
    own size), with a message that says so. ``default_steps``: the model's own steps (`steps_of`)."""
    from pydantic import BeforeValidator, ConfigDict, Field, create_model, model_validator

    name = type(pipe).__name__
    labels = labels_of(pipe)
    takes = taken(pipe)

    def only(allowed, message):
        def check(v):
            if v is not None and v != allowed:
                raise ValueError(message)
            return v
        return BeforeValidator(check)

    def refused(field, why=""):
        message = f"{name} takes no {field}{why}"
        return Annotated[None, only(None, message), Field(description=message)], None

    if labels:
        Prompt = Literal[tuple(labels)]
        about = f"a class label of the model ({', '.join(labels[:20])}{', ...' if len(labels) > 20 else ''})"
    else:
        Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")]
        about = "the text"
    fields = dict(prompt=(Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=limits.max_batch)],
                          Field(description=f"{about}, or a list of at most {limits.max_batch}")))
    if "negative_prompt" in takes:
        fields["negative_prompt"] = (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None, None)
    else:
        fields["negative_prompt"] = refused("negative_prompt", " (a class-conditional model)" if labels else "")
    for field, limit in (("height", limits.max_height), ("width", limits.max_width)):
        if field in takes:
            fields[field] = (int | None, Field(None, ge=1, le=limit, description="pixels"))
        else:
            own = size[1] if field == "height" else size[0]
            message = f"the model has a fixed size: {size[0]}x{size[1]} pixels ({name} takes no {field})"
            fields[field] = (Annotated[Literal[own] | None, only(own, message)], Field(None, description=message))
    if "num_frames" in takes:
        fields["num_frames"] = (int | None, Field(None, ge=1, le=limits.max_frames))
    else:
        fields["num_frames"] = refused("num_frames")
    if default_steps <= limits.max_steps:
        fields["num_inference_steps"] = (int | None, Field(None, ge=1, le=limits.max_steps,
                                                           description=f"default: the model's own, {default_steps}"))
    else:  # the model's default would pass the operator's limit: a request must say
        fields["num_inference_steps"] = (int, Field(ge=1, le=limits.max_steps, description=(
            f"required: the model's default, {default_steps}, is over the limit of {limits.max_steps}")))
    if "guidance_scale" in takes:
        fields["guidance_scale"] = (float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                                        description="default: the model's own"))
    else:
        fields["guidance_scale"] = refused("guidance_scale")
    fields["seed"] = (int, Field(0, ge=0, le=2**63 - 1, description='torch.Generator("cpu").manual_seed(seed)'))
    fields["output"] = (Literal["png", "json"], Field("png", description="png: the picture(s) side by side; "
                                                                          "json: base64 PNGs with seconds and plan"))

    def area(self):
        h = self.height or size[1]
        w = self.width or size[0]
        if h * w > limits.max_pixels:
            raise ValueError(f"height x width = {h} x {w} = {h * w} pixels is over the limit of {limits.max_pixels}")
        return self

    return create_model("GenerateRequest", __config__=ConfigDict(extra="forbid", strict=True),
                        __validators__={"area": model_validator(mode="after")(area)}, **fields)


# ---- rank 0: the HTTP service -------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    request: dict
    future: concurrent.futures.Future
    started: float = 0.0


class Service:
    """Rank 0's side: the queue between the HTTP thread and the main thread, which drives every rank."""

    def __init__(self, worker: Worker, limits: Limits, ranks: list, size: tuple[int, int], default_steps: int):
        self.worker, self.limits, self.ranks, self.size = worker, limits, ranks, size
        self.default_steps = default_steps
        self.queue: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.stopping = threading.Event()
        self.running: Job | None = None
        self.served = self.failed = 0

    def submit(self, request: dict) -> concurrent.futures.Future:
        if self.stopping.is_set():
            raise Unavailable("the service is stopping")
        job = Job(request, concurrent.futures.Future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Unavailable(f"the queue is full ({self.limits.queue_size} requests wait); try again later") from None
        return job.future

    def info(self) -> dict:
        w = self.worker
        running = None
        if self.running is not None:
            done, steps = w.progress
            running = dict(prompts=self.running.request["prompts"], step=done, steps=steps,
                           seconds=round(time.perf_counter() - self.running.started, 3))
        return dict(model=w.model, pipeline=type(w.pipe).__name__, plan=str(w.plan), plan_fields=w.plan.to_dict(),
                    world_size=w.world, ranks=self.ranks, labels=labels_of(w.pipe),
                    size=dict(width=self.size[0], height=self.size[1]), default_steps=self.default_steps,
                    limits=dataclasses.asdict(self.limits),
                    queue=dict(length=self.queue.qsize(), size=self.limits.queue_size), running=running,
                    served=self.served, failed=self.failed, stopping=self.stopping.is_set())

    def loop(self) -> None:
        """Serve queued jobs until `stopping`; a `ServiceDown` is raised after answering its job."""
        while not self.stopping.is_set():
            try:
                job = self.queue.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                self.worker.send(("heartbeat",))
                continue
            job.started = time.perf_counter()
            self.worker.progress = (0, self.worker.steps(job.request))
            self.running = job
            try:
                self.worker.send(("generate", job.request))
                verdict, statuses, reply = self.worker.handle(job.request)
            except ServiceDown as e:
                self.failed += 1
                job.future.set_result((500, f"the service stops: {e}"))
                raise
            finally:
                self.running = None
            if verdict == "ok":
                self.served += 1
                _log(f"200 {job.request['prompts']} {reply['steps']} steps {reply['seconds']:.2f} s")
                job.future.set_result((200, reply))
                continue
            self.failed += 1
            failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
            if verdict == "error":
                code = 422 if failed[0][1][0] == "user" else 500
                _log(f"{code} {job.request['prompts']}: {failed[0][1][1]}")
                job.future.set_result((code, failed[0][1][1]))
                continue
            message = split_message(statuses)
            job.future.set_result((500, message))
            raise ServiceDown(message)

    def refuse_waiting(self, message: str) -> None:
        while True:
            try:
                self.queue.get_nowait().future.set_result((503, message))
            except queue.Empty:
                return


class Unavailable(Exception):
    """A 503: the queue is full or the service stops."""


def make_app(service: Service, Request):
    from fastapi import FastAPI
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel

    class Result(BaseModel):
        images: list[str]
        width: int
        height: int
        seconds: float
        steps: int
        seed: int
        prompts: list[str]
        plan: str
        world_size: int

    class Problem(BaseModel):
        detail: str

    class Health(BaseModel):
        status: Literal["ok", "stopping"]

    takes = taken(service.worker.pipe)
    headers = {h: {"schema": {"type": "string"}, "description": d} for h, d in (
        ("X-Seconds", "seconds the generation took"), ("X-Steps", "denoising steps"), ("X-Plan", "the plan"))}
    app = FastAPI(title="ditpass serve", version="1", docs_url=None, redoc_url=None,
                  description=f"{service.worker.model} ({type(service.worker.pipe).__name__}) under "
                              f"{service.worker.plan} on {service.worker.world} process(es)")

    @app.exception_handler(RequestValidationError)
    async def refused(_, e: RequestValidationError):  # FastAPI's own, but an input of 1e309 or NaN is said as text
        return JSONResponse({"detail": _finite(jsonable_encoder(e.errors()))}, status_code=422)

    def bad_value(message: str):  # a 422 as FastAPI words its own, for what the schema cannot say
        return RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": message, "input": None}])

    @app.post("/generate", response_model=Result,
              responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                               "headers": headers, "description": "the picture(s) (png), or JSON (json)"},
                         400: {"model": Problem, "description": "the body is not text (FastAPI's own answer)"},
                         500: {"model": Problem, "description": "the generation failed"},
                         503: {"model": Problem, "description": "the queue is full, or the service stops"}})
    async def generate(body: Request):
        request = body.model_dump()
        request["prompts"] = [request.pop("prompt")] if isinstance(body.prompt, str) else list(body.prompt)
        for field in {"height", "width"} - takes:
            request[field] = None  # the model's own size (the schema allows no other)
        try:
            service.worker.kwargs(request)  # what the pipeline lacks is said before any rank sees the request
            future = service.submit(request)
        except GenerateError as e:
            raise bad_value(str(e)) from None
        except Unavailable as e:
            return JSONResponse({"detail": str(e)}, status_code=503)
        code, reply = await asyncio.wrap_future(future)
        if code == 422:
            raise bad_value(reply)
        if code != 200:
            return JSONResponse({"detail": reply}, status_code=code)
        pictures = reply["pictures"]
        h = {"X-Seconds": f"{reply['seconds']:.3f}", "X-Steps": str(reply["steps"]), "X-Plan": str(service.worker.plan)}
        if body.output == "png":
            return Response(_png(pictures), media_type="image/png", headers=h)
        images = [base64.b64encode(_png([im])).decode() for im in pictures]
        result = Result(images=images, width=pictures[0].width, height=pictures[0].height,
                        seconds=round(reply["seconds"], 4), steps=reply["steps"], seed=body.seed,
                        prompts=request["prompts"], plan=str(service.worker.plan), world_size=service.worker.world)
        return JSONResponse(result.model_dump(), headers=h)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        if service.stopping.is_set():
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        return service.info()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return _page(service.info(), takes)

    return app


def _finite(x):
    """``x`` with every infinite or NaN float as its text (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _page(info: dict, takes: set) -> str:
    """The form (the prompt, steps and seed, and the other fields this model takes), a button, the picture."""
    if info["labels"]:
        options = "".join(f"<option>{html.escape(v)}</option>" for v in info["labels"])
        prompt = f'<select name="prompt">{options}</select>'
    else:
        prompt = '<input name="prompt" size="60" required>'
    inputs = [f"<label>prompt {prompt}</label>"]
    max_steps = info["limits"]["max_steps"]
    steps = min(info["default_steps"], max_steps)
    for field, attrs in (("num_inference_steps", f'min="1" max="{max_steps}" step="1" value="{steps}"'),
                         ("guidance_scale", f'min="0" max="{MAX_GUIDANCE:g}" step="any"'),
                         ("seed", 'min="0" step="1" value="0"'), ("negative_prompt", None),
                         ("height", 'min="1" step="1"'), ("width", 'min="1" step="1"')):
        if field not in takes | {"num_inference_steps", "seed"}:
            continue
        kind = 'type="text"' if field == "negative_prompt" else f'type="number" {attrs}'
        inputs.append(f'<label>{field} <input name="{field}" {kind} placeholder="the model\'s"></label>')
    title = html.escape(f"ditpass serve: {info['model']} ({info['pipeline']}), {info['plan']} "
                        f"on {info['world_size']} process(es)")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} label{{display:block;margin:.4em 0}}
#out img{{width:256px;image-rendering:pixelated;border:1px solid #ccc;margin-right:.5em}}</style></head>
<body><h1>{title}</h1>
<form id="form">{''.join(inputs)}<button type="submit">generate</button></form>
<p id="status"></p><div id="out"></div>
<script>
const form = document.getElementById("form"), status = document.getElementById("status");
form.onsubmit = async (event) => {{
  event.preventDefault();
  const body = {{output: "json"}};
  for (const el of form.elements) {{
    if (!el.name || el.value === "") continue;
    body[el.name] = el.type === "number" ? Number(el.value) : el.value;
  }}
  status.textContent = "waiting";
  const poll = setInterval(async () => {{
    const info = await (await fetch("info")).json();
    if (info.running) status.textContent = `step ${{info.running.step}} of ${{info.running.steps}}`;
  }}, 300);
  try {{
    const r = await fetch("generate", {{method: "POST", headers: {{"content-type": "application/json"}},
                                       body: JSON.stringify(body)}});
    const j = await r.json().catch(() => ({{detail: r.statusText}}));
    if (!r.ok) {{
      const d = typeof j.detail === "string" ? j.detail
              : j.detail.map(e => `${{e.loc.slice(1).join(".")}}: ${{e.msg}}`).join("; ");
      status.textContent = `${{r.status}}: ${{d}}`;
      return;
    }}
    const out = document.getElementById("out");
    out.replaceChildren(...j.images.map(b64 => Object.assign(new Image(), {{src: "data:image/png;base64," + b64,
                                                                          alt: j.prompts.join(" ")}})));
    status.textContent = `${{j.prompts.join(", ")}}: ${{j.steps}} steps in ${{j.seconds}} s, ` +
                         `${{j.plan}} on ${{j.world_size}} process(es)`;
  }} finally {{ clearInterval(poll); }}
}};
</script></body></html>
"""


def _log(text: str, rank: int = 0) -> None:
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"ditpass serve{where}: {text}", file=sys.stderr, flush=True)


# ---- the command --------------------------------------------------------------------------------


def run(args) -> int:
    limits = Limits.from_args(args)
    check_plan_args(args)
    if not 0 <= args.port < 65536:
        raise GenerateError(f"--port {args.port}: must be 0..65535")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise GenerateError(f"ditpass serve needs fastapi and uvicorn ({e}): pip install 'ditpass[serve]'") from None
    import torch.distributed as dist

    plan = run_plan(args)
    listener = _listen(args.host, args.port) if int(os.environ.get("RANK", "0")) == 0 else None  # before any load
    rank, world, _, pipe, _ = start(args, plan)
    pipe.set_progress_bar_config(disable=True)
    timeout = max(args.timeout or 60.0, 5 * HEARTBEAT_S)  # the other ranks wait this long for a heartbeat
    control = None
    if world > 1:  # after the model load (ranks load at their own pace), before any control message
        from datetime import timedelta

        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    worker = Worker(pipe, args.model, plan, rank, world, control, timeout)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        ranks = worker.gather(dict(rank=rank, host=socket.gethostname(), pid=os.getpid()))
        size = _warm_up(worker)
        if rank != 0:
            return _follow(worker)
        return _serve(worker, limits, ranks, size, listener, args, uvicorn)
    except ServiceDown as e:
        _log(f"{e}; exiting", rank)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _listen(host: str, port: int) -> socket.socket:
    """Rank 0's socket, bound before the model loads (a port in use is said at once); uvicorn listens on it
    once the warm-up is done (until then a client is refused, not kept waiting)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise GenerateError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    return sock


_SERVICE: list = []  # rank 0's Service, for the signal handler


def _on_signal(signum, frame) -> None:
    if _SERVICE:
        if not _SERVICE[0].stopping.is_set():
            _log(f"{signal.Signals(signum).name}: finishing the running request, then stopping")
        _SERVICE[0].stopping.set()
    elif int(os.environ.get("RANK", "0")) != 0:
        _log(f"{signal.Signals(signum).name}: waiting for rank 0 to stop the service", int(os.environ["RANK"]))
    else:  # rank 0 before it serves (loading, warming up): stop now
        raise KeyboardInterrupt


def _warm_up(worker: Worker) -> tuple[int, int]:
    """One 1-step generation on every rank, as a request: the graph is captured and built before the first
    client waits, and the picture's size is known. Returns (width, height)."""
    request = dict(prompts=[_a_prompt(worker.pipe)], num_inference_steps=1, seed=0)
    t0 = time.perf_counter()
    verdict, statuses, reply = worker.handle(request)
    if verdict != "ok":
        said = "; ".join(f"rank {r}: {s[1]}" for r, s in enumerate(statuses) if s is not None)
        if verdict == "error":
            raise GenerateError(f"the warm-up generation failed on every rank: {said}")
        raise ServiceDown(f"the warm-up generation failed: {said}")
    size = (0, 0)
    if worker.rank == 0:
        size = reply["pictures"][0].size
        _log(f"warm-up (capture, build, 1 step) {time.perf_counter() - t0:.2f} s; pictures are {size[0]}x{size[1]}")
    return tuple(worker.send(("size", size))[1])


def _a_prompt(pipe) -> str:
    labels = labels_of(pipe)
    return labels[0] if labels else "a picture"


def _follow(worker: Worker) -> int:
    """Ranks other than 0: take part in every request until rank 0 says stop."""
    while True:
        message = worker.receive()
        if message[0] == "stop":
            return 0
        if message[0] == "generate":
            verdict, statuses, _ = worker.handle(message[1])
            if verdict == "split":
                raise ServiceDown(split_message(statuses))


def _serve(worker: Worker, limits: Limits, ranks: list, size, listener, args, uvicorn) -> int:
    service = Service(worker, limits, ranks, tuple(size), worker.steps(dict(prompts=[_a_prompt(worker.pipe)])))
    app = make_app(service, request_model(worker.pipe, limits, service.size, service.default_steps))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs=dict(sockets=[listener]), name="http", daemon=True)
    _SERVICE.append(service)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    code = 0
    try:
        if not http.is_alive():
            raise ServiceDown("the HTTP server did not start (see above)")
        host, port = listener.getsockname()[:2]
        _log(f"listening on http://{host}:{port} ({args.model}, {worker.plan} on {worker.world} process(es)); "
             f"pids {[r['pid'] for r in ranks]}")
        service.loop()
    except ServiceDown as e:
        _log(f"{e}; exiting")
        code = 1
    service.stopping.set()
    service.refuse_waiting("the service is stopping")
    if code == 0:
        try:
            worker.send(("stop",))
        except ServiceDown as e:
            _log(f"{e}; exiting")
            code = 1
    server.should_exit = True
    http.join(timeout=10)
    _log(f"stopped after {service.served} request(s) served, {service.failed} failed")
    return code
