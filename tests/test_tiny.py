"""`ttsd make-tiny`: random checkpoints in the official formats, converted and loaded strictly."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from ttsd.pipeline.convert import convert, verify
from ttsd.pipeline.errors import CheckpointError, CheckpointMismatch
from ttsd.tools import tiny

from .conftest import FixtureSet

TENSOR_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def describe(path: Path) -> Any:
    """A file's containers, keys, shapes and dtypes (safetensors: also its metadata), no values."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            return ("safetensors", f.metadata(), tensors)

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return (tuple(obj.shape), str(obj.dtype))
        if isinstance(obj, Mapping):
            return (type(obj).__name__, {k: walk(v) for k, v in obj.items()})
        return type(obj).__name__

    return walk(torch.load(path, map_location="cpu", weights_only=True))


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an official file under flat dotted keys."""
    from ttsd.pipeline.convert import _flatten

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {"": obj} if isinstance(obj, torch.Tensor) else _flatten(obj)


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset official directory, seed 0 (written once per module)."""
    return tiny.write_official(tmp_path_factory.mktemp("tiny-src"), "tiny", seed=0)


@pytest.fixture(scope="module")
def generated(official: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny official directory converted with ttsd-convert."""
    out = tmp_path_factory.mktemp("tiny-ckpt")
    convert(official, out, progress=False)
    return out


def require_tiny_sized(fx: FixtureSet) -> None:
    """The tiny preset mirrors fixture sets of the tiny size (any seed); a set of other dims (the
    full-size one) is covered by the full preset's element counts instead."""
    theirs = yaml.safe_load((fx.ckpt / "config.yaml").read_text(encoding="utf-8"))
    theirs.pop("oracle_tiny_overrides", None)
    if theirs != tiny.preset_config(tiny.get_preset("tiny")):
        pytest.skip(f"fixture set {fx.root.name} is not tiny-sized: compared by element counts instead")


def test_tiny_preset_has_the_fixture_files_containers_keys_and_shapes(fx: FixtureSet, official: Path) -> None:
    """Every fixture file exists in the generated directory with the same containers, keys, dtypes and shapes."""
    require_tiny_sized(fx)
    assert files(official) == files(fx.ckpt)
    for rel in files(fx.ckpt):
        if rel.endswith(TENSOR_SUFFIXES):
            assert describe(official / rel) == describe(fx.ckpt / rel), rel


def test_tiny_config_is_the_release_structure_with_the_fixture_dims(fx: FixtureSet, official: Path) -> None:
    """config.yaml and the auxiliary JSON configs equal the fixture's; the oracle-only section is never written."""
    require_tiny_sized(fx)
    mine = yaml.safe_load((official / "config.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load((fx.ckpt / "config.yaml").read_text(encoding="utf-8"))
    assert "oracle_tiny_overrides" not in mine
    theirs.pop("oracle_tiny_overrides", None)
    assert mine == theirs
    for rel in ("hf_cache/bigvgan/config.json", "hf_cache/w2v-bert-2.0/config.json"):
        assert yaml.safe_load((official / rel).read_text()) == yaml.safe_load((fx.ckpt / rel).read_text()), rel


def test_full_preset_config_is_the_release_config() -> None:
    """The full preset's config.yaml is the real IndexTTS-2 config value for value."""
    spec = Path(__file__).resolve().parent / "fixtures" / "indextts2-config.yaml"  # shared/spec's copy
    assert tiny.preset_config(tiny.PRESETS["full"]) == yaml.safe_load(spec.read_text(encoding="utf-8"))


def test_full_preset_element_counts_match_the_release_files() -> None:
    """On meta, the full preset's state dicts hold the published element counts of every release file."""
    p = tiny.PRESETS["full"]

    def count(*modules: torch.nn.Module) -> int:
        return sum(t.numel() for m in modules for t in m.state_dict().values())

    with torch.device("meta"):
        gpt = tiny.make_gpt(p)
        assert (len(gpt.state_dict()), count(gpt)) == (665, 871_100_639)
        assert count(*tiny.make_s2mel(p).values()) == 103_685_328
        assert count(tiny.make_w2v(p)) == 580_493_120
        assert count(tiny.make_codec(p)) == 44_289_808
        assert count(tiny.make_bigvgan(p)) == 112_233_865
        assert round(count(tiny.make_campplus(p)) / 1e6, 2) == 6.93


def test_persistent_buffers_equal_the_fixture_values(fx: FixtureSet, official: Path) -> None:
    """Conformer `pe`, BigVGAN filters and DiT `freqs`/`input_pos` hold what the official modules store."""
    require_tiny_sized(fx)
    for rel in ("gpt.pth", "s2mel.pth", "hf_cache/bigvgan/bigvgan_generator.pt"):
        want, have = tensors(fx.ckpt / rel), tensors(official / rel)
        keys = [k for k in want if k.endswith((".pe", ".filter", ".freqs", ".input_pos"))]
        assert keys, rel
        for k in keys:
            if k.endswith(".freqs"):  # exp() may differ by an ulp between CPU kernels (AVX2 / AVX-512)
                torch.testing.assert_close(have[k], want[k], rtol=1e-6, atol=0.0, msg=k)
            else:
                assert torch.equal(have[k], want[k]), k


def test_initial_values_are_sane(official: Path) -> None:
    """Weights are finite, weight-norm g equals ‖v‖, variances are positive and norm weights are near 1."""
    for rel in files(official):
        if not rel.endswith(TENSOR_SUFFIXES):
            continue
        state = tensors(official / rel)
        for k, t in state.items():
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), f"{rel}:{k}"
            if k.endswith("weight_g"):
                v = state[k[:-1] + "v"]
                assert torch.allclose(t, v.norm(dim=tuple(range(1, v.dim())), keepdim=True)), f"{rel}:{k}"
    camp = tensors(official / "hf_cache/campplus_cn_common.bin")
    assert all(bool((t > 0).all()) for k, t in camp.items() if k.endswith("running_var"))
    stats = tensors(official / "wav2vec2bert_stats.pt")
    assert bool((stats["var"] > 0).all())
    gpt = tensors(official / "gpt.pth")
    ln = gpt["gpt.h.0.ln_1.weight"]
    assert 0.8 < float(ln.min()) and float(ln.max()) < 1.2
    w = gpt["gpt.h.0.attn.c_attn.weight"]  # [in, out]: std ≈ 1/sqrt(in)
    assert abs(float(w.std()) * w.shape[0] ** 0.5 - 1.0) < 0.1


def test_same_seed_reproduces_and_another_seed_differs(official: Path, tmp_path: Path) -> None:
    """Seed 0 written twice gives identical tensors; seed 1 gives different weights in every file."""
    again = tiny.write_official(tmp_path / "again", "tiny", seed=0)
    other = tiny.write_official(tmp_path / "other", "tiny", seed=1)
    for rel in files(official):
        if not rel.endswith(TENSOR_SUFFIXES):
            continue
        a, b, c = tensors(official / rel), tensors(again / rel), tensors(other / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel
        learned = [k for k in a if a[k].is_floating_point() and not k.endswith((".pe", ".filter", ".freqs"))]
        assert any(not torch.equal(a[k], c[k]) for k in learned), rel
    assert (official / "bpe.model").read_bytes() == (again / "bpe.model").read_bytes()


def test_bpe_model_covers_the_normalised_alphabet(generated: Path) -> None:
    """The tokenizer has single pieces for A–Z, digits, punctuation and `▁`, and mixed text has no unknowns."""
    from ttsd.pipeline.text import TextNormalizer, TextTokenizer

    tok = TextTokenizer.from_file(generated / "tokenizer.json", TextNormalizer())
    assert tok.vocab_size == 500
    vocab = tok.tokenizer.get_vocab()
    for piece in [*"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", *".,!?'", "▁", "你", "好"]:
        assert piece in vocab, piece
    ids = tok.convert_tokens_to_ids(tok.tokenize("Hello, world! It's 3 pm. 你好，世界！"))
    assert ids and tok.unk_id not in ids


def test_generated_directory_converts_and_loads_strictly(generated: Path) -> None:
    """ttsd-convert accepts the generated directory, its manifest verifies, and Pipeline.load succeeds."""
    from ttsd.pipeline import Pipeline

    verify(generated)
    pipe = Pipeline.load(generated, device="cpu")
    assert pipe.gpt.cfg.model_dim == 64


def test_generated_model_synthesises_finite_audio_of_the_expected_length(generated: Path, fx: FixtureSet) -> None:
    """One segment gives finite PCM of 256·floor(1.72·M) samples for its M codes."""
    from ttsd.api.options import SynthesisOptions
    from ttsd.pipeline import Pipeline

    pipe = Pipeline.load(generated, device="cpu")
    voice = pipe.prepare_voice(fx.root / "inputs" / "speaker.wav")
    opts = SynthesisOptions(seed=0, num_beams=1, max_mel_tokens=12, diffusion_steps=3)
    segment = pipe.split_text("Hello world.", opts)[0]
    emovec = pipe.request_emovec(voice, opts, None)
    out = pipe.run_gpt(voice, segment, opts, emovec)
    m = out.codes.size(1)
    assert 1 <= m <= 12
    pcm = pipe.run_acoustic(voice, out, opts, segment=segment, emovec=emovec)
    assert pcm.shape == (256 * int(m * 1.72),)
    assert bool(torch.isfinite(pcm).all())


def test_direct_converted_layout_equals_the_converted_official_files(generated: Path, tmp_path: Path) -> None:
    """write_converted writes byte for byte what ttsd-convert makes of write_official (same seed)."""
    manifest = tiny.write_converted(tmp_path / "direct", "tiny", seed=0)
    direct = json.loads(manifest.read_text())
    converted = json.loads((generated / "manifest.json").read_text())
    assert direct["files"] == converted["files"]
    verify(tmp_path / "direct")


def test_random_pipeline_is_loaded_like_any_checkpoint(generated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """random_pipeline goes through Pipeline.load and holds exactly the weights of the converted official files."""
    from ttsd.pipeline import Pipeline

    loaded = Pipeline.load(generated, device="cpu")
    calls: list[Path] = []
    real_load = Pipeline.load.__func__  # type: ignore[attr-defined]  # the classmethod's function

    def recording_load(cls: type[Pipeline], ckpt: Path, *args: Any, **kwargs: Any) -> Pipeline:
        calls.append(Path(ckpt))
        return real_load(cls, ckpt, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(Pipeline, "load", classmethod(recording_load))
    memory = tiny.random_pipeline("tiny", seed=0)
    assert len(calls) == 1 and not calls[0].exists()  # loaded from a temporary directory, removed since
    for name in ("gpt", "cfm", "length_regulator", "gpt_layer", "w2v", "w2v_stats", "codec", "campplus", "bigvgan"):
        want, have = getattr(loaded, name).state_dict(), getattr(memory, name).state_dict()
        assert have.keys() == want.keys(), name
        for k in want:
            assert torch.equal(have[k], want[k]), f"{name}.{k}"
    assert memory.tokenizer.encode("Hello, world!") == loaded.tokenizer.encode("Hello, world!")


def test_truncated_safetensors_names_the_file(official: Path, tmp_path: Path) -> None:
    """A truncated semantic-codec file converts, then loading fails with a CheckpointError naming it."""
    from ttsd.pipeline import Pipeline

    src = tmp_path / "src"
    shutil.copytree(official, src)
    codec = src / "hf_cache" / "semantic_codec_model.safetensors"
    data = codec.read_bytes()
    codec.write_bytes(data[: len(data) - 100])
    convert(src, tmp_path / "ckpt", progress=False)
    with pytest.raises(CheckpointError, match=r"semantic_codec\.safetensors.*truncated"):
        Pipeline.load(tmp_path / "ckpt", device="cpu")


def test_renamed_key_is_reported_missing_and_unexpected(official: Path, tmp_path: Path) -> None:
    """A key renamed in gpt.pth gives a CheckpointMismatch listing the old name as missing and the new as unexpected."""
    from ttsd.pipeline import Pipeline

    src = tmp_path / "src"
    shutil.copytree(official, src)
    state = torch.load(src / "gpt.pth", map_location="cpu", weights_only=True)
    state["mel_head.weight_renamed"] = state.pop("mel_head.weight")
    torch.save(state, src / "gpt.pth")
    convert(src, tmp_path / "ckpt", progress=False)
    with pytest.raises(CheckpointMismatch) as err:
        Pipeline.load(tmp_path / "ckpt", device="cpu")
    assert err.value.missing == ["mel_head.weight"]
    assert err.value.unexpected == ["mel_head.weight_renamed"]
    assert "gpt.safetensors" in str(err.value)


def test_make_tiny_cli_writes_and_converts(tmp_path: Path) -> None:
    """`ttsd make-tiny OUT --seed 3 --convert DST` exits 0 and leaves a verified converted directory."""
    assert tiny.main([str(tmp_path / "src"), "--seed", "3", "--convert", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "src" / "gpt.pth").is_file()
    verify(tmp_path / "ckpt")


# --- IndexTTS-2.5 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset official IndexTTS-2.5 directory, seed 0 (written once per module)."""
    return tiny.write_official(tmp_path_factory.mktemp("tiny25-src"), "tiny", seed=0, model="indextts-2.5")


@pytest.fixture(scope="module")
def generated25(official25: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny25-ckpt")
    convert(official25, out, progress=False)
    return out


@pytest.mark.model_versions("2.5")
def test_tiny25_has_the_fixture_files_keys_shapes_and_config(fx: FixtureSet, official25: Path) -> None:
    """The 2.5 tiny preset writes the 2.5 fixture's files, containers, keys, dtypes and shapes and its
    config.yaml (the oracle-only section aside)."""
    theirs = yaml.safe_load((fx.ckpt / "config.yaml").read_text(encoding="utf-8"))
    theirs.pop("oracle_tiny_overrides", None)
    if theirs != tiny.preset_config(tiny.get_preset("tiny"), "indextts-2.5"):
        pytest.skip(f"fixture set {fx.root.name} is not tiny-sized")
    assert yaml.safe_load((official25 / "config.yaml").read_text(encoding="utf-8")) == theirs
    assert files(official25) == files(fx.ckpt)
    for rel in files(fx.ckpt):
        if rel.endswith(TENSOR_SUFFIXES):
            assert describe(official25 / rel) == describe(fx.ckpt / rel), rel


def test_tiny25_converts_loads_and_synthesises(generated25: Path) -> None:
    """A made 2.5 model converts and verifies, loads as IndexTTS-2.5 and speaks zh and en: finite PCM of
    256·int(2M·1.72·duration_factor) samples for M codes."""
    from ttsd.api.options import SynthesisOptions
    from ttsd.pipeline import Pipeline

    verify(generated25)
    pipe = Pipeline.load(generated25, device="cpu")
    assert pipe.version == "2.5"
    voice = pipe.prepare_voice(tiny.synthetic_voice(2.0))
    for text, factor in (("Hello world.", 1.0), ("你好，世界。", 1.5)):
        opts = SynthesisOptions(seed=0, num_beams=1, max_mel_tokens=8, diffusion_steps=2, duration_factor=factor)
        segment = pipe.split_text(text, opts)[0]
        emovec = pipe.request_emovec(voice, opts, None)
        out = pipe.run_gpt(voice, segment, opts, emovec)
        m = out.codes.size(1)
        assert 1 <= m <= 8 and out.latent is None
        pcm = pipe.run_acoustic(voice, out, opts, segment=segment, emovec=emovec)
        assert pcm.shape == (256 * int(2 * m * 1.72 * factor),)
        assert bool(torch.isfinite(pcm).all())


def test_tiny25_direct_converted_layout_equals_the_converted_official_files(generated25: Path, tmp_path: Path) -> None:
    """write_converted(model=2.5) writes byte for byte what ttsd-convert makes of the 2.5 official files."""
    manifest = tiny.write_converted(tmp_path / "direct", "tiny", seed=0, model="indextts-2.5")
    assert json.loads(manifest.read_text())["files"] == json.loads((generated25 / "manifest.json").read_text())["files"]


def test_make_tiny_cli_writes_a_25_model(tmp_path: Path) -> None:
    """`ttsd make-tiny OUT --model indextts-2.5` writes the 2.5 layout (tiktoken vocabulary and codec.pth)."""
    assert tiny.main([str(tmp_path / "src"), "--model", "indextts-2.5"]) == 0
    assert (tmp_path / "src" / tiny.TIKTOKEN_FILE).is_file() and (tmp_path / "src" / "codec.pth").is_file()
    assert not (tmp_path / "src" / "bpe.model").exists()
