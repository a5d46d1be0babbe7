"""Visual-search scanpaths for OAT (``attnzoo.heads.oat``): the authors' data in a pickle-free layout, and a
procedurally generated grid search task.

The authors (HKUST-NISL/oat_eccv24, ``src/preprocess``, ``src/dataBuilders/data_builder.py``) pickle a list of
records ``{package_target: [t], package_seq: [...], X, Y, question_img_feature, id, tgt_id, layout_id, sub_id}``
(1-based object indices; ``question_img_feature`` the row-major object crops, float in [0, 1], H x W x 3) and write
the split order (a shuffled list of record indices, one a line, ``split.py``). We never unpickle: the same records
live in a folder, made once from the authors' list by :func:`from_authors_records` and :func:`write_oat_folder`
(the README shows the conversion, where the user unpickles the authors' file they trust)::

    DATA/records.json   {"records": [{id, layout_id, tgt_id, package_target, package_seq, (sub_id, X, Y)}, ...],
                         "grids": {ID: {rows, cols, cell: [w, h], top, screen: [w, h]}}}   ("grids" optional)
    DATA/crops.npz      layout_id -> (N, H, W, 3) crops (float in [0, 1] or uint8), np.load(allow_pickle=False)
    DATA/splitlist.txt  the authors' index file

:data:`GRIDS` holds the authors' grids (wine Q1 2 x 11, yogurt Q3 3 x 9, Amazon 6 x 14) and their pixel geometry
from ``evaluation/MM/calculate_mm.py``; "grids" in the json adds others. :func:`split_records` is ``randsplit``
(per task, in index-file order: val = [0.8 n, 0.9 n), test = [0.9 n, n), train = the rest) and ``randsplit_comb``
(leave one (layout, target) combination out as the test set; train keeps [0.9 n, n)).

:func:`make_grid_search` generates the synthetic task the tests train on: grids of coloured shapes, a target, and
scanpaths from a known policy: fixate the objects of the target's colour in raster order up to the target, then
stop, with noise (a random extra fixation, a refixation).
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..common import InputError

__all__ = ["GRIDS", "Grid", "GridSearchSpec", "OATScanpaths", "collate_scanpaths", "from_authors_records",
           "load_oat_folder", "make_grid_search", "read_index_file", "split_records", "write_oat_folder"]

RECORDS, CROPS = "records.json", "crops.npz"


@dataclass(frozen=True)
class Grid:
    """A search display: ``rows`` x ``cols`` objects in cells of ``cell`` = (width, height) pixels from ``top``
    pixels down a ``screen`` = (width, height)."""

    rows: int
    cols: int
    cell: tuple[float, float]
    top: float = 0.0
    screen: tuple[float, float] | None = None

    @property
    def size(self) -> tuple[float, float]:
        return self.screen or (self.cols * self.cell[0], self.top + self.rows * self.cell[1])


# the authors' grids (run.py) and pixel geometry (MM/calculate_mm.py: cell [width, height], title bar height)
GRIDS: dict[str, Grid] = {
    "Q1": Grid(2, 11, (152, 449), 152, (1680, 1050)),  # wine
    "Q3": Grid(3, 9, (186, 305), 135, (1680, 1050)),  # yogurt
    "amazon": Grid(6, 14, (183, 267), 0),  # book covers; the authors take each image's size from its json
}


def _grid(name: str, spec: object, where: str) -> Grid:
    try:
        g = Grid(int(spec["rows"]), int(spec["cols"]), tuple(float(v) for v in spec["cell"]),
                 float(spec.get("top", 0)), tuple(float(v) for v in spec["screen"]) if "screen" in spec else None)
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(f"{where}: grids[{name!r}] must be {{rows, cols, cell: [w, h], top, screen: [w, h]}}: "
                         f"{e!r}") from None
    if g.rows < 1 or g.cols < 1 or len(g.cell) != 2:
        raise InputError(f"{where}: grids[{name!r}] needs rows, cols >= 1 and cell [w, h], got {spec}")
    return g


class OATScanpaths(Dataset):
    """Samples ``{"crops": (N, 3, H, W) float in [0, 1], "target": (), "fixations": (L,)}`` (0-based indices)
    from records with 1-based ``package_target``/``package_seq`` and per-layout crops (N, H, W, 3), float in [0, 1]
    or uint8, optionally resized to ``crop_size`` = (H, W). The crops are converted once, here."""

    def __init__(self, records: Sequence[dict], crops: dict[str, np.ndarray], crop_size: tuple[int, int] | None = None):
        self.records = list(records)
        self.layouts = {name: self._tensor(crops[name], crop_size) for name in {r["layout_id"] for r in self.records}}

    @staticmethod
    def _tensor(x: np.ndarray, crop_size: tuple[int, int] | None) -> torch.Tensor:
        t = torch.from_numpy(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)).permute(0, 3, 1, 2)
        if crop_size is not None and tuple(t.shape[-2:]) != tuple(crop_size):
            t = F.interpolate(t, size=tuple(crop_size), mode="bilinear", antialias=True, align_corners=False)
        return t.contiguous()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.records[index]
        return {"crops": self.layouts[r["layout_id"]], "target": torch.tensor(r["package_target"][0] - 1),
                "fixations": torch.tensor(r["package_seq"], dtype=torch.long) - 1}


def collate_scanpaths(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack crops and targets; right-pad the fixations with -1."""
    fix = [b["fixations"] for b in batch]
    return {"crops": torch.stack([b["crops"] for b in batch]), "target": torch.stack([b["target"] for b in batch]),
            "fixations": torch.nn.utils.rnn.pad_sequence(fix, batch_first=True, padding_value=-1)}


