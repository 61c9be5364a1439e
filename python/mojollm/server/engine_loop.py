"""One thread owns the engine; HTTP handlers talk to it through commands and OutputStreams.

    loop = EngineLoop(lambda: LLM(...), metrics)
    loop.start()                       # loads the model on the loop thread, then steps
    stream = loop.open([(ids, params)])
    try:
        async for outputs in stream:   # RequestOutputs of the requests that advanced
            ...
    finally:
        loop.close(stream)

Handlers never touch the engine: `open` and `close` queue commands that the loop thread applies
between steps, so every request of every connection shares one step (continuous batching) and a
step never waits on the event loop. After each step the loop hands all its outputs to the event
loop in one call (`call_soon_threadsafe`). An OutputStream keeps only the newest output of each
of its requests (outputs are cumulative), so a slow client skips intermediate states instead of
queueing them. Closing a stream early (client gone, task cancelled) aborts the requests that have
not finished: their KV blocks are free at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import traceback
from typing import AsyncIterator, Callable

log = logging.getLogger("mojollm.server")

_HANDOFF_TIMEOUT_S = 0.05  # longest the engine waits for the event loop after a step


class QueueFull(Exception):
    """More requests than the server accepts at once; the caller should retry later (429)."""


class EngineNotReady(Exception):
    """The model is still loading, failed to load, or the server is shutting down (503)."""


class OutputStream:
    """The outputs of one HTTP request's engine requests, as the event loop sees them."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = list(request_ids)
        self.unfinished = set(request_ids)
        self.error: str | None = None   # set when the loop dropped the requests (shutdown, engine bug)
        self.closed = False
        self._latest: dict[str, object] = {}
        self._changed = asyncio.Event()

    def _deliver(self, out) -> None:
        self._latest[out.request_id] = out
        self._changed.set()

    def _fail(self, message: str) -> None:
        self.error = message
        self._changed.set()

    def __aiter__(self) -> AsyncIterator[list]:
        return self._updates()

    async def _updates(self) -> AsyncIterator[list]:
        while self.unfinished and self.error is None:
            await self._changed.wait()
            self._changed.clear()
            batch = [self._latest.pop(rid) for rid in self.request_ids if rid in self._latest]
            for out in batch:
                if out.finished:
                    self.unfinished.discard(out.request_id)
            if batch:
                yield batch


