"""The Ray Serve application of `dvt serve`: one deployment whose replicas each hold one engine and one
`StageBatcher` (dvt_serve.batching), answering the Open Inference Protocol (dvt_serve.protocol) and
`POST /v1/predict`.

Imported only by `dvt serve` (it imports Ray and FastAPI); dvt_cli.serve holds the command.
"""

import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from dvt_serve.batching import QueueFull, StageBatcher
from dvt_serve.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)
from dvt_serve.spec import ServeSpec

from .images import decode_posted_image

# Seconds a client refused for a full queue is told to wait (Retry-After).
RETRY_AFTER_S = 1


api = FastAPI(title="dvt serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(ProtocolError)
async def _protocol_error(_, exc: ProtocolError):
    return _error(str(exc), exc.status)


@api.exception_handler(QueueFull)
async def _queue_full(_, exc: QueueFull):
    return _error(str(exc), 503, {"Retry-After": str(RETRY_AFTER_S)})


@api.exception_handler(HTTPException)
async def _http_error(_, exc: HTTPException):
    return _error(str(exc.detail), exc.status_code, getattr(exc, "headers", None))


# The Ray actor counting answered inference requests, refused ones included (`dvt serve --stop-after`), set by
# this process's replica.
_request_counter = None


@api.middleware("http")
async def _count_answers(request: Request, call_next):
    response = await call_next(request)
    if _request_counter is not None and request.method == "POST":
        _request_counter.add.remote()
    return response


def _count_requests_with(counter) -> None:
    # a module function, so that it sets this module's global: Ray ships the deployment class by value, with
    # its own copy of the globals its methods name
    global _request_counter
    _request_counter = counter


class _Metrics:
    """Prometheus metrics beside Ray Serve's own (exported by Ray's metrics agent, `--metrics-export-port`)."""

    def __init__(self, exits: int, stages: int):
        from ray.serve.metrics import Counter, Histogram

        self.images = Counter("dvt_images", "images answered, by the exit they left at", tag_keys=("exit",))
        self.batch = Histogram("dvt_stage_batch_size", "images per stage batch", tag_keys=("stage",),
                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.wait = Histogram("dvt_queue_wait_seconds", "time an image waited in a stage's queue",
                              tag_keys=("stage",), boundaries=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
        self.rejected = Counter("dvt_rejected_images", "images refused for a full queue")

    def observe(self, stage: int, size: int, waits: np.ndarray, exits: np.ndarray) -> None:
        tags = {"stage": str(stage)}
        self.batch.observe(size, tags)
        for wait in waits:
            self.wait.observe(float(wait), tags)
        for exit_index, count in zip(*np.unique(exits, return_counts=True)):
            self.images.inc(int(count), {"exit": str(exit_index)})


@serve.deployment
@serve.ingress(api)
class DVTServer:
    def __init__(self, spec: ServeSpec):
        os.environ.setdefault("GLOG_v", "3")
        from dvt_shared.data_config import default_data_config
        from dvt_shared.exit_policy import exit_policy

        from . import backends

        if spec.backend == "torch":
            import torch

            torch.set_num_threads(spec.threads)
        _count_requests_with(spec.request_counter)
        self.spec, self.config = spec, spec.config
        self.data = spec.data or default_data_config(spec.config)
        # the engine runs the batcher's batches: built for its max_batch (MindSpore's gears go up to it)
        engine = backends.engine(spec.backend, spec.config, spec.tensors, spec.thresholds,
                                 precision=spec.precision, exit_policy=exit_policy(spec.exit_policy),
                                 max_batch=spec.max_batch)
        self.metrics = _Metrics(spec.config.num_exits, spec.config.num_exits)
        self.batcher = StageBatcher(engine, spec.max_batch, spec.max_wait_ms / 1e3, spec.max_queue, spec.batching,
                                    observer=self.metrics.observe)
        # every stage at every gear (MindSpore) before the first request: initialisation and compiles are paid here
        for gear in getattr(engine, "gears", None) or (1,):
            engine.all_exit_logits(np.zeros((gear, *self.data.input_size), np.float32))

    def _check_model(self, name: str, version: str | None = None) -> None:
        if name != self.config.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.config.name!r}", status=404)
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has version 1 only, not {version!r}", status=404)

    async def _body(self, request: Request) -> bytes:
        if self.batcher.full:  # refused before its body is read: overload must cost little
            self.metrics.rejected.inc()
            raise QueueFull(f"the queue holds its limit of {self.batcher.max_queue} images (--max-queue)")
        limit = self.spec.max_body
        body, size = bytearray(), 0
        # an oversized body is read to its end (up to 4x the limit) and dropped, so that the client, still
        # sending, gets the 413 rather than a reset connection
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > 4 * limit:
                break
        if size > limit:
            raise ProtocolError(f"the body is {'over ' if size > 4 * limit else ''}{size} bytes; the limit is "
                                f"{limit} (--max-body)", status=413)
        if not body:
            raise ProtocolError("the body is empty")
        return bytes(body)

    async def _classify(self, images: np.ndarray):
        if len(images) > self.batcher.max_queue:
            raise ProtocolError(f"{len(images)} images in one request exceed the queue limit of "
                                f"{self.batcher.max_queue} images (--max-queue): send fewer per request", status=413)
        try:
            prediction = await self.batcher.submit(images)
        except QueueFull:
            self.metrics.rejected.inc(len(images))
            raise
        return prediction

    @api.get("/v2")
    async def server_metadata(self):
        return {"name": "dvt", "version": "1", "extensions": ["binary_tensor_data", "statistics"]}

    @api.get("/v2/health/live")
    async def live(self):
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self):
        return {"ready": True}

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def metadata(self, name: str, version: str | None = None):
        self._check_model(name, version)
        return model_metadata(self.config, f"dvt_{self.spec.backend}", self.data)

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str | None = None):
        self._check_model(name, version)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/stats")
    async def stats(self, name: str):
        """Triton's statistics extension in outline; `dvt` holds this replica's batcher counts."""
        self._check_model(name)
        stats = self.batcher.stats
        return {"model_stats": [{"name": name, "version": "1", "inference_count": stats.images[0],
                                 "execution_count": sum(stats.batches), "dvt": stats.as_dict()}]}

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request, version: str | None = None):
        self._check_model(name, version)
        body = await self._body(request)
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), self.config, self.data)
        prediction = await self._classify(parsed.images)
        content, headers = encode_infer_response(name, parsed, prediction, self.data)
        return Response(content, headers=headers)

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        image = decode_posted_image(await self._body(request), self.data)
        p = await self._classify(image)
        cls = int(p.classes[0])
        return {"class_index": cls, "label": self.data.label(cls),
                "exit": int(p.exit_index[0]), "confidence": float(p.confidence[0]), "macs": int(p.macs[0])}

    async def __del__(self):
        await self.batcher.close()


def application(spec: ServeSpec, replicas: int, replica_cpus: float):
    """The bound application: `replicas` replicas of `replica_cpus` CPUs each."""
    env = {"OMP_NUM_THREADS": str(spec.threads), "GLOG_v": os.environ.get("GLOG_v", "3")}
    return DVTServer.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "runtime_env": {"env_vars": env}},
        # the batcher bounds the images a replica holds; Serve must hand it enough requests to fill batches
        max_ongoing_requests=spec.max_queue,
        max_queued_requests=spec.max_queue,
        graceful_shutdown_timeout_s=30,
    ).bind(spec)
