"""QwenEmotion: emotion weights from text (IndexTTS-2 `infer(use_emo_text=True)` / `emo_text=...`).

Ports indextts/infer_v2.py `QwenEmotion` (`inference`, `normalize_content`, `convert`,
`clamp_score`) and the emo_text branch of `IndexTTS2.infer_generator`, with transformers' pieces
done by hand: the prompt is rendered from the checkpoint's own chat template as
`apply_chat_template(add_generation_prompt=True, enable_thinking=False)` renders it (same jinja2
sandbox and globals), tokenised with `tokenizers` from its tokenizer.json, and answered by a Qwen3
(qwen3.py) decoding greedily as its generation_config.json says, stopping on its eos id(s).
The answer is then read as upstream reads it: cut after the last `</think>`, decoded without
special tokens, parsed as JSON with Python's `json` or else by upstream's regex, 悲伤/低落 swapped
for melancholic texts, labels normalised, scores clamped to [0, 1.2], calm 1.0 when nothing is
detected; `list(values)` in the order below is the emotion vector, scaled by emo_alpha as
`int(x·a·10000)/10000` (gpt.scale_emo_vector) and never bias-normalised on this path.

Deliberate difference: upstream passes max_new_tokens=32768; here the budget is a parameter
(DEFAULT_MAX_NEW_TOKENS), because the static KV cache is sized by it. An answer that has not
ended by then is read as it is (logged)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

import torch
from torch import Tensor

from ttsd.api.errors import ConfigError

from .config import load_yaml
from .device import resolve_device
from .errors import CheckpointError, EmotionAnswerError, EmotionScoreError
from .gpt import scale_emo_vector
from .qwen3 import Qwen3Config, Qwen3ForCausalLM, expected_shapes, greedy, load_qwen3
from .weights import read_shapes

log = logging.getLogger(__name__)

QWEN_EMO_DIR: Final = "qwen0.6bemo4-merge"  # the released folder (official config.yaml: qwen_emo_path)
SYSTEM_PROMPT: Final = "文本情感分类"  # QwenEmotion.prompt ("text emotion classification")
THINK_END_ID: Final = 151668  # `</think>`, hard-coded upstream: the answer starts after the last one
UPSTREAM_MAX_NEW_TOKENS: Final = 32768  # what upstream passes to generate(); also our upper bound
DEFAULT_MAX_NEW_TOKENS: Final = 512  # a full 8-score JSON answer is about 66 tokens
CHAT_TEMPLATE_FILE: Final = "chat_template.jinja"  # transformers prefers it to tokenizer_config's entry
REQUIRED_FILES: Final = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Chinese label → English key, in the emotion vector's order (QwenEmotion.cn_key_to_en).
CN_TO_EN: Final = {
    "高兴": "happy", "愤怒": "angry", "悲伤": "sad", "恐惧": "afraid",
    "反感": "disgusted", "低落": "melancholic", "惊讶": "surprised", "自然": "calm",
}
LABEL_ALIASES: Final = ("emotion", "emotion_label", "label", "情感", "情绪")  # keys an answer may name a label under
# Upstream's workaround: the model never tells 低落 from 悲伤, so texts with these words swap the two.
MELANCHOLIC_WORDS: Final = ("低落", "melancholy", "melancholic", "depression", "depressed", "gloomy")
MIN_SCORE, MAX_SCORE = 0.0, 1.2
SCORE_PAIR: Final = re.compile(r'([^\s":.,]+?)"?\s*:\s*([\d.]+)')  # upstream's fallback for non-JSON answers
# Special tokens transformers passes to every chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS: Final = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token", "additional_special_tokens")
# generation_config.json keys that would make transformers' generate() other than plain greedy
# decoding, with the values that leave it greedy (temperature, top_k, top_p only matter when sampling).
GREEDY_VALUES: Final[dict[str, tuple[object, ...]]] = {
    "do_sample": (False, None), "num_beams": (1, None), "num_beam_groups": (1, None),
    "repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None), "min_new_tokens": (0, None),
    "min_length": (0, None), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "penalty_alpha": (None,), "guidance_scale": (None, 1.0),
}


# --------------------------------------------------------------------------- reading an answer


def cut_index(ids: Sequence[int]) -> int:
    """Where the answer starts: just past the last `</think>` id, or 0 without one."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == THINK_END_ID:
            return i + 1
    return 0


def parse_content(content: str) -> tuple[Any, str]:
    """(value, "json") from Python's json (any JSON value, NaN/Infinity, last duplicate wins), else
    ({key: float}, "regex") from upstream's pattern; a value float() refuses raises EmotionScoreError."""
    try:
        return json.loads(content), "json"
    except json.JSONDecodeError:
        pass
    pairs: dict[str, float] = {}
    for m in SCORE_PAIR.finditer(content):
        try:
            pairs[m[1]] = float(m[2])  # later matches win, as in upstream's dict comprehension
        except ValueError as e:  # "1.2.3", "."
            raise EmotionScoreError(str(e)) from e
    return pairs, "regex"