class EngineLoop:
    def __init__(self, load: Callable[[], object], metrics=None, max_waiting: int | None = None,
                 on_fatal: Callable[[str], None] | None = None):
        """`load()` builds the LLM (on the loop thread); `metrics` a ServerMetrics or None;
        `max_waiting`: requests accepted beyond the engine's max_num_seqs before `open` raises
        QueueFull (None: no limit); `on_fatal(message)` runs on the loop thread if loading fails."""
        self._load = load
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._on_fatal = on_fatal
        self.llm = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._handed = threading.Event()  # the event loop has taken the last step's outputs
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[OutputStream, list]] = {}  # loop thread only
        self._ids = itertools.count()
        self.num_in_flight = 0  # engine requests opened and not yet closed (event loop only)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._aloop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mojollm-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort whatever is still running and end the loop thread (a model still loading is left
        to finish on its daemon thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._ready.is_set():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- event-loop side
    @property
    def capacity(self) -> int | None:
        if self.max_waiting is None or self.llm is None:
            return None
        return self.llm.engine.scheduler.max_num_seqs + self.max_waiting

    def open(self, requests: list[tuple[list[int], object]]) -> OutputStream:
        """Queue (prompt token ids, SamplingParams) pairs, checked beforehand, as engine requests;
        returns their OutputStream. Raises EngineNotReady or QueueFull before queueing anything.
        Every stream opened must be closed (`close`), however its handler ends."""
        if not self.ready:
            raise EngineNotReady(self.load_error or "the model is still loading")
        cap = self.capacity
        if cap is not None and self.num_in_flight + len(requests) > cap:
            raise QueueFull(f"the server is at capacity ({self.num_in_flight} requests in flight, at most {cap}); "
                            f"retry later")
        prefix = f"req-{next(self._ids)}"
        rids = [f"{prefix}-{i}" for i in range(len(requests))]
        stream = OutputStream(rids)
        self.num_in_flight += len(rids)
        self._command(("add", stream, [(rid, ids, sp) for rid, (ids, sp) in zip(rids, requests)],
                       self.llm.engine.clock()))
        return stream

    def close(self, stream: OutputStream) -> None:
        """The handler is done with `stream`: abort its unfinished requests (a client that went
        away, a cancelled task), which frees their KV blocks at the next step."""
        if stream.closed:
            return
        stream.closed = True
        self.num_in_flight -= len(stream.request_ids)
        for rid in stream.unfinished:
            self._command(("abort", rid))

    def _command(self, cmd: tuple) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    def _dispatch(self, deliveries: list) -> None:
        """On the event loop: hand a step's outputs to their streams."""
        for stream, out in deliveries:
            stream._deliver(out)
        # runs after the handlers just woken have taken their step (the ready queue is FIFO)
        self._aloop.call_soon(self._handed.set)

    # ---------------------------------------------------------------- loop thread
    def _run(self) -> None:
        try:
            self.llm = self._load()
        except BaseException as e:  # noqa: BLE001 - any failure to load is reported, not raised
            self.load_error = f"the model failed to load: {' '.join(str(e).split()) or type(e).__name__}"
            log.error(self.load_error)
            if self._on_fatal is not None:
                self._on_fatal(self.load_error)
            return
        self._ready.set()
        engine = self.llm.engine
        if self.metrics is not None:
            self.metrics.observe_engine(engine)
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not engine.has_unfinished():
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for cmd in commands:
                self._apply(engine, cmd)
            if stopping:
                self._drop_all(engine, "the server is shutting down")
                return
            if engine.has_unfinished():
                self._step(engine)
            if self.metrics is not None:  # also after aborts that left nothing to step
                self.metrics.observe_engine(engine)

    def _apply(self, engine, cmd: tuple) -> None:
        if cmd[0] == "abort":
            rid = cmd[1]
            engine.abort(rid)
            self._streams.pop(rid, None)
            return
        _, stream, items, arrival = cmd
        for rid, ids, sp in items:
            try:
                engine.add_request(ids, sp, request_id=rid, arrival_time=arrival)
            except ValueError as e:  # checked by the handler first: should not happen
                self._call(stream._fail, f"the engine refused the request: {e}")
                return
            self._streams[rid] = (stream, [False, 0])

    def _step(self, engine) -> None:
        try:
            outputs = engine.step()
        except Exception:  # an engine bug: fail every request rather than hang them all
            log.error("engine step failed:\n%s", traceback.format_exc())
            self._drop_all(engine, "internal error in the engine step")
            return
        deliveries = []
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, seen = entry
            if self.metrics is not None:
                self.metrics.observe_output(out, seen)
            if out.finished:
                del self._streams[out.request_id]
            deliveries.append((stream, out))
        if deliveries:
            # The model's forward holds the GIL, so without a pause the event loop (HTTP parsing,
            # SSE writes) would only run in GIL switch-interval gaps and stream tokens in bursts.
            # Wait (briefly) until it has handed these outputs to their handlers.
            self._handed.clear()
            self._call(self._dispatch, deliveries)
            self._handed.wait(_HANDOFF_TIMEOUT_S)

    def _drop_all(self, engine, message: str) -> None:
        streams = {id(s): s for s, _ in self._streams.values()}
        for rid in list(engine.requests):
            engine.abort(rid)
        self._streams.clear()
        for stream in streams.values():
            self._call(stream._fail, message)
        if self.metrics is not None:
            self.metrics.observe_engine(engine)

    def _call(self, fn, *args) -> None:
        try:
            self._aloop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass
