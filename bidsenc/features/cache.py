"""On-disk feature cache shared by concurrent jobs.

Layout (``root`` is ``--feature-cache``)::

    root/v1/<model_key>/<story_key>/times.npy          float64 [n_rows]
    root/v1/<model_key>/<story_key>/layer-012.npy      float16 [n_rows, hidden], one per layer
    root/v1/<model_key>/<story_key>/info.json          written last: marks the entry complete
    root/v1/<model_key>/<story_key>.lock               held while one process computes the entry

The caller builds the keys: ``model_key`` already hashes the model's fingerprint
(weights) and the extraction parameters, ``story_key`` the story id and a hash
of its content; the format version is the first folder.  Arrays are read back
memory-mapped and read-only, so features of all layers of a large model never
need to be in memory at once.  Nothing is ever unpickled.

Concurrency
-----------
Every file is written to a temporary file in its own folder and renamed into
place (``os.replace``), and ``info.json`` is renamed last, so a reader sees
either no entry or a complete one.  A process computes an entry only while it
holds the entry's lock, a file created with ``O_CREAT | O_EXCL`` that holds JSON
``{host, pid, created, argv0, token}``; a daemon thread refreshes the lock's
mtime every ``heartbeat`` seconds while it is held.  Other processes wait for a
locked entry until it is complete or its lock is stale:

* same host (and PID namespace) and the PID is gone, or
* its mtime is older than ``stale_after`` seconds (any host: the heartbeat keeps
  a live holder's lock fresh; mtimes on a network file system come from the
  server's clock, so keep ``stale_after`` well above any clock skew), or
* it is empty or not valid JSON (the holder died between creating and writing
  it) and older than ``_EMPTY_LOCK_GRACE`` seconds by mtime.

A stale lock is taken over by renaming it to a unique name (only one of two
racing takers can succeed), checking that the renamed file is the one judged
stale (same inode, mtime and content; otherwise it is put back), deleting it and
creating a fresh lock with ``O_EXCL``.  The worst outcome of a lost race is that
an entry is computed twice; as every write is an atomic rename of complete
content, the entry stays consistent.  ``O_EXCL`` and ``rename`` are atomic on
local file systems and on NFSv3 and later.

Files and folders are created with mode ``0o666``/``0o777`` less the umask, so a
cache shared by a group works with ``umask 002``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: Seconds after which an empty or unreadable lock file counts as stale.  Its
#: creator died between ``O_EXCL``-creating it and writing its JSON, which takes
#: microseconds, so a few seconds are plenty even on a slow network file system.
_EMPTY_LOCK_GRACE = 10.0

_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]{0,199}")
_DTYPE = np.dtype("<f2")
_INFO = "info.json"
_TIMES = "times.npy"
_HOST = socket.gethostname()
#: Keys of ``info.json`` that the cache writes; the caller's info holds the others.
_RESERVED = frozenset({"format_version", "model_key", "story_key", "layers", "n_rows", "hidden", "dtype",
                       "times_dtype", "created", "updated", "host"})


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PIDNS = _pid_namespace()


class CacheMiss(KeyError):
    """The cache holds no complete entry with all requested layers."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptEntry(ValueError):
    """An entry's files do not match its ``info.json`` (missing, truncated, wrong shape or dtype)."""


