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
- ``multimatch``: MultiMatch (Jarodzka et al., ETRA 2010; Dewhurst et al., BRM 2012) exactly as the authors'
  ``evaluation/MM`` computes it (their copy of ``multimatch_gaze`` with simplification off): saccades are the vectors
  between consecutive fixations; the alignment is the cheapest path from the first to the last saccade pair through
  the matrix of saccade-vector differences, moving right, down or diagonally, found by their Dijkstra; each
  similarity is 1 - median difference along the path / normaliser (vector: twice the screen diagonal, direction:
  pi, length and position: the screen diagonal). Duration is left out (object scanpaths have none). Where their code
  is odd, we follow it, because published tables were computed with it:

  * a scanpath of fewer than 3 fixations is padded with fixations at pixel (1, 1) (their ``np.ones`` array), not
    with anything derived from the scanpath;
  * equal-cost alignments are broken by their Dijkstra's order: the unvisited pair with the smallest distance is
    settled next, the lowest index (row-major over saccade pairs) first, and a pair's predecessor only changes on a
    strictly shorter distance; scipy's Dijkstra breaks these ties differently (about 1 pair of scanpaths in 10);
  * coordinates are float32 (their fixation arrays), and the vector and length medians are taken in float32 (the
    direction is float64; their code gives it in float32 under numpy 2: a difference of at most 2e-7);
  * the first scanpath is the human one, the second the prediction (the order decides ties).

  Object indices become pixels with ``object_centres`` (row-major grid cells, as ``MM/calculate_mm.py``).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence

import numpy as np

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


def _saccades(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) fixations -> the (n-1, 2) saccade start points and (n-1, 2) saccade vectors, in float32; a scanpath of
    fewer than 3 fixations is padded with fixations at (1, 1), as the authors' ``calculate_mm.multimatch``."""
    fix = np.ones((max(3, len(points)), 2), dtype=np.float32)
    fix[: len(points)] = points
    return fix[:-1], fix[1:] - fix[:-1]


def _align(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j) saccade pairs on the cheapest path through M from (0, 0) to the last cell, moving right, down or
    diagonally, the cost of a step being M at the cell it enters (Dewhurst et al. 2012, "Alignment"). Ties go as in
    the authors' Dijkstra: settle the smallest (distance, row-major index) first; improve only on a strictly
    shorter distance."""
    n, m = M.shape
    dist = np.full(n * m, np.inf)
    pred = np.full(n * m, -1)
    done = np.zeros(n * m, dtype=bool)
    dist[0] = 0.0
    heap = [(0.0, 0)]
    while heap:
        d, node = heapq.heappop(heap)
        if done[node]:
            continue
        done[node] = True
        i, j = divmod(node, m)
        for di, dj in ((0, 1), (1, 0), (1, 1)):
            if i + di < n and j + dj < m and d + M[i + di, j + dj] < dist[(i + di) * m + j + dj]:
                nxt = (i + di) * m + j + dj
                dist[nxt], pred[nxt] = d + M[i + di, j + dj], node
                heapq.heappush(heap, (dist[nxt], nxt))
    path = [n * m - 1]
    while path[-1] != 0:
        path.append(int(pred[path[-1]]))
    return np.divmod(np.array(path[::-1]), m)


def multimatch(human: np.ndarray, pred: np.ndarray, screen: tuple[float, float]) -> dict[str, float]:
    """MultiMatch vector, direction, length and position similarities (each in [0, 1], 1 = identical) of two
    scanpaths given as (n, 2) pixel coordinates, on a ``screen`` = (width, height) in pixels. The order of the
    scanpaths decides equal-cost alignments: the human one first, as the authors' evaluation."""
    paths = []
    for name, p in (("human", human), ("pred", pred)):
        p = np.asarray(p)
        if p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
            raise ValueError(f"multimatch: `{name}` must be (n >= 1, 2) pixel coordinates, got shape {p.shape}")
        paths.append(_saccades(p))
    (start_a, vec_a), (start_b, vec_b) = paths
    # saccade-vector differences, in float64 as their np.ones-based differences
    M = np.linalg.norm(vec_a[:, None].astype(np.float64) - vec_b[None].astype(np.float64), axis=-1)
    i, j = _align(M)
    # float32 angles moved into [0, 2 pi) as theirs (pi + (pi + theta)), their difference folded into [0, pi]
    theta_a, theta_b = (np.arctan2(v[:, 1], v[:, 0]).astype(np.float64) for v in (vec_a[i], vec_b[j]))
    theta_a, theta_b = (np.where(t < 0, math.pi + (math.pi + t), t) for t in (theta_a, theta_b))
    angle = np.abs(theta_a - theta_b)
    angle = np.where(angle > math.pi, 2 * math.pi - angle, angle)
    rho_a, rho_b = (np.sqrt((v ** 2).sum(1)) for v in (vec_a[i], vec_b[j]))  # float32
    diag = math.sqrt(screen[0] ** 2 + screen[1] ** 2)
    return {
        "vector": float(1 - np.median(np.sqrt(((vec_a[i] - vec_b[j]) ** 2).sum(1))) / (2 * diag)),
        "direction": float(1 - np.median(angle) / math.pi),
        "length": float(1 - np.median(np.abs(rho_a - rho_b)) / diag),
        "position": float(1 - np.median(np.sqrt(((start_a[i] - start_b[j]) ** 2).sum(1).astype(np.float64))) / diag),
    }
