"""The download stage against a real HTTP server on 127.0.0.1, with img2dataset doing the downloading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from vlkd.cli import main
from vlkd.config import DownloadParams
from vlkd.corpus import shards
from vlkd.corpus.download import FAILED, LOCK, STAGING, SUMMARY, download
from vlkd.data.webdataset import iter_shard, list_shards
from vlkd.errors import VlkdError

PARAMS = DownloadParams(processes=1, threads=8, shard_size=10, timeout=1.0, max_image_area=250_000,
                        image_size=32, max_caption_chars=50)


def write_list(path: Path, urls: list[str], captions: list[str] | None = None) -> Path:
    captions = captions if captions is not None else [f"picture number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


def shard_samples(output: Path) -> dict[str, dict]:
    """Every sample in every tar: key -> {jpg, txt, json}."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(output.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def file_hashes(output: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(output.iterdir()) if shards.SHARD_FILE.match(p.name)}


def folder_hashes(output: Path) -> dict[str, str]:
    """Every file of the shard folder but the writer's lock: what DVC hashes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(output.iterdir())
            if p.is_file() and p.name != LOCK}


def check_accounting(summary: dict) -> None:
    counts = summary["url_list"]
    assert counts["successes"] + counts["failures"] + counts["duplicates"] + counts["invalid"] == counts["rows"]
    assert counts["failures"] == sum(counts["failures_by_reason"].values())
    assert counts["invalid"] == sum(counts["invalid_by_reason"].values())


def test_every_row_is_accounted_for(tmp_path, image_server):
    bad = ["/404", "/html", "/truncated.jpg", "/empty.jpg", "/huge.png", "/loop", "/slow.png"]
    urls = [image_server.url(f"/img/{i}.png") for i in range(6)]
    urls += [image_server.url("/redirect/7")]  # a redirect to an image is followed: a success
    urls += [image_server.url(p) for p in bad]
    urls += [image_server.url("/img/1.png"), "ftp://example.invalid/a.png", "not a url", "",
             image_server.url("/img/8.png"), image_server.url("/img/9.png"), image_server.url("/img/10.png")]
    captions = [f"picture number {i}" for i in range(len(urls))]
    captions[-3] = ""  # empty caption: invalid
    captions[-2] = "x" * 500  # huge caption: truncated
    captions[-1] = "un café à Zürich, 東京"  # non-ASCII: kept as is
    url_list = write_list(tmp_path / "urls.parquet", urls, captions)

    summary = download(url_list, tmp_path / "shards", PARAMS)

    check_accounting(summary)
    counts = summary["url_list"]
    assert counts["rows"] == len(urls)
    assert counts["successes"] == 9  # 6 images, the redirect, the truncated caption and the non-ASCII one
    assert counts["duplicates"] == 1
    assert counts["invalid"] == 4
    assert counts["failures"] == len(bad)
    assert set(counts["failures_by_reason"]) == {
        "HTTP Error 404: Not Found", "not a decodable image (HTML page, truncated or corrupt file)",
        "empty response body", "image area too large (download.max_image_area)", "redirect loop", "timed out"}
    assert counts["captions_truncated"] == 1 and counts["captions_non_ascii"] == 1

    failed = pq.read_table(tmp_path / "shards" / FAILED).to_pylist()
    assert sorted(row["url"] for row in failed if row["kind"] == "download") == sorted(
        image_server.url(p) for p in bad)
    assert {row["reason"] for row in failed if row["kind"] == "invalid"} == {
        "not an http(s) url (scheme 'ftp')", "not an http(s) url", "empty or missing url",
        "empty or missing caption"}

    samples = shard_samples(tmp_path / "shards")
    assert len(samples) == 9
    texts = {sample["txt"].decode("utf-8") for sample in samples.values()}
    assert "un café à Zürich, 東京" in texts
    assert "x" * 50 in texts
    for sample in samples.values():
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
        assert json.loads(sample["json"])["status"] == "success"
    # the folder's summary holds what the shards hold; how this run went is only returned
    assert json.loads((tmp_path / "shards" / SUMMARY).read_text()) == {
        name: value for name, value in summary.items() if name != "this_run"}
    assert not (tmp_path / "shards" / STAGING).exists()


def test_the_same_list_gives_the_same_bytes_whatever_the_processes_and_threads(tmp_path, image_server):
    # 50 ms per image and many threads: img2dataset's threads finish in an order of their own
    urls = [image_server.url(f"/delay/{i}.png") for i in range(30)] + [image_server.url("/404")]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    download(url_list, tmp_path / "one", PARAMS.model_copy(update={"processes": 1, "threads": 1}))
    download(url_list, tmp_path / "many", PARAMS.model_copy(update={"processes": 2, "threads": 16}))

    assert folder_hashes(tmp_path / "one") == folder_hashes(tmp_path / "many")
    assert len(list_shards(tmp_path / "one")) == 4
    for tar_path in list_shards(tmp_path / "many")[:3]:  # the fourth holds the 404 only: no sample
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        names = [member.name for member in members]
        assert len(names) == 30 and names == sorted(names)  # samples in key order, a sample's files together
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
        keys = pq.read_table(tar_path.with_suffix(".parquet")).column("key").to_pylist()
        assert keys == sorted(keys)
        stats = json.loads(tar_path.with_name(tar_path.stem + shards.STATS_SUFFIX).read_text())
        assert not set(shards.RUN_FIELDS) & set(stats)


def test_spark_writes_the_bytes_multiprocessing_writes(tmp_path, image_server):
    """img2dataset's pyspark distributor (Spark in local mode, 2 cores) runs vlkd's writer in Spark's
    Python workers: the same list gives the same shard folder as the multiprocessing distributor."""
    urls = [image_server.url(f"/delay/{i}.png") for i in range(30)] + [image_server.url("/404")]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    spark = download(url_list, tmp_path / "spark", PARAMS.model_copy(update={"distributor": "pyspark",
                                                                             "processes": 2}))
    download(url_list, tmp_path / "local", PARAMS.model_copy(update={"processes": 2}))
    assert spark["url_list"]["successes"] == 30 and spark["this_run"]["new_shards"] == [0, 1, 2, 3]
    assert folder_hashes(tmp_path / "spark") == folder_hashes(tmp_path / "local")


def test_ray_writes_the_bytes_multiprocessing_writes(tmp_path, image_server):
    """img2dataset's ray distributor on a local Ray started here (a cluster's `ray start` in real use)."""
    import ray

    urls = [image_server.url(f"/delay/{i}.png") for i in range(30)] + [image_server.url("/404")]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    environment = dict(os.environ)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = download(url_list, tmp_path / "ray", PARAMS.model_copy(update={"distributor": "ray"}))
    finally:
        ray.shutdown()
        os.environ.clear()  # ray.init leaves variables behind (RAY_AUTH_MODE=token, ...) for later tests
        os.environ.update(environment)
    download(url_list, tmp_path / "local", PARAMS.model_copy(update={"processes": 2}))
    assert on_ray["url_list"]["successes"] == 30 and on_ray["this_run"]["new_shards"] == [0, 1, 2, 3]
    assert folder_hashes(tmp_path / "ray") == folder_hashes(tmp_path / "local")


def test_a_distributor_that_is_not_installed_is_one_clear_line(tmp_path, image_server, monkeypatch):
    import importlib.util

    url_list = write_list(tmp_path / "urls.parquet", [image_server.url(f"/img/{i}.png") for i in range(12)])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "ray" else find_spec(name, *rest))
    with pytest.raises(VlkdError, match=r"download.distributor is ray but ray is not installed; install it"):
        download(url_list, tmp_path / "shards", PARAMS.model_copy(update={"distributor": "ray"}))
    assert not list_shards(tmp_path / "shards")


def test_images_whose_site_opts_out_are_failures_with_their_own_reason(tmp_path, image_server):
    urls = [image_server.url(f"/img/{i}.png") for i in range(3)]
    urls += [image_server.url("/noai/3.png"), image_server.url("/otherbot/4.png")]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    summary = download(url_list, tmp_path / "shards", PARAMS)
    opted_out = "opted out by the site (X-Robots-Tag; download.disallowed_header_directives)"
    assert summary["url_list"]["failures_by_reason"] == {opted_out: 1}
    assert summary["url_list"]["successes"] == 4  # a directive for another agent does not apply to vlkd
    failed = pq.read_table(tmp_path / "shards" / FAILED).to_pylist()
    assert failed == [{"url": urls[3], "caption": "picture number 3", "reason": opted_out, "kind": "download"}]

    kept = download(url_list, tmp_path / "all", PARAMS.model_copy(update={"disallowed_header_directives": []}))
    assert kept["url_list"]["successes"] == 5


def test_duplicates_are_downloaded_once(tmp_path, image_server):
    url = image_server.url("/img/3.png")
    url_list = write_list(tmp_path / "urls.parquet", [url, url, url, image_server.url("/img/4.png")])
    summary = download(url_list, tmp_path / "shards", PARAMS)
    assert summary["url_list"]["duplicates"] == 2
    assert image_server.requests["/img/3.png"] == 1


def test_refresh_fetches_only_new_rows_and_keeps_shards_byte_identical(tmp_path, image_server):
    first = [image_server.url(f"/img/{i}.png") for i in range(25)]  # shards 0, 1, 2 (the last one partial)
    output = tmp_path / "shards"
    download(write_list(tmp_path / "v1.parquet", first), output, PARAMS)
    before = file_hashes(output)
    requests_before = sum(image_server.requests.values())

    # New rows in the middle and at the end: img2dataset's own incremental mode would put some of them into
    # shard numbers it already considers done and silently skip them.
    refreshed = first[:5] + [image_server.url(f"/img/{i}.png") for i in range(100, 104)] + first[5:]
    refreshed += [image_server.url(f"/img/{i}.png") for i in range(200, 203)]
    summary = download(write_list(tmp_path / "v2.parquet", refreshed), output, PARAMS)

    assert sum(image_server.requests.values()) - requests_before == 7
    assert summary["this_run"] == {**summary["this_run"], "fetched": 7, "new_shards": [3]}
    assert summary["url_list"]["successes"] == len(refreshed)
    after = file_hashes(output)
    assert {name: after[name] for name in before} == before
    urls = [json.loads(s["json"])["url"] for s in shard_samples(output).values()]
    assert sorted(urls) == sorted(refreshed)  # nothing lost, nothing twice

    again = download(tmp_path / "v2.parquet", output, PARAMS)  # nothing new: nothing fetched
    assert again["this_run"]["fetched"] == 0 and file_hashes(output) == after


def test_retry_failed_reattempts_failures_only(tmp_path, image_server):
    urls = [image_server.url(f"/img/{i}.png") for i in range(3)] + [image_server.url("/flaky/5.png")]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    output = tmp_path / "shards"
    first = download(url_list, output, PARAMS)
    assert first["url_list"]["failures_by_reason"] == {"HTTP Error 404: Not Found": 1}

    assert download(url_list, output, PARAMS)["this_run"]["fetched"] == 0  # failures are not retried by default
    retried = download(url_list, output, PARAMS, retry_failed=True)
    assert retried["this_run"]["fetched"] == 1
    assert retried["url_list"]["successes"] == 4 and retried["url_list"]["failures"] == 0
    assert image_server.requests["/img/0.png"] == 1 and image_server.requests["/flaky/5.png"] == 2
    assert pq.read_table(output / FAILED).num_rows == 0


def test_headerless_tsv_with_column_names(tmp_path, image_server):
    # Conceptual Captions' layout: caption<TAB>url, no header; one line with a stray tab is malformed.
    lines = [f"a picture of thing {i}\t{image_server.url(f'/img/{i}.png')}" for i in range(4)]
    lines.append("a caption\twith a tab\thttp://127.0.0.1:1/x.png")
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")
    params = PARAMS.model_copy(update={"column_names": ["caption", "url"]})
    summary = download(tmp_path / "cc.tsv", tmp_path / "shards", params)
    check_accounting(summary)
    assert summary["url_list"]["rows"] == 5 and summary["url_list"]["successes"] == 4
    assert summary["url_list"]["invalid_by_reason"] == {"malformed line: expected 2 fields, got 3 (line 5)": 1}
    captions = sorted(s["txt"].decode() for s in shard_samples(tmp_path / "shards").values())
    assert captions == [f"a picture of thing {i}" for i in range(4)]


def test_csv_with_header(tmp_path, image_server):
    rows = ["image,text", *(f"{image_server.url(f'/img/{i}.png')},caption {i}" for i in range(3))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    params = PARAMS.model_copy(update={"url_col": "image", "caption_col": "text"})
    assert download(tmp_path / "list.csv", tmp_path / "shards", params)["url_list"]["successes"] == 3


def test_resume_after_kill_finishes_without_redoing_or_duplicating(tmp_path, image_server):
    urls = [image_server.url(f"/delay/{i}.png") for i in range(60)]  # 50 ms each, 6 shards of 10
    write_list(tmp_path / "urls.parquet", urls)
    (tmp_path / "params.yaml").write_text(
        "download:\n  url_list: urls.parquet\n  output: shards\n  processes: 1\n  threads: 2\n"
        "  shard_size: 10\n  image_size: 32\n")
    command = [sys.executable, "-m", "vlkd.cli", "download"]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / "shards" / STAGING
    deadline = time.monotonic() + 120
    while not (staging.is_dir() and list(staging.glob("*_stats.json"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole process group: img2dataset's workers too
    process.wait()
    assert list(staging.glob("*_stats.json")), "the run ended before it finished a shard"
    finished_before_kill = set(int(p.name[:5]) for p in staging.glob("*_stats.json"))

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    output = tmp_path / "shards"
    summary = json.loads((output / SUMMARY).read_text())
    assert summary["url_list"]["successes"] == 60
    samples = shard_samples(output)
    fetched_urls = [json.loads(s["json"])["url"] for s in samples.values()]
    assert sorted(fetched_urls) == sorted(urls)  # every URL exactly once, no truncated sample
    assert finished_before_kill <= set(shards.complete_shards(output))  # kept, not redone
    assert sum(image_server.requests.values()) < 60 + 10 * 2  # at most the unfinished shards twice
    for shard_id in shards.complete_shards(output):
        table = pq.read_table(output / f"{shard_id:05d}.parquet")
        with tarfile.open(output / f"{shard_id:05d}.tar") as tar:
            assert len([m for m in tar.getmembers() if m.name.endswith(".jpg")]) == table.num_rows

    # the resumed folder is byte for byte what an uninterrupted download of the same list writes
    uninterrupted = download(tmp_path / "urls.parquet", tmp_path / "uninterrupted",
                             DownloadParams(processes=1, threads=2, shard_size=10, image_size=32))
    assert uninterrupted["this_run"]["fetched"] == 60
    assert folder_hashes(output) == folder_hashes(tmp_path / "uninterrupted")


def test_a_killed_run_is_finished_into_the_shard_numbers_it_planned(tmp_path, image_server, monkeypatch):
    import vlkd.corpus.download as stage

    urls = [image_server.url(f"/img/{i}.png") for i in range(30)]
    url_list = write_list(tmp_path / "urls.parquet", urls)
    fetch = stage._run_img2dataset

    def killed_before_shard_0_finished(input_file, rows, staging, *args):
        fetch(input_file, rows, staging, *args)
        for path in staging.glob("00000*"):  # shards 1 and 2 finished first (two processes may do that)
            path.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "_run_img2dataset", killed_before_shard_0_finished)
    with pytest.raises(KeyboardInterrupt):
        download(url_list, tmp_path / "resumed", PARAMS)
    monkeypatch.undo()
    resumed = download(url_list, tmp_path / "resumed", PARAMS)

    assert resumed["this_run"]["fetched"] == 10 and resumed["this_run"]["new_shards"] == [0]
    download(url_list, tmp_path / "uninterrupted", PARAMS)
    assert folder_hashes(tmp_path / "resumed") == folder_hashes(tmp_path / "uninterrupted")


def test_a_second_download_into_the_same_folder_stops(tmp_path, image_server):
    import fcntl

    url_list = write_list(tmp_path / "urls.parquet", [image_server.url("/img/1.png")])
    output = tmp_path / "shards"
    output.mkdir()
    with (output / LOCK).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, ["download", "--url-list", str(url_list), "--output", str(output)])
    assert result.exit_code == 2
    assert "another download is writing to" in result.stderr


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path, image_server):
    output = tmp_path / "shards"
    url_list = write_list(tmp_path / "urls.parquet", [image_server.url(f"/img/{i}.png") for i in range(12)])
    download(url_list, output, PARAMS)
    (output / "00007.tar").write_bytes(b"half a tar")  # a shard without its stats file
    summary = download(url_list, output, PARAMS)
    assert not (output / "00007.tar").exists()
    assert summary["this_run"]["fetched"] == 0


def _missing(folder: Path) -> Path:
    return folder / "missing.parquet"


def _garbage(folder: Path) -> Path:
    (folder / "garbage.parquet").write_bytes(b"not parquet at all")
    return folder / "garbage.parquet"


def _no_url_column(folder: Path) -> Path:
    pq.write_table(pa.table({"link": ["http://127.0.0.1:1/a.png"], "caption": ["a"]}), folder / "x.parquet")
    return folder / "x.parquet"


def _empty(folder: Path) -> Path:
    return write_list(folder / "empty.parquet", [], [])


def _unknown_format(folder: Path) -> Path:
    (folder / "list.json").write_text("{}")
    return folder / "list.json"


@pytest.mark.parametrize(
    ("make_list", "message"),
    [
        (_missing, "does not exist"),
        (_garbage, "cannot read URL list"),
        (_no_url_column, "has no column 'url'"),
        (_empty, "has no rows"),
        (_unknown_format, "cannot tell the format"),
    ],
)
def test_bad_url_lists_give_one_clear_line(tmp_path, make_list, message):
    url_list = make_list(tmp_path)
    result = CliRunner().invoke(main, ["download", "--url-list", str(url_list), "--output",
                                       str(tmp_path / "shards")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkd: error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_every_caption_of_an_image_is_kept_in_its_json(tmp_path, image_server):
    urls = [image_server.url(f"/img/{i}.png") for i in range(3)]
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["a red circle", "a blue star", "a cat"],
                             "captions": [["a red circle", "a circle\non the left", ""], ["a blue star"], None]}),
                   url_list)
    download(url_list, tmp_path / "shards", PARAMS.model_copy(update={"captions_col": "captions"}))

    samples = {sample.caption: sample.captions
               for tar in list_shards(tmp_path / "shards") for sample in iter_shard(tar)}
    assert samples == {"a red circle": ("a red circle", "a circle on the left"), "a blue star": ("a blue star",),
                       "a cat": ("a cat",)}


def test_a_list_without_the_captions_column_keeps_one_caption(tmp_path, image_server, caplog):
    url_list = write_list(tmp_path / "urls.parquet", [image_server.url("/img/1.png")], ["a red circle"])
    summary = download(url_list, tmp_path / "shards", PARAMS.model_copy(update={"captions_col": "captions"}))
    assert summary["url_list"]["successes"] == 1
    assert "has no column 'captions'" in caplog.text
    [sample] = [sample for tar in list_shards(tmp_path / "shards") for sample in iter_shard(tar)]
    assert sample.captions == ("a red circle",)


def test_changed_captions_of_downloaded_urls_are_counted_and_named(tmp_path, image_server, caplog):
    urls = [image_server.url(f"/img/{i}.png") for i in range(4)]
    output = tmp_path / "shards"
    first = download(write_list(tmp_path / "v1.parquet", urls, ["one", "two", "three", "four"]), output, PARAMS)
    assert first["url_list"]["captions_changed"] == 0

    # The same URLs, one recaptioned, and then a caption list where the shards were written without one:
    # the shards keep what they hold, and the run says how many rows differ instead of passing silently.
    recaptioned = write_list(tmp_path / "v2.parquet", urls, ["one", "TWO", "three", "four"])
    summary = download(recaptioned, output, PARAMS)
    assert summary["url_list"]["captions_changed"] == 1 and summary["this_run"]["fetched"] == 0
    assert "1 URL(s) of" in caplog.text and "download into an empty --output" in caplog.text

    with_lists = tmp_path / "v3.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["one", "two", "three", "four"],
                             "captions": [["one", "uno"], ["two"], ["three"], ["four"]]}), with_lists)
    listed = PARAMS.model_copy(update={"captions_col": "captions"})
    assert download(with_lists, output, listed)["url_list"]["captions_changed"] == 4

    fresh = tmp_path / "fresh"
    download(with_lists, fresh, listed)
    assert download(with_lists, fresh, listed)["url_list"]["captions_changed"] == 0


def test_a_list_read_in_many_batches_gives_the_folder_one_batch_gives(tmp_path, image_server):
    """The list is read in record batches, several times (check, plan, account): duplicates, invalid rows,
    failures and new rows spread over many batches give the bytes of reading it in one."""
    urls = [image_server.url(f"/img/{i}.png") for i in range(12)] + [image_server.url("/404"), "not a url", ""]
    urls += [image_server.url("/img/3.png"), image_server.url("/html"), image_server.url("/img/3.png")]
    captions = [f"picture number {i}" for i in range(len(urls))]
    captions[5] = ""
    lists = [[caption, f"also {i}", ""] if i % 4 else None for i, caption in enumerate(captions)]
    first = tmp_path / "v1.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions, "captions": lists}), first)
    # the refresh: new rows at both ends and in the middle, one caption changed
    urls2 = [image_server.url("/img/100.png"), *urls[:8], image_server.url("/img/101.png"), *urls[8:],
             image_server.url("/img/102.png")]
    captions2 = ["new 100", *captions[:8], "new 101", *captions[8:], "new 102"]
    captions2[2] = "recaptioned"
    second = tmp_path / "v2.parquet"
    lists2 = [[caption, "other"] if i % 3 else None for i, caption in enumerate(captions2)]
    pq.write_table(pa.table({"url": urls2, "caption": captions2, "captions": lists2}), second)
    params = PARAMS.model_copy(update={"captions_col": "captions"})

    def runs(output: Path, batch_size: int | None) -> list[dict]:
        extra = {"batch_size": batch_size} if batch_size else {}
        summaries = [download(first, output, params, **extra), download(second, output, params, **extra)]
        for summary in summaries:
            summary["this_run"].pop("seconds")
        return summaries

    in_batches_of_2 = runs(tmp_path / "small", 2)
    whole = runs(tmp_path / "whole", None)
    assert in_batches_of_2 == whole
    assert folder_hashes(tmp_path / "small") == folder_hashes(tmp_path / "whole")
    assert whole[0]["url_list"]["duplicates"] == 2 and whole[0]["url_list"]["invalid"] == 3
    assert whole[1]["this_run"]["fetched"] == 3 and whole[1]["url_list"]["captions_changed"] > 1