def swap_melancholic(text: str, value: Any) -> tuple[Any, bool]:
    """Upstream's 悲伤/低落 swap when `text` holds a melancholic word (both keys are then present);
    a copy, and whether it applied. A non-object answer raises EmotionAnswerError, as upstream's `.get`."""
    lowered = text.lower()
    if not any(word in lowered for word in MELANCHOLIC_WORDS):
        return value, False
    if not isinstance(value, dict):
        raise EmotionAnswerError(f"'{type(value).__name__}' object has no attribute 'get'")
    out = dict(value)
    out["悲伤"], out["低落"] = out.get("低落", 0.0), out.get("悲伤", 0.0)
    return out, True


def label_key(value: Any) -> str | None:
    """The Chinese key a label names (a Chinese label, or an English key in any case), else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value in CN_TO_EN:
        return value
    lowered = value.lower()
    return next((cn for cn, en in CN_TO_EN.items() if lowered == en), None)


def normalize_content(content: Any) -> dict[Any, Any]:
    """Upstream's label handling: a bare label, or one under an alias key, scores 1.0 when no Chinese
    score key is present; a score that is itself a label becomes 1.0 (naming its own key) or 0.0 and
    sets the emotion it names to 1.0. English keys are not mapped. A non-object answer counts as {}."""
    out: dict[Any, Any] = dict(content) if isinstance(content, dict) else {}
    label = label_key(content) if isinstance(content, str) else None
    for alias in LABEL_ALIASES:
        if label is not None:
            break
        label = label_key(out.get(alias))
    if label is not None and all(cn not in out for cn in CN_TO_EN):
        out[label] = 1.0
    for cn in CN_TO_EN:
        named = label_key(out.get(cn))
        if named is not None:
            out[cn] = 1.0 if named == cn else 0.0
            if named != cn:
                out[named] = 1.0
    return out


def clamp_score(value: Any) -> float:
    """float(value) clamped to [0, 1.2] with Python's min/max (so NaN gives 1.2); else EmotionScoreError."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer beyond float (upstream lets it out)
        raise EmotionScoreError(
            f"QwenEmotion returned a non-numeric emotion score {value!r}. Please retry the request."
        ) from e
    return max(MIN_SCORE, min(MAX_SCORE, x))


def convert(content: Any) -> dict[str, float]:
    """The emotion dict: English keys in vector order, clamped scores (a missing one is 0), calm 1.0
    when every score is ≤ 0."""
    normalized = normalize_content(content)
    emotions = {en: clamp_score(normalized.get(cn, 0.0)) for cn, en in CN_TO_EN.items()}
    if all(v <= 0.0 for v in emotions.values()):
        emotions["calm"] = 1.0
    return emotions


@dataclass(frozen=True, kw_only=True, slots=True)
class Reading:
    """Every step of reading one answer (for checks against upstream's intermediate values)."""

    parsed: Any  # the JSON value, or the regex pairs
    parse_path: str  # "json" or "regex"
    swapped: bool  # the melancholic swap applied
    convert_input: Any  # parsed, after the swap
    normalized: dict[Any, Any]
    emotions: dict[str, float]  # happy, angry, sad, afraid, disgusted, melancholic, surprised, calm


def read_content(text: str, content: str) -> Reading:
    """Upstream's post-processing of the decoded answer `content` to the emotion text `text`.
    Raises EmotionTextError (EmotionScoreError, EmotionAnswerError) where upstream raises."""
    parsed, path = parse_content(content)
    swapped_value, swapped = swap_melancholic(text, parsed)
    normalized = normalize_content(swapped_value)
    return Reading(parsed=parsed, parse_path=path, swapped=swapped, convert_input=swapped_value,
                   normalized=normalized, emotions=convert(swapped_value))


def emotion_vector(emotions: Mapping[str, float], emo_alpha: float) -> list[float]:
    """`list(emo_dict.values())` scaled as infer_generator scales an emotion vector (alpha clamped to
    [0, 1]; unless 1, truncated to 4 decimals). No bias or sum normalisation on this path."""
    return scale_emo_vector(list(emotions.values()), emo_alpha)


# --------------------------------------------------------------------------- the model folder


def qwen_emo_subdir(config: Mapping[str, Any]) -> PurePosixPath | None:
    """config.yaml's `qwen_emo_path` as a relative path inside the checkpoint directory (None when
    the config has none); anything that could leave the directory is a ConfigError."""
    raw = config.get("qwen_emo_path")
    if raw is None:
        return None
    rel = PurePosixPath(str(raw).strip())
    if not str(raw).strip() or rel.is_absolute() or ".." in rel.parts or rel == PurePosixPath("."):
        raise ConfigError(f"config.yaml: qwen_emo_path {raw!r} must be a folder inside the checkpoint directory")
    return rel