# ------------------------------------------------------------------------------------------------ the folder


def read_index_file(path: Path, count: int) -> list[int]:
    """The authors' split order: one record index a line, each of 0..count-1 at most once."""
    if not path.is_file():
        raise InputError(f"index file {path} does not exist")
    lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    try:
        order = [int(s) for s in lines]
    except ValueError:
        raise InputError(f"index file {path}: every line must be a record index (an integer)") from None
    bad = [i for i in order if not 0 <= i < count]
    if bad or len(set(order)) != len(order):
        raise InputError(f"index file {path}: expected distinct indices in [0, {count}) (records.json has {count} "
                         f"records), got {'out-of-range ' + str(bad[:5]) if bad else 'duplicates'}")
    return order


def _check_record(r: object, i: int, where: str, grids: dict[str, Grid], crops: dict[str, np.ndarray]) -> None:
    def fail(key: str, expected: str) -> None:
        raise InputError(f"{where}: records[{i}][{key!r}]: expected {expected}, got "
                         f"{r.get(key, '<missing>') if isinstance(r, dict) else r!r}")

    if not isinstance(r, dict):
        fail("", "an object")
    if r.get("id") not in grids:
        fail("id", f"one of the grids {sorted(grids)}")
    n = grids[r["id"]].rows * grids[r["id"]].cols
    if r.get("layout_id") not in crops:
        fail("layout_id", f"a layout of {CROPS}")
    t, s = r.get("package_target"), r.get("package_seq")
    if not (isinstance(t, list) and len(t) >= 1 and isinstance(t[0], int) and 1 <= t[0] <= n):
        fail("package_target", f"[object index in 1..{n}]")
    if not (isinstance(s, list) and s and all(isinstance(v, int) and 1 <= v <= n for v in s)):
        fail("package_seq", f"a non-empty list of object indices in 1..{n}")
    shape = crops[r["layout_id"]].shape
    if len(shape) != 4 or shape[0] != n or shape[3] != 3:
        raise InputError(f"{where}: {CROPS}[{r['layout_id']!r}] has shape {shape}; records[{i}] (id {r['id']!r}) "
                         f"needs ({n}, H, W, 3)")


def load_oat_folder(root: str | os.PathLike) -> tuple[list[dict], dict[str, np.ndarray], dict[str, Grid]]:
    """The checked records, the crops (layout_id -> array, read without pickle) and the grids of an OAT folder."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    path, crops_path = root / RECORDS, root / CROPS
    for p in (path, crops_path):
        if not p.is_file():
            raise InputError(f"data folder {root} has no {p.name} (expected {RECORDS}, {CROPS} and an index file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid json: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) or not data["records"]:
        raise InputError(f"{path}: expected an object with a non-empty 'records' list")
    grids = dict(GRIDS)
    grid_specs = data.get("grids", {})
    if not isinstance(grid_specs, dict):
        raise InputError(f"{path}: 'grids' must be an object mapping a task id to its grid")
    grids.update({name: _grid(name, spec, str(path)) for name, spec in grid_specs.items()})
    try:
        with np.load(crops_path, allow_pickle=False) as npz:
            crops = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{crops_path} is not a readable .npz of arrays: {e}") from None
    for i, r in enumerate(data["records"]):
        _check_record(r, i, str(path), grids, crops)
    return data["records"], crops, grids


def split_records(records: Sequence[dict], order: Sequence[int], task: str,
                  leave_out: tuple[str, str] | None = None) -> dict[str, list[dict]]:
    """train/val/test records of ``task`` (a record ``id``), as the authors' ``randsplit`` / ``randsplit_comb``."""
    ordered = [records[i] for i in order]
    if leave_out is None:
        test_comb = []
        pool = [r for r in ordered if r["id"] == task]
    else:
        layout, target = leave_out
        held = [r["layout_id"] == layout and str(r.get("tgt_id")) == target for r in ordered]
        test_comb = [r for r, h in zip(ordered, held, strict=True) if h]
        if not test_comb:
            raise InputError(f"--oat-leave-out {layout}:{target}: no record has layout_id {layout!r} and tgt_id "
                             f"{target!r}")
        pool = [r for r, h in zip(ordered, held, strict=True) if not h and r["id"] == task]
    if not pool:
        raise InputError(f"no record of task {task!r} (the records' ids: {sorted({r['id'] for r in records})})")
    n = len(pool)
    a, b = int(n * 0.8), int(n * 0.9)
    if leave_out is None:
        return {"train": pool[:a], "val": pool[a:b], "test": pool[b:]}
    return {"train": pool[:a] + pool[b:], "val": pool[a:b], "test": test_comb}


