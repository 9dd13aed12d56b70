"""The feature cache: float16 memory-mapped entries, exactly-once computation across processes, locks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bidsenc.features.cache import FORMAT_VERSION, CacheMiss, CorruptEntry, FeatureStore, Request

HIDDEN = 6

# A worker run in separate processes: ``share`` computes (slowly) after meeting its peers at a
# barrier, ``block`` locks its entries and hangs in compute until killed.
WORKER = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_feature_cache import fake_result
from bidsenc.features.cache import FeatureStore, Request

root, work, mode, n_peers = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
requests = [Request("model", s, (0, 1)) for s in sys.argv[6].split(",")]

def compute(reqs):
    for req in reqs:
        with open(work / "calls", "a") as fh:
            fh.write(f"{req.story_key} {os.getpid()}\n")
        if mode == "block":
            while True:
                time.sleep(1)
        time.sleep(0.5)
        yield fake_result(req)

(work / f"ready-{os.getpid()}").touch()
deadline = time.time() + 20
while len(list(work.glob("ready-*"))) < n_peers and time.time() < deadline:
    time.sleep(0.01)
store = FeatureStore(root, poll_interval=0.05)
counts = store.ensure(requests, compute)
ok = all(store.has(r) for r in requests)
for r in requests:
    got = store.load(r)
    _, times, layers, _ = fake_result(r)
    ok = ok and all(np.array_equal(got.layers[k], layers[k].astype(np.float16)) for k in r.layers)
print(json.dumps({"counts": counts, "complete": bool(ok)}))
"""


def fake_result(req: Request):
    """Deterministic ``(request, times, layers, info)`` for a request: rows depend on the story."""
    n_rows = 3 + len(req.story_key)
    times = np.arange(n_rows) * 0.5 + 0.25
    layers = {}
    for layer in req.layers:
        rng = np.random.default_rng([layer, *req.story_key.encode()])
        layers[layer] = rng.normal(scale=10.0, size=(n_rows, HIDDEN))  # float64: cast on writing
    return req, times, layers, {"model": "fake", "story": req.story_key}


class Recorder:
    """A ``compute`` that records the requests of each call and yields fake results."""

    def __init__(self, fail_after: int | None = None, delay: float = 0.0):
        self.calls: list[list[Request]] = []
        self.fail_after, self.delay = fail_after, delay

    def __call__(self, requests):
        self.calls.append(list(requests))
        for i, req in enumerate(requests):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("boom")
            time.sleep(self.delay)
            yield fake_result(req)


def never(requests):
    raise AssertionError(f"compute called with {requests}")
    yield  # pragma: no cover


def locks_and_temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith((".lock", ".tmp")) or ".stale-" in p.name)


def run_worker(root: Path, work: Path, mode: str, stories: list[str], n_peers: int = 1) -> subprocess.Popen:
    script = work / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent), str(root), str(work),
                             mode, str(n_peers), ",".join(stories)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def write_lock(path: Path, host: str, pid: int, age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "created": "x", "argv0": "other"}))
    past = time.time() - age
    os.utime(path, (past, past))


# --------------------------------------------------------------------------- single process

def test_round_trip_float16_memmap_read_only(tmp_path):
    store = FeatureStore(tmp_path / "cache")
    req = Request("gpt2-abc", "story1-0123", (2, 0))
    assert req.layers == (0, 2)
    counts = store.ensure([req], Recorder())
    assert counts == {"hit": 0, "computed": 1, "waited": 0}

    folder = store.path(req)
    assert folder == tmp_path / "cache" / f"v{FORMAT_VERSION}" / "gpt2-abc" / "story1-0123"
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "layer-000.npy", "layer-002.npy",
                                                        "times.npy"]
    assert np.load(folder / "layer-002.npy", allow_pickle=False).dtype == np.float16
    assert locks_and_temps(tmp_path) == []

    _, times, layers, _ = fake_result(req)
    got = store.load(req)
    assert got.times.dtype == np.float64 and np.array_equal(got.times, times)
    assert sorted(got.layers) == [0, 2]
    for layer, arr in got.layers.items():
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and not arr.flags.writeable
        np.testing.assert_array_equal(arr, layers[layer].astype(np.float16))
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0

    info = json.loads((folder / "info.json").read_text())
    assert info == got.info
    assert info["format_version"] == FORMAT_VERSION and info["layers"] == [0, 2]
    assert (info["n_rows"], info["hidden"], info["dtype"]) == (len(times), HIDDEN, "float16")
    assert info["host"] == socket.gethostname() and info["created"]
    assert (info["model"], info["story"]) == ("fake", "story1-0123")  # the caller's info

    assert store.has(req) and not store.has(Request("gpt2-abc", "story1-0123", (0, 1)))
    with pytest.raises(KeyError, match="lacks layers \\[1\\]"):
        store.load(Request("gpt2-abc", "story1-0123", (1,)))
    with pytest.raises(CacheMiss):
        store.load(Request("gpt2-abc", "other", (0,)))