def find_qwen_emo(ckpt_dir: Path) -> Path | None:
    """The QwenEmotion folder of `ckpt_dir`: config.yaml's qwen_emo_path when it has a config.yaml,
    else the released folder name; or `ckpt_dir` itself when it is such a folder. None if absent."""
    ckpt_dir = Path(ckpt_dir)
    rel: PurePosixPath | None = PurePosixPath(QWEN_EMO_DIR)
    if (ckpt_dir / "config.yaml").is_file():
        rel = qwen_emo_subdir(load_yaml(ckpt_dir / "config.yaml"))
    for folder in ([ckpt_dir / rel] if rel is not None else []) + [ckpt_dir]:
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def _token_text(value: Any) -> Any:
    """A special token as transformers renders it into a template: its text (AddedToken → content)."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _compile_template(source: str, where: Path) -> Any:
    """The chat template compiled as transformers 4.52 compiles it (_compile_jinja_template)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # transformers' override: no HTML escaping, unlike jinja2's own tojson.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: chat template does not compile: {e}") from e


@dataclass(frozen=True, kw_only=True, slots=True)
class QwenEmoFiles:
    """Everything of a QwenEmotion folder but the weights, read and checked."""

    folder: Path
    model: Qwen3Config
    template: Any  # a compiled jinja2 Template
    template_vars: dict[str, Any]  # the special tokens transformers passes to the template
    tokenizer: Any  # tokenizers.Tokenizer
    clean_up_spaces: bool  # tokenizer_config clean_up_tokenization_spaces
    eos_ids: frozenset[int]

    @classmethod
    def read(cls, folder: Path) -> QwenEmoFiles:
        """Read config, tokenizer, template and generation settings; ConfigError/CheckpointError naming
        the file at the first problem. Reads no weights."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: not a QwenEmotion folder, missing {', '.join(missing)}")
        model = Qwen3Config.from_json(folder / "config.json")
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        template_path = folder / CHAT_TEMPLATE_FILE
        if template_path.is_file():
            source: Any = template_path.read_text(encoding="utf-8")
        else:
            template_path, source = folder / "tokenizer_config.json", tok_cfg.get("chat_template")
            if isinstance(source, list):  # named templates: transformers takes "default"
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise ConfigError(f"{folder}: no chat template ({CHAT_TEMPLATE_FILE} or tokenizer_config chat_template)")
        specials = dict(tok_cfg)
        if "added_tokens_decoder" not in tok_cfg and (folder / "special_tokens_map.json").is_file():
            specials.update(_read_json(folder / "special_tokens_map.json"))  # transformers' legacy merge
        template_vars = {k: _token_text(specials[k]) for k in SPECIAL_TOKEN_KEYS if specials.get(k)}
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"{folder / 'tokenizer.json'}: cannot read tokenizer: {e}") from e
        eos_ids = read_eos_ids(folder)
        if not all(0 <= i < model.vocab_size for i in eos_ids):
            raise ConfigError(f"{folder}: eos_token_id {sorted(eos_ids)} outside the vocabulary ({model.vocab_size})")
        return cls(folder=folder, model=model, template=_compile_template(source, template_path),
                   template_vars=template_vars, tokenizer=tokenizer,
                   clean_up_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)), eos_ids=eos_ids)

    def check_weights(self) -> None:
        """CheckpointMismatch listing every missing, unexpected and mis-shaped tensor of
        model.safetensors (header only), as the strict load would."""
        from .errors import CheckpointMismatch

        path = self.folder / "model.safetensors"
        have, want = read_shapes(path), expected_shapes(self.model)
        missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        misshaped = sorted(f"{k}: file {have[k]} vs model {want[k]}" for k in want.keys() & have.keys()
                           if have[k] != want[k])
        if missing or unexpected or misshaped:
            raise CheckpointMismatch(path, missing, unexpected, misshaped)


def read_eos_ids(folder: Path) -> frozenset[int]:
    """The stop ids generate() uses: generation_config.json's eos_token_id (int or list), or
    config.json's when there is no generation_config.json. Refuses settings that are not greedy."""
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        for key, neutral in GREEDY_VALUES.items():
            if key in gen and gen[key] not in neutral:
                raise ConfigError(f"{gen_path}: {key} {gen[key]!r} is not supported (QwenEmotion decodes greedily)")
        raw, where = gen.get("eos_token_id"), gen_path
    else:
        raw, where = _read_json(folder / "config.json").get("eos_token_id"), folder / "config.json"
    ids = raw if isinstance(raw, list) else [raw]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{where}: eos_token_id {raw!r} is not an id or a list of ids")
    return frozenset(ids)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """QwenEmotion's answer to one emotion text, decoded but not yet read."""

    text: str  # the emotion text
    prompt: str  # the rendered chat prompt
    input_ids: list[int]
    generated_ids: list[int]  # the new ids, ending with the eos id when eos_reached
    eos_reached: bool
    cut_index: int  # generated_ids[cut_index:] were decoded
    content: str
    logits: Tensor | None = None  # [K, V] float32 of the first K steps when asked for (checks only)

    def reading(self) -> Reading:
        """Upstream's post-processing; raises EmotionTextError where upstream raises."""
        return read_content(self.text, self.content)

    def vector(self, emo_alpha: float = 1.0) -> list[float]:
        """The 8 emotion weights infer(use_emo_text=True) would use; raises EmotionTextError."""
        return emotion_vector(self.reading().emotions, emo_alpha)


