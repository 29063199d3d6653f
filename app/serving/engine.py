"""The serving engine: students run on onnxruntime, loaded once, their requests micro-batched.

Each loaded model holds one ``onnxruntime.InferenceSession`` (one intra-op thread: on a shared
CPU, parallelism comes from answering several models and batches at once, not from splitting
one small matrix product) and one batcher thread. Requests are queued to it; it gathers what
is queued, up to ``serve_max_batch`` samples, into one run. While other requests to the model
are in flight (being answered, not yet in this batch), the batcher waits up to
``serve_max_wait_ms`` for them to join it; a lone request runs at once, so micro-batching adds
no latency to it. Each model has its own thread: a request never waits behind another model's
batch.

Loaded models are kept in a least-recently-used set bounded by memory (a session's memory is
estimated as its file's size times ``MEMORY_FACTOR``) and by count (``MAX_MODELS``); each is
warmed up on load, so its first request does not pay for onnxruntime's first run.

Request latency, batch sizes and loads are recorded in ``app.metrics`` (``GET /metrics``).
"""

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import onnxruntime as ort

from app import metrics
from app.config import get_settings
from app.ml.signature import ModelSignature, TextPreprocessing
from app.ml.text import INPUT_IDS

log = logging.getLogger(__name__)

# A session's resident memory next to its file: weights, arena and per-run buffers (measured on
# the digits students: about 2-3x their file).
MEMORY_FACTOR = 3
MAX_MODELS = 64
INTRA_OP_THREADS = 1

Tensors = dict[str, np.ndarray]


class ModelEvicted(Exception):
    """The model was evicted between being looked up and being given a request: look it up
    again."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from class scores along the last axis (float32)."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


@dataclass
class _Request:
    inputs: Tensors
    size: int
    future: "Future[np.ndarray]"


_STOP = object()


@dataclass
class LoadedModel:
    """One student in memory: its onnxruntime session and the thread that batches its requests.
    ``runs`` counts the session runs, ``requests`` the requests answered."""

    key: tuple[str, str]
    path: Path
    signature: ModelSignature
    session: ort.InferenceSession
    estimated_bytes: int
    max_batch: int
    max_wait_s: float
    runs: int = 0
    requests: int = 0
    active: int = 0
    _queue: "queue.SimpleQueue[_Request | object]" = field(default_factory=queue.SimpleQueue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._output_name = self.session.get_outputs()[0].name
        self._thread = threading.Thread(
            target=self._serve, name=f"serve-{self.key[0]}-{self.key[1]}", daemon=True
        )
        self._thread.start()

    def submit(self, inputs: Tensors) -> "Future[np.ndarray]":
        """Queue a batch (arrays keyed by input name, all of one batch size); its future gets
        the class scores ``[batch, classes]``. Raises ``ModelEvicted`` once closed."""
        request = _Request(inputs, len(next(iter(inputs.values()))), Future())
        with self._lock:
            if self._closed:
                raise ModelEvicted(self.key)
            self._queue.put(request)
        return request.future

    async def infer(self, inputs: Tensors) -> np.ndarray:
        """``submit``, awaited without blocking the event loop; counted in ``active`` until
        the caller has its answer."""
        with self._lock:
            self.active += 1
        try:
            return await asyncio.wrap_future(self.submit(inputs))
        finally:
            with self._lock:
                self.active -= 1

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One session run, on the caller's thread (no batching)."""
        outputs = self.session.run([self._output_name], dict(inputs))
        result: np.ndarray = outputs[0]
        return result

    def close(self) -> None:
        """Stop taking requests; those already queued are still answered."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` and what follows it in the queue, up to ``max_batch`` samples; waits up
        to ``max_wait_s`` for more while other requests are in flight. Also says whether STOP
        was met."""
        batch, samples = [first], first.size
        deadline = None
        while samples < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self.active <= len(batch) or self.max_wait_s <= 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.max_wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Request)
            batch.append(item)
            samples += item.size
        return batch, False

    @property
    def pad_token_id(self) -> int | None:
        """The padding token of a text model (None: the model takes arrays)."""
        preprocessing = self.signature.preprocessing
        return preprocessing.pad_token_id if isinstance(preprocessing, TextPreprocessing) else None

    def _padded(self, arrays: list[np.ndarray], name: str) -> list[np.ndarray]:
        """Text inputs ``[batch, tokens]`` right-padded to the longest of ``arrays`` (ids with
        the padding token, masks and segments with 0); anything else as it is."""
        if self.pad_token_id is None:
            return arrays
        width = max(a.shape[1] for a in arrays)
        value = self.pad_token_id if name == INPUT_IDS else 0
        return [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value) for a in arrays]

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, _Request)
            batch, stopping = self._gather(item)
            # Requests of different per-sample shapes (symbolic dimensions) run separately, but
            # text of any length runs together, padded (a text model gives each record the same
            # scores whatever padding follows it).
            groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[_Request]] = {}
            for request in batch:
                shape_key = (
                    ()
                    if self.pad_token_id is not None
                    else tuple((k, v.shape[1:]) for k, v in sorted(request.inputs.items()))
                )
                groups.setdefault(shape_key, []).append(request)
            for requests in groups.values():
                self._run_group(requests)

    def _run_group(self, requests: list[_Request]) -> None:
        try:
            if len(requests) == 1:
                inputs = requests[0].inputs
            else:
                inputs = {
                    name: np.concatenate(self._padded([r.inputs[name] for r in requests], name))
                    for name in requests[0].inputs
                }
            logits = self.run(inputs)
        except Exception as e:
            for request in requests:
                request.future.set_exception(e)
            return
        finally:
            self.runs += 1
            self.requests += len(requests)
            metrics.observe_batch(sum(r.size for r in requests))
        start = 0
        for request in requests:
            request.future.set_result(logits[start : start + request.size])
            start += request.size


