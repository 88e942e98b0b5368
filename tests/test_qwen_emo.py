"""QwenEmotion (emotion from text) against upstream's goldens in tests/fixtures/qwen-emo-tiny-s1.

Every `qwen-emo-*` set (that one and any in ../shared/fixtures) is checked; qwen-emo-tiny-s1 is
required: without it the run fails, it never skips. Checked: the rendered prompt, input and
generated ids exactly, the first steps' logits under the parity rule, every intermediate value of
the answer's reading, the 46 crafted answers, convert() and clamp_score(), batched against alone,
`ttsd emotion`, and the conversion and fetch of the folder. Model cases are decoded in one batch
per template variant, once per module."""

from __future__ import annotations

import gc
import json
import math
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ttsd.api.errors import ConfigError
from ttsd.pipeline import qwen_emo
from ttsd.pipeline.errors import CheckpointError, CheckpointMismatch, EmotionTextError
from ttsd.pipeline.qwen3 import load_qwen3
from ttsd.pipeline.qwen_emo import (
    QWEN_EMO_DIR,
    Answer,
    QwenEmoFiles,
    QwenEmotion,
    clamp_score,
    convert,
    cut_index,
    emotion_vector,
    find_qwen_emo,
    normalize_content,
    read_content,
    read_eos_ids,
)

from .conftest import FixtureSet, assert_close, edit_checkpoint, qwen_emo_dirs

# Every set present; the s1 set is required, so a missing fixture is a failure, not an empty run.
QWEN_SETS = qwen_emo_dirs()
ALPHAS = ("1.0", "0.65", "0.3")  # emo_vector_after_emo_alpha keys


@dataclass
class QwenSet:
    """One qwen-emo fixture set: the released-format folder and upstream's goldens."""

    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def folder(self) -> Path:
        return self.ckpt / QWEN_EMO_DIR

    def json(self, name: str) -> Any:
        return json.loads((self.root / "golden" / name).read_text(encoding="utf-8"))

    @cached_property
    def cases(self) -> list[dict[str, Any]]:
        return list(self.json("cases.json"))

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "golden" / "tensors.safetensors"))

    def variant(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.cases if c["variant"] == name]


def plain(x: Any) -> Any:
    """A golden JSON value with its {"$float": ...} markers turned back into floats."""
    if isinstance(x, dict):
        if x.keys() == {"$float"}:
            return float(x["$float"].replace("Infinity", "inf"))
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types (bool, int and float kept apart), NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def assert_error(err: BaseException, golden: dict[str, Any]) -> None:
    """The error is a TtsdError that is also of upstream's type, with Python's message where recorded."""
    assert isinstance(err, EmotionTextError), err
    assert golden["type"] in {c.__name__ for c in type(err).__mro__}, (type(err), golden)
    if "message" in golden:
        assert str(err) == golden["message"]


