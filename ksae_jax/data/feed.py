"""Batches for the training loop.

The order of rows in each epoch is a pure function of (seed, epoch): chunks of consecutive
rows in a random order, grouped into buffers, rows shuffled within each buffer. Data that
fit in one buffer use one-row chunks (a uniform permutation, the same for both feeders);
larger data use chunks of 1,024 rows and buffers of 262,144, so that the rows of a buffer
lie in a few regions of a memory-mapped file. Step s is batch
s % steps_per_epoch of epoch s // steps_per_epoch, so a resumed run sees the same batches.

Two feeders turn the order into device batches {"x": float32 (B, ...), "w": (B,)} (w = 0
marks the padding of an epoch's last, partial batch): `DeviceFeeder` when the data fit on
the device (gathered there by a jitted take), `HostFeeder` otherwise (rows read on the host
by a background thread, `prefetch` batches ahead).
"""
from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

STREAM_CHUNK_ROWS = 1024     # consecutive rows kept together when streaming from a file
STREAM_BUFFER_ROWS = 262144  # rows shuffled together when streaming from a file
DEVICE_FRACTION = 0.25       # data go to the device when they take at most this of its memory
CPU_DEVICE_BYTES = 4 << 30   # what "the device's memory" is taken to be on CPU


class Rows(Protocol):
    """What the feeders read: n rows of one shape, scaled by `scale` into model inputs."""

    n: int
    row_shape: tuple[int, ...]
    scale: float
    nbytes: int

    def take(self, rows: np.ndarray) -> np.ndarray: ...

    def all(self) -> np.ndarray: ...


class ArrayRows:
    """Rows of an in-memory array (e.g. uint8 images, scale 1/255)."""

    def __init__(self, array: np.ndarray, scale: float = 1.0):
        self.array, self.scale = array, float(scale)
        self.n, self.row_shape, self.nbytes = len(array), tuple(array.shape[1:]), array.nbytes

    def take(self, rows):
        return self.array[rows]

    def all(self):
        return self.array