def estimate_bytes(path: Path) -> int:
    """The memory a session of the ONNX file at ``path`` is taken to hold."""
    return path.stat().st_size * MEMORY_FACTOR


def _example_inputs(session: ort.InferenceSession, batch: int) -> Tensors:
    """Zeros for every input, symbolic dimensions taken as 1 (the warm-up batch)."""
    types: dict[str, Any] = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
    }
    inputs = {}
    for node in session.get_inputs():
        dims = [d if isinstance(d, int) else 1 for d in node.shape]
        if dims and not isinstance(node.shape[0], int):
            dims[0] = batch
        inputs[node.name] = np.zeros(dims, dtype=types.get(node.type, np.float32))
    return inputs


class ServingEngine:
    """Loaded models keyed by (job id, version), least recently used first out."""

    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_bytes: int,
        max_models: int = MAX_MODELS,
        intra_op_threads: int = INTRA_OP_THREADS,
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.max_bytes = max_bytes
        self.max_models = max_models
        self.intra_op_threads = intra_op_threads
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self.loads = 0
        self.evictions = 0

    @property
    def runs(self) -> int:
        """Session runs of the models loaded now (the micro-batches)."""
        with self._lock:
            return sum(m.runs for m in self._models.values())

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(m.estimated_bytes for m in self._models.values())

    def loaded(self) -> list[tuple[str, str]]:
        """The keys loaded now, least recently used first."""
        with self._lock:
            return list(self._models)

    def cached(self, key: tuple[str, str]) -> LoadedModel | None:
        """The model if loaded (marking it used), without loading it: cheap on the event loop."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def get(self, key: tuple[str, str], path: Path, signature: ModelSignature) -> LoadedModel:
        """The model for ``key``, loading (and warming up) the ONNX file at ``path`` once;
        blocks while it loads: call it off the event loop when ``cached`` had nothing."""
        model = self.cached(key)
        if model is not None:
            return model
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            model = self.cached(key)
            if model is not None:
                return model
            model = self._load(key, path, signature)
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
                self.loads += 1
                evicted = self._evict_locked()
        metrics.model_loaded(model.estimated_bytes)
        for old in evicted:
            old.close()
            metrics.model_unloaded(old.estimated_bytes, evicted=True)
        return model

    async def aget(
        self, key: tuple[str, str], path: Path, signature: ModelSignature
    ) -> LoadedModel:
        """``get`` from the event loop: a load runs on a worker thread."""
        model = self.cached(key)
        if model is not None:
            return model
        return await anyio.to_thread.run_sync(self.get, key, path, signature)

    async def infer(
        self, key: tuple[str, str], path: Path, signature: ModelSignature, inputs: Tensors
    ) -> np.ndarray:
        """Class scores for ``inputs``, micro-batched with other requests to the same model."""
        start = time.perf_counter()
        try:
            return await self._infer(key, path, signature, inputs)
        finally:
            metrics.observe_predict(key, time.perf_counter() - start)

    async def _infer(
        self, key: tuple[str, str], path: Path, signature: ModelSignature, inputs: Tensors
    ) -> np.ndarray:
        for _ in range(3):
            model = await self.aget(key, path, signature)
            try:
                return await model.infer(inputs)
            except ModelEvicted:
                continue
        model = await self.aget(key, path, signature)
        return await model.infer(inputs)

    def evict(self, key: tuple[str, str]) -> bool:
        with self._lock:
            model = self._models.pop(key, None)
        if model is not None:
            model.close()
            metrics.model_unloaded(model.estimated_bytes, evicted=False)
        return model is not None

    def close(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        for model in models:
            model.close()
            metrics.model_unloaded(model.estimated_bytes, evicted=False)

    def _evict_locked(self) -> list[LoadedModel]:
        """Drop least recently used models while over the bounds; the newest always stays."""
        evicted = []
        total = sum(m.estimated_bytes for m in self._models.values())
        while len(self._models) > 1 and (
            total > self.max_bytes or len(self._models) > self.max_models
        ):
            _, model = self._models.popitem(last=False)
            total -= model.estimated_bytes
            evicted.append(model)
            self.evictions += 1
            log.info("serving.model_evicted", extra={"model": model.key})
        return evicted

    def _load(self, key: tuple[str, str], path: Path, signature: ModelSignature) -> LoadedModel:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        output = session.get_outputs()[0].name
        for batch in sorted({1, min(self.max_batch, 64)}):
            session.run([output], _example_inputs(session, batch))
        return LoadedModel(
            key=key,
            path=path,
            signature=signature,
            session=session,
            estimated_bytes=estimate_bytes(path),
            max_batch=self.max_batch,
            max_wait_s=self.max_wait_s,
        )


@lru_cache
def get_serving_engine() -> ServingEngine:
    """The process's engine, from the ``serve_*`` settings."""
    settings = get_settings()
    return ServingEngine(
        max_batch=settings.serve_max_batch,
        max_wait_ms=settings.serve_max_wait_ms,
        max_bytes=settings.serve_models_max_bytes,
    )