def link_tree(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """`dst` with a symlink to every entry of `src` but `skip` (a cheap, editable copy of a read-only folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p.resolve())
    return dst


@pytest.fixture(scope="module", params=QWEN_SETS, ids=[p.name for p in QWEN_SETS])
def qset(request: pytest.FixtureRequest) -> QwenSet:
    root = Path(request.param)
    assert (root / "golden" / "cases.json").is_file(), f"QwenEmotion fixture missing: {root}"
    return QwenSet(root)


@pytest.fixture(scope="module")
def qe(qset: QwenSet) -> QwenEmotion:
    return QwenEmotion.load(qset.ckpt, "cpu")


@pytest.fixture(scope="module")
def qe_b(qset: QwenSet, qe: QwenEmotion, tmp_path_factory: pytest.TempPathFactory) -> QwenEmotion:
    """The same model behind the fixture's Qwen3-style template (variant B), read from a folder as usual."""
    folder = link_tree(qset.folder, tmp_path_factory.mktemp("variant-b") / QWEN_EMO_DIR, skip=("chat_template.jinja",))
    shutil.copyfile(qset.root / "golden" / "variant_b_chat_template.jinja", folder / "chat_template.jinja")
    return QwenEmotion(QwenEmoFiles.read(folder), qe.model)


@pytest.fixture(scope="module")
def answers(qset: QwenSet, qe: QwenEmotion, qe_b: QwenEmotion) -> dict[str, Answer]:
    """Every model case, decoded in one batch per template (A with its first three steps' logits)."""
    a, b = qset.variant("A"), qset.variant("B")
    got = qe.generate([c["text"] for c in a], record_logits=3) + qe_b.generate([c["text"] for c in b])
    return {c["key"]: answer for c, answer in zip(a + b, got, strict=True)}


def test_prompts_and_ids_match_upstream(qset: QwenSet, answers: dict[str, Answer]) -> None:
    """The chat template renders upstream's prompt, which tokenises and decodes greedily to upstream's ids."""
    assert answers.keys() == {c["key"] for c in qset.cases}
    for c in qset.cases:
        a = answers[c["key"]]
        assert a.prompt == c["prompt"], c["key"]
        assert a.input_ids == c["input_ids"] == qset.tensors[f"{c['key']}.input_ids"].tolist(), c["key"]
        assert a.generated_ids == c["generated_ids"] == qset.tensors[f"{c['key']}.generated_ids"].tolist(), c["key"]
        assert a.eos_reached == c["eos_reached"], c["key"]


def test_first_step_logits_match_upstream(qset: QwenSet, answers: dict[str, Answer]) -> None:
    """The logits of the first three decoding steps of every model case are within the parity rule."""
    for c in qset.variant("A"):
        logits = answers[c["key"]].logits
        assert logits is not None
        for step in range(3):
            assert_close(logits[step], qset.tensors[f"{c['key']}.logits.step{step}"], f"{c['key']} step {step}")


def test_answers_read_as_upstream(qset: QwenSet, answers: dict[str, Answer]) -> None:
    """Cut, decoded content, parse path, every intermediate value, emotions and vectors equal upstream's."""
    for c in qset.cases:
        a, key = answers[c["key"]], c["key"]
        assert (a.cut_index, a.content) == (c["cut_index"], c["content"]), key
        r = a.reading()
        assert r.parse_path == c["parse_path"] and r.swapped == c["melancholic_swap"], key
        if c["parse_path"] == "json":
            assert same(r.parsed, plain(c["json_value"])), key
        assert same(r.convert_input, plain(c["convert_input"])), key
        assert same(r.normalized, plain(c["normalized"])), key
        assert same(r.emotions, c["emo_dict"]) and list(r.emotions) == list(c["emo_dict"]), key
        for alpha in ALPHAS:
            assert same(a.vector(float(alpha)), c["emo_vector_after_emo_alpha"][alpha]), (key, alpha)
        assert torch.equal(torch.tensor(a.vector(), dtype=torch.float32), qset.tensors[f"{key}.emo_vector"]), key


def test_crafted_answers_read_as_upstream(qset: QwenSet, qe: QwenEmotion) -> None:
    """Every crafted answer (stubbed generate) is cut, decoded, parsed and converted as upstream does, errors too."""
    for c in qset.json("parse_cases.json"):
        ids, name = c["answer_ids"], c["id"]
        cut = cut_index(ids)
        content = qe.decode(ids[cut:])
        assert (cut, content) == (c["cut_index"], c["content"]), name
        try:
            r = read_content(c["text"], content)
        except EmotionTextError as e:
            assert c["error"] is not None, (name, e)
            assert_error(e, c["error"])
            continue
        assert c["error"] is None, name
        assert (r.parse_path, r.swapped) == (c["parse_path"], c["melancholic_swap"]), name
        if c["parse_path"] == "json":
            assert same(r.parsed, plain(c["json_value"])), name
        else:
            assert same(r.parsed, {k: float(v) for k, v in c["regex_matches"]}), name
        assert same(r.convert_input, plain(c["convert_input"])), name
        assert same(r.normalized, plain(c["normalized"])), name
        assert same(r.emotions, c["emo_dict"]), name
        assert same(emotion_vector(r.emotions, 1.0), c["emo_vector"]), name


def test_convert_and_clamp_cases(qset: QwenSet) -> None:
    """convert() and clamp_score() give upstream's dicts, scores and errors on every recorded input."""
    cases = qset.json("convert_cases.json")
    for c in cases["convert"]:
        if c["error"] is not None:
            with pytest.raises(EmotionTextError) as info:
                convert(plain(c["input"]))
            assert_error(info.value, c["error"])
            continue
        assert same(normalize_content(plain(c["input"])), plain(c["normalized"])), c["id"]
        emotions = convert(plain(c["input"]))
        assert same(emotions, c["emo_dict"]) and same(emotion_vector(emotions, 1.0), c["emo_vector"]), c["id"]
    for c in cases["clamp_score"]:
        if "error" in c:
            with pytest.raises(EmotionTextError) as info:
                clamp_score(plain(c["input"]))
            assert_error(info.value, c["error"])
        else:
            assert same(clamp_score(plain(c["input"])), c["output"]), c


def test_tokenizer_cases(qset: QwenSet, qe: QwenEmotion) -> None:
    """Encoding matches tokenizer([text]) and decoding matches decode() with and without special tokens."""
    cases = qset.json("tokenizer_cases.json")
    tokenizer = qe.files.tokenizer
    for c in cases["encode"]:
        assert qe.encode(c["text"]) == c["input_ids"], c["id"]
    for c in cases["encode"] + cases["decode"]:
        ids = c.get("ids", c.get("input_ids"))
        assert qe.decode(ids) == c["decode_skip_special"], c["id"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == c["decode_keep_special"], c["id"]


def test_batched_prompts_equal_each_alone(qset: QwenSet, qe: QwenEmotion, answers: dict[str, Answer]) -> None:
    """Each prompt alone gets the first-step logits it gets in the batch (parity rule) and the same first id;
    the shortest and longest prompts batched together in the other order get the same ids throughout
    (test_cli_prints_the_fixture_cases decodes whole answers alone)."""
    cases = qset.variant("A")
    for c in cases:
        alone = qe.generate([c["text"]], max_new_tokens=1, record_logits=1)[0]
        assert alone.logits is not None and answers[c["key"]].logits is not None
        assert_close(alone.logits[0], answers[c["key"]].logits[0], f"{c['key']} alone")
        assert alone.generated_ids == answers[c["key"]].generated_ids[:1]
    by_length = sorted(cases, key=lambda c: len(c["input_ids"]))
    ends = [by_length[-1], by_length[0]]  # longest first: the batch's padding now falls on the other row
    for c, a in zip(ends, qe.generate([c["text"] for c in ends]), strict=True):
        assert a.generated_ids == answers[c["key"]].generated_ids, c["key"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ttsd.daemon.cli import main as ttsd

    rc = ttsd(["emotion", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def check_cli_line(out: str, case: dict[str, Any], alpha: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 1, out
    line = json.loads(lines[0])
    assert list(line) == ["prompt", "input_ids", "generated_ids", "content", "emotions", "vector"]
    assert line["prompt"] == case["prompt"] and line["input_ids"] == case["input_ids"]
    assert line["generated_ids"] == case["generated_ids"] and line["content"] == case["content"]
    assert same(line["emotions"], case["emo_dict"]) and list(line["emotions"]) == list(case["emo_dict"])
    assert same(line["vector"], case["emo_vector_after_emo_alpha"][alpha])


def test_cli_prints_the_fixture_cases(qset: QwenSet, capsys: pytest.CaptureFixture[str]) -> None:
    """`ttsd emotion` prints upstream's prompt, ids, answer, emotions and scaled vector as one JSON line."""
    cases = {c["key"]: c for c in qset.variant("A")}
    # The regex path, two </think> blocks, a label answer where the set has them; else the first cases.
    picks = [cases[k] for k in ("A3", "A4", "A7") if k in cases] or list(cases.values())[:3]
    for case, alpha in zip(picks, ALPHAS, strict=False):
        rc, out, err = run_cli(["--checkpoints", str(qset.ckpt), "--device", "cpu", "--emo-alpha", alpha,
                                case["text"]], capsys)
        assert rc == 0, err
        check_cli_line(out, case, alpha)


def test_cli_checks_arguments_before_loading(qset: QwenSet, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad arguments give exit 2 and one line on stderr, and nothing is loaded."""

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded the model before checking the arguments")

    monkeypatch.setattr(qwen_emo.QwenEmotion, "load", no_load)
    ckpt = str(qset.ckpt)
    for args, says in (
        (["--checkpoints", str(tmp_path), "hello"], "no QwenEmotion model"),
        (["--checkpoints", str(tmp_path / "absent"), "hello"], "no such directory"),
        (["--checkpoints", ckpt, "--emo-alpha", "5", "hello"], "emo_alpha"),
        (["--checkpoints", ckpt, "--max-new-tokens", "0", "hello"], "--max-new-tokens"),
        (["--checkpoints", ckpt, "  "], "empty"),
        (["--checkpoints", ckpt, "--device", "tpu", "hello"], "device"),
        (["--checkpoints", ckpt, "x" * 5001], "limit is 5000"),
    ):
        rc, out, err = run_cli(args, capsys)
        assert (rc, out) == (2, ""), args
        assert len(err.strip().splitlines()) == 1 and err.startswith("ttsd emotion: ") and says in err, err


def test_folder_is_found_in_any_layout(qset: QwenSet, tmp_path: Path) -> None:
    """The model is found in a directory holding the released folder, in the folder itself, and where
    config.yaml's qwen_emo_path says; a path leaving the directory is refused."""
    assert find_qwen_emo(qset.ckpt) == qset.folder
    assert find_qwen_emo(qset.folder) == qset.folder
    assert find_qwen_emo(tmp_path) is None
    link_tree(qset.folder, tmp_path / "elsewhere")
    (tmp_path / "config.yaml").write_text("qwen_emo_path: elsewhere/\n", encoding="utf-8")
    assert find_qwen_emo(tmp_path) == tmp_path / "elsewhere"
    (tmp_path / "config.yaml").write_text("qwen_emo_path: ../elsewhere\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="qwen_emo_path"):
        find_qwen_emo(tmp_path)


@pytest.mark.parametrize("how", ["removed", "renamed", "reshaped"])
def test_strict_loading_lists_every_mismatch(qset: QwenSet, tmp_path: Path, how: str) -> None:
    """A folder whose safetensors lacks, renames or reshapes a tensor fails to load, and the conversion's
    header check names the same tensor."""
    folder = link_tree(qset.folder, tmp_path / QWEN_EMO_DIR, skip=("model.safetensors",))
    key = "model.layers.0.self_attn.k_norm.weight"
    edit_checkpoint(qset.folder / "model.safetensors", folder / "model.safetensors", how, key)
    for check in (lambda: load_qwen3(folder, "cpu"), lambda: QwenEmoFiles.read(folder).check_weights()):
        with pytest.raises(CheckpointMismatch) as info:
            check()
        err = info.value
        if how == "renamed":
            assert (err.missing, err.unexpected) == ([key], [key + "_renamed"])
        elif how == "removed":
            assert (err.missing, err.unexpected, err.misshaped) == ([key], [], [])
        else:
            assert [m.split(":")[0] for m in err.misshaped] == [key]


def test_generation_settings_must_be_greedy(qset: QwenSet, tmp_path: Path) -> None:
    """Sampling or beam settings are refused; eos_token_id may be one id or a list, as in transformers."""
    folder = link_tree(qset.folder, tmp_path / QWEN_EMO_DIR, skip=("generation_config.json",))
    gen = json.loads((qset.folder / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen["eos_token_id"]
    for extra, problem in (({"do_sample": True}, "do_sample"), ({"num_beams": 4}, "num_beams"),
                           ({"eos_token_id": [eos, 151645]}, None), ({"eos_token_id": None}, "eos_token_id")):
        (folder / "generation_config.json").write_text(json.dumps({**gen, **extra}), encoding="utf-8")
        if problem is None:
            assert read_eos_ids(folder) == {eos, 151645}
        else:
            with pytest.raises(ConfigError, match=problem):
                read_eos_ids(folder)


def official_with_qwen(fx: FixtureSet, qset: QwenSet, root: Path) -> Path:
    """An official IndexTTS-2 directory (the fixture's) with the released QwenEmotion folder beside its files."""
    src = link_tree(fx.ckpt, root)
    (src / QWEN_EMO_DIR).symlink_to(qset.folder.resolve())
    return src


def test_fetch_and_convert_carry_the_folder(fx: FixtureSet, qset: QwenSet, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`ttsd fetch` lays the folder out, `ttsd-convert` copies it into the manifest, and `ttsd emotion`
    reads it from the converted directory as upstream would."""
    from ttsd.daemon.cli import main as ttsd
    from ttsd.pipeline.convert import verify
    from ttsd.pipeline.download import QWEN_EMO

    src = official_with_qwen(fx, qset, tmp_path / "src")
    assert ttsd(["fetch", "--dst", str(tmp_path / "ckpt"), "--from-dir", str(src)]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "ckpt"
    files = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))["files"]
    released = sorted(p.name for p in qset.folder.iterdir())
    assert sorted(rf.filename for rf in QWEN_EMO) == [f"{QWEN_EMO_DIR}/{n}" for n in released]
    assert {f"{QWEN_EMO_DIR}/{n}" for n in released} <= files.keys()
    for name in released:
        assert (ckpt / QWEN_EMO_DIR / name).read_bytes() == (qset.folder / name).read_bytes(), name
    verify(ckpt)
    case = min(qset.variant("A"), key=lambda c: len(c["generated_ids"]))
    rc, out, err = run_cli(["--checkpoints", str(ckpt), "--device", "cpu", case["text"]], capsys)
    assert rc == 0, err
    check_cli_line(out, case, "1.0")


def test_conversion_refuses_a_broken_folder(fx: FixtureSet, qset: QwenSet, tmp_path: Path) -> None:
    """A QwenEmotion folder without its tokenizer stops the conversion before anything is written."""
    from ttsd.pipeline.convert import convert

    src = link_tree(fx.ckpt, tmp_path / "src")
    link_tree(qset.folder, src / QWEN_EMO_DIR, skip=("tokenizer.json",))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_pipeline_load_helper(fx: FixtureSet, qset: QwenSet, tmp_path: Path) -> None:
    """The helper Pipeline.load calls returns the model when the directory has the folder, None otherwise."""
    assert qwen_emo.load_qwen_emo(fx.ckpt, torch.device("cpu")) is None
    loaded = qwen_emo.load_qwen_emo(qset.ckpt, torch.device("cpu"))
    assert loaded is not None and loaded.files.folder == qset.folder


def test_on_simulated_cuda_the_release_loads_in_float32_and_answers_as_upstream(qset: QwenSet) -> None:
    """The bfloat16 release becomes float32 on the host, tensor by tensor, so the device never holds the
    bfloat16 copy; greedy decoding there gives upstream's ids, with no device-mixing or stream violation."""
    from ttsd.tools import simcuda

    gc.collect()
    simcuda.clear_violations()
    with simcuda.installed():
        qe = QwenEmotion.load(qset.ckpt, "cuda")
        params = list(qe.model.parameters())
        assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in params)
        cases = qset.variant("A")
        got = qe.generate([c["text"] for c in cases])
        for c, answer in zip(cases, got, strict=True):
            assert answer.generated_ids == c["generated_ids"], c["key"]
        torch.cuda.synchronize()
        del qe, params
        gc.collect()
    assert simcuda.violations() == []
