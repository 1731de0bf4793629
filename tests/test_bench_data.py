"""``memvla bench data`` runs end to end at a small size and reports what it measured."""

import json

from memvla.cli import main


def test_bench_data_small(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--episodes", "2", "--frames", "20", "--height", "32",
                 "--width", "48", "--samples", "16", "--segment", "4", "--png",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["write"]["video"]["frames"] == r["write"]["png"]["frames"] == 40
    assert set(r["read"]) == {"seek", "segments", "png"}
    assert all(m["frames"] == 16 and m["frames_per_s"] > 0 for m in r["read"].values())
    assert "read seek" in capsys.readouterr().out
