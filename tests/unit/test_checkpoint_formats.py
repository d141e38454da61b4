"""Every checkpoint form users have loads bit-exactly into the tiny DiT and VAE, or is refused.

Forms: one safetensors file, sharded safetensors (folder or index), torch `.pt`/`.pth` (flat,
Self-Forcing's nested generator / generator_ema, `state_dict` / `model` wrappers), diffusers
model folders (single, sharded, `.bin`, pipeline root). Every file is written here into
tmp_path; diffusers names are produced by converters written out below, independently of
keymaps.py (the diffusers oracle tests check them against diffusers itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from diffusers_names import dit_to_diffusers
from streamdit.errors import CheckpointError
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import get_dit_config
from streamdit.model.vae import CausalVideoVAE, get_vae_config
from streamdit.model.weights import check_checkpoint, load_checkpoint_into, open_checkpoint

Module = Callable[[], nn.Module]
MODELS: dict[str, Module] = {
    "dit": lambda: CausalWanDiT(get_dit_config("tiny"), "cpu"),
    "vae": lambda: CausalVideoVAE(get_vae_config("tiny")),
}


def _random_state(module: nn.Module, seed: int) -> dict[str, Tensor]:
    """Random values for every key (init schemes leave biases 0 / norms 1: too easy to match)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in module.state_dict().items()}


