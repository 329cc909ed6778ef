"""Warm starts: :class:`FixedPointCache`, the fixed points of earlier solves kept per sample, to
start the next solve of the same sample from."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._inputs import resolve_backend
from ._options import nonnegative_int, positive_int
from ._registry import registry
from ._results import Status
from ._structure import Structure

_OWNER = "deqcore.FixedPointCache"
#: What :meth:`FixedPointCache.store` keeps: the statuses of each ``keep`` setting.
KEEP = {"converged": (Status.CONVERGED,), "best": (Status.CONVERGED, Status.MAX_ITER)}


class FixedPointCache:
    """Fixed points of earlier solves, one row per sample, keyed by the sample's index.

    For data whose samples come back (epochs over a data set, frames of a video, steps of a
    diffusion sampler) the fixed point a sample reached last time is a better start than zeros
    while the model changed little since. ``lookup`` gives the ``z0`` of a batch, ``store`` keeps
    the fixed points of a solve, ``advance`` counts parameter updates::

        cache = deqcore.FixedPointCache(capacity=len(dataset), max_age=500)
        for indices, x in batches:
            z0, hit = cache.lookup(indices, like=zeros)  # cached rows where fresh, zeros elsewhere
            sol = deqcore.solve(f, x, z0)
            cache.store(indices, sol)                     # converged samples only
            ...  # loss, backward, optimizer step
            cache.advance()                               # once per parameter update

    Keys are host integers (NumPy or Python: dataset indices, frame numbers; any int64). The
    rows live in one array of the solution's framework on its device, ``(capacity + 1, n)`` in
    the state's dtype (``n``: the numbers of one sample's state, all arrays of a tuple state
    together; the extra row takes the writes of rows that are not kept): :attr:`nbytes`. The
    states never leave the device; ``store`` reads the batch's per-sample status codes back to
    the host (B small integers), the bookkeeping (which key sits in which row, when it was
    written) is NumPy. Under JAX, lookup and store run outside ``jax.jit`` between compiled
    steps and update the table functionally (each store writes into a copy of the table: twice
    its memory for a moment); ``z0`` and the solution are ordinary inputs and outputs of a
    jitted step.

    Staleness policy:

    * **Convergence.** ``store`` keeps a sample only when its solve reached the tolerance
      (``Status.CONVERGED``; with ``keep="best"`` also when it ran out of steps, ``MAX_ITER``:
      its lowest-residual iterate, for training whose fixed step budget stops most solves
      before the tolerance). A sample that is not kept (``DIVERGED``, ``OVERFLOW``,
      ``NONFINITE``, and ``MAX_ITER`` by default) is not stored, and the entry it had is
      dropped, so a start that led a solve astray is not offered again; its next lookup
      misses (the default start).
    * **Age.** ``max_age`` (None: no limit) is the number of parameter updates an entry stays
      valid: written at update count ``t`` (the number of :meth:`advance` calls so far), it
      hits while the count is at most ``t + max_age`` and is dropped after. ``max_age=0`` reuses
      fixed points only within one parameter version (several solves per update: video
      frames, a sampler's steps).
    * **Capacity.** At most ``capacity`` samples are kept. Storing a new key into a full cache
      evicts the entry written longest ago (expired entries first).

    The cache does not compare a cached start with the default one (that costs one extra
    evaluation of ``f`` per solve, as much as a solver step saves): the convergence rule is
    its guard against starts that got worse. Misses start from ``like``'s rows (zeros in the
    usual case). Statistics: :attr:`lookups`, :attr:`hits`, :attr:`hit_rate`.

    Args:
        capacity: the most samples kept (an int >= 1).
        max_age: parameter updates an entry stays valid (an int >= 0), or None for no limit.
        keep: ``"converged"`` (default) or ``"best"``: the samples ``store`` keeps (above).
        backend: the framework of the states (``"torch"``, ``"jax"``); default: inferred from
            the first array the cache sees.
    """

    def __init__(self, capacity: int, *, max_age: int | None = None, keep: str = "converged",
                 backend: str | None = None) -> None:
        for name, value, check in (("capacity", capacity, positive_int),
                                   ("max_age", max_age, nonnegative_int)):
            problem = None if value is None and name == "max_age" else check(value)
            if problem is not None:
                error = TypeError if not isinstance(value, int) or isinstance(value, bool) else ValueError
                raise error(f"{_OWNER}: {name} must be {problem}, got {value!r}")
        if keep not in KEEP:
            raise ValueError(f"{_OWNER}: keep must be one of {', '.join(map(repr, KEEP))}, got {keep!r}")
        self.capacity = int(capacity)
        self.max_age = None if max_age is None else int(max_age)
        self.keep = keep
        self._backend_name = backend
        self._be: Any = None if backend is None else registry().backend(backend)
        #: Parameter updates counted by :meth:`advance`.
        self.updates = 0
        #: Rows looked up and rows that hit, since creation or :meth:`reset_statistics`.
        self.lookups = 0
        self.hits = 0
        self._slot_of: dict[int, int] = {}
        self._key = np.full(self.capacity, -1, np.int64)
        self._written = np.zeros(self.capacity, np.int64)
        self._serial = np.zeros(self.capacity, np.int64)
        self._writes = 0
        self._table: Any = None
        self._sample: tuple[bool, tuple[tuple[int, ...], ...], Any] | None = None

    # ------------------------------------------------------------------ public
    def lookup(self, indices: Any, like: Any = None) -> tuple[Any, np.ndarray]:
        """The start of a batch: ``(z0, hit)``.

        ``z0`` has the structure of ``like`` (an array or tuple of arrays with the batch on axis
        0, one row per index): the cached fixed point in each row whose key is in the cache and
        fresh, ``like``'s row elsewhere (the default start: zeros, normally). ``like=None``
        means zeros of the cached structure, and ``z0`` is None when no row hits (start the
        solve from its own default). ``hit`` is a NumPy bool array, True where the row came
        from the cache. ``like`` must have the structure and dtype of the stored fixed points
        (a ``ValueError`` / ``TypeError`` otherwise).
        """
        keys = self._keys(indices, "lookup")
        self._expire()
        slots = np.array([self._slot_of.get(int(k), self.capacity) for k in keys], np.int64)
        hit = slots < self.capacity
        self.lookups += len(keys)
        self.hits += int(hit.sum())
        if like is not None:
            be = self._backend_of(like, "like")
            structure = Structure.of(be, like, True, "like")
            self._check_sample(structure, "like")
            if structure.batch != len(keys):
                raise ValueError(f"{_OWNER}.lookup: like has a batch of {structure.batch}, indices "
                                 f"{len(keys)}")
            if not hit.any():
                return like, hit
        elif not hit.any():
            return None, hit
        be, xp = self._be, self._be.xp
        assert self._sample is not None
        is_tuple, shapes, _ = self._sample
        batch = Structure(is_tuple, tuple((len(keys), *s) for s in shapes), self._sample[2], True)
        device = be.device(self._table)
        rows = xp.take(self._table, xp.asarray(slots, device=device), axis=0)
        default = xp.zeros_like(rows) if like is None else batch.flatten(be, like)
        z0 = xp.where(xp.asarray(hit, device=device)[:, None], rows, default)
        return batch.unflatten(be, z0), hit

    def store(self, indices: Any, solution: Any) -> int:
        """Keep the fixed points of ``solution`` (a :class:`deqcore.Solution` of the batch whose
        rows ``indices`` name; its ``z`` and ``status`` are read) for the samples that converged
        (``keep="best"``: also those that ran out of steps); drop the entries of the others. A
        key given twice keeps its last row. Returns how many samples were stored."""
        keys = self._keys(indices, "store")
        be = self._backend_of(solution.z, "solution.z")
        structure = Structure.of(be, solution.z, True, "solution.z")
        if structure.batch != len(keys):
            raise ValueError(f"{_OWNER}.store: solution has a batch of {structure.batch}, indices "
                             f"{len(keys)}")
        if self._sample is None:
            self._sample = (structure.is_tuple, tuple(s[1:] for s in structure.shapes), structure.dtype)
        self._check_sample(structure, "solution.z")
        status = np.asarray(be.to_numpy(solution.status)).reshape(-1)
        if status.shape != keys.shape:
            raise ValueError(f"{_OWNER}.store: solution.status has {status.size} entries, indices "
                             f"{len(keys)}")
        self._expire()
        converged = np.isin(status, [int(s) for s in KEEP[self.keep]])
        for key in keys[~converged]:
            self._drop(int(key))
        last = {int(k): row for row, k in enumerate(keys) if converged[row]}  # a repeated key: last row
        rows = list(last.values())[-self.capacity:]
        slots = np.full(len(keys), self.capacity, np.int64)  # the extra row takes what is not kept
        taken: set[int] = set()
        free = list(np.flatnonzero(self._key < 0)[::-1])
        oldest = iter(np.argsort(self._serial, kind="stable"))  # when full: evicted in this order
        for row in rows:
            key = int(keys[row])
            slot = self._slot_of.get(key)
            if slot is None:
                slot = int(free.pop()) if free else int(next(s for s in oldest if int(s) not in taken))
                self._drop_slot(slot)
                self._slot_of[key] = slot
                self._key[slot] = key
            taken.add(slot)
            slots[row] = slot
            self._written[slot] = self.updates
            self._serial[slot] = self._writes
            self._writes += 1
        if rows:
            self._write_rows(be, structure, solution.z, slots)
        return len(rows)

    def advance(self, updates: int = 1) -> None:
        """Count ``updates`` parameter updates (call it after each optimizer step); entries older
        than ``max_age`` updates stop hitting."""
        problem = nonnegative_int(updates)
        if problem is not None:
            raise ValueError(f"{_OWNER}.advance: updates must be {problem}, got {updates!r}")
        self.updates += int(updates)

    def clear(self) -> None:
        """Drop every entry and free the table (statistics and the update count stay)."""
        self._slot_of.clear()
        self._key[:] = -1
        self._table = self._sample = None

    def reset_statistics(self) -> None:
        """Start :attr:`lookups`, :attr:`hits` and :attr:`hit_rate` again from zero."""
        self.lookups = self.hits = 0

    @property
    def hit_rate(self) -> float:
        """Hits per row looked up since the last :meth:`reset_statistics` (NaN before any lookup)."""
        return self.hits / self.lookups if self.lookups else math.nan

    @property
    def nbytes(self) -> int:
        """Bytes of the device table (0 before the first store) and of the host bookkeeping."""
        host = self._key.nbytes + self._written.nbytes + self._serial.nbytes
        if self._table is None:
            return host
        return host + int(self._table.shape[0]) * int(self._table.shape[1]) * self._itemsize()

    def __len__(self) -> int:
        """Entries that would hit now."""
        return int((self._key >= 0).sum()) - int(self._stale().sum())

    def __contains__(self, key: object) -> bool:
        """Whether a lookup of ``key`` would hit now."""
        slot = self._slot_of.get(int(key)) if isinstance(key, (int, np.integer)) else None
        return slot is not None and self._fresh(slot)

    def __repr__(self) -> str:
        age = "no limit" if self.max_age is None else self.max_age
        return (f"FixedPointCache({len(self)}/{self.capacity} entries, max_age {age}, updates "
                f"{self.updates}, hit rate {self.hit_rate:.3f})")

    # ------------------------------------------------------------------ internals
    def _keys(self, indices: Any, method: str) -> np.ndarray:
        if hasattr(indices, "shape") and not isinstance(indices, np.ndarray):
            raise TypeError(f"{_OWNER}.{method}: indices must be host integers (a NumPy array or a "
                            f"sequence of ints), got {type(indices).__name__}")
        keys = np.asarray(indices)
        if keys.ndim != 1 or not (np.issubdtype(keys.dtype, np.integer) or keys.size == 0):
            raise TypeError(f"{_OWNER}.{method}: indices must be a 1-D sequence of integers, got "
                            f"{keys.dtype} of shape {keys.shape}")
        return keys.astype(np.int64)

    def _backend_of(self, arrays: Any, what: str) -> Any:
        be = resolve_backend(registry(), self._backend_name, f"{_OWNER} ({what})", {what: arrays})
        if self._be is not None and be.name != self._be.name:
            raise TypeError(f"{_OWNER}: {what} is a {be.name} array, the cache holds {self._be.name} arrays")
        self._be = be
        return be

    def _check_sample(self, structure: Structure, what: str) -> None:
        if self._sample is None:
            return
        is_tuple, shapes, dtype = self._sample
        got = tuple(s[1:] for s in structure.shapes)
        if structure.is_tuple != is_tuple or got != shapes:
            raise ValueError(f"{_OWNER}: {what} has per-sample shapes "
                             f"{got if structure.is_tuple else got[0]}, the cache holds "
                             f"{shapes if is_tuple else shapes[0]}")
        if structure.dtype != dtype:
            raise TypeError(f"{_OWNER}: {what} has dtype {structure.dtype}, the cache holds {dtype}")

    def _fresh(self, slot: int) -> bool:
        return self.max_age is None or self.updates - int(self._written[slot]) <= self.max_age

    def _stale(self) -> np.ndarray:
        """Which rows hold an entry older than ``max_age`` updates."""
        if self.max_age is None:
            return np.zeros(self.capacity, bool)
        return (self._key >= 0) & (self.updates - self._written > self.max_age)

    def _expire(self) -> None:
        for key in self._key[self._stale()]:
            self._drop(int(key))

    def _drop(self, key: int) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self._key[slot] = -1

    def _drop_slot(self, slot: int) -> None:
        if self._key[slot] >= 0:
            self._drop(int(self._key[slot]))

    def _write_rows(self, be: Any, structure: Structure, z: Any, slots: np.ndarray) -> None:
        xp = be.xp
        with be.no_grad():
            rows = be.stop_gradient(structure.flatten(be, z))
            if self._table is None:
                self._table = xp.zeros((self.capacity + 1, structure.n), dtype=structure.dtype,
                                       device=be.device(rows))
            self._table = _writer(be)(self._table, slots, rows)

    def _itemsize(self) -> int:
        return int(self._be.xp.finfo(self._table.dtype).bits) // 8


_WRITERS: dict[str, Any] = {}


def _writer(be: Any) -> Any:
    """``write(table, slots, rows)``: ``rows[i]`` into row ``slots[i]`` of ``table``, in order,
    compiled once per backend (JAX: per shape) and shared by every cache."""
    if be.name not in _WRITERS:
        def write(table: Any, slots: Any, rows: Any) -> Any:
            return be.fori_loop(int(rows.shape[0]), lambda i, t: be.set_index(t, slots[i], rows[i], axis=0),
                                table)

        _WRITERS[be.name] = be.jit(write)
    return _WRITERS[be.name]