class QwenEmotion:
    """The QwenEmotion model and tokenizer on one device. Holds no per-request state: every call
    builds its own KV cache, so calls share nothing but the weights."""

    def __init__(self, files: QwenEmoFiles, model: Qwen3ForCausalLM) -> None:
        self.files, self.model = files, model
        self.pad_id = min(files.eos_ids)  # fills short prompts' rows; never attended

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "auto") -> QwenEmotion:
        """From a QwenEmotion folder, or a checkpoint directory holding one (find_qwen_emo)."""
        dev = resolve_device(str(device))
        folder = find_qwen_emo(Path(path))
        if folder is None:
            raise CheckpointError(f"{path}: no QwenEmotion model ({QWEN_EMO_DIR}/ with config.json and "
                                  "model.safetensors)")
        files = QwenEmoFiles.read(folder)
        model = load_qwen3(folder, dev)
        log.info("qwen_emo loaded folder=%s layers=%d hidden=%d vocab=%d device=%s", folder,
                 files.model.num_hidden_layers, files.model.hidden_size, files.model.vocab_size, dev)
        return cls(files, model)

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def render_prompt(self, text: str) -> str:
        """The chat prompt upstream sends for `text` (system 文本情感分类, user `text`)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        # transformers: special tokens first, then the call's keyword arguments over them.
        variables = {**self.files.template_vars, "enable_thinking": False}
        rendered = self.files.template.render(messages=messages, tools=None, documents=None,
                                              add_generation_prompt=True, **variables)
        return str(rendered)

    def encode(self, prompt: str) -> list[int]:
        """tokenizer([prompt]).input_ids[0]: added tokens matched in the raw text, no BOS."""
        return list(self.files.tokenizer.encode(prompt).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """tokenizer.decode(ids, skip_special_tokens=True), with transformers' space clean-up when
        tokenizer_config asks for it."""
        text = str(self.files.tokenizer.decode(list(ids), skip_special_tokens=True))
        if self.files.clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def generate(self, texts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 record_logits: int = 0) -> list[Answer]:
        """Answers to several emotion texts, decoded together in one batch (each as it would be alone).
        `record_logits` keeps the logits of the first steps of each answer (for checks)."""
        if not 1 <= max_new_tokens <= UPSTREAM_MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be in [1, {UPSTREAM_MAX_NEW_TOKENS}], got {max_new_tokens}")
        prompts = [self.render_prompt(t) for t in texts]
        ids = [self.encode(p) for p in prompts]
        out = greedy(self.model, ids, self.files.eos_ids, max_new_tokens, self.pad_id, record_logits)
        answers = []
        for i, text in enumerate(texts):
            gen = out.generated[i]
            if not out.eos_reached[i]:
                log.warning("qwen_emo answer cut max_new_tokens=%d (upstream allows %d)", max_new_tokens,
                            UPSTREAM_MAX_NEW_TOKENS)
            cut = cut_index(gen)
            answers.append(Answer(text=text, prompt=prompts[i], input_ids=ids[i], generated_ids=gen,
                                  eos_reached=out.eos_reached[i], cut_index=cut, content=self.decode(gen[cut:]),
                                  logits=None if out.logits is None else out.logits[i]))
        return answers

    def emotion_vectors(self, texts: Sequence[str], emo_alpha: float = 1.0,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[list[float]]:
        """The 8 emotion weights of each text, batched; raises EmotionTextError for the first text
        whose answer cannot be read (use `generate` + `Answer.vector` to handle texts one by one)."""
        return [a.vector(emo_alpha) for a in self.generate(texts, max_new_tokens)]


def load_qwen_emo(ckpt_dir: Path, device: torch.device) -> QwenEmotion | None:
    """The checkpoint's QwenEmotion, or None when the directory has no such folder (Pipeline.load)."""
    return None if find_qwen_emo(ckpt_dir) is None else QwenEmotion.load(ckpt_dir, device)