def test_second_ensure_is_all_hits(tmp_path):
    store = FeatureStore(tmp_path)
    reqs = [Request("m", f"s{i}", (0, 1)) for i in range(3)]
    assert store.ensure(reqs, Recorder())["computed"] == 3
    assert store.ensure(reqs, never) == {"hit": 3, "computed": 0, "waited": 0}
    assert FeatureStore(tmp_path).ensure(reqs[:1], never)["hit"] == 1


def test_missing_layers_computed_and_earlier_layers_kept(tmp_path):
    store = FeatureStore(tmp_path)
    first = Recorder()
    store.ensure([Request("m", "a", (0, 1)), Request("m", "b", (0, 1, 2, 3))], first)
    assert len(first.calls) == 1 and len(first.calls[0]) == 2  # one batched call
    kept = store.path(Request("m", "a", (0,))) / "layer-000.npy"
    stamp = kept.stat().st_ino, kept.stat().st_mtime_ns

    second = Recorder()
    # duplicates of an entry merge into the union of their layers
    counts = store.ensure([Request("m", "a", (0, 2)), Request("m", "a", (3, 1)),
                           Request("m", "b", (1, 3))], second)
    assert counts == {"hit": 1, "computed": 1, "waited": 0}
    assert second.calls == [[Request("m", "a", (0, 1, 2, 3))]]  # only the entry lacking layers
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp  # intact layers not rewritten
    full = Request("m", "a", (0, 1, 2, 3))
    assert store.load(full).info["layers"] == [0, 1, 2, 3]
    _, _, layers, _ = fake_result(full)
    for layer, arr in store.load(full).layers.items():
        np.testing.assert_array_equal(arr, layers[layer].astype(np.float16))


def test_compute_error_leaves_no_lock_and_no_complete_entry(tmp_path):
    store = FeatureStore(tmp_path)
    reqs = [Request("m", "a", (0,)), Request("m", "b", (0,))]
    with pytest.raises(RuntimeError, match="boom"):
        store.ensure(reqs, Recorder(fail_after=1))
    assert locks_and_temps(tmp_path) == []
    assert store.has(reqs[0])  # written before the failure
    assert not (store.path(reqs[1]) / "info.json").exists() and not store.has(reqs[1])
    retry = Recorder()
    assert store.ensure(reqs, retry) == {"hit": 1, "computed": 1, "waited": 0}
    assert retry.calls == [[reqs[1]]]


def test_compute_must_yield_every_request(tmp_path):
    store = FeatureStore(tmp_path)

    def lazy(requests):
        yield fake_result(requests[0])

    with pytest.raises(RuntimeError, match="yielded nothing for m/b"):
        store.ensure([Request("m", "a", (0,)), Request("m", "b", (0,))], lazy)
    assert locks_and_temps(tmp_path) == []


def test_caller_info_must_not_use_the_cache_keys(tmp_path):
    store = FeatureStore(tmp_path)

    def clash(requests):
        req, times, layers, _ = fake_result(requests[0])
        yield req, times, layers, {"layers": "mine"}

    with pytest.raises(ValueError, match="layers"):
        store.ensure([Request("m", "a", (0,))], clash)
    assert locks_and_temps(tmp_path) == [] and not store.has(Request("m", "a", (0,)))


def test_unwritable_cache_raises_oserror(tmp_path):
    root = tmp_path / "not-a-folder"
    root.write_text("")
    with pytest.raises(OSError):
        FeatureStore(root).ensure([Request("m", "a", (0,))], never)


@pytest.mark.parametrize("damage", ["deleted", "wrong_shape", "truncated", "bad_info"])
def test_corrupt_entry_is_recomputed(tmp_path, caplog, damage):
    store = FeatureStore(tmp_path)
    req = Request("m", "story", (0, 1, 2))
    store.ensure([req], Recorder())
    layer, intact = store.path(req) / "layer-001.npy", store.path(req) / "layer-002.npy"
    stamp = intact.stat().st_ino
    if damage == "deleted":
        layer.unlink()
    elif damage == "wrong_shape":
        np.save(layer, np.zeros((2, HIDDEN), np.float16))
    elif damage == "truncated":
        layer.write_bytes(layer.read_bytes()[:-10])
    else:
        (store.path(req) / "info.json").write_text("{not json")

    caplog.set_level(logging.WARNING, logger="bidsenc.features.cache")
    assert not store.has(req)
    with pytest.raises((CacheMiss, CorruptEntry)):
        store.load(req)
    redo = Recorder()
    assert store.ensure([req], redo)["computed"] == 1
    assert redo.calls == [[req]]
    assert (intact.stat().st_ino == stamp) is (damage != "bad_info")  # intact layers kept
    assert "corrupt" in caplog.text or "unreadable" in caplog.text
    assert store.has(req)
    np.testing.assert_array_equal(store.load(req).layers[1], fake_result(req)[2][1].astype(np.float16))


