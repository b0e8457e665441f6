"""Which tar files are shards, streaming the samples of one, and writing tar members reproducibly.

Shards are any webdataset tars: a folder (vlkd's download, img2dataset's, or any tars), a brace pattern
(`/data/cc3m/{00000..00331}.tar`, expanded by braceexpand as webdataset expands it), or a list of files.
Keys are webdataset's: a member's name up to the first dot of its file name (`webdataset`'s own split).

A plain `tarfile` stream rather than `webdataset.WebDataset`: the stages downstream must report the key
of every sample they could not decode, and webdataset's error handlers drop a bad sample without it.
Streaming keeps memory at one sample, whatever the shard's size.

A shard that cannot be read to its end (cut short, as a killed copy leaves it; not a tar at all; an I/O
error) is `UnreadableShard`: every stage skips it whole, names it with its reason and reads the others.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from vlkd.errors import VlkdError

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # img2dataset writes it last: a shard with one is complete
MTIME = 0  # tar members' fixed metadata, what a reproducible archive needs (as `tar --mtime=@0 --owner=0 --group=0`)
MODE = 0o444

IMAGE_EXTENSIONS = ("jpg", "png", "webp")

ShardSpec = Path | str | Sequence[Path | str]  # a folder, a brace pattern, a tar file, or a list of those

@dataclass(frozen=True)
class ShardSample:
    key: str
    image: bytes | None  # encoded image, None when the shard holds none for this key
    caption: str
    captions: tuple[str, ...]  # every caption of the image, `caption` first (just `caption` without a list)


class UnreadableShard(Exception):
    """A shard that cannot be read to its end: cut short, not a tar, or an I/O error. Not a VlkdError, which
    stops a stage: a stage skips the shard, names it with `problem` and goes on with the others. Skipped
    whole: the samples read before the failure go with it, so no part of a shard enters a feature file (which
    would mark the shard done) or a training set, and once the shard is whole a later run reads all of it."""

    def __init__(self, path: Path, reason: str, samples: int) -> None:
        super().__init__(path, reason, samples)  # the arguments again: DataLoader workers pickle it
        self.path, self.reason, self.samples = path, reason, samples

    @property
    def problem(self) -> str:
        where = f"cut short after {self.samples} sample(s)" if self.samples else "no sample could be read"
        return f"{where} ({self.reason})"

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


# What to do about an unreadable shard, wherever it is found.
UNREADABLE_ADVICE = ("delete it (in a download's folder with its .parquet and _stats.json) and re-run `vlkd download` "
                     "to fetch its images again, or put a whole copy in its place")


def warn_unreadable(err: UnreadableShard) -> None:
    log.warning("%s; skipped: %s", err, UNREADABLE_ADVICE)


def list_shards(spec: ShardSpec) -> list[Path]:
    """The shards' tar files, in order: a folder's (see `folder_shards`), a brace pattern's (every file
    it names must exist), or each of a list of those. Two shards with the same stem are refused: their
    feature files, named after the stem, would be one file."""
    entries = [spec] if isinstance(spec, str | Path) else list(spec)
    tars = [tar for entry in entries for tar in _expand(Path(entry))]
    seen: dict[str, Path] = {}
    for tar in tars:
        if tar.stem in seen:
            raise VlkdError(f"shards {seen[tar.stem]} and {tar} have the same name {tar.stem!r}, so their features "
                            "would be one file; give shards distinct file names (features.shards or --shards)")
        seen[tar.stem] = tar
    return tars


def _expand(entry: Path) -> list[Path]:
    if "{" in str(entry):
        named = [Path(name) for name in braceexpand(str(entry))]
        missing = [path for path in named if not path.is_file()]
        if missing:
            raise VlkdError(f"{len(missing)} of the {len(named)} shard(s) that {entry} names do not exist, e.g. "
                            f"{missing[0]}; fix the pattern (features.shards or --shards)")
        return named
    if entry.is_dir():
        return folder_shards(entry)
    if entry.is_file():
        return [entry]
    raise VlkdError(f"shard folder or file {entry} does not exist; run `vlkd download` first or check --shards")


def folder_shards(folder: Path) -> list[Path]:
    """The shards of a folder, numbered ones in number order, then the rest by name. In a folder with
    img2dataset's stats files (vlkd's download) only complete shards count: a tar whose `<stem>_stats.json`
    is not there yet is being written, or a killed run's leftover. Without any stats file, every *.tar is."""
    tars = sorted(folder.glob("*.tar"), key=_shard_order)
    if not any(folder.glob(f"*{STATS_SUFFIX}")):
        return tars
    complete = [tar for tar in tars if tar.with_name(tar.stem + STATS_SUFFIX).is_file()]
    if len(complete) < len(tars):
        log.warning("%s: %d tar file(s) without their %s left out (a download in progress, or a killed one's "
                    "leftover): %s", folder, len(tars) - len(complete), STATS_SUFFIX,
                    [tar.name for tar in tars if tar not in complete][:5])
    return complete