def write_oat_folder(root: str | os.PathLike, records: Sequence[dict], crops: dict[str, np.ndarray],
                     grids: dict[str, Grid] | None = None, order: Sequence[int] | None = None,
                     index_file: str = "splitlist.txt") -> Path:
    """Write records, crops and an index file (``order``, default the identity) in the folder layout above."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    grid_json = {k: {"rows": g.rows, "cols": g.cols, "cell": list(g.cell), "top": g.top,
                     **({"screen": list(g.screen)} if g.screen else {})} for k, g in (grids or {}).items()}
    (root / RECORDS).write_text(json.dumps({"records": list(records), "grids": grid_json}))
    np.savez(root / CROPS, **crops)
    order = range(len(records)) if order is None else order
    (root / index_file).write_text("\n".join(str(i) for i in order))
    return root


def from_authors_records(records: Sequence[dict]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The authors' records (the list their preprocessing pickles) as this folder's records and crops: each
    record's ``question_img_feature`` becomes the crops of its ``layout_id`` (one array per layout; records of
    one layout must carry the same crops), numpy scalars and arrays become json numbers and lists, and
    ``layout_id`` a string (an ``.npz`` key)."""

    def plain(v):
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    out, crops = [], {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "question_img_feature" not in r or "layout_id" not in r:
            raise InputError(f"authors' records[{i}]: expected a dict with 'layout_id' and 'question_img_feature' "
                             f"(got {type(r).__name__}{' with keys ' + str(sorted(r)) if isinstance(r, dict) else ''})")
        layout = str(plain(r["layout_id"]))
        image = np.asarray(r["question_img_feature"])
        if layout in crops and not np.array_equal(crops[layout], image):
            raise InputError(f"authors' records[{i}]: layout {layout!r} has other crops than an earlier record of it")
        crops[layout] = image
        out.append({k: plain(v) for k, v in r.items() if k != "question_img_feature"} | {"layout_id": layout})
    return out, crops


# ------------------------------------------------------------------------------------------ synthetic grid search


@dataclass(frozen=True)
class GridSearchSpec:
    """A synthetic visual search: ``layouts`` random grids, ``targets_per_layout`` searches on each."""

    layouts: int = 40
    targets_per_layout: int = 4
    rows: int = 3
    cols: int = 4
    crop: int = 32
    colours: int = 3
    noise: float = 0.1  # per fixation: the chance of a random extra fixation before it, and of a refixation
    seed: int = 0

    @property
    def grid(self) -> Grid:
        return Grid(self.rows, self.cols, (float(self.crop), float(self.crop)))


_PALETTE = ((220, 40, 40), (40, 170, 40), (40, 70, 220), (230, 200, 30), (160, 50, 200), (30, 190, 200))
_SHAPES = ("circle", "square", "triangle", "diamond")


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(np.clip(235 + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    c, r = size / 2, size * rng.uniform(0.3, 0.42)
    if shape == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=colour)
    else:
        sides, rotation = {"square": (4, 45), "triangle": (3, 0), "diamond": (4, 0)}[shape]
        draw.regular_polygon((c, c, r), sides, rotation=rotation, fill=colour)
    return np.asarray(img)


def search_policy(colours: Sequence[int], target: int) -> list[int]:
    """The noiseless scanpath: objects of the target's colour in raster order, up to and including the target."""
    return [k for k in range(target + 1) if colours[k] == colours[target]]


def make_grid_search(spec: GridSearchSpec = GridSearchSpec()) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Records (the authors' fields, 1-based) and crops (layout_id -> (N, crop, crop, 3) uint8) of the synthetic
    task; every record has ``id`` "grid" (its grid is ``spec.grid``). A function of ``spec`` only."""
    if spec.colours > len(_PALETTE):
        raise ValueError(f"GridSearchSpec.colours: at most {len(_PALETTE)}, got {spec.colours}")
    rng = np.random.default_rng(spec.seed)
    n = spec.rows * spec.cols
    records, crops = [], {}
    for layout in range(spec.layouts):
        name = f"L{layout:04d}"
        colours = rng.integers(spec.colours, size=n)
        shapes = rng.integers(len(_SHAPES), size=n)
        crops[name] = np.stack([_draw(_SHAPES[s], _PALETTE[c], spec.crop, rng)
                                for c, s in zip(colours, shapes, strict=True)])
        for target in rng.choice(n, size=min(spec.targets_per_layout, n), replace=False):
            seq = []
            for k in search_policy(colours, int(target)):
                if rng.random() < spec.noise:
                    seq.append(int(rng.integers(n)))
                seq.append(k)
                if rng.random() < spec.noise:
                    seq.append(k)
            records.append({"id": "grid", "layout_id": name, "tgt_id": f"T{target}", "sub_id": "policy",
                            "package_target": [int(target) + 1], "package_seq": [k + 1 for k in seq]})
    return records, crops
