"""Batching of concurrent requests for one model: a bounded queue of jobs and one worker thread that owns the
model (Paddle Inference predictors are not shared between threads).

When the worker is free it takes the oldest job and every other waiting job with the same kind and key (the
same decoding settings, so they can share one decode), oldest first, while their rows fit `max_batch`; jobs
that arrive while it decodes wait for the next batch ("gathered at the next decode start"). Under concurrent
load (the previous batch held several jobs) a batch with room waits up to `gather_s` for more jobs before it
starts: the clients just answered send their next requests within milliseconds, and without the wait they
would form a batch of their own beside the jobs that waited (two half-full batches taking turns). A job whose
deadline passed before its batch started, or whose caller gave up (its future cancelled), is never run.

    batcher = Batcher({"caption": lambda payloads: [...one result per payload...]}, max_batch=16, max_queue=64)
    future = batcher.submit("caption", key, rows=1, payload=image, timeout=60)   # QueueFull when full
    result = future.result()
"""
import collections
import concurrent.futures
import threading
import time


class QueueFull(RuntimeError):
    pass


class JobTimeout(TimeoutError):
    pass


Job = collections.namedtuple("Job", "kind key rows payload deadline future")


class Batcher:
    def __init__(self, handlers, max_batch=16, max_queue=64, gather_s=0.0, start=True):
        """handlers: {kind: function(list of payloads) -> list of results, one per payload, in order}; a
        handler's exception fails every job of its batch. max_batch: rows per batch (a job bigger than that
        runs alone); max_queue: jobs waiting (not yet started) before submit() raises QueueFull; gather_s: the
        longest wait for more jobs under concurrent load (0: none)."""
        if max_batch < 1 or max_queue < 1 or gather_s < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and gather_s >= 0, got {max_batch}, "
                             f"{max_queue}, {gather_s}")
        self.handlers, self.max_batch, self.max_queue = dict(handlers), max_batch, max_queue
        self.gather_s, self._last_jobs = gather_s, 0
        self._pending = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.busy = False
        self.stats = collections.Counter()      # batches, jobs, rows, timed_out, cancelled, failed
        self.batch_sizes = collections.Counter()  # jobs per batch -> batches
        self._thread = None
        if start:
            self.start()

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ppvilg-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout=None):
        """Stop taking jobs; the worker finishes its batch; jobs still waiting fail with RuntimeError."""
        with self._cv:
            self._closed = True
            left, self._pending = list(self._pending), collections.deque()
            self._cv.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def waiting(self):
        with self._cv:
            return len(self._pending)

    def submit(self, kind, key, rows, payload, timeout=None):
        """Queue one job -> a concurrent.futures.Future of its result. QueueFull when max_queue jobs wait;
        `timeout` (seconds): the job fails with JobTimeout if its batch has not started by then."""
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r}")
        future = concurrent.futures.Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit, --max-queue)")
            self._pending.append(Job(kind, key, rows, payload, deadline, future))
            self._cv.notify()
        return future

    def _like_head(self):
        """The oldest job and the waiting jobs like it that fit, in order -> (jobs, rows)."""
        head = self._pending[0]
        batch, rows = [], 0
        for job in self._pending:
            if (job.kind, job.key) == (head.kind, head.key) and (not batch or rows + job.rows <= self.max_batch):
                batch.append(job)
                rows += job.rows
        return batch, rows

    def _take(self):
        """The next batch; None once closed."""
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            batch, rows = self._like_head()
            if self.gather_s > 0 and self._last_jobs > 1 and rows < self.max_batch:
                end = time.monotonic() + self.gather_s
                while rows < self.max_batch and not self._closed and time.monotonic() < end:
                    self._cv.wait(end - time.monotonic())
                    batch, rows = self._like_head()
            taken = set(map(id, batch))
            self._pending = collections.deque(j for j in self._pending if id(j) not in taken)
            self._last_jobs = len(batch)
            self.busy = True
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self.busy = False

    def _run(self, batch):
        now = time.monotonic()
        live = []
        for job in batch:
            if job.deadline is not None and now > job.deadline:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(JobTimeout("the request waited longer than its timeout"))
                self.stats["timed_out"] += 1
            elif job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self.stats["cancelled"] += 1
        if not live:
            return
        self.stats.update(batches=1, jobs=len(live), rows=sum(j.rows for j in live))
        self.batch_sizes[len(live)] += 1
        try:
            results = self.handlers[live[0].kind]([j.payload for j in live])
            if len(results) != len(live):
                raise RuntimeError(f"the {live[0].kind} handler returned {len(results)} results for {len(live)} jobs")
        except Exception as e:   # noqa: BLE001 - every job of the batch gets the error; the worker goes on
            self.stats["failed"] += len(live)
            for job in live:
                job.future.set_exception(e)
            return
        for job, result in zip(live, results):
            job.future.set_result(result)