def _assert_holds(module: nn.Module, expected: dict[str, Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def _shard(tensors: dict[str, Tensor], folder: Path, stem: str, shards: int = 3) -> Path:
    """Write `tensors` as `shards` safetensors files plus a HF-style index; return the index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map |= dict.fromkeys(part, name)
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[str, Module]:
    return request.param, MODELS[request.param]


def test_single_safetensors_and_report(tmp_path: Path, model: tuple[str, Module]) -> None:
    _, make = model
    dst = make()
    state = _random_state(dst, 0)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    report = load_checkpoint_into(dst, open_checkpoint(path))
    _assert_holds(dst, {k: v.to(torch.bfloat16) for k, v in state.items()})
    assert (report.format, report.layout, report.selection) == ("safetensors", "wan", None)
    assert report.files == (str(path.resolve()),) and report.loaded == len(state)
    assert report.dtypes == {"bfloat16": len(state)} and report.ignored == ()
    assert f"loaded {len(state)} tensors" in report.summary() and "bfloat16" in report.summary()


def test_open_reads_headers_only(tmp_path: Path) -> None:
    dit = CausalWanDiT(get_dit_config("tiny"), "meta")  # nothing to load into: validation only
    state = _random_state(CausalWanDiT(get_dit_config("tiny"), "cpu"), 0)
    save_file(state, str(tmp_path / "w.safetensors"))
    source = open_checkpoint(tmp_path / "w.safetensors")
    assert source.shapes() == {k: tuple(v.shape) for k, v in state.items()}
    assert set(source.dtypes().values()) == {"float32"}
    assert len(check_checkpoint(dit, source)) == len(state)
    assert torch.equal(source.get("head.head.weight"), state["head.head.weight"])


@pytest.mark.parametrize("given", ["folder", "index"])
def test_sharded_safetensors(tmp_path: Path, model: tuple[str, Module], given: str) -> None:
    _, make = model
    dst = make()
    state = _random_state(dst, 1)
    index = _shard(state, tmp_path / "ckpt", "model")
    report = load_checkpoint_into(dst, open_checkpoint(index.parent if given == "folder" else index))
    _assert_holds(dst, state)
    assert report.format == "safetensors-sharded" and len(report.files) == 3


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_flat_torch_file(tmp_path: Path, model: tuple[str, Module], suffix: str) -> None:
    """A flat state dict with Wan names: e.g. `Wan2.1_VAE.pth`."""
    _, make = model
    dst = make()
    state = _random_state(dst, 2)
    torch.save(state, tmp_path / f"Wan2.1_weights{suffix}")
    report = load_checkpoint_into(dst, open_checkpoint(tmp_path / f"Wan2.1_weights{suffix}"))
    _assert_holds(dst, state)
    assert (report.format, report.selection, report.dtypes) == ("torch", None, {"float32": len(state)})


def _self_forcing(tmp_path: Path) -> tuple[Path, dict[str, Tensor], dict[str, Tensor]]:
    dit = MODELS["dit"]()
    gen, ema = _random_state(dit, 3), _random_state(dit, 4)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(
        {
            "generator": {"model." + k: v for k, v in gen.items()},
            "generator_ema": {"model." + k: v for k, v in ema.items()},
            "step": 600,
        },
        path,
    )
    return path, gen, ema


@pytest.mark.parametrize("select", [None, "generator", "ema", "generator.model.", "model."])
def test_self_forcing_selection(tmp_path: Path, select: str | None) -> None:
    path, gen, ema = _self_forcing(tmp_path)
    dst = MODELS["dit"]()
    report = load_checkpoint_into(dst, open_checkpoint(path, select=select))
    _assert_holds(dst, ema if select == "ema" else gen)
    assert report.selection == {None: "generator", "ema": "generator_ema", "model.": "generator.model."}.get(
        select, select
    )
    assert len(report.ignored) == len(gen)  # the other state dict
    assert any("EMA" in note for note in report.notes) == (select != "ema")


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_torch_file(tmp_path: Path, wrapper: str) -> None:
    dst = MODELS["vae"]()
    state = _random_state(dst, 5)
    torch.save(
        {wrapper: state, "epoch": 3, "optimizer": {"state": {0: {"m": torch.ones(2)}}}}, tmp_path / "w.pt"
    )
    report = load_checkpoint_into(dst, open_checkpoint(tmp_path / "w.pt"))
    _assert_holds(dst, state)
    assert report.selection == wrapper


def test_prefix_selection_in_flat_safetensors(tmp_path: Path) -> None:
    dst = MODELS["vae"]()
    state = _random_state(dst, 6)
    tensors = {"vae." + k: v for k, v in state.items()} | {"text.weight": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "bundle.safetensors"))
    report = load_checkpoint_into(dst, open_checkpoint(tmp_path / "bundle.safetensors", select="vae."))
    _assert_holds(dst, state)
    assert report.ignored == ("text.weight",)


# ---------------------------------------------------------------- diffusers layouts

RESIDUAL = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
}
RESIDUAL |= {"shortcut.": "conv_shortcut."}


def _vae_to_diffusers(key: str, per_level: int = 3) -> str:
    """Wan VAE → AutoencoderKLWan names for num_res_blocks=1 (3 decoder entries per level)."""
    top, _, rest = key.partition(".")
    if top in ("conv1", "conv2"):
        return {"conv1": "quant_conv.", "conv2": "post_quant_conv."}[top] + rest
    head = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}
    for wan, diff in head.items():
        if rest.startswith(wan):
            return f"{top}.{diff}{rest[len(wan) :]}"
    group, index, inner = rest.split(".", 2)
    i = int(index)
    if group == "downsamples":
        block = f"down_blocks.{i}."
    elif group == "middle":
        block = ("mid_block.resnets.0.", "mid_block.attentions.0.", "mid_block.resnets.1.")[i]
    elif i % per_level < per_level - 1:
        block = f"up_blocks.{i // per_level}.resnets.{i % per_level}."
    else:
        block = f"up_blocks.{i // per_level}.upsamplers.0."
    for wan, diff in RESIDUAL.items():
        if inner.startswith(wan):
            inner = diff + inner[len(wan) :]
    return f"{top}.{block}{inner}"


TO_DIFFUSERS = {"dit": dit_to_diffusers, "vae": _vae_to_diffusers}
CLASS = {"dit": "WanTransformer3DModel", "vae": "AutoencoderKLWan"}
SUBFOLDER = {"dit": "transformer", "vae": "vae"}


def _diffusers_folder(folder: Path, name: str, state: dict[str, Tensor], form: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": CLASS[name]}))
    tensors = {TO_DIFFUSERS[name](k): v for k, v in state.items()}
    assert len(tensors) == len(state)  # the renaming is one to one
    if form == "single":
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    elif form == "sharded":
        _shard(tensors, folder, "diffusion_pytorch_model")  # diffusers' -0000N-of-0000M names
    else:
        torch.save(tensors, folder / "diffusion_pytorch_model.bin")
    return folder


@pytest.mark.parametrize("form", ["single", "sharded", "bin"])
def test_diffusers_model_folder(tmp_path: Path, model: tuple[str, Module], form: str) -> None:
    name, make = model
    dst = make()
    state = _random_state(dst, 7)
    folder = _diffusers_folder(tmp_path / SUBFOLDER[name], name, state, form)
    report = load_checkpoint_into(dst, open_checkpoint(folder))
    _assert_holds(dst, state)
    fmt = {"single": "safetensors", "sharded": "safetensors-sharded", "bin": "torch"}[form]
    assert report.format == "diffusers-" + fmt and report.layout == "diffusers"
    assert open_checkpoint(folder).config == {"_class_name": CLASS[name]}


def test_diffusers_pipeline_root(tmp_path: Path) -> None:
    dit, vae = MODELS["dit"](), MODELS["vae"]()
    dit_state, vae_state = _random_state(dit, 8), _random_state(vae, 9)
    _diffusers_folder(tmp_path / "transformer", "dit", dit_state, "single")
    (tmp_path / "model_index.json").write_text("{}")
    load_checkpoint_into(dit, open_checkpoint(tmp_path))  # the only component: no choice to make
    _assert_holds(dit, dit_state)
    _diffusers_folder(tmp_path / "vae", "vae", vae_state, "sharded")
    with pytest.raises(CheckpointError, match=r"transformer, vae; pass component="):
        open_checkpoint(tmp_path)
    load_checkpoint_into(vae, open_checkpoint(tmp_path, component="vae"))
    _assert_holds(vae, vae_state)


# ---------------------------------------------------------------- refusals


def _check_refused(path: Path, needles: list[str], select: str | None = None) -> None:
    dst = MODELS["dit"]()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_into(dst, open_checkpoint(path, select=select))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    _assert_holds(dst, before)  # validated before anything was copied


def _dit_state() -> dict[str, Tensor]:
    return _random_state(MODELS["dit"](), 10)


@pytest.mark.parametrize("case", ["missing", "unexpected", "mis-shaped"])
@pytest.mark.parametrize("form", ["torch", "sharded"])
def test_key_and_shape_mismatches(tmp_path: Path, case: str, form: str) -> None:
    state = _dit_state()
    key = {"missing": "blocks.1.ffn.2.bias", "unexpected": "blocks.0.self_attn.extra.weight"}.get(
        case, "blocks.0.self_attn.q.weight"
    )
    if case == "missing":
        del state[key]
        needle = "1 missing: blocks.1.ffn.2.bias [64]"
    elif case == "unexpected":
        state[key] = torch.zeros(3)
        needle = "1 unexpected: blocks.0.self_attn.extra.weight [3]"
    else:
        state[key] = torch.zeros(64, 65)
        needle = "1 mis-shaped: blocks.0.self_attn.q.weight: expected [64, 64] found [64, 65]"
    if form == "torch":
        path = tmp_path / "ckpt.pt"
        torch.save(state, path)
    else:
        path = _shard(state, tmp_path, "model")
        if case != "missing":  # the offending key's shard is named
            needle += f" (in {json.loads(path.read_text())['weight_map'][key]})"
    _check_refused(path, [str(path), needle])


def test_missing_shard_file(tmp_path: Path) -> None:
    index = _shard(_dit_state(), tmp_path, "model")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    _check_refused(index, [str(index), "shard file(s) missing: model-00002-of-00003.safetensors"])


def test_index_naming_an_absent_key(tmp_path: Path) -> None:
    index = _shard(_dit_state(), tmp_path, "model")
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.0.ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    _check_refused(tmp_path, ["model-00001-of-00003.safetensors", "blocks.0.ghost.weight"])


@pytest.mark.parametrize("select", ["critic", "ema.", "decoder."])
def test_bad_selection_names_top_level_keys(tmp_path: Path, select: str) -> None:
    path, _, _ = _self_forcing(tmp_path)
    _check_refused(path, [f"select={select!r}", "generator, generator_ema, step"], select)


def test_ambiguous_state_dicts(tmp_path: Path) -> None:
    state = _dit_state()
    torch.save({"student": state, "teacher": state}, tmp_path / "two.pt")
    _check_refused(tmp_path / "two.pt", ["several state dicts (student, teacher)", "select="])
    dst = MODELS["dit"]()
    load_checkpoint_into(dst, open_checkpoint(tmp_path / "two.pt", select="teacher"))
    _assert_holds(dst, state)


class _Custom:
    """Not a tensor nor a plain container: torch.load(weights_only=True) must refuse it."""


def test_pickled_object_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _dit_state(), "cfg": _Custom()}, path)
    _check_refused(path, [str(path), "weights_only", "_Custom"])


def test_legacy_torch_format_and_non_dict(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(_dit_state(), legacy, _use_new_zipfile_serialization=False)
    _check_refused(legacy, [str(legacy), "not a loadable torch checkpoint", "mmap"])
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    _check_refused(tmp_path / "list.pt", ["expected a state dict, found a list"])


def test_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint in this folder"):
        open_checkpoint(tmp_path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"several checkpoints \(a.safetensors, b.safetensors\)"):
        open_checkpoint(tmp_path)
    (tmp_path / "bad.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight_map"):
        open_checkpoint(tmp_path / "bad.index.json")
