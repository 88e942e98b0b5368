"""ttsd fetch: download an official IndexTTS-2 or IndexTTS-2.5 release and its auxiliary models, then convert.

The files are placed in the official source layout that `ttsd.pipeline.convert` reads (see its
docstring), each one is verified, and `convert(src, dst)` writes the ttsd checkpoint directory
(`checkpoints/IndexTTS-2/` by default). The official files stay beside it, in `<dst>.official/`,
so a later `ttsd-convert` needs no second download (and the conversion, which replaces its
destination as a whole, never touches them).

Downloading is a plain function, `Downloader = (RemoteFile, dest Path) -> None`, passed in by
the caller: `hub_downloader()` uses `huggingface_hub` (the optional `fetch` extra), and tests
pass one that copies from a local stand-in directory so they never touch the network.
This module is never imported by the daemon.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ttsd.api.errors import TtsdError, missing_extra

from .errors import CheckpointError

log = logging.getLogger(__name__)

INDEXTTS2_REPO = "IndexTeam/IndexTTS-2"
INDEXTTS25_REPO = "IndexTeam/IndexTTS-2.5"
CHECKPOINTS = Path("checkpoints")  # DST defaults to CHECKPOINTS/<the release's repository name>
DEFAULT_DST = CHECKPOINTS / "IndexTTS-2"  # that of the default model
SOURCE_SUFFIX = ".official"         # <dst>.official/ holds the files as released
RECORD_NAME = "fetch.json"          # what was downloaded, from where, with its SHA-256

# Leading bytes of each container format; a failed download usually leaves an HTML error page
# or a Git LFS pointer ("version https://git-lfs...") under the right name, and this catches both.
ZIP_MAGIC = b"PK\x03\x04"           # torch.save (zip container, torch >= 1.6)
PICKLE_MAGIC = b"\x80"              # legacy torch.save: a pickle protocol opcode
LFS_POINTER = b"version https://git-lfs"
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteFile:
    """One file of the release: where it is published and where the source layout wants it."""

    repo_id: str                # hub repository, e.g. "IndexTeam/IndexTTS-2"
    filename: str               # path inside that repository
    dest: str                   # path inside the official source layout (convert.py's docstring)
    kind: str                   # format checked after download: torch|safetensors|json|yaml|spm|tiktoken|text
    sha256: str | None = None   # pinned digest where one is published; None means "not pinned"
    revision: str | None = None  # branch, tag or commit; None is the repository's default branch


# The release as upstream's infer_v2 loads it, but for the emotion-from-text model (QWEN_EMO below).
# No SHA-256 is pinned: the repositories publish none outside the hub's own LFS metadata, which
# hub_downloader checks instead.
RELEASE: tuple[RemoteFile, ...] = (
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="config.yaml", dest="config.yaml", kind="yaml"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="gpt.pth", dest="gpt.pth", kind="torch"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="s2mel.pth", dest="s2mel.pth", kind="torch"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="bpe.model", dest="bpe.model", kind="spm"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="wav2vec2bert_stats.pt", dest="wav2vec2bert_stats.pt",
               kind="torch"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="feat1.pt", dest="feat1.pt", kind="torch"),
    RemoteFile(repo_id=INDEXTTS2_REPO, filename="feat2.pt", dest="feat2.pt", kind="torch"),
    RemoteFile(repo_id="facebook/w2v-bert-2.0", filename="model.safetensors",
               dest="hf_cache/w2v-bert-2.0/model.safetensors", kind="safetensors"),
    RemoteFile(repo_id="facebook/w2v-bert-2.0", filename="config.json",
               dest="hf_cache/w2v-bert-2.0/config.json", kind="json"),
    RemoteFile(repo_id="amphion/MaskGCT", filename="semantic_codec/model.safetensors",
               dest="hf_cache/semantic_codec_model.safetensors", kind="safetensors"),
    RemoteFile(repo_id="funasr/campplus", filename="campplus_cn_common.bin",
               dest="hf_cache/campplus_cn_common.bin", kind="torch"),
    RemoteFile(repo_id="nvidia/bigvgan_v2_22khz_80band_256x", filename="bigvgan_generator.pt",
               dest="hf_cache/bigvgan/bigvgan_generator.pt", kind="torch"),
    RemoteFile(repo_id="nvidia/bigvgan_v2_22khz_80band_256x", filename="config.json",
               dest="hf_cache/bigvgan/config.json", kind="json"),
)

# IndexTTS-2.5 as infer_v2_5 loads it (its file names: config.yaml's gpt_checkpoint, s2mel_checkpoint,
# w2v_stat, spk_matrix, emo_matrix, which upstream's webui checks for too, plus the hard-coded
# codec.pth and get_tokenizer's vocabulary name) and the same auxiliary models minus the MaskGCT
# codec, which 2.5 never reads. The emotion-from-text model is QWEN_EMO, as for IndexTTS-2.
RELEASE_V25: tuple[RemoteFile, ...] = (
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="config.yaml", dest="config.yaml", kind="yaml"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="gpt.pth", dest="gpt.pth", kind="torch"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="s2mel.pth", dest="s2mel.pth", kind="torch"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="codec.pth", dest="codec.pth", kind="torch"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="multilingual_zh_ja_yue_char_del.tiktoken",
               dest="multilingual_zh_ja_yue_char_del.tiktoken", kind="tiktoken"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="wav2vec2bert_stats.pt", dest="wav2vec2bert_stats.pt",
               kind="torch"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="feat1.pt", dest="feat1.pt", kind="torch"),
    RemoteFile(repo_id=INDEXTTS25_REPO, filename="feat2.pt", dest="feat2.pt", kind="torch"),
    *(rf for rf in RELEASE if rf.repo_id not in (INDEXTTS2_REPO, "amphion/MaskGCT")),
)

# The emotion-from-text model (config.yaml `qwen_emo_path`; the name is qwen_emo.QWEN_EMO_DIR, not
# imported here because that module needs torch): the released folder as it is, all 11 files, for
# `infer(use_emo_text=True)`. The IndexTTS-2.5 config names the same folder; it is taken from the
# IndexTTS-2 repository, where it is known to be published, for both models.
QWEN_EMO_FOLDER = "qwen0.6bemo4-merge"
QWEN_EMO: tuple[RemoteFile, ...] = tuple(
    RemoteFile(repo_id=INDEXTTS2_REPO, filename=f"{QWEN_EMO_FOLDER}/{name}", dest=f"{QWEN_EMO_FOLDER}/{name}",
               kind=kind)
    for name, kind in (
        ("config.json", "json"), ("generation_config.json", "json"), ("model.safetensors", "safetensors"),
        ("tokenizer.json", "json"), ("tokenizer_config.json", "json"), ("special_tokens_map.json", "json"),
        ("added_tokens.json", "json"), ("vocab.json", "json"), ("merges.txt", "text"),
        ("chat_template.jinja", "text"), ("Modelfile", "text"),
    )
)

# `ttsd fetch --model NAME` → (the model's own repository, every file to fetch but QWEN_EMO).
MODELS: dict[str, tuple[str, tuple[RemoteFile, ...]]] = {
    "indextts-2": (INDEXTTS2_REPO, RELEASE),
    "indextts-2.5": (INDEXTTS25_REPO, RELEASE_V25),
}
DEFAULT_MODEL = "indextts-2"  # the daemon serves IndexTTS-2 checkpoints today


def release_files(model: str, revision: str | None = None, *, emo_text: bool = True) -> tuple[RemoteFile, ...]:
    """The files of `model` (a MODELS key), with `revision` applied to the model's own repository;
    with `emo_text`, the emotion-from-text model (QWEN_EMO) too."""
    try:
        repo, files = MODELS[model]
    except KeyError:
        raise FetchError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}") from None
    if emo_text:
        files = files + QWEN_EMO
    if revision is None:
        return files
    return tuple(
        RemoteFile(repo_id=rf.repo_id, filename=rf.filename, dest=rf.dest, kind=rf.kind, sha256=rf.sha256,
                   revision=revision) if rf.repo_id == repo else rf
        for rf in files
    )


Downloader = Callable[[RemoteFile, Path], None]
"""Writes `RemoteFile` to the given path (parents exist); raises on failure."""


class FetchError(CheckpointError):
    """A release file could not be downloaded or failed verification."""


def sha256_file(path: Path) -> str:
    from .convert import sha256_file as digest  # lazy: convert imports torch

    return digest(path)


def check_format(path: Path, kind: str) -> None:
    """Raise FetchError unless `path` is a non-empty file whose contents look like `kind`."""
    size = path.stat().st_size if path.is_file() else -1
    if size <= 0:
        raise FetchError(f"{path}: missing or empty after download")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(LFS_POINTER):
        raise FetchError(f"{path}: is a Git LFS pointer, not the file itself")
    if kind == "torch":
        ok = head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)
    elif kind == "safetensors":
        # 8-byte little-endian header length, then the JSON header itself.
        header_len = int.from_bytes(head[:8], "little")
        ok = len(head) > 8 and head[8:9] == b"{" and 8 + header_len <= size
    elif kind == "json":
        try:
            ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
    elif kind == "yaml":
        try:
            ok = isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)
        except (UnicodeDecodeError, yaml.YAMLError):
            ok = False
    elif kind == "tiktoken":
        # One `base64(piece) rank` pair per line (utils/tokenizer.get_encoding's format).
        first = head.split(b"\n", 1)[0].split()
        ok = len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None
    elif kind == "text":
        # A chat template, merges.txt, an ollama Modelfile: UTF-8 text, not an HTML error page.
        try:
            ok = not head.lstrip().lower().startswith((b"<!doctype", b"<html")) and bool(path.read_text("utf-8"))
        except UnicodeDecodeError:
            ok = False
    elif kind == "spm":
        # A SentencePiece ModelProto starts with field 1 (pieces), wire type 2: tag byte 0x0a.
        ok = head[:1] == b"\x0a"
    else:
        raise ValueError(f"unknown file kind {kind!r}")
    if not ok:
        raise FetchError(f"{path}: does not look like a {kind} file (truncated or an error page?)")


def verify_file(path: Path, rf: RemoteFile) -> str:
    """Check format and, where pinned, SHA-256; return the file's SHA-256."""
    check_format(path, rf.kind)
    digest = sha256_file(path)
    if rf.sha256 is not None and digest != rf.sha256:
        raise FetchError(f"{path}: SHA-256 {digest} differs from the pinned {rf.sha256}")
    return digest


