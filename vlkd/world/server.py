"""The synthetic world's HTTP server on 127.0.0.1, started and stopped around a download.

The world's URL list names a fixed port (params `synth.port`) so that the list, a DVC-tracked input,
is identical from run to run. If that port is already serving the same world (another download of the
same world running at the same time), that server is used as it is.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from vlkd.errors import VlkdError

# The world folder's manifest (written by `vlkd synth`): how the server knows a URL list is the world's.
WORLD_MANIFEST = "world.json"

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once


@contextlib.contextmanager
def serve_folder(root: Path, port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `root` read-only over HTTP on host:port while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = _Server((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise VlkdError(
                f"port {port} on {host} is taken by another program; free it, or set synth.port "
                "in params.yaml and run `vlkd synth` again"
            ) from err
        raise
    thread = threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True)
    thread.start()
    base_url = f"http://{host}:{server.server_address[1]}"
    log.info("serving %s at %s", root, base_url)
    try:
        yield base_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def world_of_url_list(url_list: Path) -> dict | None:
    """The manifest of the synthetic world that `url_list` belongs to, or None for any other list."""
    manifest = url_list.parent / WORLD_MANIFEST
    if not manifest.is_file():
        return None
    world = json.loads(manifest.read_text())
    return world if "base_url" in world else None


@contextlib.contextmanager
def world_server(url_list: Path) -> Iterator[None]:
    """Serve the world next to `url_list` if it is a synthetic world's list; do nothing otherwise."""
    world = world_of_url_list(url_list)
    if world is None:
        yield
        return
    root = url_list.parent
    base = urlsplit(world["base_url"])
    if _already_served(world, base.geturl()):
        log.info("the world is already served at %s; using that server", base.geturl())
        yield
        return
    with serve_folder(root, base.port, base.hostname):
        yield


def _already_served(world: dict, base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/{WORLD_MANIFEST}", timeout=2) as response:
            served = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return served.get("files") == world.get("files")
