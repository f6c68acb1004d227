"""Streaming mode of the webdataset source: shards read front to back, a shuffle buffer,
and a state that resumes the stream exactly.

Per process and epoch::

    the epoch's shard order (permutation by (seed, epoch))
      -> shards process_index::process_count              disjoint, together the epoch
      -> lane l of L takes every L-th of them and reads    background threads, sequential
         them one after another                            reads, retries, prefetch queue
      -> one group from each live lane in turn
      -> shuffle buffer of S groups: draw slot j(seed, epoch, draws), refill it
      -> prepare (decode, crop, tokenize) in worker threads, in order   [_StreamBatches]

The order depends on (seed, shards, process slot, L, S) only, never on the number of
workers. The state (JSON) is the epoch, each lane's (shard, byte offset of the next
group), the lane whose turn it is, the buffer's groups as (shard, start, end) and the
number of draws; a resumed stream re-reads the buffer's groups by ranged reads and
reopens each lane at its offset, so it yields exactly what the saved one would have.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import gzip
import logging
import queue
import tarfile
import threading
import time
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from clipjax.data import train_input, transforms
from clipjax.data import webdataset as wds
from clipjax.data.convert import tars
from clipjax.data.convert.example import ShardStats
from clipjax.data.loading import LazyTokenizer

log = logging.getLogger("clipjax")

_LANE_DEPTH = 32  # groups a lane reads ahead of the merge
_DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


@functools.lru_cache(maxsize=64)
def _shard_order(seed: int, epoch: int, num_shards: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5AAD])).permutation(num_shards)


def _slot(seed: int, epoch: int, draw: int, size: int) -> int:
    """The buffer slot of a draw: a pure function of (seed, epoch, draw), so no generator state."""
    return int(np.random.SeedSequence([seed, epoch, draw, 0xB0F]).generate_state(1, np.uint64)[0] % size)


class _Lane:
    """Reads a list of shards front to back in a thread, from shard ``k`` at byte ``offset``.

    Puts ``("group", k, (key, files, start, end))`` per example, ``("end", k, why)`` after
    each shard (``why`` is "" when it was read whole) and ``("done",)``. A transient error
    reopens the shard at the group being read (retries with backoff); damage ends the shard,
    keeping the groups before it; so no group is handed over twice or left out.
    """

    def __init__(self, paths: Sequence[str], k: int, offset: int, retries: int, delay_s: float):
        self.paths, self.retries, self.delay_s = list(paths), retries, delay_s
        self.queue: queue.Queue = queue.Queue(_LANE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(k, offset), daemon=True, name="wds-lane")
        self._thread.start()

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self, k0: int, offset: int) -> None:
        try:
            for k in range(k0, len(self.paths)):
                self._put(("end", k, self._read_shard(k, offset if k == k0 else 0)))
            self._put(("done",))
        except _Stopped:
            pass

    def _read_shard(self, k: int, offset: int) -> str:
        path, failures = self.paths[k], 0
        while True:
            held = None  # handed over only once the next group (or the clean end) is seen
            try:
                with wds.open_tar_stream(path, offset) as stream:
                    for group in tars.member_groups(stream, path, ShardStats(), wds.read_member, base=offset):
                        if held is not None:
                            self._put(("group", k, held))
                            failures = 0
                        held, offset = group, group[2]  # a retry starts at the group not yet handed over
                if held is not None:
                    self._put(("group", k, held))
                return ""
            except _DAMAGE as e:
                if held is None and offset > 0 and str(e) == "empty file":  # resumed after the last example
                    return ""
                if held is not None:  # the damage came after its last member: keep it, as the converter does
                    self._put(("group", k, held))
                return f"damaged ({e or type(e).__name__})"
            except OSError as e:
                if not wds.transient(e) or failures >= self.retries:
                    return f"unreachable ({e})"
                log.warning("%s: %s; retry %d of %d at byte %d", path, e, failures + 1, self.retries, offset)
                time.sleep(self.delay_s * 2**failures)
                failures += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Stopped(Exception):
    pass


class ExampleStream:
    """This process's endless sequence of groups ``(epoch, shard, start, end, key, files)``."""

    def __init__(self, paths: Sequence[str], *, seed: int, shuffle: bool, process_index: int, process_count: int,
                 lanes: int, buffer_size: int, retries: int, retry_delay_s: float,
                 state: dict[str, Any] | None = None):
        self.paths, self.seed, self.shuffle = list(paths), int(seed), bool(shuffle)
        self.pi, self.pc, self.num_lanes = process_index, process_count, int(lanes)
        self.buffer_size = int(buffer_size) if shuffle else 1
        self.retries, self.retry_delay_s = int(retries), float(retry_delay_s)
        if len(self.paths) < process_count:
            raise wds.WebDatasetError(f"{len(self.paths)} shard(s) for {process_count} processes: streaming gives "
                                      "each process whole shards; set config.data.webdataset.mode=random")
        self._lanes: list[_Lane] = []
        self.skipped_shards: list[int] = []  # shards cut short or unreachable, by their index in paths
        state = state or {"epoch": 0, "cursors": [[0, 0]] * self.num_lanes, "turn": 0, "buffer": [], "draws": 0,
                          "skipped_shards": [], "num_shards": len(self.paths)}
        self._restore(state)

    # -- state
    def _restore(self, state: dict[str, Any]) -> None:
        if state["num_shards"] != len(self.paths) or len(state["cursors"]) != self.num_lanes:
            raise train_input.DataError(
                f"the saved webdataset stream read {state['num_shards']} shards in {len(state['cursors'])} lanes; "
                f"this run has {len(self.paths)} shards and config.data.webdataset.lanes={self.num_lanes}: "
                "resume with the same shards and lanes")
        self.epoch, self.draws, self.skipped_shards = int(state["epoch"]), int(state["draws"]), list(state["skipped_shards"])
        self._open_lanes([list(c) for c in state["cursors"]], int(state["turn"]))

        def refetch(key: list[int]) -> tuple | None:
            shard, start, end = key
            path = self.paths[shard]
            try:
                data = wds.with_retries(lambda: wds.read_span(path, start, end), f"reading {path}", self.retries,
                                        self.retry_delay_s)
                return (shard, start, end, *wds.parse_group(data, path))
            except (OSError, ValueError, *_DAMAGE) as e:
                log.warning("webdataset: a buffered example of %s is unreadable now (%s); skipped", path, e)
                return None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # the buffer's groups, by ranged reads
            self._buffer = [g for g in pool.map(refetch, state["buffer"]) if g is not None]

    def _open_lanes(self, cursors: list[list[int]], turn: int) -> None:
        self.close()
        mine = _shard_order(self.seed, self.epoch, len(self.paths), self.shuffle)[self.pi::self.pc]
        self._lane_shards = [[int(s) for s in mine[lane::self.num_lanes]] for lane in range(self.num_lanes)]
        self._cursors, self._turn = cursors, turn
        self._lanes = [_Lane([self.paths[s] for s in shards], k, off, self.retries, self.retry_delay_s)
                       for shards, (k, off) in zip(self._lane_shards, cursors)]

    def state(self) -> dict[str, Any]:
        """JSON state: what is read next (a fresh object each call; saved as it is)."""
        return {"epoch": self.epoch, "cursors": [list(c) for c in self._cursors], "turn": self._turn,
                "buffer": [[b[0], b[1], b[2]] for b in self._buffer], "draws": self.draws,
                "skipped_shards": list(self.skipped_shards), "num_shards": len(self.paths)}

    # -- reading
    def _live(self, lane: int) -> bool:
        return self._cursors[lane][0] < len(self._lane_shards[lane])

    def _pull(self) -> tuple | None:
        """The next group from the lanes in turn, or None when every lane has read its shards."""
        while any(self._live(i) for i in range(self.num_lanes)):
            lane = self._turn
            if not self._live(lane):
                self._turn = (lane + 1) % self.num_lanes
                continue
            item = self._lanes[lane].queue.get()
            k = item[1] if len(item) > 1 else None
            if item[0] == "group":
                _, _, (key, files, start, end) = item
                self._cursors[lane] = [k, end]
                self._turn = (lane + 1) % self.num_lanes
                return self._lane_shards[lane][k], start, end, key, files
            if item[0] == "end":
                self._cursors[lane] = [k + 1, 0]
                if item[2] and self._lane_shards[lane][k] not in self.skipped_shards:
                    self.skipped_shards.append(self._lane_shards[lane][k])
                    log.warning("webdataset: skipping the rest of shard %s: %s",
                                self.paths[self._lane_shards[lane][k]], item[2])
        return None

    def __iter__(self) -> "ExampleStream":
        return self

    def __next__(self) -> tuple:
        """``(epoch, shard, start, end, key, files)`` of the next example."""
        while True:
            while len(self._buffer) < self.buffer_size:
                group = self._pull()
                if group is None:
                    break
                self._buffer.append(group)
            if self._buffer:
                break
            if self.draws == 0:
                raise wds.WebDatasetError(f"no readable examples in this process's shards (of {len(self.paths)} "
                                          f"from {self.paths[0]}); check config.data.path")
            self.epoch, self.draws = self.epoch + 1, 0  # the buffer drains at each epoch's end
            self._open_lanes([[0, 0] for _ in range(self.num_lanes)], 0)
        j = _slot(self.seed, self.epoch, self.draws, len(self._buffer))
        group = self._buffer[j]
        self._buffer[j] = self._buffer[-1]
        self._buffer.pop()
        self.draws += 1
        return (self.epoch, *group)

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()
        self._lanes = []


