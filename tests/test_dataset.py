"""LeRobot v3.0 datasets: writer, reader, segments, statistics and error reports."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memvla.data.lerobot_v3 import (
    EpisodeSegmentLoader,
    LeRobotV3Dataset,
    LeRobotV3Writer,
    load_stats,
    read_info,
    read_tasks,
)
from memvla.data.png import decode_png, encode_png

IMG = "observation.images.top"
LENGTHS = [5, 8, 3, 11]
TASKS = ["touch the red ball", "go left", "touch the red ball", "remember the colour"]


def make_episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.zeros((length, 12, 10, 3), dtype=np.uint8)  # flat colours + noise
    images[:, 2:6, 3:8] = rng.integers(0, 256, (length, 1, 1, 3))
    images += rng.integers(0, 4, images.shape, dtype=np.uint8)
    return {
        IMG: images,
        "observation.state": rng.normal(size=(length, 3)).astype(np.float32),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
        "next.done": np.arange(length) == length - 1,
    }


def write_dataset(root, lengths=LENGTHS, tasks=TASKS, **kwargs) -> list[dict]:
    episodes = [make_episode(n, seed) for seed, n in enumerate(lengths)]
    with LeRobotV3Writer(root, fps=10, robot_type="sim", **kwargs) as writer:
        for i, (ep, task) in enumerate(zip(episodes, tasks, strict=True)):
            writer.add_episode(ep, task=task, extra={"seed": 100 + i})
    return episodes


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "demo"
    episodes = write_dataset(root)
    return root, episodes


def concat(episodes, key):
    return np.concatenate([ep[key] for ep in episodes])


def test_layout_and_metadata(dataset_dir):
    root, _ = dataset_dir
    for rel in ["meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet"]:
        assert (root / rel).is_file(), rel
    assert not list(root.parent.glob(".demo.tmp-*"))  # the temporary directory is gone
    info = read_info(root)
    assert info["codebase_version"] == "v3.0"
    assert info["total_episodes"] == 4 and info["total_frames"] == sum(LENGTHS)
    assert info["total_tasks"] == 3 and info["splits"] == {"train": "0:4"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["fps"] == 10 and info["robot_type"] == "sim"
    assert info["features"][IMG] == {
        "dtype": "image", "shape": [12, 10, 3], "names": ["height", "width", "channels"]
    }
    assert info["features"]["action"]["shape"] == [2]
    assert info["features"]["next.done"]["dtype"] == "bool"
    for key in ["timestamp", "frame_index", "episode_index", "index", "task_index"]:
        assert info["features"][key]["shape"] == [1]
    assert read_tasks(root) == ["touch the red ball", "go left", "remember the colour"]
    # tasks.parquet is what pandas writes for a DataFrame indexed by the task strings
    meta = json.loads(pq.read_schema(root / "meta/tasks.parquet").metadata[b"pandas"])
    assert meta["index_columns"] == ["__index_level_0__"]
    # image columns carry Hugging Face's Image type, vectors its fixed-length Sequence
    schema = pq.read_schema(root / "data/chunk-000/file-000.parquet")
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf[IMG] == {"_type": "Image"} and hf["action"]["length"] == 2
    assert str(schema.field(IMG).type) == "struct<bytes: binary, path: string>"
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == LENGTHS
    assert [e["dataset_from_index"] for e in episodes] == [0, 5, 13, 16]
    assert episodes[1]["tasks"] == ["go left"] and episodes[3]["seed"] == 103
    assert episodes[0]["data/chunk_index"] == 0 and episodes[0]["data/file_index"] == 0


def test_round_trip(dataset_dir):
    root, episodes = dataset_dir
    ds = LeRobotV3Dataset(root)
    assert len(ds) == sum(LENGTHS) and ds.num_episodes == 4
    frames = np.arange(len(ds))
    np.testing.assert_array_equal(ds.get_numpy(IMG, frames), concat(episodes, IMG))
    for key in ["observation.state", "action", "next.done"]:
        np.testing.assert_array_equal(ds.get_numpy(key, frames), concat(episodes, key))
    item = ds[6]  # episode 1, frame 1
    assert item["task"] == "go left"
    assert item[IMG].shape == (3, 12, 10) and item[IMG].dtype == torch.float32
    assert torch.equal((item[IMG] * 255).round().to(torch.uint8).permute(1, 2, 0),
                       torch.from_numpy(episodes[1][IMG][1]))
    assert torch.equal(item["action"], torch.from_numpy(episodes[1]["action"][1]))
    assert item["index"].shape == () and int(item["index"]) == 6
    assert int(item["frame_index"]) == 1 and int(item["episode_index"]) == 1
    assert float(item["timestamp"]) == pytest.approx(0.1)
    assert [ds[i]["task"] for i in (0, 5, 13, 16)] == TASKS


def test_several_files_and_episode_subset(tmp_path, dataset_dir):
    root = tmp_path / "small_files"
    episodes = write_dataset(root, data_files_size_in_mb=1e-4, chunks_size=2)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("data/*/*.parquet"))
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "data/chunk-001/file-000.parquet", "data/chunk-001/file-001.parquet"]
    ds = LeRobotV3Dataset(root)
    np.testing.assert_array_equal(ds.get_numpy("action", np.arange(len(ds))),
                                  concat(episodes, "action"))
    sub = LeRobotV3Dataset(root, episodes=[3, 1])
    assert sub.episode_index.tolist() == [1, 3] and len(sub) == 8 + 11
    np.testing.assert_array_equal(sub.get_numpy(IMG, np.arange(len(sub))),
                                  concat([episodes[1], episodes[3]], IMG))
    assert sub[8]["task"] == "remember the colour" and int(sub[8]["index"]) == 16
    with pytest.raises(ValueError, match="no episodes"):
        LeRobotV3Dataset(root, episodes=[7])


def test_episode_index_ranges_match_the_data(tmp_path, dataset_dir):
    """LeRobot v3.0: an episode's frames are the data rows whose ``index`` is in
    ``range(dataset_from_index, dataset_to_index)`` (``to`` exclusive), all in the data file
    that ``data/chunk_index`` and ``data/file_index`` name; in one file and across several."""
    small = tmp_path / "small_files"
    write_dataset(small, data_files_size_in_mb=1e-4, chunks_size=2)
    for root in (dataset_dir[0], small):
        info = read_info(root)
        episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        assert [e["episode_index"] for e in episodes] == list(range(len(LENGTHS)))
        for e in episodes:
            path = root / info["data_path"].format(chunk_index=e["data/chunk_index"],
                                                   file_index=e["data/file_index"])
            data = pq.read_table(path, columns=["episode_index", "index"]).to_pydict()
            index = [i for ep, i in zip(data["episode_index"], data["index"], strict=True)
                     if ep == e["episode_index"]]
            assert index == list(range(e["dataset_from_index"], e["dataset_to_index"]))
            assert e["dataset_to_index"] - e["dataset_from_index"] == e["length"]
        assert episodes[-1]["dataset_to_index"] == info["total_frames"]


def test_history_and_action_chunk(dataset_dir):
    root, episodes = dataset_dir
    deltas = {IMG: [-2, -1, 0], "action": [0, 1, 2, 3]}
    ds = LeRobotV3Dataset(root, delta_indices=deltas)
    item = ds[5]  # first frame of episode 1 (8 frames)
    assert item[IMG].shape == (3, 3, 12, 10) and item["action"].shape == (4, 2)
    assert item[f"{IMG}_is_pad"].tolist() == [True, True, False]
    assert item["action_is_pad"].tolist() == [False, False, False, False]
    # padded history repeats the episode's first frame
    assert torch.equal(item[IMG][0], item[IMG][2])
    item = ds[5 + 6]  # frame 6 of 8: actions 6, 7, then padding
    assert item["action_is_pad"].tolist() == [False, False, True, True]
    expected = episodes[1]["action"][[6, 7, 7, 7]]
    assert torch.equal(item["action"], torch.from_numpy(expected))
    assert item[f"{IMG}_is_pad"].tolist() == [False, False, False]
    pixels = (item[IMG] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, episodes[1][IMG][[4, 5, 6]])
    # the same in seconds, as LeRobot's delta_timestamps
    ds_t = LeRobotV3Dataset(root, delta_timestamps={IMG: [-0.2, -0.1, 0.0],
                                                    "action": [0.0, 0.1, 0.2, 0.3]})
    assert {k: v.tolist() for k, v in ds_t.delta_indices.items()} == deltas
    with pytest.raises(ValueError, match="multiples"):
        LeRobotV3Dataset(root, delta_timestamps={"action": [0.05]})
    with pytest.raises(ValueError, match="not a feature"):
        LeRobotV3Dataset(root, delta_indices={"actions": [0]})


def test_segment_batches(dataset_dir):
    root, episodes = dataset_dir
    ds = LeRobotV3Dataset(root, image_cache=False)
    a = 4
    loader = EpisodeSegmentLoader(ds, chunk_size=a, batch_size=3, shuffle=False)
    assert len(loader) == 2
    batch = loader.collate(np.array([0, 1, 2]))  # lengths 5, 8, 3 -> 2, 2, 1 segments
    assert batch.num_segments == 2
    assert batch.action.shape == (3, 2, a, 2)
    assert batch.observation[IMG].shape == (3, 2, 3, 12, 10)
    assert batch.observation["observation.state"].shape == (3, 2, 3)
    assert batch.segment_is_pad.tolist() == [[False, False], [False, False], [False, True]]
    assert batch.action_is_pad.tolist() == [
        [[False] * 4, [False, True, True, True]],
        [[False] * 4, [False] * 4],
        [[False, False, False, True], [True] * 4],
    ]
    assert batch.frame_index.tolist() == [[0, 4], [0, 4], [0, 0]]
    assert batch.length.tolist() == [5, 8, 3] and batch.episode_index.tolist() == [0, 1, 2]
    assert batch.task == TASKS[:3]
    for b, ep in enumerate(episodes[:3]):
        n = len(ep["action"])
        for s in range(-(-n // a)):
            steps = np.minimum(np.arange(s * a, s * a + a), n - 1)
            np.testing.assert_array_equal(batch.action[b, s].numpy(), ep["action"][steps])
            np.testing.assert_array_equal(batch.observation["observation.state"][b, s].numpy(),
                                          ep["observation.state"][s * a])
            pixels = (batch.observation[IMG][b, s] * 255).round().to(torch.uint8)
            np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), ep[IMG][s * a])
    assert float(batch.action[2, 1].abs().sum()) == 0.0  # a padded segment is zeros
    assert float(batch.observation[IMG][2, 1].abs().sum()) == 0.0
    seg = batch.segment(1)
    assert seg["action"].shape == (3, a, 2) and seg["segment_is_pad"].tolist() == [0, 0, 1]
    assert seg[IMG].shape == (3, 3, 12, 10) and seg["task"] == TASKS[:3]
    # shuffling: every episode once per epoch, a new order each epoch, reproducible
    orders = []
    for _ in range(2):
        loader = EpisodeSegmentLoader(ds, chunk_size=a, batch_size=3, seed=1)
        orders.append([[e for b in loader for e in b.episode_index.tolist()] for _ in range(3)])
    assert orders[0] == orders[1]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders[0])
    assert len({tuple(o) for o in orders[0]}) > 1
    last = list(EpisodeSegmentLoader(ds, chunk_size=a, batch_size=3, drop_last=True))
    assert len(last) == 1 and last[0].action.shape[0] == 3


def test_stats_match_numpy(dataset_dir):
    root, episodes = dataset_dir
    stats = load_stats(root)
    q = [0.01, 0.10, 0.50, 0.90, 0.99]
    for key in ["observation.state", "action"]:
        x = concat(episodes, key).astype(np.float64)
        s = {k: v.numpy() for k, v in stats[key].items()}
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(s["std"], x.std(0), rtol=1e-5)
        np.testing.assert_allclose(s["min"], x.min(0), rtol=1e-6)
        np.testing.assert_allclose(s["max"], x.max(0), rtol=1e-6)
        quantiles = np.stack([s["q01"], s["q10"], s["q50"], s["q90"], s["q99"]])
        np.testing.assert_allclose(quantiles, np.quantile(x, q, axis=0), rtol=1e-5, atol=1e-6)
        assert s["count"].tolist() == [sum(LENGTHS)]
    pixels = concat(episodes, IMG).reshape(-1, 3).astype(np.float64) / 255  # (N*H*W, C)
    s = {k: v.numpy() for k, v in stats[IMG].items()}
    assert s["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(s["mean"].ravel(), pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s["std"].ravel(), pixels.std(0), rtol=1e-5)
    np.testing.assert_allclose(s["min"].ravel(), pixels.min(0), atol=1e-7)
    np.testing.assert_allclose(s["max"].ravel(), pixels.max(0), atol=1e-7)
    np.testing.assert_allclose(s["q50"].ravel(), np.quantile(pixels, 0.5, axis=0), atol=1e-6)
    np.testing.assert_allclose(s["q01"].ravel(), np.quantile(pixels, 0.01, axis=0), atol=1e-6)
    assert stats["index"]["max"].tolist() == [sum(LENGTHS) - 1]
    # per-episode statistics live in the episodes parquet
    table = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    mean = np.array(table.column("stats/action/mean").to_pylist()[1])
    np.testing.assert_allclose(mean, episodes[1]["action"].mean(0), rtol=1e-5)
    img_max = np.array(table.column(f"stats/{IMG}/max").to_pylist()[2])
    np.testing.assert_allclose(img_max.ravel(), episodes[2][IMG].reshape(-1, 3).max(0) / 255)


def test_writer_refuses_to_overwrite_and_cleans_up(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, lengths=[3], tasks=["a"])
    with pytest.raises(FileExistsError, match="not empty"):
        LeRobotV3Writer(root, fps=10)
    write_dataset(root, lengths=[4, 2], tasks=["b", "c"], overwrite=True)
    assert read_info(root)["total_episodes"] == 2
    with pytest.raises(RuntimeError), LeRobotV3Writer(tmp_path / "failed", fps=10) as writer:
        writer.add_episode(make_episode(3, 0), task="x")
        raise RuntimeError("crash while recording")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing half-written
    with LeRobotV3Writer(tmp_path / "bad", fps=10) as writer:
        writer.add_episode(make_episode(3, 0), task="x")
        with pytest.raises(ValueError, match="missing"):
            writer.add_episode({"action": np.zeros((3, 2), np.float32)}, task="x")
        with pytest.raises(ValueError, match="shape"):
            writer.add_episode({**make_episode(3, 0), "action": np.zeros((3, 5))}, task="x")
    assert read_info(tmp_path / "bad")["total_episodes"] == 1
    empty = LeRobotV3Writer(tmp_path / "empty", fps=10)
    with pytest.raises(ValueError, match="no episodes"):
        empty.finalize()


def test_missing_and_corrupt_files_are_named(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root)

    def broken(rel, action):
        target = tmp_path / f"broken_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(root, target)
        action(target / rel)
        return target

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cases = [
        ("data/chunk-000/file-000.parquet", lambda p: p.unlink(), FileNotFoundError),
        ("data/chunk-000/file-000.parquet", truncate, ValueError),
        ("meta/info.json", lambda p: p.write_text('{"codebase_version": "v3.0", '), ValueError),
        ("meta/info.json", lambda p: p.unlink(), FileNotFoundError),
        ("meta/tasks.parquet", truncate, ValueError),
        ("meta/tasks.parquet", lambda p: p.unlink(), FileNotFoundError),
        ("meta/episodes/chunk-000/file-000.parquet", truncate, ValueError),
    ]
    for rel, action, error in cases:
        target = broken(rel, action)
        with pytest.raises(error) as info:
            LeRobotV3Dataset(target)
        assert str(target / rel) in str(info.value), (rel, str(info.value))
    target = broken("meta/episodes/chunk-000/file-000.parquet", lambda p: p.unlink())
    with pytest.raises(FileNotFoundError, match="meta/episodes"):
        LeRobotV3Dataset(target)
    # stats.json: missing or corrupt
    target = broken("meta/stats.json", lambda p: p.unlink())
    with pytest.raises(FileNotFoundError, match=str(target / "meta/stats.json")):
        load_stats(target)
    target = broken("meta/stats.json", lambda p: p.write_text("{not json"))
    with pytest.raises(ValueError, match=str(target / "meta/stats.json")):
        load_stats(target)
    # a data file that no longer matches the episodes metadata
    target = broken("data/chunk-000/file-000.parquet", lambda p: None)
    table = pq.read_table(target / "data/chunk-000/file-000.parquet")
    pq.write_table(table.slice(0, 10), target / "data/chunk-000/file-000.parquet")
    with pytest.raises(ValueError, match="frames"):
        LeRobotV3Dataset(target)
    # a corrupt PNG inside an image column is named by key and frame
    target = broken("data/chunk-000/file-000.parquet", lambda p: None)
    path = target / "data/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[2][IMG]["bytes"] = rows[2][IMG]["bytes"][:40]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    ds = LeRobotV3Dataset(target)
    with pytest.raises(ValueError, match=f"{IMG}.*frame 2"):
        ds[2]


def test_not_a_v3_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="info.json"):
        LeRobotV3Dataset(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1"}))
    with pytest.raises(ValueError, match=r"info\.json.*'v2\.1'"):
        LeRobotV3Dataset(tmp_path)


def test_video_features_need_pyav(dataset_dir, tmp_path, monkeypatch):
    root = tmp_path / "video"
    shutil.copytree(dataset_dir[0], root)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][IMG]["dtype"] = "video"
    (root / "meta/info.json").write_text(json.dumps(info))
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(NotImplementedError, match=IMG):
        LeRobotV3Dataset(root)


def to_video_dataset(src, dst, fps=10):
    """Re-store the images of a dataset as LeRobot videos: two episodes per mp4 file."""
    av = pytest.importorskip("av")
    shutil.copytree(src, dst)
    ds = LeRobotV3Dataset(src)
    info = json.loads((dst / "meta/info.json").read_text())
    info["features"][IMG]["dtype"] = "video"
    info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    (dst / "meta/info.json").write_text(json.dumps(info))
    data = dst / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(data).drop_columns([IMG]), data)
    columns = {f"videos/{IMG}/{c}": [] for c in ("chunk_index", "file_index", "from_timestamp",
                                                 "to_timestamp")}
    for f in range(0, ds.num_episodes, 2):
        path = dst / info["video_path"].format(video_key=IMG, chunk_index=0, file_index=f // 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = 40, 48, "yuv420p"
            stream.options = {"qscale": "1"}
            t = 0.0
            for e in range(f, min(f + 2, ds.num_episodes)):
                start, end = ds.episode_range(e)
                duration = (end - start) / fps
                for key, value in (("chunk_index", 0), ("file_index", f // 2),
                                   ("from_timestamp", t), ("to_timestamp", t + duration)):
                    columns[f"videos/{IMG}/{key}"].append(value)
                t += duration
                for image in ds.get_numpy(IMG, np.arange(start, end)):
                    big = np.kron(image, np.ones((4, 4, 1), np.uint8))  # (48, 40, 3)
                    frame = av.VideoFrame.from_ndarray(big, format="rgb24")
                    container.mux(stream.encode(frame))
            container.mux(stream.encode())
    episodes = dst / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(episodes)
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, episodes)
    info["features"][IMG]["shape"] = [48, 40, 3]
    (dst / "meta/info.json").write_text(json.dumps(info))


def test_video_features_with_pyav(dataset_dir, tmp_path):
    root = tmp_path / "video"
    to_video_dataset(dataset_dir[0], root)
    ds = LeRobotV3Dataset(root, delta_indices={IMG: [-1, 0]})
    images = ds.get_numpy(IMG, np.arange(len(ds)))  # (N, 48, 40, 3)
    expected = np.kron(concat(dataset_dir[1], IMG), np.ones((1, 4, 4, 1), np.uint8))
    errors = np.abs(images.astype(int) - expected).reshape(len(ds), -1).mean(axis=1)
    assert errors.max() < 12  # lossy codec; a frame off by one would be far worse
    assert ds[6][IMG].shape == (2, 3, 48, 40)
    sub = LeRobotV3Dataset(root, episodes=[3])
    assert np.abs(sub.get_numpy(IMG, np.arange(11)).astype(int) - expected[16:]).mean() < 12


def test_tasks_with_a_task_column(dataset_dir, tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree(dataset_dir[0], root)
    table = pa.table({"task_index": [1, 0, 2], "task": ["go left", "a", "b"]})
    pq.write_table(table, root / "meta/tasks.parquet")
    assert read_tasks(root) == ["a", "go left", "b"]


def test_png_codec():
    rng = np.random.default_rng(0)
    for shape in [(7, 5, 3), (4, 9, 1), (3, 3, 4)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(decode_png(encode_png(image)), image)
    PIL = pytest.importorskip("PIL.Image")
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12] = np.arange(16, dtype=np.uint8)[:, None] * 10  # gradient: Pillow uses filters
    for optimize in (False, True):
        buf = io.BytesIO()
        PIL.fromarray(image).save(buf, format="PNG", optimize=optimize)
        np.testing.assert_array_equal(decode_png(buf.getvalue()), image)
    ours = PIL.open(io.BytesIO(encode_png(image)))
    np.testing.assert_array_equal(np.asarray(ours), image)


def test_video_seeking_reads_what_decoding_front_to_back_reads(dataset_dir, tmp_path):
    """image_cache=False decodes videos by seeking, keeping nothing: the same frames as the
    whole-file decode, in any order, with a bounded number of open files."""
    root = tmp_path / "video"
    to_video_dataset(dataset_dir[0], root)
    whole = LeRobotV3Dataset(root)
    seek = LeRobotV3Dataset(root, image_cache=False, delta_indices={IMG: [-2, -1, 0]})
    seek._seeker.max_open = 1
    n = len(whole)
    want = whole.get_numpy(IMG, np.arange(n))  # (N, H, W, 3)
    order = np.random.default_rng(0).permutation(n)
    assert np.array_equal(seek.get_numpy(IMG, order), want[order])
    assert np.array_equal(seek.get_numpy(IMG, np.array([5, 5, 3, 9, 4])), want[[5, 5, 3, 9, 4]])
    for i in order[:12]:
        item = seek[int(i)]
        start, _ = seek.episode_range(int(seek.frame_episode[i]))
        rows = np.clip(np.array([i - 2, i - 1, i]), start, None)
        assert np.allclose(item[IMG].numpy(), want[rows].transpose(0, 3, 1, 2) / 255.0)
    assert not seek._cache and seek._seeker.open_files == 1  # nothing kept


def test_a_truncated_video_names_its_file(dataset_dir, tmp_path):
    root = tmp_path / "video"
    to_video_dataset(dataset_dir[0], root)
    path = next((root / "videos").rglob("file-001.mp4"))
    path.write_bytes(path.read_bytes()[:200])
    ds = LeRobotV3Dataset(root, image_cache=False)
    with pytest.raises(ValueError, match=r"file-001.mp4.*episodes \[2, 3\]"):
        ds.get_numpy(IMG, np.arange(len(ds)))


@pytest.mark.parametrize("codec", ["av1", "h264"])
def test_video_writer_puts_every_frame_at_its_index(codec, tmp_path):
    """LeRobotV3Writer(video=True): episodes one after the other in one MP4 per camera; on
    distinct (random) frames, every decoded frame is nearest to the one written at its
    index, whole-file decode and seeking alike."""
    from memvla.data.lerobot_v3 import LeRobotV3Writer

    rng = np.random.default_rng(0)
    written = []
    with LeRobotV3Writer(tmp_path / "v", fps=10, video=True, video_codec=codec) as w:
        for t in (12, 7, 15):
            images = rng.integers(0, 255, (t, 48, 64, 3), dtype=np.uint8)
            written.append(images)
            w.add_episode({IMG: images, "observation.state": rng.normal(size=(t, 2)).astype(
                np.float32), "action": rng.normal(size=(t, 2)).astype(np.float32)}, task="x")
    want = np.concatenate(written).astype(int)
    n = len(want)
    info = json.loads((tmp_path / "v/meta/info.json").read_text())
    assert info["features"][IMG]["info"]["video.codec"] == codec
    for cache in (True, False):
        got = LeRobotV3Dataset(tmp_path / "v", image_cache=cache).get_numpy(IMG, np.arange(n))
        dist = np.abs(got.astype(int)[:, None] - want[None]).reshape(n, n, -1).mean(-1)
        assert (dist.argmin(1) == np.arange(n)).all()
    with pytest.raises(ValueError, match="make the writer with video=True"):
        LeRobotV3Writer(tmp_path / "w", fps=10, features={IMG: {"dtype": "video",
                                                                "shape": [8, 8, 3]}})
