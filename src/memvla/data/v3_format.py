"""The LeRobot v3.0 on-disk layout: paths, feature types and metadata files.

A v3.0 dataset directory (what LeRobot's ``LeRobotDataset`` reads)::

    meta/info.json                        codebase_version "v3.0", fps, features, path templates
    meta/stats.json                       normalisation statistics (see memvla.data.stats)
    meta/tasks.parquet                    task strings (pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet
                                          one row per episode: episode_index, tasks, length,
                                          data/chunk_index, data/file_index, dataset_from_index,
                                          dataset_to_index, stats/<feature>/<stat>, ...
    data/chunk-000/file-000.parquet       one row per frame, many episodes per file
    videos/<key>/chunk-000/file-000.mp4   only for features of dtype "video"

Features are LeRobot's ``{"dtype", "shape", "names"}`` dicts. In the data parquet a
feature of shape (1,) is a plain column, shape (D,) a fixed-size list (Hugging Face
``Sequence(length=D)``), shape (D1, ..., Dk) with k = 2..5 (a depth map (H, W), a pose
(4, 4)) fixed-size lists nested k deep (Hugging Face ``Array2D`` .. ``Array5D``, as LeRobot
declares such features), and dtype "image" a struct ``{bytes: binary (PNG), path:
string}`` (Hugging Face ``Image``), with the Hugging Face feature types in the schema
metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk directory
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500

# per-frame bookkeeping columns that every LeRobot dataset has
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
IMAGE_NAMES = ["height", "width", "channels"]
MAX_ARRAY_DIMS = 5  # numeric features have 1 to 5 axes (Hugging Face Array2D .. Array5D)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def next_chunk_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: files 0..chunks_size-1 fill a chunk, then a new one."""
    if file_index + 1 >= chunks_size:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


def is_visual(feature: dict) -> bool:
    return feature["dtype"] in ("image", "video")


def arrow_type(feature: dict) -> pa.DataType:
    """Arrow type of a (non-video) feature's column in the data parquet."""
    dtype, shape = feature["dtype"], tuple(feature["shape"])
    if dtype == "image":
        return IMAGE_TYPE
    base = pa.string() if dtype == "string" else pa.from_numpy_dtype(np.dtype(dtype))
    if shape == (1,):
        return base
    if not 1 <= len(shape) <= MAX_ARRAY_DIMS:
        raise NotImplementedError(f"features of shape {shape} are not supported (1 to "
                                  f"{MAX_ARRAY_DIMS} axes)")
    for size in reversed(shape):
        base = pa.list_(base, size)
    return base


def _hf_feature(feature: dict) -> dict:
    """The Hugging Face ``datasets`` type of a feature, as stored in the schema metadata."""
    dtype, shape = feature["dtype"], tuple(feature["shape"])
    if dtype == "image":
        return {"_type": "Image"}
    value = {"dtype": dtype, "_type": "Value"}
    if shape == (1,):
        return value
    if len(shape) == 1:
        return {"feature": value, "length": shape[0], "_type": "Sequence"}
    return {"shape": list(shape), "dtype": dtype, "_type": f"Array{len(shape)}D"}


def data_schema(features: dict[str, dict]) -> pa.Schema:
    """Schema of the data parquet files, with LeRobot-compatible Hugging Face metadata."""
    keys = [k for k, ft in features.items() if ft["dtype"] != "video"]
    hf = {"info": {"features": {k: _hf_feature(features[k]) for k in keys}}}
    return pa.schema(
        [pa.field(k, arrow_type(features[k])) for k in keys],
        metadata={"huggingface": json.dumps(hf)},
    )


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {what} {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"corrupt {what} {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"corrupt {what} {path}: expected a JSON object")
    return data


def read_info(root: str | os.PathLike) -> dict:
    """``meta/info.json`` of a v3.0 dataset, checked.

    Raises FileNotFoundError when ``root`` is not a dataset, and ValueError naming the file
    for another codebase version or missing fields.
    """
    path = Path(root) / INFO_PATH
    if not path.is_file():
        raise FileNotFoundError(f"not a LeRobot dataset: {path} does not exist")
    info = read_json(path, "dataset info file")
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise ValueError(
            f"{path}: codebase_version is {version!r}, but only LeRobot {CODEBASE_VERSION!r} "
            "datasets are supported (convert older ones with LeRobot's "
            "convert_dataset_v21_to_v30 script)"
        )
    for field in ("fps", "features", "data_path"):
        if field not in info:
            raise ValueError(f"corrupt dataset info file {path}: no {field!r} field")
    for key, ft in info["features"].items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise ValueError(f"corrupt dataset info file {path}: feature {key!r} lacks dtype/shape")
    return info


def read_table(path: Path, what: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file as an Arrow table; FileNotFoundError / ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {what} {path}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt {what} {path}: {e}") from e


def write_tasks(path: Path, tasks: list[str]) -> None:
    """Write ``meta/tasks.parquet`` the way pandas writes LeRobot's tasks DataFrame.

    LeRobot keeps the tasks as ``pd.DataFrame({"task_index": ...}, index=tasks)``; pandas
    stores the index as the column ``__index_level_0__`` and records it in its metadata, so
    ``pd.read_parquet`` gives the task strings back as the index.
    """
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema(
        [("task_index", pa.int64()), ("__index_level_0__", pa.string())],
        metadata={"pandas": json.dumps(pandas_meta)},
    )
    table = pa.table([pa.array(range(len(tasks)), pa.int64()), pa.array(tasks)], schema=schema)
    pq.write_table(table, path)


def read_tasks(root: str | os.PathLike) -> list[str]:
    """Task strings by task_index from ``meta/tasks.parquet`` (pandas index or a "task" column)."""
    path = Path(root) / TASKS_PATH
    table = read_table(path, "tasks file")
    names = table.column_names
    meta = table.schema.metadata or {}
    column = None
    if b"pandas" in meta:
        try:
            index_columns = json.loads(meta[b"pandas"]).get("index_columns", [])
        except ValueError:
            index_columns = []
        column = next((c for c in index_columns if isinstance(c, str) and c in names), None)
    if column is None:
        column = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if column is None or "task_index" not in names:
        raise ValueError(f"corrupt tasks file {path}: expected task strings and task_index")
    strings = table.column(column).to_pylist()
    indices = table.column("task_index").to_pylist()
    tasks = [""] * len(strings)
    for i, s in zip(indices, strings, strict=True):
        if not 0 <= i < len(tasks):
            raise ValueError(f"corrupt tasks file {path}: task_index {i} out of range")
        tasks[i] = s
    return tasks
