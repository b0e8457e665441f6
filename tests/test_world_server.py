"""The synthetic world downloaded for real: `vlkd download` starts and stops the world's server itself."""

from __future__ import annotations

import json
import socket
import urllib.request
from http.server import HTTPServer, SimpleHTTPRequestHandler

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from vlkd.cli import main
from vlkd.config import SynthParams
from vlkd.errors import VlkdError
from vlkd.world.server import serve_folder, world_server
from vlkd.world.synth import generate_world


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def world(tmp_path):
    params = SynthParams(images=24, eval_images=3, shifted_images=2, text_scenes=20, pretrain_images=0,
                         image_size=48, port=free_port())
    generate_world(tmp_path / "world", params)
    return tmp_path / "world", params


def test_vlkd_download_serves_the_world_it_downloads(world, tmp_path):
    folder, params = world
    (tmp_path / "params.yaml").write_text("download:\n  processes: 1\n  shard_size: 10\n  image_size: 32\n")
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "download", "--url-list",
                                       str(folder / "urls.parquet"), "--output", str(tmp_path / "shards"),
                                       "--metrics", str(tmp_path / "summary.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["url_list"]["successes"] == 24 and summary["shards"]["count"] == 3
    with pytest.raises(OSError):  # stopped afterwards
        urllib.request.urlopen(f"http://127.0.0.1:{params.port}/world.json", timeout=1)
    captions = pq.read_table(folder / "urls.parquet").column("caption").to_pylist()
    shard_captions = pq.read_table(tmp_path / "shards" / "00000.parquet").column("caption").to_pylist()
    assert set(shard_captions) <= set(captions)


def test_a_port_taken_by_another_program_is_one_clear_error(world):
    folder, params = world
    with HTTPServer(("127.0.0.1", params.port), SimpleHTTPRequestHandler), \
            pytest.raises(VlkdError, match=f"port {params.port} on 127.0.0.1 is taken"), \
            world_server(folder / "urls.parquet"):
        pass


def test_a_server_already_serving_the_same_world_is_reused(world):
    folder, params = world
    url = f"http://127.0.0.1:{params.port}/images/train/000000.png"
    with serve_folder(folder, params.port), world_server(folder / "urls.parquet"), urllib.request.urlopen(url) as r:
        assert r.status == 200
