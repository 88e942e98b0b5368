"""ttsd-convert: an official IndexTTS-2 or IndexTTS-2.5 checkpoint directory → a ttsd checkpoint directory.

Conversion changes only the container format. Official `.pth`/`.pt`/`.bin` files are read with
`torch.load(weights_only=True)` and written as safetensors with the same keys; the only name
changes are nesting turned into dotted prefixes (`state["net"]["cfm"]` → `cfm.`) and a dropped
DDP `module.` prefix. The SentencePiece `bpe.model` becomes a `tokenizers` `tokenizer.json`.
A `manifest.json` with the SHA-256 of every output file goes beside them.

The output is written into a temporary directory beside the destination and renamed into place
only when every file is complete, so a failed or interrupted conversion leaves no partial
destination. A non-empty destination is replaced only with `--force` (a daemon serving it keeps
the weights it has loaded); the destination can never be the source or lie inside it.

Source layout (the IndexTTS-2 release plus its auxiliary models, as `ttsd fetch` lays it out):

    config.yaml  gpt.pth  s2mel.pth  bpe.model  wav2vec2bert_stats.pt  feat1.pt  feat2.pt
    hf_cache/w2v-bert-2.0/{model.safetensors, config.json}
    hf_cache/semantic_codec_model.safetensors
    hf_cache/campplus_cn_common.bin
    hf_cache/bigvgan/{bigvgan_generator.pt, config.json}
    qwen0.6bemo4-merge/{config.json, model.safetensors, tokenizer.json, ...}   (optional)

IndexTTS-2.5 (config `version: 2.5`; without the key: codec.pth and a `*.tiktoken` present and
no bpe.model) has `codec.pth` and `multilingual_zh_ja_yue_char_del.tiktoken` instead of
bpe.model and the MaskGCT codec, and its s2mel.pth has no `gpt_layer`. It converts to
codec.safetensors (codec.pth's `model` dict) and tokenizer.tiktoken (the vocabulary, copied);
see `plan_v25`.

Both may hold the emotion-from-text model in the folder config.yaml's `qwen_emo_path` names
(qwen0.6bemo4-merge/, already safetensors and tokenizer.json). It is checked as strictly as the
loader reads it and copied unchanged under the same name; without it the conversion goes on
and the checkpoint has no emotion from text (see `plan_qwen_emo`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ttsd.api.errors import ConfigError, TtsdError, missing_extra

from .config import load_yaml
from .errors import CheckpointError
from .family import source_family

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "ttsd-checkpoint/1"


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceLayout:
    """Where each official file lives inside a source directory."""

    root: Path
    config: dict[str, Any]

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        if not p.is_file():
            raise CheckpointError(f"official checkpoint file not found: {p}")
        return p

    @property
    def gpt(self) -> Path:
        return self.path(self.config["gpt_checkpoint"])

    @property
    def s2mel(self) -> Path:
        return self.path(self.config["s2mel_checkpoint"])

    @property
    def bpe(self) -> Path:
        return self.path(self.config["dataset"]["bpe_model"])

    @property
    def w2v_stat(self) -> Path:
        return self.path(self.config["w2v_stat"])

    @property
    def spk_matrix(self) -> Path:
        return self.path(self.config["spk_matrix"])

    @property
    def emo_matrix(self) -> Path:
        return self.path(self.config["emo_matrix"])


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad pickles
        raise CheckpointError(f"{path}: cannot read official checkpoint: {e}") from e


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors → flat dotted keys; a DDP `module.` prefix is dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + name] = value.contiguous()
        else:
            raise CheckpointError(f"unexpected non-tensor entry {prefix}{name} of type {type(value).__name__}")
    return out


def _gpt(src: SourceLayout) -> dict[str, torch.Tensor]:
    state = _torch_load(src.gpt)
    # Upstream's load_checkpoint accepts {"model": sd} or a bare state dict.
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    return _flatten(state)


S2MEL_PARTS = ("cfm", "length_regulator", "gpt_layer")  # what infer_v2 loads from s2mel.pth
S2MEL_PARTS_V25 = ("cfm", "length_regulator")  # infer_v2_5 builds MyModel without gpt_layer


def _s2mel(src: SourceLayout, parts: tuple[str, ...] = S2MEL_PARTS) -> dict[str, torch.Tensor]:
    state = _torch_load(src.s2mel)
    if not isinstance(state, Mapping) or "net" not in state:
        raise CheckpointError(f"{src.s2mel}: expected a dict with key 'net'")
    # Only the sub-models inference loads; other top-level entries (optimizer, etc.) are training state.
    net = state["net"]
    missing = [k for k in parts if k not in net]
    if missing:
        raise CheckpointError(f"{src.s2mel}: 'net' lacks {missing}")
    return {k: v for name in parts for k, v in _flatten(net[name], f"{name}.").items()}


def _w2v_stats(src: SourceLayout) -> dict[str, torch.Tensor]:
    state = _torch_load(src.w2v_stat)
    if not isinstance(state, Mapping) or not {"mean", "var"} <= state.keys():
        raise CheckpointError(f"{src.w2v_stat}: expected a dict with 'mean' and 'var'")
    return {"mean": state["mean"].contiguous(), "var": state["var"].contiguous()}


def _emotion(src: SourceLayout) -> dict[str, torch.Tensor]:
    spk, emo = _torch_load(src.spk_matrix), _torch_load(src.emo_matrix)
    if not isinstance(spk, torch.Tensor) or not isinstance(emo, torch.Tensor):
        raise CheckpointError("feat1.pt / feat2.pt must each hold one tensor")
    # The bare tensors get the config keys that name them (spk_matrix = feat1, emo_matrix = feat2).
    return {"spk_matrix": spk.contiguous(), "emo_matrix": emo.contiguous()}


def _safetensors_copy(path: Path) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"official checkpoint file not found: {path}")
        shutil.copyfile(path, dst)

    return write


def _tensors(fn: Callable[[], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        save_file(fn(), str(dst), metadata={"format": "pt"})

    return write


def _bigvgan(src: SourceLayout) -> dict[str, torch.Tensor]:
    path = src.path("hf_cache", "bigvgan", "bigvgan_generator.pt")
    state = _torch_load(path)
    if isinstance(state, Mapping) and "generator" in state:
        state = state["generator"]
    return _flatten(state)


def _campplus(src: SourceLayout) -> dict[str, torch.Tensor]:
    return _flatten(_torch_load(src.path("hf_cache", "campplus_cn_common.bin")))


def _tokenizer(src: SourceLayout) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        from .text.tokenizer import sentencepiece_to_json

        dst.write_text(sentencepiece_to_json(src.bpe), encoding="utf-8")

    return write


def _copy(path_fn: Callable[[], Path]) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        shutil.copyfile(path_fn(), dst)

    return write


def _copy_file(path: Path) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)

    return write


def plan_qwen_emo(src: SourceLayout) -> dict[str, Callable[[Path], None]]:
    """The emotion-from-text model (config.yaml `qwen_emo_path`, released as qwen0.6bemo4-merge/, already
    safetensors + tokenizer.json): every file of the folder, copied under the same relative name once
    the folder has been checked as the loader will read it (config, tokenizer, chat template,
    generation settings, and every tensor name and shape). No folder, or no `qwen_emo_path`: nothing,
    and the converted checkpoint has no emotion from text."""
    from .qwen_emo import QwenEmoFiles, qwen_emo_subdir

    rel = qwen_emo_subdir(src.config)
    if rel is None or not (src.root / rel).exists():
        log.info("convert qwen_emo=absent folder=%s (no emotion from text)", rel)
        return {}
    folder = src.root / rel
    files = QwenEmoFiles.read(folder)
    files.check_weights()
    # Dot files are download-tool state (.cache/, .gitattributes), not part of the model.
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return {f"{rel}/{name}": _copy_file(folder / name) for name in names}


def plan(src: SourceLayout) -> dict[str, Callable[[Path], None]]:
    """Output file name → writer. Order is the order of the progress bar."""
    return {
        "config.yaml": _copy(lambda: src.path("config.yaml")),
        "tokenizer.json": _tokenizer(src),
        "gpt.safetensors": _tensors(lambda: _gpt(src)),
        "s2mel.safetensors": _tensors(lambda: _s2mel(src)),
        "w2v_bert.json": _copy(lambda: src.path("hf_cache", "w2v-bert-2.0", "config.json")),
        "w2v_bert.safetensors": _safetensors_copy(src.root / "hf_cache" / "w2v-bert-2.0" / "model.safetensors"),
        "w2v_stats.safetensors": _tensors(lambda: _w2v_stats(src)),
        "semantic_codec.safetensors": _safetensors_copy(src.root / "hf_cache" / "semantic_codec_model.safetensors"),
        "campplus.safetensors": _tensors(lambda: _campplus(src)),
        "bigvgan.json": _copy(lambda: src.path("hf_cache", "bigvgan", "config.json")),
        "bigvgan.safetensors": _tensors(lambda: _bigvgan(src)),
        "emotion.safetensors": _tensors(lambda: _emotion(src)),
        **plan_qwen_emo(src),
    }


TIKTOKEN_NAME = "multilingual_zh_ja_yue_char_del.tiktoken"  # get_tokenizer(multilingual=True) reads this name


def tiktoken_source(src: SourceLayout) -> Path:
    """The 2.5 vocabulary: upstream's fixed file name, else the directory's only `*.tiktoken`."""
    named = src.root / TIKTOKEN_NAME
    if named.is_file():
        return named
    found = sorted(src.root.glob("*.tiktoken"))
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise CheckpointError(f"{src.root}: expected {TIKTOKEN_NAME} (or one *.tiktoken file), found {what}")
    return found[0]


def _codec25(src: SourceLayout) -> dict[str, torch.Tensor]:
    path = src.path("codec.pth")
    state = _torch_load(path)
    # EnhancedCodec.load_checkpoint reads checkpoint["model"].
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with key 'model'")
    return _flatten(state["model"])


def plan_v25(src: SourceLayout) -> dict[str, Callable[[Path], None]]:
    """IndexTTS-2.5: output file name → writer (the IndexTTS-2 set with tokenizer.tiktoken for
    tokenizer.json, codec.safetensors for semantic_codec.safetensors, and no s2mel gpt_layer)."""
    steps = plan(src)
    del steps["tokenizer.json"], steps["semantic_codec.safetensors"]
    steps.update(
        {
            "tokenizer.tiktoken": _copy(lambda: tiktoken_source(src)),
            "s2mel.safetensors": _tensors(lambda: _s2mel(src, S2MEL_PARTS_V25)),
            "codec.safetensors": _tensors(lambda: _codec25(src)),
        }
    )
    return steps


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_destination(src_dir: Path, dst_dir: Path, *, force: bool) -> None:
    """ConfigError unless `dst_dir` may be written: never the source or inside it, and empty or absent
    unless `force`."""
    src, dst = src_dir.resolve(), dst_dir.resolve()
    if dst == src or dst.is_relative_to(src):
        raise ConfigError(f"destination {dst_dir} is {'the source' if dst == src else 'inside the source'} {src_dir}")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise ConfigError(f"destination {dst_dir} exists and is not a directory")
    if dst_dir.is_dir() and any(dst_dir.iterdir()) and not force:
        raise ConfigError(f"destination {dst_dir} is not empty; pass --force to replace it")


@contextmanager
def staged(dst_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary directory beside `dst_dir` to write into; renamed to `dst_dir` when the block
    ends without an error, removed when it fails. An existing non-empty `dst_dir` is replaced only
    with `force` (moved aside first, deleted after the rename), so no reader ever sees a mix."""
    dst_dir = Path(dst_dir)
    if dst_dir.is_dir() and any(dst_dir.iterdir()) and not force:
        raise ConfigError(f"destination {dst_dir} is not empty; pass --force to replace it")
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".partial", dir=dst_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".old", dir=dst_dir.parent))
        dst_dir.replace(old / dst_dir.name)  # aside, in one rename
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint directory is read by the service user
    tmp.replace(dst_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(out_dir: Path, names: Iterable[str], source: str) -> Path:
    """manifest.json in `out_dir`: format, source, and the SHA-256 and size of each named file."""
    files = {name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size} for name in names}
    manifest = {"format": MANIFEST_FORMAT, "source": source, "files": files}
    out = out_dir / "manifest.json"
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def convert(src_dir: Path, dst_dir: Path, progress: bool = True, *, force: bool = False) -> Path:
    """Convert `src_dir` (official layout) into `dst_dir` (see the module docstring for the rules);
    returns the manifest path."""
    from tqdm import tqdm

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise CheckpointError(f"no such directory: {src_dir}")
    cfg_path = src_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{src_dir}: no config.yaml (is this an IndexTTS-2 checkpoint directory?)")
    check_destination(src_dir, dst_dir, force=force)
    config = load_yaml(cfg_path)
    src = SourceLayout(root=src_dir, config=config)
    steps = source_family(src.root, src.config).convert_plan(src)
    with staged(dst_dir, force=force) as tmp:
        bar = tqdm(steps.items(), desc="convert", unit="file", disable=not progress, file=sys.stderr)
        for name, write in bar:
            bar.set_postfix_str(name)
            write(tmp / name)
        write_manifest(tmp, steps, source=str(src_dir.resolve()))
    log.info("converted src=%s dst=%s files=%d", src_dir, dst_dir, len(steps))
    return dst_dir / "manifest.json"


def verify(ckpt_dir: Path) -> None:
    """Check every file listed in `manifest.json` against its SHA-256; raise on the first mismatch."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt_dir}: no manifest.json (run ttsd-convert first)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{mpath}: unknown format {manifest.get('format')!r}")
    for name, entry in manifest["files"].items():
        p = ckpt_dir / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt_dir}: {name} listed in manifest but missing")
        if sha256_file(p) != entry["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 differs from manifest (corrupt or modified)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ttsd-convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="official IndexTTS-2 or IndexTTS-2.5 checkpoint directory")
    ap.add_argument("dst", type=Path, help="output ttsd checkpoint directory (absent or empty)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty destination")
    ap.add_argument("--verify", action="store_true", help="re-hash the written files against the manifest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(args.src, args.dst, force=args.force)
        if args.verify:
            verify(args.dst)
    except TtsdError as e:
        print(f"ttsd-convert: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (missing := missing_extra(e)) is None:
            raise
        print(f"ttsd-convert: {missing}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ttsd-convert: {e.filename or args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ttsd-convert: interrupted; {args.dst} was not changed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