@dataclass(frozen=True)
class Request:
    """One cache entry (a model and a story) and the layers wanted from it.

    Parameters
    ----------
    model_key : str
        Folder-safe key of the model, its weights and the extraction parameters
        (letters, digits and ``_.+=@,-``; not starting with ``.`` or ``-``, not
        ending in ``.lock``; at most 200 characters).
    story_key : str
        Folder-safe key of the stimulus content, same rules.
    layers : tuple of int
        Hidden-state indices (0 is the embedding output); stored sorted and
        without duplicates.
    """

    model_key: str
    story_key: str
    layers: tuple[int, ...]

    def __post_init__(self):
        for name in ("model_key", "story_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _KEY_RE.fullmatch(value) or value.endswith(".lock"):
                raise ValueError(f"Request.{name}={value!r} is not a folder-safe key")
        layers = tuple(sorted({int(layer) for layer in self.layers}))
        if not layers or layers[0] < 0:
            raise ValueError(f"Request.layers={self.layers!r}: give one or more layer indices >= 0")
        object.__setattr__(self, "layers", layers)

    @property
    def key(self) -> tuple[str, str]:
        """``(model_key, story_key)``: the entry, whatever the layers."""
        return self.model_key, self.story_key


@dataclass
class StoredFeatures:
    """Features of one entry as read back from the cache.

    Attributes
    ----------
    times : numpy.ndarray
        float64 ``[n_rows]``, seconds (word midpoints or window end times).
    layers : dict of int to numpy.memmap
        Read-only float16 ``[n_rows, hidden]`` memory maps, one per requested layer.
    info : dict
        The entry's ``info.json``: the cache's keys (``format_version``, ``layers``,
        ``n_rows``, ``hidden``, ``dtype``, ``created``, ``host``, ...) and the caller's.
    """

    times: np.ndarray
    layers: dict[int, np.ndarray]
    info: dict = field(default_factory=dict)


Computed = tuple[Request, np.ndarray, dict[int, np.ndarray], dict]


class FeatureStore:
    """A folder of cached features, safe to share between concurrent processes and hosts.

    Parameters
    ----------
    root : pathlib.Path
        The cache folder; created when the first entry is written.
    stale_after : float
        Seconds without a heartbeat after which another process's lock is taken over.
    poll_interval : float
        Seconds between checks while waiting for entries locked by other processes.
    heartbeat : float
        Seconds between refreshes of the mtime of the locks this process holds.
    """

    def __init__(self, root: Path, *, stale_after: float = 6 * 3600, poll_interval: float = 0.5,
                 heartbeat: float = 60.0):
        self.root = Path(root)
        self.stale_after = float(stale_after)
        self.poll_interval = float(poll_interval)
        self.heartbeat = float(heartbeat)

    # ------------------------------------------------------------------ reading

    def path(self, request: Request) -> Path:
        """The entry's folder: ``root/v<FORMAT_VERSION>/<model_key>/<story_key>``."""
        return self.root / f"v{FORMAT_VERSION}" / request.model_key / request.story_key

    def has(self, request: Request) -> bool:
        """Whether a complete, intact entry holds all of ``request.layers``."""
        return not self._missing_layers(request)

    def load(self, request: Request) -> StoredFeatures:
        """Read an entry back, memory-mapped and read-only.

        Parameters
        ----------
        request : Request
            The entry and the layers to map.

        Returns
        -------
        StoredFeatures

        Raises
        ------
        CacheMiss
            (a ``KeyError``) No complete entry, or it lacks a requested layer.
        CorruptEntry
            (a ``ValueError``) A file is missing, truncated, of the wrong shape or
            dtype; ``numpy`` refuses object arrays (no unpickling) with a ``ValueError`` too.
        """
        folder = self.path(request)
        info = self._read_info(folder)
        if info is None:
            raise CacheMiss(f"feature cache has no complete entry {request.model_key}/{request.story_key}")
        absent = sorted(set(request.layers) - set(info["layers"]))
        if absent:
            raise CacheMiss(f"feature cache entry {request.model_key}/{request.story_key} "
                            f"lacks layers {absent}")
        n_rows, hidden = info["n_rows"], info["hidden"]
        times = _open(folder / _TIMES, (n_rows,), np.dtype("<f8"))
        layers = {layer: _open(folder / _layer_file(layer), (n_rows, hidden), _DTYPE)
                  for layer in request.layers}
        return StoredFeatures(times=times, layers=layers, info=info)

    # ------------------------------------------------------------------ computing

    def ensure(self, requests: Iterable[Request],
               compute: Callable[[list[Request]], Iterator[Computed]]) -> dict[str, int]:
        """Make every request's entry complete, computing each at most once across processes.

        Parameters
        ----------
        requests : iterable of Request
            Requests for the same entry are merged (union of their layers).
        compute : callable
            ``compute(requests)`` yields ``(request, times, layers, info)`` for each
            request it is given: ``times`` float64 ``[n_rows]``, ``layers`` a dict
            ``{layer: array [n_rows, hidden]}`` (cast to float16 on writing) holding at
            least the request's layers, ``info`` a JSON-serialisable dict merged into
            ``info.json`` (its keys must not be the cache's own).  It is called once per
            round with all entries this process could lock, as requested (all their
            layers, also when only some are missing; layers already intact on disk are
            kept, not rewritten).  Each result is written as soon as it is yielded and
            its lock released.

        Returns
        -------
        dict
            ``{"hit": n, "computed": n, "waited": n}`` over the distinct entries:
            already complete, computed here, completed by another process while
            this one waited.

        Raises
        ------
        OSError
            The cache cannot be written (permissions, disk full).
        RuntimeError
            ``compute`` skipped a request or yielded one it was not given.
        ValueError
            ``compute`` yielded arrays of inconsistent shapes, lacked a requested
            layer, or used one of the cache's keys in ``info``.
        Exception
            Whatever ``compute`` raises, after this process's locks are released.
        """
        pending: dict[tuple[str, str], Request] = {}
        for req in requests:
            if req.key in pending:
                req = Request(req.model_key, req.story_key, pending[req.key].layers + req.layers)
            pending[req.key] = req
        counts = {"hit": 0, "computed": 0, "waited": 0}
        waiting: set[tuple[str, str]] = set()
        while pending:
            mine: list[tuple[Request, _Lock]] = []
            try:
                for key, req in list(pending.items()):
                    lock_path = self._lock_path(req)
                    if key in waiting and lock_path.exists() and not self._lock_is_stale(lock_path):
                        continue
                    missing = self._missing_layers(req)
                    if missing:
                        lock = self._acquire(lock_path)
                        if lock is not None:
                            missing = self._missing_layers(req)  # completed while we were locking?
                            if missing:
                                mine.append((req, lock))
                                continue
                            lock.release()
                    if not missing:
                        outcome = "waited" if key in waiting else "hit"
                        counts[outcome] += 1
                        log.debug("feature cache %s: %s/%s", outcome, *key)
                        del pending[key]
                    elif key not in waiting:
                        waiting.add(key)
                        log.info("feature cache: waiting for %s/%s, locked by %s", *key,
                                 _describe_lock(lock_path))
            except BaseException:
                for _, lock in mine:
                    lock.release()
                raise
            if mine:
                self._compute(mine, compute)
                for req, _ in mine:
                    counts["computed"] += 1
                    pending.pop(req.key)
                    waiting.discard(req.key)
            elif pending:
                time.sleep(self.poll_interval)
        log.info("feature cache %s: %d hit, %d computed, %d waited for another job",
                 self.root, counts["hit"], counts["computed"], counts["waited"])
        return counts

    def _compute(self, mine: list[tuple[Request, _Lock]], compute) -> None:
        """Run ``compute`` on the locked requests, write each result, release every lock."""
        held = {req.key: (req, lock) for req, lock in mine}
        beat = _Heartbeat([lock for _, lock in mine], self.heartbeat)
        results = None
        try:
            log.info("feature cache: computing %d entr%s", len(mine), "y" if len(mine) == 1 else "ies")
            results = compute([req for req, _ in mine])
            for item in results:
                got, times, layers, info = item
                if got.key not in held:
                    raise RuntimeError(f"compute yielded {got.model_key}/{got.story_key}, which it was not "
                                       "given or yielded twice")
                req, lock = held[got.key]
                self._write(req, times, layers, info)
                del held[got.key]
                beat.drop(lock)
                lock.release()
                log.debug("feature cache: wrote %s/%s layers %s", *req.key, list(req.layers))
            if held:
                raise RuntimeError("compute yielded nothing for " + ", ".join("/".join(k) for k in held))
        finally:
            beat.stop()
            for _, lock in held.values():
                lock.release()
            close = getattr(results, "close", None)
            if close is not None:
                close()

    def _write(self, req: Request, times, layers: dict, info: dict) -> None:
        """Write one computed result into its entry (the caller holds the entry's lock)."""
        times = np.asarray(times, dtype=np.float64)
        if times.ndim != 1:
            raise ValueError(f"{req.model_key}/{req.story_key}: times must be 1-D, got shape {times.shape}")
        n_rows = times.shape[0]
        absent = sorted(set(req.layers) - {int(k) for k in layers})
        if absent:
            raise ValueError(f"{req.model_key}/{req.story_key}: compute returned no layers {absent}")
        shapes = {tuple(np.shape(a)) for a in layers.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != n_rows:
            raise ValueError(f"{req.model_key}/{req.story_key}: layers must all be "
                             f"[n_rows={n_rows}, hidden]; got shapes {sorted(shapes)}")
        hidden = next(iter(shapes))[1]
        caller = json.loads(json.dumps(info or {}, default=_json_default))  # fail before writing anything
        clash = sorted(set(caller) & _RESERVED)
        if clash:
            raise ValueError(f"{req.model_key}/{req.story_key}: info keys {clash} are the feature cache's own")

        folder = self.path(req)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_old_temp_files(folder, self.stale_after)
        old = self._read_info(folder)
        kept: set[int] = set()
        if old is not None:
            kept = self._valid_layers(folder, old, old["layers"])
            same_rows = old["n_rows"] == n_rows and old["hidden"] == hidden
            if kept and not (same_rows and _times_equal(folder, times)):
                log.warning("feature cache %s: times or hidden size changed; discarding layers %s",
                            folder, sorted(kept))
                kept = set()
            if not kept:
                (folder / _INFO).unlink(missing_ok=True)  # the entry is incomplete while rewritten

        if not kept:
            _save(folder / _TIMES, times)
        for layer, array in sorted(layers.items()):
            if int(layer) in kept:  # intact on disk: left untouched
                continue
            array = np.asarray(array)
            half = array.astype(_DTYPE)
            overflow = int(np.count_nonzero(np.isinf(half))) - int(np.count_nonzero(np.isinf(array)))
            if overflow:
                log.warning("feature cache %s: layer %s has %d values beyond the float16 range (now inf)",
                            folder, layer, overflow)
            _save(folder / _layer_file(int(layer)), half)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        previous = {k: v for k, v in old.items() if k not in _RESERVED} if kept else {}
        meta = {
            **previous,
            **caller,
            "format_version": FORMAT_VERSION,
            "model_key": req.model_key,
            "story_key": req.story_key,
            "layers": sorted(kept | {int(k) for k in layers}),
            "n_rows": int(n_rows),
            "hidden": int(hidden),
            "dtype": "float16",
            "times_dtype": "float64",
            "created": old.get("created", now) if kept else now,
            "updated": now,
            "host": _HOST,
        }
        _atomic_write(folder / _INFO, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))

    # ------------------------------------------------------------------ checks

    def _missing_layers(self, request: Request) -> tuple[int, ...]:
        """The requested layers that are not in the cache intact (all of them when there is no entry)."""
        folder = self.path(request)
        info = self._read_info(folder)
        if info is None:
            return request.layers
        valid = self._valid_layers(folder, info, request.layers)
        return tuple(layer for layer in request.layers if layer not in valid)

    def _valid_layers(self, folder: Path, info: dict, layers) -> set[int]:
        """Of ``layers``, those listed in ``info`` whose files are intact (none if ``times.npy`` is not)."""
        listed = [layer for layer in layers if layer in info["layers"]]
        if not listed:
            return set()
        try:
            _open(folder / _TIMES, (info["n_rows"],), np.dtype("<f8"))
        except (CorruptEntry, ValueError, OSError) as err:
            log.warning("feature cache %s is corrupt, recomputing it: %s", folder, err)
            return set()
        valid = set()
        for layer in listed:
            try:
                _open(folder / _layer_file(layer), (info["n_rows"], info["hidden"]), _DTYPE)
                valid.add(layer)
            except (CorruptEntry, ValueError, OSError) as err:
                log.warning("feature cache %s: layer %s is corrupt, recomputing it: %s", folder, layer, err)
        return valid

    @staticmethod
    def _read_info(folder: Path) -> dict | None:
        """``info.json`` if present, readable and of this format version, else ``None``."""
        try:
            info = json.loads((folder / _INFO).read_text())
            if info.get("format_version") != FORMAT_VERSION:
                return None
            info["layers"] = [int(layer) for layer in info["layers"]]
            info["n_rows"], info["hidden"] = int(info["n_rows"]), int(info["hidden"])
            return info
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("feature cache %s: unreadable %s, recomputing the entry: %s", folder, _INFO, err)
            return None

    # ------------------------------------------------------------------ locks

    def _lock_path(self, request: Request) -> Path:
        entry = self.path(request)
        return entry.with_name(entry.name + ".lock")

    def _acquire(self, path: Path) -> _Lock | None:
        """Create the lock, taking a stale one over; ``None`` while another live process holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _Lock.create(path)
        if lock is not None:
            return lock
        snapshot = _snapshot(path)
        if snapshot is None:  # released meanwhile
            return _Lock.create(path)
        if not self._lock_is_stale(path, snapshot):
            return None
        aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # another process took it over first
            return None
        if _snapshot(aside) != snapshot:  # we moved a fresh lock that replaced the stale one: put it back
            try:
                os.link(aside, path)
                os.unlink(aside)
            except FileExistsError:
                log.warning("feature cache: lock %s changed hands during a takeover", path)
                os.unlink(aside)
            except OSError:  # no hard links on this file system
                if not path.exists():
                    os.rename(aside, path)
            return None
        log.warning("feature cache: taking over stale lock %s (%s)", path, _describe(snapshot[2]))
        os.unlink(aside)
        return _Lock.create(path)

    def _lock_is_stale(self, path: Path, snapshot=None) -> bool:
        snapshot = snapshot or _snapshot(path)
        if snapshot is None:
            return False
        _, mtime_ns, raw = snapshot
        age = time.time() - mtime_ns / 1e9
        try:
            holder = json.loads(raw)
            host, pid = holder["host"], int(holder["pid"])
        except (ValueError, KeyError, TypeError):
            return age > _EMPTY_LOCK_GRACE
        if age > self.stale_after:
            return True
        if host == _HOST and holder.get("pidns") == _PIDNS:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except OSError:  # PermissionError: alive, another user's
                return False
        return False


class _Lock:
    """A lock file this process created; released only while it still holds this process's token."""

    def __init__(self, path: Path, token: str):
        self.path, self.token, self.released = path, token, False

    @classmethod
    def create(cls, path: Path) -> _Lock | None:
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return None
        body = {"host": _HOST, "pid": os.getpid(), "pidns": _PIDNS, "token": token,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv0": sys.argv[0] if sys.argv else ""}
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(body).encode())
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return cls(path, token)

    def owned(self) -> bool:
        snapshot = _snapshot(self.path)
        if snapshot is None:
            return False
        try:
            return json.loads(snapshot[2]).get("token") == self.token
        except (ValueError, AttributeError):
            return False

    def touch(self) -> bool:
        """Refresh the lock's mtime; ``False`` (and a warning) when another process has taken it over."""
        if self.owned():
            os.utime(self.path)
            return True
        log.warning("feature cache: lock %s was taken over by another process", self.path)
        return False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if self.owned():
                self.path.unlink()
        except OSError as err:  # never mask the error that got us here
            log.warning("feature cache: cannot remove lock %s: %s", self.path, err)


class _Heartbeat:
    """Daemon thread refreshing the mtime of held locks every ``interval`` seconds."""

    def __init__(self, locks: list[_Lock], interval: float):
        self._locks, self._guard, self._stop = list(locks), threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                        name="feature-cache-heartbeat")
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._guard:
                for lock in list(self._locks):
                    try:
                        if not lock.touch():
                            self._locks.remove(lock)
                    except OSError as err:
                        log.warning("feature cache: cannot refresh lock %s: %s", lock.path, err)

    def drop(self, lock: _Lock) -> None:
        with self._guard:
            if lock in self._locks:
                self._locks.remove(lock)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------- helpers

