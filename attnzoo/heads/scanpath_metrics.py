"""Scanpath metrics of OAT (Fang et al., "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction",
ECCV 2024, arXiv 2407.13335): sequence score, SIM, the behavioural statistics and their mean relative error
("delta"), and MultiMatch.

A scanpath here is a sequence of object indices (the fixated objects, in order). Definitions follow the authors'
code (HKUST-NISL/oat_eccv24):

- ``sequence_score``: Needleman-Wunsch alignment with 0/1 similarity and gap 0, normalised by the longer length
  (``evaluation/saliency_metric.nw_matching``).
- ``sim``: histogram intersection ``sum_k min(p_k, q_k)`` (``SIM``); ``scanpath_sim`` averages it over the steps of a
  teacher-forced prediction against the one-hot human fixation (``saliency_map_metric``), which is the mean
  probability given to the fixated object.
- ``behaviour``: per scanpath, whether the last fixation is the target, the length, and the proportions of search,
  refixation and revisit fixations, counted over runs of identical consecutive fixations exactly as
  ``evaluation/evaluation_model.behavior`` does (a run's first fixation is a revisit if that object was fixated in an
  earlier run, else a search; its other fixations are refixations). ``behaviour_delta`` is the mean over the five
  statistics of ``|pred - human| / human`` of their dataset means (``Evaluation.evaluation``). Our reading: a
  statistic whose human mean is 0 (the authors' code would divide by zero) is left out of the mean.
- ``multimatch``: MultiMatch (Jarodzka et al., ETRA 2010; Dewhurst et al., BRM 2012) as ``multimatch_gaze``
  computes it with simplification off (the authors' default): saccades are the vectors between consecutive
  fixations; the alignment is the shortest path (Dijkstra) from the first to the last saccade pair through the
  matrix of saccade-vector differences, moving right, down or diagonally; each similarity is 1 - median difference
  along the path / normaliser (vector: twice the screen diagonal, direction: pi, length and position: the screen
  diagonal). Duration is left out (object scanpaths have none). A scanpath needs 3 fixations: the authors pad a
  shorter one with fixations at pixel (1, 1); our reading repeats its last fixation instead (zero-length saccades).
  Object indices become pixels with ``object_centres`` (row-major grid cells, as ``MM/calculate_mm.py``).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

__all__ = ["BEHAVIOUR_KEYS", "MULTIMATCH_KEYS", "behaviour", "behaviour_delta", "multimatch", "object_centres",
           "scanpath_sim", "sequence_score", "sim"]

BEHAVIOUR_KEYS = ("target_found", "length", "search", "refixation", "revisit")
MULTIMATCH_KEYS = ("vector", "direction", "length", "position")


def _ints(seq: Sequence[int] | np.ndarray, name: str) -> list[int]:
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of object indices, got shape {arr.shape}")
    return [int(v) for v in arr]


def sequence_score(pred: Sequence[int], human: Sequence[int]) -> float:
    """Needleman-Wunsch score of two object sequences: matches (similarity 1) of an order-preserving alignment, gaps
    free, divided by the longer length. 1 when equal, 0 when they share no object."""
    a, b = _ints(pred, "pred"), _ints(human, "human")
    if not a or not b:
        raise ValueError(f"sequence_score: empty scanpath (lengths {len(a)} and {len(b)})")
    # F[i, j]: best score aligning a[:i] with b[:j]; with gap 0 this is the longest common subsequence
    F = np.zeros((len(a) + 1, len(b) + 1))
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        F[i, j] = max(F[i - 1, j - 1] + (a[i - 1] == b[j - 1]), F[i - 1, j], F[i, j - 1])
    return float(F[-1, -1] / max(len(a), len(b)))


def sim(p: np.ndarray, q: np.ndarray) -> float:
    """Histogram intersection of two distributions of the same shape (1 when identical)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"sim: shapes {p.shape} and {q.shape} differ")
    return float(np.minimum(p, q).sum())


def scanpath_sim(probs: np.ndarray, human: Sequence[int]) -> float:
    """Mean over steps t of SIM(probs[t], one-hot(human[t])); ``probs`` is (T, K), one distribution per step."""
    probs = np.asarray(probs, dtype=np.float64)
    h = _ints(human, "human")
    if probs.ndim != 2 or len(probs) != len(h) or not h:
        raise ValueError(f"scanpath_sim: probs must be (T, K) with T = len(human) = {len(h)} > 0, got {probs.shape}")
    onehot = np.eye(probs.shape[1])[h]
    return float(np.mean([sim(p, o) for p, o in zip(probs, onehot, strict=True)]))


