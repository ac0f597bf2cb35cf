"""An SQLite database of a layer's mesh or skeleton spatial index (the `.spatial` files),
so "which labels lie in this box" is one query instead of reading every index file
the box touches.

The database keeps CloudVolume's own tables (`index_files`, `file_lookup`: which
index file lists which label), so CloudVolume can use it as its `spatial_index_db`,
and adds what CloudVolume's `to_sql` leaves out: each label's bounding box in each
index file (`boxes`, searched through an R*Tree `boxes_rtree`). A label is in a query
box when one of its boxes intersects it, exactly CloudVolume's
`spatial_index.query(bbox)` rule. Coordinates are physical (nm), as in the index.
"""
from __future__ import annotations

import json
import os
import posixpath
import sqlite3

import numpy as np
from cloudvolume import Bbox, CloudVolume

from .errors import MagmaError

SCHEMA = """
CREATE TABLE index_files (id INTEGER PRIMARY KEY AUTOINCREMENT, filename VARCHAR(100) NOT NULL);
CREATE TABLE file_lookup (label INTEGER NOT NULL, fid INTEGER NOT NULL);
CREATE TABLE boxes (id INTEGER PRIMARY KEY, label INTEGER NOT NULL, fid INTEGER NOT NULL,
                    x0 INTEGER, y0 INTEGER, z0 INTEGER, x1 INTEGER, y1 INTEGER, z1 INTEGER);
CREATE VIRTUAL TABLE boxes_rtree USING rtree(id, x0, x1, y0, y1, z0, z1);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""
# R*Tree coordinates are 32-bit floats, rounded outward: the rtree narrows the search,
# the exact integer columns decide.
QUERY = """
SELECT DISTINCT b.label FROM boxes_rtree r JOIN boxes b ON b.id = r.id
WHERE r.x0 <= :x1 AND r.x1 >= :x0 AND r.y0 <= :y1 AND r.y1 >= :y0 AND r.z0 <= :z1 AND r.z1 >= :z0
  AND b.x0 < :x1 AND b.x1 > :x0 AND b.y0 < :y1 AND b.y1 > :y0 AND b.z0 < :z1 AND b.z1 > :z0
"""


def _signed(label: int) -> int:
    """SQLite integers are signed 64-bit: ids >= 2**63 are stored as their two's complement."""
    return label - 2**64 if label >= 2**63 else label


def _unsigned(value: int) -> int:
    return value + 2**64 if value < 0 else value


def spatial_index(path: str, kind: str):
    vol = CloudVolume(path, progress=False)
    source = vol.mesh if kind == "mesh" else vol.skeleton
    index = getattr(source, "spatial_index", None)
    if index is None:
        raise MagmaError(f"{path}: the {kind} info has no spatial_index; the {kind} step writes one with"
                         " spatial_index: true")
    return index


def build(path: str, kind: str, db: str, allow_missing: bool = False) -> dict:
    """Write the database `db` (a local file, replaced atomically) from the `.spatial` files of
    `path`'s meshes or skeletons. Returns counts."""
    index = spatial_index(path, kind)
    tmp = f"{db}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    conn = sqlite3.connect(tmp)
    counts = {"index_files": 0, "boxes": 0}
    labels = set()
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("layer", path), ("kind", kind), ("resolution", json.dumps(np.asarray(index.resolution).tolist())),
        ])
        box_id = 0
        for batch in index.fetch_all_index_files(allow_missing=allow_missing):
            for filename, content in batch.items():
                if content is None:
                    continue
                fid = conn.execute("INSERT INTO index_files (filename) VALUES (?)",
                                   (posixpath.basename(filename),)).lastrowid
                counts["index_files"] += 1
                rows = []
                for label, box in json.loads(content).items():
                    box_id += 1
                    rows.append((box_id, _signed(int(label)), fid, *box))
                    labels.add(int(label))
                conn.executemany("INSERT INTO file_lookup VALUES (?, ?)", [(r[1], fid) for r in rows])
                conn.executemany("INSERT INTO boxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                conn.executemany("INSERT INTO boxes_rtree VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(r[0], r[3], r[6], r[4], r[7], r[5], r[8]) for r in rows])
                counts["boxes"] += len(rows)
        conn.execute("CREATE INDEX idxfname ON index_files (filename)")
        conn.execute("CREATE UNIQUE INDEX pk_label_fid ON file_lookup (label, fid)")
        conn.execute("CREATE INDEX fname ON file_lookup (fid)")
        conn.execute("CREATE INDEX box_label ON boxes (label)")
        conn.commit()
    except Exception:
        conn.close()
        os.remove(tmp)
        raise
    conn.close()
    os.replace(tmp, db)
    counts["labels"] = len(labels)
    return counts


def query(db: str, bbox: Bbox) -> list:
    """Labels with a box intersecting `bbox` (physical units, max exclusive), sorted."""
    if not os.path.isfile(db):
        raise MagmaError(f"{db}: no such database; build it with `magma spatial-index db`")
    lo, hi = bbox.minpt.tolist(), bbox.maxpt.tolist()
    keys = dict(zip(("x0", "y0", "z0", "x1", "y1", "z1"), lo + hi))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(_unsigned(row[0]) for row in conn.execute(QUERY, keys))
    finally:
        conn.close()


def resolution(db: str) -> list:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return json.loads(conn.execute("SELECT value FROM meta WHERE key = 'resolution'").fetchone()[0])
    finally:
        conn.close()