def _layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.npy"


def _open(path: Path, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Memory-map an ``.npy`` read-only (never unpickling) and check its shape and dtype."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CorruptEntry(f"{path} is missing") from None
    except ValueError as err:  # truncated, not an .npy, or an object array (never unpickled)
        raise CorruptEntry(f"{path}: {err}") from err
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise CorruptEntry(f"{path} holds {array.dtype} {array.shape}, expected {dtype} {tuple(shape)}")
    return array


def _save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder, fsync, rename into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_old_temp_files(folder: Path, older_than: float) -> None:
    """Delete temporary files left in ``folder`` by writers that died (older than ``older_than`` s)."""
    limit = time.time() - older_than
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < limit:
                tmp.unlink()
        except OSError:
            pass


def _times_equal(folder: Path, times: np.ndarray) -> bool:
    try:
        old = _open(folder / _TIMES, times.shape, np.dtype("<f8"))
    except (CorruptEntry, ValueError, OSError):
        return False
    return bool(np.allclose(old, times, rtol=0, atol=1e-6))


def _snapshot(path: Path) -> tuple[int, int, bytes] | None:
    """``(inode, mtime_ns, content)`` of a lock file, or ``None`` when it is gone."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            return st.st_ino, st.st_mtime_ns, fh.read(4096)
    except FileNotFoundError:
        return None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('created')}"
    except ValueError:
        return "an empty or unreadable lock"


def _describe_lock(path: Path) -> str:
    snapshot = _snapshot(path)
    return _describe(snapshot[2]) if snapshot else "a process that has just finished"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} in the info of a feature cache entry is not JSON-serialisable")
