"""`ttsd emotion`: what QwenEmotion reads in one emotion text, as one JSON line on stdout.

Runs a checkpoint's emotion-from-text model (qwen_emo.py) the way upstream's
`infer(use_emo_text=True)` / `infer(emo_text=...)` does, and prints every step: the rendered
prompt, its ids, the generated ids, the decoded answer, the emotion dict and the vector after
emo_alpha. `--checkpoints` is a converted checkpoint directory or any directory holding the
released qwen0.6bemo4-merge/ folder. Everything that can be checked without the model is checked
before it loads; every failure is one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Final

from ttsd.api.errors import ConfigError, TtsdError
from ttsd.api.options import SynthesisOptions
from ttsd.api.rules import MAX_TEXT_CHARS, check_text

from .qwen_emo import DEFAULT_MAX_NEW_TOKENS, QWEN_EMO_DIR, REQUIRED_FILES, UPSTREAM_MAX_NEW_TOKENS, find_qwen_emo

EXIT_FAILED: Final = 1  # the model could not be loaded, or its answer could not be read
EXIT_USAGE: Final = 2  # an argument is wrong; nothing was loaded
EXIT_INTERRUPTED: Final = 130


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ttsd emotion", description="Emotion weights from text with a checkpoint's QwenEmotion model.",
        epilog="Prints {prompt, input_ids, generated_ids, content, emotions, vector} as one JSON line. "
               "Exit status: 0 done, 1 load failed or the answer could not be read, 2 bad arguments.")
    ap.add_argument("--checkpoints", type=Path, required=True,
                    help=f"converted checkpoint directory, or a directory holding {QWEN_EMO_DIR}/")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                    help=f"longest answer in tokens, 1-{UPSTREAM_MAX_NEW_TOKENS} (default %(default)s; "
                         f"upstream allows {UPSTREAM_MAX_NEW_TOKENS})")
    ap.add_argument("--emo-alpha", type=float, default=1.0,
                    help="emotion strength applied to the vector as upstream does (default %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    ap.add_argument("text", help="the emotion text ('-' reads standard input)")
    return ap


def check_args(args: argparse.Namespace) -> tuple[Path, str]:
    """The QwenEmotion folder and the text, or ConfigError/BadOptions/TextTooLong naming the argument."""
    text = sys.stdin.read() if args.text == "-" else str(args.text)
    if not text.strip():
        raise ConfigError("the emotion text is empty")
    check_text(text, MAX_TEXT_CHARS)
    if not 1 <= args.max_new_tokens <= UPSTREAM_MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens must be in [1, {UPSTREAM_MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    SynthesisOptions(emo_alpha=args.emo_alpha)  # BadOptions outside the range the daemon accepts
    if not args.checkpoints.is_dir():
        raise ConfigError(f"--checkpoints {args.checkpoints}: no such directory")
    folder = find_qwen_emo(args.checkpoints)
    if folder is None:
        raise ConfigError(f"--checkpoints {args.checkpoints}: no QwenEmotion model ({QWEN_EMO_DIR}/ with "
                          "config.json and model.safetensors)")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder}: missing {', '.join(missing)}")
    from .device import resolve_device  # imports torch: after the cheap checks

    resolve_device(args.device)
    return folder, text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        folder, text = check_args(args)
    except TtsdError as e:
        print(f"ttsd emotion: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .qwen_emo import QwenEmotion, emotion_vector

        answer = QwenEmotion.load(folder, args.device).generate([text], args.max_new_tokens)[0]
        emotions = answer.reading().emotions
        vector = emotion_vector(emotions, args.emo_alpha)
    except TtsdError as e:
        print(f"ttsd emotion: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ttsd emotion: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    line = {"prompt": answer.prompt, "input_ids": answer.input_ids, "generated_ids": answer.generated_ids,
            "content": answer.content, "emotions": emotions, "vector": vector}
    print(json.dumps(line, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