def _shard_order(tar: Path) -> tuple[int, int, str]:
    """Numbered shards by number (as the download stage numbers them, past 99999 too), then by name."""
    return (0, int(tar.stem), "") if tar.stem.isdigit() else (1, 0, tar.stem)


def iter_shard(tar_path: Path) -> Iterator[ShardSample]:
    """The samples of one shard in file order. A shard that cannot be read to its end raises
    `UnreadableShard` after the samples before the failure: whoever reads it drops those with it."""
    samples = 0
    try:
        for sample in _samples(tar_path):
            yield sample
            samples += 1
    except (tarfile.TarError, EOFError, OSError) as err:  # tarfile reports compression errors as ReadError
        raise UnreadableShard(tar_path, f"{type(err).__name__}: {err}"[:200], samples) from err


class _WholeTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly where a header after the first is missing, cut or garbled; a whole tar
    ends with its end-of-archive block, so such a file was cut short (a cut in a header or between members)."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            if tar.offset == 0:
                raise  # the first header: tarfile's own ReadError ("empty file", "invalid header")
            raise tarfile.ReadError(f"no end-of-archive block, {err}") from None


def _samples(tar_path: Path) -> Iterator[ShardSample]:
    """The samples of a tar; files of one sample are consecutive in a webdataset tar."""
    key, files = None, {}
    # `*`: compressed shards too, as webdataset reads them
    with tarfile.open(tar_path, mode="r|*", tarinfo=_WholeTarInfo) as tar:
        for member in tar:
            member_key, extension = base_plus_ext(member.name) if member.isfile() else (None, None)
            if member_key is None:  # not a sample's file (webdataset skips these too)
                continue
            extension = extension.lower()  # as webdataset's grouping does: x.JPG is an image
            if member_key != key and key is not None:
                yield _sample(key, files)
                files = {}
            key = member_key
            files[extension] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(key, files)


def _sample(key: str, files: dict[str, bytes]) -> ShardSample:
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    caption = files.get("txt", b"").decode("utf-8", errors="replace")
    return ShardSample(key=key, image=image, caption=caption, captions=_captions(files.get("json"), caption))


def _captions(meta: bytes | None, caption: str) -> tuple[str, ...]:
    """The `captions` list img2dataset saved in the sample's json (download.captions_col), else (caption,)."""
    try:
        listed = json.loads(meta).get("captions") if meta else None
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        return (caption,)
    return tuple(dict.fromkeys([caption, *(text for text in listed if isinstance(text, str) and text)]))


@dataclass
class Pairs:
    """The decodable image-caption pairs of some shards, and what was left out: the keys of bad samples
    and the shards that cannot be read (tar name -> problem)."""

    keys: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)  # encoded
    captions: list[tuple[str, ...]] = field(default_factory=list)  # each image's captions
    bad: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


def read_pairs(shards: list[Path]) -> Pairs:
    """The pairs of every shard. A sample whose image is missing or does not decode is a bad sample: counted,
    logged and left out; a shard that cannot be read to its end is named and left out whole. That no shard
    can be read is an error."""
    pairs = Pairs()
    for tar in shards:
        try:
            samples = list(iter_shard(tar))  # the whole shard or none of it
        except UnreadableShard as err:
            warn_unreadable(err)
            pairs.unreadable[tar.name] = err.problem
            continue
        for sample in samples:
            problem = decode_problem(sample.image)
            if problem:
                log.warning("skipping sample %s in %s: %s", sample.key, tar.name, problem)
                pairs.bad.append(sample.key)
                continue
            pairs.keys.append(sample.key)
            pairs.images.append(sample.image)
            pairs.captions.append(sample.captions)
    if shards and len(pairs.unreadable) == len(shards):
        raise VlkdError(f"none of the {len(shards)} shard(s) can be read, e.g. {shards[0]}: "
                        f"{pairs.unreadable[shards[0].name]}; {UNREADABLE_ADVICE}")
    return pairs


def decode_problem(data: bytes | None) -> str | None:
    if data is None:
        return "no image in the shard"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return f"image does not decode ({type(err).__name__}: {str(err)[:100]})"
    return None


def training_shards(folder: Path, first: int | None = None) -> dict[str, Path]:
    """The complete shards to train on (the `first` of them in name order, or all), by tar name: a stage's
    record hashes them, so a changed training shard retrains and a shard added after them does not."""
    tars = list_shards(folder)[:first]
    if not tars:
        raise VlkdError(f"no complete shards in {folder}; run `vlkd download` first or check --shards")
    return {tar.name: tar for tar in tars}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata, so the archive's bytes depend on names and contents only."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
