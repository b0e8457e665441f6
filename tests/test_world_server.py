"""The synthetic world downloaded for real: the stage starts and stops the world's server itself."""

from __future__ import annotations

import socket
import urllib.request
from http.server import HTTPServer, SimpleHTTPRequestHandler

import pyarrow.parquet as pq
import pytest

from vlkd.config import DownloadParams, SynthParams
from vlkd.corpus.download import download
from vlkd.corpus.server import serve_folder, world_server
from vlkd.corpus.synth import generate_world
from vlkd.errors import VlkdError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def world(tmp_path):
    params = SynthParams(images=24, eval_images=3, shifted_images=2, text_scenes=20, image_size=48,
                         port=free_port())
    generate_world(tmp_path / "world", params)
    return tmp_path / "world", params


def test_the_world_downloads_through_its_own_server(world, tmp_path):
    folder, params = world
    summary = download(folder / "urls.parquet", tmp_path / "shards",
                       DownloadParams(processes=1, shard_size=10, image_size=32))
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