def behaviour(seq: Sequence[int], target: int) -> dict[str, float]:
    """The five behavioural statistics of one scanpath (see the module docstring)."""
    s = _ints(seq, "seq")
    if not s:
        raise ValueError("behaviour: empty scanpath")
    search = refix = revisit = 0
    seen: set[int] = set()
    for obj, run in itertools.groupby(s):
        n = len(list(run))
        if obj in seen:
            revisit += 1
        else:
            search += 1
        refix += n - 1
        seen.add(obj)
    n = len(s)
    return {"target_found": float(s[-1] == int(target)), "length": float(n), "search": search / n,
            "refixation": refix / n, "revisit": revisit / n}


def behaviour_delta(pred: Sequence[dict[str, float]], human: Sequence[dict[str, float]]) -> float:
    """Mean relative absolute error of the dataset means of the behavioural statistics (the paper's "delta")."""
    if not pred or not human:
        raise ValueError("behaviour_delta: no scanpaths")
    errors = []
    for key in BEHAVIOUR_KEYS:
        p, h = np.mean([d[key] for d in pred]), np.mean([d[key] for d in human])
        if h != 0:
            errors.append(abs(p - h) / h)
    return float(np.mean(errors)) if errors else 0.0


def object_centres(rows: int, cols: int, cell: tuple[float, float], top: float = 0.0) -> np.ndarray:
    """Pixel centres (x, y) of the objects of a row-major ``rows`` x ``cols`` grid of ``cell`` = (width, height)
    cells starting ``top`` pixels down the screen: an array (rows * cols, 2) indexed by object."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c * cell[0] + cell[0] / 2, top + r * cell[1] + cell[1] / 2], axis=1).astype(np.float64)


def _saccades(points: np.ndarray) -> np.ndarray:
    """(n, 2) fixations -> (n-1, 4) saccades: start x, start y, dx, dy; padded to 3 fixations (see module doc)."""
    if len(points) < 3:
        points = np.concatenate([points, np.repeat(points[-1:], 3 - len(points), axis=0)])
    return np.concatenate([points[:-1], np.diff(points, axis=0)], axis=1)


def _align(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j) saccade pairs on the cheapest path through M from (0, 0) to the last cell, moving right, down or
    diagonally, the cost of a step being M at the cell it enters (Dewhurst et al. 2012, section "Alignment")."""
    n, m = M.shape
    node = np.arange(n * m).reshape(n, m)
    src, dst = [], []
    for di, dj in ((0, 1), (1, 0), (1, 1)):
        src.append(node[: n - di, : m - dj].ravel())
        dst.append(node[di:, dj:].ravel())
    src, dst = np.concatenate(src), np.concatenate(dst)
    # explicit zero weights are edges for csgraph (identical saccades cost nothing)
    graph = csr_matrix((M.ravel()[dst], (src, dst)), shape=(n * m, n * m))
    _, pred = dijkstra(graph, indices=0, return_predecessors=True)
    path = [n * m - 1]
    while path[-1] != 0:
        path.append(int(pred[path[-1]]))
    return np.divmod(np.array(path[::-1]), m)


def multimatch(a: np.ndarray, b: np.ndarray, screen: tuple[float, float]) -> dict[str, float]:
    """MultiMatch vector, direction, length and position similarities (each in [0, 1], 1 = identical) of two
    scanpaths given as (n, 2) pixel coordinates, on a ``screen`` = (width, height) in pixels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, p in (("a", a), ("b", b)):
        if p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
            raise ValueError(f"multimatch: {name} must be (n >= 1, 2) pixel coordinates, got shape {p.shape}")
    sa, sb = _saccades(a), _saccades(b)
    M = np.linalg.norm(sa[:, None, 2:] - sb[None, :, 2:], axis=-1)  # saccade-vector differences
    i, j = _align(M)
    pa, pb = sa[i], sb[j]
    theta_a = np.arctan2(pa[:, 3], pa[:, 2])
    theta_b = np.arctan2(pb[:, 3], pb[:, 2])
    angle = np.abs(theta_a - theta_b) % (2 * math.pi)
    angle = np.minimum(angle, 2 * math.pi - angle)
    diag = math.hypot(*screen)
    return {
        "vector": float(1 - np.median(M[i, j]) / (2 * diag)),
        "direction": float(1 - np.median(angle) / math.pi),
        "length": float(1 - np.median(np.abs(np.hypot(pa[:, 2], pa[:, 3]) - np.hypot(pb[:, 2], pb[:, 3]))) / diag),
        "position": float(1 - np.median(np.linalg.norm(pa[:, :2] - pb[:, :2], axis=1)) / diag),
    }
