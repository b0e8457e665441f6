"""Shared fixtures: a real HTTP server on 127.0.0.1 that serves good images and every kind of bad answer."""

from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

SLOW_SECONDS = 3.0


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs a worker per core), each worker and every stage process it
    starts compute on one thread: two workers of two threads each on two cores would oversubscribe. Set
    before any test imports torch, which reads it once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")


def png_bytes(index: int, size: int = 48) -> bytes:
    """A small PNG that differs per index."""
    image = Image.new("RGB", (size, size), ((index * 37) % 256, (index * 91) % 256, (index * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: int = 64) -> bytes:
    image = Image.effect_noise((size, size), 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class ImageServer:
    """Paths: /img/N.png good; /404; /html; /truncated.jpg; /empty.jpg; /huge.png (decodes to 1000x1000);
    /redirect/N -> /img/N.png; /loop (redirects to itself); /slow.png (answers after SLOW_SECONDS);
    /flaky/N.png (404 on the first request, then an image); /delay/N.png (a good image after 50 ms);
    /noai/N.png (an image whose X-Robots-Tag opts out of AI use); /otherbot/N.png (opts out for another
    agent only)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 drops img2dataset's connections
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def _handler(self):
        server = self
        truncated = jpeg_bytes(128)
        truncated = truncated[: len(truncated) // 3]
        huge = png_bytes(1, size=1000)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", content_type: str = "image/png", **headers) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path
                with server.lock:
                    server.requests[path] += 1
                    seen = server.requests[path]
                if path.startswith("/img/"):
                    self._send(200, png_bytes(int(path.split("/")[-1].split(".")[0])))
                elif path.startswith("/delay/"):
                    time.sleep(0.05)
                    self._send(200, png_bytes(int(path.split("/")[-1].split(".")[0])))
                elif path.startswith("/noai/"):
                    self._send(200, png_bytes(int(path.split("/")[-1].split(".")[0])), **{"X-Robots-Tag": "noai"})
                elif path.startswith("/otherbot/"):
                    self._send(200, png_bytes(int(path.split("/")[-1].split(".")[0])),
                               **{"X-Robots-Tag": "otherbot: noai, noimageai"})
                elif path.startswith("/flaky/"):
                    if seen == 1:
                        self._send(404, b"not yet", "text/plain")
                    else:
                        self._send(200, png_bytes(int(path.split("/")[-1].split(".")[0])))
                elif path == "/html":
                    self._send(200, b"<html><body>not an image</body></html>", "text/html")
                elif path == "/truncated.jpg":
                    self._send(200, truncated, "image/jpeg")
                elif path == "/empty.jpg":
                    self._send(200, b"", "image/jpeg")
                elif path == "/huge.png":
                    self._send(200, huge)
                elif path.startswith("/redirect/"):
                    self._send(302, Location=f"/img/{path.split('/')[-1]}.png")
                elif path == "/loop":
                    self._send(302, Location="/loop")
                elif path == "/slow.png":
                    time.sleep(SLOW_SECONDS)
                    self._send(200, png_bytes(0))
                else:
                    self._send(404, b"no such thing", "text/plain")

        return Handler


@pytest.fixture
def image_server():
    server = ImageServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """Prefect's test harness (a temporary local server on SQLite), set up as the Makefile sets Prefect."""
    settings = {"PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_world_shards(tmp_path_factory):
    """A tiny synthetic world downloaded for real into 3 shards of 10 images: (world folder, shard folder)."""
    from vlkd.config import DownloadParams, SynthParams
    from vlkd.corpus.download import download
    from vlkd.world.server import world_server
    from vlkd.world.synth import generate_world

    root = tmp_path_factory.mktemp("tiny")
    generate_world(root / "world", SynthParams(images=30, eval_images=6, shifted_images=2, text_scenes=20,
                                               pretrain_images=0, image_size=48, port=free_port()))
    with world_server(root / "world" / "urls.parquet"):
        download(root / "world" / "urls.parquet", root / "shards",
                 DownloadParams(processes=1, shard_size=10, image_size=32, captions_col="captions"))
    return root / "world", root / "shards"


TEST_MODEL = "vlkd-test-vit"
TEST_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_random_teacher(folder, seed: int = 0, model_name: str = TEST_MODEL, config: dict | None = None):
    """A randomly initialised tiny open_clip model (the test ViT unless `model_name`/`config` say otherwise)
    saved like the teacher stage saves one; returns its file."""
    import json

    import open_clip
    import torch

    from vlkd.models.teacher import save_checkpoint

    config = config or TEST_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{model_name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{model_name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    return save_checkpoint(model, model_name, config, folder)


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher"))


def make_tiny_plm(folder, captions):
    """A byte-level BPE tokenizer trained on `captions` and a randomly initialised tiny BART."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BartTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=96, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
