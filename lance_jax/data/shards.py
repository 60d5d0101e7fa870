"""Shards of `lance_interleaved_v1` rows: Parquet files (small row groups, inline media) + `index.json`.

`ShardSource(dir)` is a Grain random-access source: global index -> (file, row group, row) from the
index, one row-group read per record (row groups cached LRU). `ReferenceSource(paths, dataset_type)`
reads the reference's Parquet layouts (50 §1.2) and adapts rows to the canonical schema on the fly.
Every record gets `_source` (the shard file name) so the pipeline can account corrupt records per shard.
"""
from __future__ import annotations

import bisect
import functools
import glob
import json
import os
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lance_jax.data import schema as S

INDEX = "index.json"


class ShardWriter:
    """Writes canonical rows into `out/shard-00000.parquet`, ... (rows_per_shard each) and `index.json`."""

    def __init__(self, out_dir: str, *, rows_per_shard: int = 2048, row_group_size: int = 64):
        os.makedirs(out_dir, exist_ok=True)
        self.out, self.rows_per_shard, self.row_group_size = out_dir, rows_per_shard, row_group_size
        self.buffer: list[dict] = []
        self.files: list[dict] = []

    def write(self, row: dict):
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_shard:
            self._flush()

    def _flush(self):
        if not self.buffer:
            return
        name = f"shard-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist(self.buffer, schema=S.SCHEMA)
        pq.write_table(table, os.path.join(self.out, name), row_group_size=self.row_group_size,
                       compression={"id": "zstd", "elements": "none", "meta": "zstd", "system_prompt": "zstd"},
                       use_dictionary=False)
        self.files.append(_file_entry(os.path.join(self.out, name), name))
        self.buffer = []

    def close(self) -> dict:
        self._flush()
        index = dict(schema=S.SCHEMA_NAME, files=self.files, num_rows=sum(f["num_rows"] for f in self.files))
        with open(os.path.join(self.out, INDEX), "w") as f:
            json.dump(index, f, indent=1)
        return index


def _file_entry(path: str, name: str) -> dict:
    md = pq.ParquetFile(path).metadata
    return dict(path=name, num_rows=md.num_rows, row_groups=[md.row_group(i).num_rows for i in range(md.num_row_groups)])


def build_index(paths: Sequence[str], root: str | None = None) -> dict:
    """Index of existing Parquet files (from their footers), paths relative to `root` when given."""
    files = [_file_entry(p, os.path.relpath(p, root) if root else p) for p in paths]
    return dict(files=files, num_rows=sum(f["num_rows"] for f in files))


def list_parquet(spec: str | Iterable[str]) -> list[str]:
    """A file, a directory (non-recursive, sorted *.parquet), or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for s in specs:
        out += sorted(glob.glob(os.path.join(s, "*.parquet"))) if os.path.isdir(s) else [s]
    return out


class _RowGroupReader:
    def __init__(self, index: dict, root: str | None):
        self.files = index["files"]
        self.root = root
        self.starts, self.locs = [], []
        g = 0
        for fi, f in enumerate(self.files):
            r = 0
            for gi, n in enumerate(f["row_groups"]):
                self.starts.append(g)
                self.locs.append((fi, gi, r))
                g += n
                r += n
        self.n = g

    def path(self, fi: int) -> str:
        p = self.files[fi]["path"]
        return p if os.path.isabs(p) or self.root is None else os.path.join(self.root, p)

    @functools.lru_cache(maxsize=8)
    def _group(self, fi: int, gi: int) -> list[dict]:
        return pq.ParquetFile(self.path(fi)).read_row_group(gi).to_pylist()

    def get(self, i: int) -> tuple[dict, str]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        fi, gi, _ = self.locs[k]
        return self._group(fi, gi)[i - self.starts[k]], os.path.basename(self.files[fi]["path"])


class ShardSource:
    """Random access over a shard directory written by `ShardWriter` (or any dir with an index.json)."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, INDEX)) as f:
            index = json.load(f)
        self.reader = _RowGroupReader(index, directory)
        self.prefix = os.path.basename(os.path.normpath(directory))

    def __len__(self) -> int:
        return self.reader.n

    def __getitem__(self, i: int) -> dict:
        row, name = self.reader.get(int(i))
        row["_source"] = f"{self.prefix}/{name}"  # dataset dir / shard file: reported names are unambiguous
        return row


class ReferenceSource:
    """The reference's local Parquet files (one `dataset_type`, or sniffed per row), adapted to canonical rows.
    Rows that do not adapt become `{"_bad": ...}` records (counted as corrupt by the pipeline)."""

    def __init__(self, paths: str | Sequence[str], dataset_type: str | None = None):
        files = list_parquet(paths)
        self.reader = _RowGroupReader(build_index(files), None)
        self.dataset_type = dataset_type

    def __len__(self) -> int:
        return self.reader.n

    def __getitem__(self, i: int) -> dict:
        row, name = self.reader.get(int(i))
        try:
            out = S.from_reference_row(row, self.dataset_type, row_id=f"{name}:{i}")
        except Exception as e:  # noqa: BLE001 - any malformed row is a corrupt record
            return {"_bad": repr(e), "_source": name}
        out["_source"] = name
        return out
