import json
from pathlib import Path

import pytest

from uniref.data.formats import MANIFEST, JsonlWriter, LoadReport, check_dataset, iter_samples, write_webdataset
from uniref.data.tasks import TaskConfig, generate
from uniref.errors import DataError

CFG = TaskConfig(max_refs=3)


def _make(tmp_path: Path, n: int = 4) -> Path:
    writer = JsonlWriter(tmp_path / "ds")
    for i in range(n):
        writer.add(generate(i, CFG), key=f"s{i}")
    writer.close()
    return tmp_path / "ds"


def test_jsonl_round_trips_samples_with_relative_paths(tmp_path):
    root = _make(tmp_path)
    rows = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    assert all(not Path(p).is_absolute() for r in rows for p in [*r["input_images"], r["output_image"]])
    assert set(rows[0]) >= {"instruction", "input_images", "output_image", "task", "spec"}
    loaded = list(iter_samples(root))
    assert [s.spec for s in loaded] == [generate(i, CFG).spec for i in range(4)]
    assert loaded[0].target.tobytes() == generate(0, CFG).target.tobytes()


def test_every_bad_row_is_counted_with_its_row_number_and_reason(tmp_path):
    root = _make(tmp_path)
    lines = (root / MANIFEST).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    (root / rows[0]["output_image"]).unlink()  # row 1: missing file
    (root / rows[1]["input_images"][0]).write_bytes(b"not a png")  # row 2: unreadable
    rows[2]["input_images"] = []  # row 3: K = 0
    rows[3]["instruction"] = "  "  # row 4: empty instruction
    text = "\n".join(json.dumps(r) for r in rows) + "\n{broken\n"  # row 5: invalid JSON
    (root / MANIFEST).write_text(text)
    report = check_dataset(root)
    assert report.rows == 5 and report.ok == 0
    reasons = {p.row: p.reason for p in report.problems}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert "no such file" in reasons[1] and "K = 0" in reasons[3] and "instruction" in reasons[4]
    assert "JSON" in reasons[5]
    assert report.problems[0].file.endswith("_target.png")


def test_unipic_style_rows_without_spec_are_accepted(tmp_path):
    root = _make(tmp_path, n=1)
    row = json.loads((root / MANIFEST).read_text())
    plain = {k: row[k] for k in ("instruction", "input_images", "output_image")}
    (root / "plain.jsonl").write_text(json.dumps(plain) + "\n")
    report = LoadReport()
    samples = list(iter_samples(root / "plain.jsonl", report))
    assert len(samples) == 1 and samples[0].spec == {} and report.by_task["unknown"] == 1


def test_webdataset_shards_stream_back_the_same_samples(tmp_path):
    samples = [generate(i, CFG) for i in range(5)]
    shards = write_webdataset(samples, tmp_path / "wds", shard_size=2)
    assert len(shards) == 3
    back = list(iter_samples(tmp_path / "wds"))
    assert [s.spec for s in back] == [s.spec for s in samples]
    assert [s.k for s in back] == [s.k for s in samples]


def test_webdataset_library_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_webdataset([generate(i, CFG) for i in range(3)], tmp_path / "wds", shard_size=10)
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False)]
    assert keys == ["00000000", "00000001", "00000002"]


def test_hf_dataset_round_trips_and_streams_from_parquet(tmp_path):
    pytest.importorskip("datasets")
    from uniref.data.formats import to_hf_dataset

    root = _make(tmp_path, n=3)
    ds = to_hf_dataset(root)
    assert len(ds) == 3
    back = list(iter_samples(ds))
    assert [s.spec for s in back] == [generate(i, CFG).spec for i in range(3)]
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    streamed = list(iter_samples(tmp_path / "ds.parquet", streaming=True))
    assert [s.instruction for s in streamed] == [s.instruction for s in back]


def test_missing_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such dataset"):
        list(iter_samples(tmp_path / "nope"))
