"""The vectors of `clipsearch bench search`: random or the demo model's, exact ground truth,
recall, latency percentiles and the memory of a process tree."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_K = 10
GROUND_TRUTH_CHUNK = 65_536
# --source demo: rows are the demo model's image vectors of DEMO_SCENES scenes, each
# perturbed by Gaussian noise of this norm (cosine to its scene ~0.97) in the model's own
# space, so the data keeps the model's clusters; queries are captions of other scenes.
DEMO_SCENES = 2_000
DEMO_NOISE_NORM = 0.25


def normalized(vectors: np.ndarray) -> np.ndarray:
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def random_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors uniform on the sphere, float32, generated in blocks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, GROUND_TRUTH_CHUNK):
        block = out[start : start + GROUND_TRUTH_CHUNK]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        normalized(block)
    return out


def perturbed_rows(base: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Row i: base[i % len(base)] plus Gaussian noise of norm ~DEMO_NOISE_NORM, normalized."""
    rng = np.random.default_rng(seed)
    rows, dim = len(base), base.shape[1]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, GROUND_TRUTH_CHUNK):
        block = out[start : start + GROUND_TRUTH_CHUNK]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= DEMO_NOISE_NORM / np.sqrt(dim)
        block += base[np.arange(start, start + len(block)) % rows]
        normalized(block)
    return out


def embed(vectors: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """`vectors` (n × d, d ≤ dim) mapped into `dim` dimensions by a fixed random matrix with
    orthonormal columns: every inner product, hence every ranking, is kept exactly."""
    have = vectors.shape[1]
    if have == dim:
        return vectors
    if have > dim:
        raise ValueError(f"cannot embed {have}-d vectors in {dim} dimensions")
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, have)))
    out = np.empty((len(vectors), dim), dtype=np.float32)
    for start in range(0, len(vectors), GROUND_TRUTH_CHUNK):
        chunk = vectors[start : start + GROUND_TRUTH_CHUNK]
        out[start : start + len(chunk)] = chunk @ basis.T.astype(np.float32)
    return out


def exact_top_k(rows: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The row numbers of each query's k highest inner products, best first (exact search by
    matrix products over chunks of rows)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(rows), GROUND_TRUTH_CHUNK):
        scores = queries @ rows[start : start + GROUND_TRUTH_CHUNK].T
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_ids = np.take_along_axis(best_ids, keep, 1)
    return best_ids


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top k that the index returned."""
    k = int(truth.shape[1])
    hits = 0
    for ids, row in zip(found, truth, strict=True):
        hits += len(set(ids[:k]) & {int(i) for i in row})
    return hits / (k * len(truth))


def row_id(row: int) -> str:
    return f"v{row:08d}"


def row_of(item_id: str) -> int:
    return int(item_id[1:])


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = np.asarray(seconds) * 1000
        return cls(
            p50_ms=round(float(np.percentile(ms, 50)), 3),
            p99_ms=round(float(np.percentile(ms, 99)), 3),
            mean_ms=round(float(ms.mean()), 3),
        )


def _proc_status(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone meanwhile
        return fields
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def tree_pids(root: int) -> list[int]:
    parents = _parents()
    pids, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        pids += frontier
    return pids


def tree_memory_mib(root: int) -> dict[str, float]:
    """RSS now and the sum of each process's peak RSS, over `root` and its descendants."""
    status = [_proc_status(pid) for pid in tree_pids(root)]
    return {
        "rss_mib": round(sum(s.get("VmRSS", 0) for s in status) / 1024, 1),
        "peak_rss_mib": round(sum(s.get("VmHWM", 0) for s in status) / 1024, 1),
    }


def child_matching(predicate: Callable[[str], bool]) -> int | None:
    """A child of this process whose command line satisfies `predicate`."""
    me = os.getpid()
    for pid, parent in _parents().items():
        if parent != me:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if predicate(command):
            return pid
    return None