class _StreamElement:
    """What ``_TrainBatches`` needs of its element function, for a streamed example."""

    streaming = True

    def __init__(self, *, seed: int, opts: transforms.ImageOptions, tokenizer: LazyTokenizer, caption_choice: str):
        self.seed, self.opts, self.tokenizer, self.caption_choice = int(seed), opts, tokenizer, caption_choice

    def __call__(self, group: tuple) -> dict[str, np.ndarray]:
        epoch, shard, start, _, key, files = group
        rng = np.random.default_rng([self.seed, epoch, shard, start])  # the example's own randomness
        return train_input.prepare_example(wds.example_of(files, key), rng, self.opts, self.tokenizer,
                                           self.caption_choice)


class StreamBatches(train_input._TrainBatches):
    """``_TrainBatches`` over an ``ExampleStream``: examples are prepared ``_ROWS_PER_TASK`` at a time
    by ``num_workers`` threads (Pillow decodes without the GIL), in order. The state adds the
    stream's state at the current task's start and how many of its rows were used."""

    def __init__(self, element_fn: _StreamElement, stream_args: dict[str, Any], **kw):
        super().__init__(element_fn, **kw)
        self._stream_args = stream_args
        self._stream: ExampleStream | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._task_state: dict[str, Any] | None = None
        self._task_used = 0

    def _tasks(self, stream: ExampleStream) -> Iterator[tuple[dict[str, Any], list]]:
        ahead: collections.deque = collections.deque()
        depth = max(2, 2 * self._num_workers)
        rows = train_input._ROWS_PER_TASK
        while True:
            while len(ahead) < depth:
                state = stream.state()
                groups = [next(stream) for _ in range(rows)]
                work = (lambda gs: [self.element_fn(g) for g in gs])
                ahead.append((state, self._pool.submit(work, groups) if self._pool else work(groups)))
            state, result = ahead.popleft()
            yield state, result.result() if self._pool else result

    def _open(self) -> Iterator:
        if self._elements is None:
            state = self._task_state
            self._stream = ExampleStream(**self._stream_args, state=state)
            for _ in range(self._task_used):  # rows of the saved task already used: read past them
                next(self._stream)
            if self._num_workers > 0:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._num_workers, thread_name_prefix="wds-prep")
            self._elements = self._tasks(self._stream)
        return self._elements

    def _next_row(self) -> dict[str, np.ndarray] | None:
        elements = self._open()
        if not self._pending:
            self._task_state, rows = next(elements)
            self._task_used = 0
            self._pending.extend(rows)
        self._task_used += 1
        row = self._pending.popleft()
        return {k: v for k, v in row.items() if k != "ok"} if row["ok"] else None

    def get_state(self) -> dict[str, Any]:
        stream = self._task_state or (self._stream.state() if self._stream else None)
        return {**super().get_state(), "stream": stream, "stream_rows_used": self._task_used,
                "skipped_shards": len(stream["skipped_shards"]) if stream else 0}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._task_state, self._task_used = state.get("stream"), int(state.get("stream_rows_used", 0))

    def close(self) -> None:
        super().close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def stream_batches(data_cfg: Any, *, seed: int, process_index: int, process_count: int, local_batch: int,
                   opts: transforms.ImageOptions, tokenizer: LazyTokenizer) -> StreamBatches:
    """The batches of ``config.data`` (source=webdataset, mode=stream) for this process."""
    w = data_cfg.webdataset
    paths = wds.shard_paths(data_cfg.path)
    args = dict(paths=paths, seed=seed, shuffle=data_cfg.shuffle, process_index=process_index,
                process_count=process_count, lanes=w.lanes, buffer_size=w.shuffle_buffer, retries=w.retries,
                retry_delay_s=w.retry_delay_s)
    fn = _StreamElement(seed=seed, opts=opts, tokenizer=tokenizer, caption_choice=data_cfg.caption_choice)
    return StreamBatches(fn, args, batch_size=local_batch, num_workers=data_cfg.num_workers, worker_buffer=0,
                         max_skip_fraction=data_cfg.max_skip_fraction, skip_check_after=data_cfg.skip_check_after,
                         source_name=f"{len(paths)} webdataset shards from {paths[0]}")