class EpochOrder:
    """The row order of one epoch (see the module docstring)."""

    def __init__(self, n: int, seed: int, epoch: int, chunk_rows: int = 1,
                 buffer_rows: int | None = None):
        self.n, self.seed, self.epoch, self.chunk_rows = n, seed, epoch, chunk_rows
        n_chunks = -(-n // chunk_rows)
        per_buffer = max(1, (buffer_rows or n) // chunk_rows)
        self.chunks = np.random.default_rng([seed, epoch]).permutation(n_chunks)
        lengths = np.full(n_chunks, chunk_rows, np.int64)
        lengths[-1] = n - chunk_rows * (n_chunks - 1)
        self.bounds = np.arange(0, n_chunks + per_buffer, per_buffer).clip(max=n_chunks)
        sizes = np.add.reduceat(lengths[self.chunks], self.bounds[:-1]) if n_chunks else []
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._cached = (-1, None)

    def buffer(self, j: int) -> np.ndarray:
        """Rows of buffer j in their shuffled order."""
        if self._cached[0] != j:
            ids = self.chunks[self.bounds[j]:self.bounds[j + 1]]
            rows = (ids[:, None] * self.chunk_rows + np.arange(self.chunk_rows)).reshape(-1)
            rows = rows[rows < self.n]
            rng = np.random.default_rng([self.seed, self.epoch, j + 1])
            self._cached = (j, rows[rng.permutation(len(rows))])
        return self._cached[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of the epoch's order (stop <= n)."""
        out, pos = [], start
        while pos < stop:
            j = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[j + 1]))
            out.append(self.buffer(j)[pos - self.starts[j]:end - self.starts[j]])
            pos = end
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def batch_rows(order: EpochOrder, i: int, batch_size: int) -> np.ndarray:
    """Rows of batch i of an epoch, padded with -1 past the epoch's end."""
    start = i * batch_size
    rows = order.rows(start, min(start + batch_size, order.n))
    return np.concatenate([rows, np.full(batch_size - len(rows), -1, rows.dtype)])


def fits_on_device(rows: Rows, device: jax.Device | None = None) -> bool:
    """Whether the data take at most DEVICE_FRACTION of the device's memory."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    limit = (stats or {}).get("bytes_limit", CPU_DEVICE_BYTES)
    return rows.nbytes <= DEVICE_FRACTION * limit


@functools.partial(jax.jit, static_argnames=("batch_size",))
def gather(data: jax.Array, order: jax.Array, i, scale, *, batch_size: int) -> dict:
    """Batch i of `order` (padded with -1) from device-resident rows, as float32 * scale
    (padding rows are zeros, as the host feeder's)."""
    idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
    real = idx >= 0
    x = data[jnp.maximum(idx, 0)].astype(jnp.float32) * scale
    x = jnp.where(real.reshape(-1, *(1,) * (x.ndim - 1)), x, 0.0)  # padding rows are zeros
    return {"x": x, "w": real.astype(jnp.float32)}


class DeviceFeeder:
    """Batches gathered on the device from rows put there once."""

    mode = "device"

    def __init__(self, rows: Rows, batch_size: int, seed: int,
                 put: Callable = jax.device_put, put_order: Callable = jax.device_put):
        self.rows, self.batch_size, self.seed, self.put_order = rows, batch_size, seed, put_order
        self.data = put_order(rows.all())  # the rows, whole on every device
        self.steps_per_epoch = -(-rows.n // batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = EpochOrder(self.rows.n, self.seed, epoch).rows(0, self.rows.n)
        pad = self.steps_per_epoch * self.batch_size - len(order)
        return np.concatenate([order, np.full(pad, -1, order.dtype)]).astype(np.int32)

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        step, epoch, order = start_step, None, None
        while True:
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.put_order(self.epoch_order(e))
            yield gather(self.data, order, i, np.float32(self.rows.scale), batch_size=self.batch_size)
            step += 1


def offer(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts item in a producer's bounded queue once there is room, unless the consumer has
    stopped first (then False)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class HostFeeder:
    """Batches read on the host by a background thread and put on the device ahead of use.

    local: (start, stop) of each batch's rows that this process reads (multi-host data
    parallelism: each process reads its own slice of every global batch).
    """

    mode = "host"

    def __init__(self, rows: Rows, batch_size: int, seed: int, put: Callable = jax.device_put,
                 prefetch: int = 3, chunk_rows: int = STREAM_CHUNK_ROWS,
                 buffer_rows: int = STREAM_BUFFER_ROWS, local: tuple[int, int] | None = None):
        self.rows, self.batch_size, self.seed, self.put = rows, batch_size, seed, put
        self.prefetch, self.chunk_rows, self.buffer_rows = prefetch, chunk_rows, buffer_rows
        self.local = local or (0, batch_size)
        self.steps_per_epoch = -(-rows.n // batch_size)
        if buffer_rows is None or rows.n <= buffer_rows:  # one buffer: the device feeder's order
            self.chunk_rows, self.buffer_rows = 1, None

    def host_batch(self, order: EpochOrder, i: int) -> dict:
        idx = batch_rows(order, i, self.batch_size)[slice(*self.local)]
        real = idx >= 0
        x = np.zeros((len(idx), *self.rows.row_shape), np.float32)
        sorted_pos = np.argsort(idx[real], kind="stable")
        picked = self.rows.take(idx[real][sorted_pos])  # sorted reads: file locality
        x[np.flatnonzero(real)[sorted_pos]] = picked
        x *= np.float32(self.rows.scale)
        return {"x": x, "w": real.astype(np.float32)}

    def _produce(self, start_step: int, out: queue.Queue, stop: threading.Event):
        try:
            step, order = start_step, None
            while not stop.is_set():
                e, i = divmod(step, self.steps_per_epoch)
                if order is None or order.epoch != e:
                    order = EpochOrder(self.rows.n, self.seed, e, self.chunk_rows, self.buffer_rows)
                offer(out, self.put(self.host_batch(order, i)), stop)
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, unless it left
            offer(out, e, stop)

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(start_step, out, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=5)


def make_feeder(rows: Rows, batch_size: int, seed: int, *, mode: str = "auto",
                put: Callable = jax.device_put, put_order: Callable = jax.device_put,
                local: tuple[int, int] | None = None, **host_kw):
    """A DeviceFeeder when the data fit comfortably on the device (or mode="device"), else a
    HostFeeder (mode="host", and always when several processes each feed their `local`
    rows of every batch). put: how a host batch goes to the device(s); put_order: how
    whole arrays do (device-resident rows and epoch orders)."""
    if mode == "auto":
        mode = "device" if fits_on_device(rows) and local is None else "host"
    if mode == "device":
        return DeviceFeeder(rows, batch_size, seed, put, put_order)
    return HostFeeder(rows, batch_size, seed, put, local=local, **host_kw)