def _place(blob: Path, dest: Path) -> None:
    """Put a downloaded blob at `dest`: a hard link costs no disk; copy across filesystems."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(blob, tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    tmp.replace(dest)


def hub_downloader(*, cache_dir: Path | None = None, token: str | None = None) -> Downloader:
    """A Downloader backed by `huggingface_hub.hf_hub_download` (its own progress bars).

    Files go through the hub cache (`cache_dir`, default the hub's) and are then hard-linked
    into the layout. LFS blobs are named by their SHA-256 in the cache; that name is checked
    against the bytes, which is the verification the release itself offers."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise FetchError("needs the 'fetch' extra (huggingface_hub is not installed): pip install 'ttsd[fetch]'") from e

    def download(rf: RemoteFile, dest: Path) -> None:
        try:
            got = hf_hub_download(repo_id=rf.repo_id, filename=rf.filename, revision=rf.revision,
                                  cache_dir=cache_dir, token=token)
        except Exception as e:  # the hub raises many types (HTTP, offline, gated, not found)
            raise FetchError(f"{rf.repo_id}/{rf.filename}: download failed: {e}") from e
        blob = Path(str(got)).resolve()
        if HEX64.fullmatch(blob.name):
            digest = sha256_file(blob)
            if digest != blob.name:
                raise FetchError(f"{rf.repo_id}/{rf.filename}: SHA-256 {digest} differs from the hub's {blob.name}")
        _place(blob, dest)

    return download


def directory_downloader(root: Path) -> Downloader:
    """A Downloader that copies from a local directory already in the source layout.

    For machines without hub access (copy a release made elsewhere) and for tests."""
    root = Path(root)

    def download(rf: RemoteFile, dest: Path) -> None:
        src = root / rf.dest
        if not src.is_file():
            raise FetchError(f"{rf.repo_id}/{rf.filename}: not in {root} (expected {src})")
        _place(src, dest)

    return download


def fetch(src_dir: Path, download: Downloader, *, files: Iterable[RemoteFile] = RELEASE,
          force: bool = False) -> dict[str, str]:
    """Download `files` into `src_dir` in the official layout and verify each one.

    A file already present and valid is kept (an interrupted fetch resumes) unless `force`.
    Returns {layout path: SHA-256} and records it, with the origins, in `src_dir/fetch.json`."""
    src_dir = Path(src_dir)
    record: dict[str, dict[str, str | None]] = {}
    digests: dict[str, str] = {}
    for rf in files:
        dest = src_dir / rf.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and not force:
            try:
                digests[rf.dest] = verify_file(dest, rf)
                log.info("fetch keep file=%s", rf.dest)
            except FetchError as e:
                log.warning("fetch redownload file=%s reason=%s", rf.dest, e)
        if rf.dest not in digests:
            log.info("fetch get repo=%s file=%s dest=%s", rf.repo_id, rf.filename, rf.dest)
            download(rf, dest)
            digests[rf.dest] = verify_file(dest, rf)
        record[rf.dest] = {"repo_id": rf.repo_id, "filename": rf.filename, "revision": rf.revision,
                           "sha256": digests[rf.dest]}
    (src_dir / RECORD_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return digests


def fetch_and_convert(dst_dir: Path, download: Downloader, *, src_dir: Path | None = None,
                      files: Iterable[RemoteFile] = RELEASE, force: bool = False,
                      progress: bool = True) -> Path:
    """fetch() into `src_dir` (default `<dst_dir>.official`), then convert into `dst_dir`.

    A non-empty `dst_dir` is refused before anything is downloaded, unless `force` (which also
    downloads every file again). Returns the path of the converted checkpoint's manifest.json."""
    from .convert import check_destination, convert

    dst_dir = Path(dst_dir)
    src_dir = Path(src_dir) if src_dir is not None else source_dir(dst_dir)
    check_destination(src_dir, dst_dir, force=force)
    fetch(src_dir, download, files=files, force=force)
    return convert(src_dir, dst_dir, progress=progress, force=force)


def default_dst(model: str) -> Path:
    """Where `ttsd fetch --model MODEL` converts to by default: checkpoints/IndexTTS-2, checkpoints/IndexTTS-2.5."""
    return CHECKPOINTS / MODELS[model][0].split("/")[-1]


def source_dir(dst_dir: Path) -> Path:
    """Where the official files go by default: beside the converted directory, never inside it."""
    return dst_dir.with_name(dst_dir.name + SOURCE_SUFFIX)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ttsd fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dst", type=Path, default=None,
                    help="converted checkpoint directory (default: checkpoints/IndexTTS-2 or checkpoints/IndexTTS-2.5)")
    ap.add_argument("--src", type=Path, default=None,
                    help=f"where the official files are laid out (default: DST{SOURCE_SUFFIX})")
    ap.add_argument("--from-dir", type=Path, default=None,
                    help="copy from a local directory in the official layout instead of downloading")
    ap.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                    help="which release to fetch (default: %(default)s)")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of the model's repository")
    ap.add_argument("--cache-dir", type=Path, default=None, help="hub cache directory (default: the hub's)")
    ap.add_argument("--token", default=None, help="hub access token (default: the hub's login, if any)")
    ap.add_argument("--force", action="store_true",
                    help="download again even if valid files are present, and replace a non-empty DST")
    ap.add_argument("--no-convert", action="store_true", help="only download and verify")
    ap.add_argument("--no-emo-text", action="store_true",
                    help=f"leave out {QWEN_EMO_FOLDER}/, the emotion-from-text model (1.2 GB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    files = release_files(args.model, args.revision, emo_text=not args.no_emo_text)
    dst = args.dst if args.dst is not None else default_dst(args.model)
    src = args.src if args.src is not None else source_dir(dst)
    try:
        download = (directory_downloader(args.from_dir) if args.from_dir is not None
                    else hub_downloader(cache_dir=args.cache_dir, token=args.token))
        if args.no_convert:
            fetch(src, download, files=files, force=args.force)
            print(f"ttsd fetch: official files in {src}", file=sys.stderr)
        else:
            manifest = fetch_and_convert(dst, download, src_dir=src, files=files, force=args.force)
            print(f"ttsd fetch: converted checkpoint in {manifest.parent}", file=sys.stderr)
    except TtsdError as e:
        print(f"ttsd fetch: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (missing := missing_extra(e)) is None:
            raise
        print(f"ttsd fetch: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttsd fetch: interrupted (run again to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