class _Trap:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_never_unpickles(tmp_path, monkeypatch):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    store = FeatureStore(tmp_path / "cache")
    req = Request("m", "s", (0,))
    store.ensure([req], Recorder())
    sentinel = tmp_path / "unpickled"
    np.save(store.path(req) / "layer-000.npy", np.array([_Trap(sentinel)], dtype=object), allow_pickle=True)

    with pytest.raises(ValueError):
        store.load(req)
    assert not store.has(req)
    assert not sentinel.exists()
    assert store.ensure([req], Recorder())["computed"] == 1
    store.load(req)
    assert calls and not any(calls)
    assert not sentinel.exists()


def test_request_keys_must_be_folder_safe():
    for bad in ["", "a/b", "..", ".hidden", "-x", "x.lock", "a b"]:
        with pytest.raises(ValueError):
            Request(bad, "s", (0,))
    with pytest.raises(ValueError):
        Request("m", "s", ())
    with pytest.raises(ValueError):
        Request("m", "s", (-1,))


# --------------------------------------------------------------------------- locks

def test_fresh_foreign_lock_waited_on_then_stale_one_taken_over(tmp_path):
    store = FeatureStore(tmp_path, stale_after=30, poll_interval=0.05)
    req = Request("m", "s", (0,))
    lock = tmp_path / "v1" / "m" / "s.lock"
    write_lock(lock, "some-other-node", 1)

    rec, result = Recorder(), {}
    thread = threading.Thread(target=lambda: result.update(store.ensure([req], rec)), daemon=True)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and rec.calls == [] and not store.has(req)
    lock.unlink()  # the other node gave up without writing the entry
    thread.join(10)
    assert not thread.is_alive() and result == {"hit": 0, "computed": 1, "waited": 0}
    assert store.has(req) and locks_and_temps(tmp_path) == []

    # a lock from another host whose heartbeat stopped long ago is taken over at once
    req2 = Request("m", "t", (0,))
    write_lock(tmp_path / "v1" / "m" / "t.lock", "some-other-node", 1, age=120)
    t0 = time.monotonic()
    assert store.ensure([req2], Recorder())["computed"] == 1
    assert time.monotonic() - t0 < 1.0
    assert locks_and_temps(tmp_path) == []


def test_empty_lock_is_stale_only_after_grace(tmp_path):
    store = FeatureStore(tmp_path, poll_interval=0.05)
    lock = tmp_path / "v1" / "m" / "s.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    assert not store._lock_is_stale(lock)
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert store._lock_is_stale(lock)
    assert store.ensure([Request("m", "s", (0,))], Recorder())["computed"] == 1


def test_heartbeat_keeps_a_slow_holder_lock_fresh(tmp_path):
    # stale_after is shorter than the computation: only the heartbeat keeps the lock from going stale
    holder = FeatureStore(tmp_path, stale_after=0.5, heartbeat=0.1, poll_interval=0.05)
    waiter = FeatureStore(tmp_path, stale_after=0.5, heartbeat=0.1, poll_interval=0.05)
    req = Request("m", "s", (0,))
    slow, result = Recorder(delay=1.2), {}
    thread = threading.Thread(target=lambda: result.update(holder.ensure([req], slow)), daemon=True)
    thread.start()
    deadline = time.time() + 5
    while not slow.calls and time.time() < deadline:
        time.sleep(0.01)
    second = Recorder()
    assert waiter.ensure([req], second) == {"hit": 0, "computed": 0, "waited": 1}
    thread.join(10)
    assert second.calls == [] and result["computed"] == 1


def test_killed_process_lock_is_taken_over(tmp_path):
    root, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    proc = run_worker(root, work, "block", ["s1", "s2"])
    try:
        deadline = time.time() + 15
        while not (work / "calls").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.02)
        lock = root / "v1" / "model" / "s1.lock"
        assert json.loads(lock.read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert lock.exists()  # SIGKILL leaves the locks behind

    rec = Recorder()
    counts = FeatureStore(root, poll_interval=0.05).ensure([Request("model", "s1", (0, 1))], rec)
    assert counts == {"hit": 0, "computed": 1, "waited": 0}
    assert rec.calls == [[Request("model", "s1", (0, 1))]]
    assert not lock.exists()


def test_two_processes_compute_each_entry_once(tmp_path):
    root, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    stories = ["s1", "s2", "s3"]
    procs = [run_worker(root, work, "share", stories, n_peers=2),
             run_worker(root, work, "share", stories[::-1], n_peers=2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))

    lines = (work / "calls").read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == stories  # each computed exactly once
    assert all(o["complete"] for o in outs)
    total = {k: sum(o["counts"][k] for o in outs) for k in ("hit", "computed", "waited")}
    assert total["computed"] == 3 and total["hit"] + total["waited"] == 3 and total["waited"] >= 1
    assert locks_and_temps(root) == []
