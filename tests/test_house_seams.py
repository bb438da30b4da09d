"""The seams a newcomer implements: a shard's writer (writer.ShardOutput) and the output folder's layout
(output_folder.OutputFolder), without Ray."""
from __future__ import annotations

import pytest

import encoder
from pipeline.config import load_pipeline_config
from pipeline.driver import RunOptions, run
from pipeline.output_folder import META_DIR, OutputFolder, temp_path
from pipeline.worker import ShardEncoder, ShardIncomplete
from pipeline_samples import TINY, bad_samples, good_samples, tiny_config, write_tar

OPENED: list["MemoryOutput"] = []  # module-level: what the in-process driver's worker opened


class MemoryOutput:
    """A ShardOutput that keeps the rows in memory: the whole of what a writer has to implement."""

    def __init__(self, out_dir, shard_id, n_strokes, metadata=None, row_group_size=256, extra_columns=None):
        self.out_dir, self.shard_id, self.n_strokes, self.metadata = out_dir, shard_id, n_strokes, metadata
        self.rows: list[dict] = []
        self.committed: dict | None = None
        self.aborted = False
        OPENED.append(self)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def commit(self, stats: dict) -> dict:
        self.committed = {**stats, "rows": len(self.rows)}
        return self.committed

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture(autouse=True)
def _fresh():
    OPENED.clear()


def _worker() -> ShardEncoder:
    fit = encoder.load_config("cpu_small", **TINY)
    return ShardEncoder(fit, load_pipeline_config(None, batch_size=2, row_group_size=4), device="cpu",
                        worker_id="test", writer_factory=MemoryOutput)  # fmt: skip


def test_a_custom_writer_gets_every_row_in_order_and_the_commit(tmp_path):
    samples = good_samples(3, size=32) + bad_samples()
    tar = write_tar(tmp_path / "00004.tar", samples)
    out = tmp_path / "out"
    stats = _worker().encode_shard(str(tar), "00004", str(out))
    [output] = OPENED
    assert (output.out_dir, output.shard_id, output.n_strokes) == (str(out), "00004", TINY["strokes"])
    assert output.metadata["created_by"] == "painterbot pipeline" and "encoder_config" in output.metadata
    assert [r["key"] for r in output.rows] == [s["key"] for s in samples]
    assert [r["status"] for r in output.rows] == [s["status"] for s in samples]
    assert output.committed == stats and stats["rows"] == stats["total"] == len(samples) and stats["complete"]
    assert not output.aborted and not out.exists()  # the Parquet writer was never opened


def test_a_custom_writer_keeps_a_cut_source_marked_incomplete_or_is_aborted(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", good_samples(5, size=32)).read_bytes()
    cut = tmp_path / "00005.tar"
    cut.write_bytes(whole[: int(len(whole.rstrip(b"\0")) * 0.7)])  # inside a member, not in the padding
    with pytest.raises(ShardIncomplete, match="kept in the shard's output, marked incomplete"):
        _worker().encode_shard(str(cut), "00005", str(tmp_path / "out"))
    assert OPENED[0].committed["complete"] is False and OPENED[0].rows
    empty = tmp_path / "00006.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardIncomplete):
        _worker().encode_shard(str(empty), "00006", str(tmp_path / "out"))
    assert OPENED[1].aborted and OPENED[1].committed is None


def test_the_driver_passes_the_writer_factory_to_its_workers(tmp_path):
    tar = write_tar(tmp_path / "00007.tar", good_samples(2, size=32))
    options = RunOptions(shards=[str(tar)], output=str(tmp_path / "out"), config=str(tiny_config(tmp_path / "c.yaml")),
                         device="cpu", use_ray=False, progress=False, writer_factory=MemoryOutput)  # fmt: skip
    assert run(options) == 0
    assert [(o.shard_id, len(o.rows), o.committed["complete"]) for o in OPENED] == [("00007", 2, True)]


def test_the_output_folder_names_every_file(tmp_path):
    folder = OutputFolder(tmp_path)
    assert not folder.is_remote and folder.root == tmp_path
    names = {p: str(p.relative_to(tmp_path)) for p in (folder.parquet("7"), folder.stats("7"), folder.incomplete("7"),
                                                       folder.settings_path, folder.summary_path, folder.lock_path)}
    assert sorted(names.values()) == sorted(["7.parquet", f"{META_DIR}/7_stats.json", f"{META_DIR}/7.incomplete",
                                             f"{META_DIR}/settings.json", f"{META_DIR}/summary.json",
                                             f"{META_DIR}/driver.lock"])  # fmt: skip
    for final in (folder.parquet("7"), folder.stats("7")):
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"{}")
        temp_path(final, "abc").write_bytes(b"partial")
    folder.incomplete("7").write_bytes(b"{}")
    listed = folder.listing()
    assert listed.has_parquet("7") and listed.has_stats("7") and listed.is_incomplete("7")
    assert not (listed.has_parquet("8") or listed.has_stats("8") or listed.is_incomplete("8"))
    assert folder.data_files() == [folder.parquet("7")] and folder.stats_files() == [folder.stats("7")]
    assert [p.name for p in folder.temp_files("7")] == [".7.parquet.abc.tmp", ".7_stats.json.abc.tmp"]
    assert folder.clean_temp("7") == 2 and not folder.temp_files("7")
    assert folder.check_settings({"strokes": 1}, overwrite=False)  # no settings file yet: to be written
    folder.write_settings({"strokes": 1})
    assert not folder.check_settings({"strokes": 1}, overwrite=False)
    with pytest.raises(ValueError, match="strokes 1 -> 2"):
        folder.check_settings({"strokes": 2}, overwrite=False)
    assert folder.check_settings({"strokes": 2}, overwrite=True)


def test_a_remote_output_folder_is_one_by_its_uri():
    pytest.importorskip("fsspec")
    folder = OutputFolder("memory://painterbot-seams/out")
    assert folder.is_remote and str(folder.stats("1")).endswith(f"painterbot-seams/out/{META_DIR}/1_stats.json")
    assert folder.listing().data == frozenset() and folder.data_files() == []
