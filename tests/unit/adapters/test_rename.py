"""User rename map (spec 5.2 step 1; spec 9: keys use the recorded names, P~ stable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from rslora_deploy.adapters import rsg
from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256
from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.rename import apply_renames, parse_rename_args, rename_name
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.cli.app import main
from rslora_deploy.config import AdapterConfig, MergeConfig, make_config
from rslora_deploy.errors import AdapterFormatError, ConfigError
from rslora_deploy.stages.merge import merge_adapter
from rslora_deploy.testing.tiny import save_tiny, tiny_llama
from tests import tolerances as tol

LIVE = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.mlp.down_proj": (64, 128)}
RECORDED = {name.replace("model.", "decoder.", 1): shape for name, shape in LIVE.items()}


def test_rename_name_prefix_rules() -> None:
    rename = {"decoder": "model", "decoder.layers.1": "model.blocks.1", "lm": ""}
    assert rename_name("decoder.layers.0.q", rename) == "model.layers.0.q"
    assert rename_name("decoder.layers.1.q", rename) == "model.blocks.1.q"  # longest wins
    assert rename_name("decoder", rename) == "model"  # a full name is a prefix of itself
    assert rename_name("decoderx.q", rename) == "decoderx.q"  # whole components only
    assert rename_name("lm.head", rename) == "head"  # empty NEW removes the prefix
    assert rename_name("other.q", rename) == "other.q"


def test_cli_and_config_maps_are_normalized() -> None:
    assert parse_rename_args(["model.language_model.=model.", "a=b"]) == {
        "model.language_model": "model",
        "a": "b",
    }
    assert AdapterConfig(rename={"x.": "y"}).rename == {"x": "y"}


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["decoder"], "OLD=NEW"),
        (["=model"], "OLD=NEW"),
        (["a=b", "a.=c"], "twice"),
        (["a b=c"], "prefix"),
    ],
)
def test_malformed_rename_args(items: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rename_args(items)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_rename_in_recipe_names_the_field() -> None:
    with pytest.raises(ConfigError, match="adapter.rename"):
        make_config({"profile": "t4-2gb", "adapter": {"rename": {"": "model"}}})


def test_two_modules_onto_one_is_refused() -> None:
    deltas = [
        ModuleDelta("a.q", "linear", 2, 2, dense=np.zeros((2, 2))),
        ModuleDelta("b.q", "linear", 2, 2, dense=np.zeros((2, 2))),
    ]
    with pytest.raises(ConfigError, match="both 'a.q' and 'b.q' onto 'b.q'"):
        apply_renames(deltas, {"a": "b"})
    assert [d.name for d in deltas] == ["a.q", "b.q"]  # nothing changed on error


def test_slices_of_one_recorded_module_may_share_a_name() -> None:
    deltas = [
        ModuleDelta("a.qkv", "linear", 2, 1, out_slice=(0, 1), dense=np.zeros((1, 2))),
        ModuleDelta("a.qkv", "linear", 2, 1, out_slice=(2, 3), dense=np.zeros((1, 2))),
    ]
    assert apply_renames(deltas, {"a": "b"}) == {"a.qkv": "b.qkv"}
    assert [(d.name, d.recorded_name) for d in deltas] == [("b.qkv", "a.qkv")] * 2


def _v(names: list[str], k: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {f"{m}.rslora_v_{f}": rng.uniform(-1, 1, k) for m in names for f in "AB"}


def _checkpoint(
    path: Path, modules: dict[str, tuple[int, int]], base_model: dict[str, str]
) -> Path:
    """Seed-mode checkpoint; v depends only on the module order, not the names."""
    spec = RsloraSpec(
        modules={
            m: {"d_in": d_in, "d_out": d_out, "layout": "linear"}
            for m, (d_out, d_in) in modules.items()
        },
        r=4,
        k=3,
        alpha=8.0,
        seed=21,
        task_id="rename",
        base_model=base_model,
    )
    rng = np.random.default_rng(3)
    return write_checkpoint(
        path, spec, {f"{m}.rslora_v_{f}": rng.uniform(-1, 1, 3) for m in modules for f in "AB"}
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("rename") / "base")


def _base_block(base_dir: Path, live_names: dict[str, str]) -> dict[str, str]:
    digest, missing = target_weights_sha256(base_dir, list(live_names), live_names)
    assert not missing
    return {
        "name_or_path": "tiny",
        "revision": "",
        "architecture": "LlamaForCausalLM",
        "config_sha256": config_sha256(base_dir),
        "target_weights_sha256": digest,
    }


def test_seed_mode_keys_use_recorded_names_through_the_stage(
    base_dir: Path, tmp_path: Path
) -> None:
    """Merging with a rename map adds exactly the delta of the *recorded* names' P~."""
    live_names = dict(zip(RECORDED, LIVE, strict=True))
    ckpt = _checkpoint(tmp_path / "rec", RECORDED, _base_block(base_dir, live_names))
    # The P~ of module m is keyed by (seed, task_id, m, factor): the recorded name, not the live.
    assert rsg.derive_key(21, "rename", "decoder.layers.0.self_attn.q_proj", "A") != rsg.derive_key(
        21, "rename", "model.layers.0.self_attn.q_proj", "A"
    )
    expected = {d.name: d.delta_weight(np.float32) for d in load_adapter(ckpt).deltas}

    # Without the map: the recorded weights are absent from the base (E010), and with the
    # base check relaxed the modules are absent from the model (E020); both hint at --rename.
    for cfg, code in ((AdapterConfig(), "E010"), (AdapterConfig(allow_base_mismatch=True), "E020")):
        with pytest.raises(AdapterFormatError) as info:
            merge_adapter(base_dir, ckpt, tmp_path / "no-map", MergeConfig(), cfg)
        assert info.value.code == code
        assert "--rename" in info.value.message
        assert not (tmp_path / "no-map").exists()

    art = merge_adapter(
        base_dir, ckpt, tmp_path / "out", MergeConfig(), AdapterConfig(rename={"decoder": "model"})
    )
    merged = load_file(str(art.path / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    for rec, live in live_names.items():
        got = (merged[f"{live}.weight"] - base[f"{live}.weight"]).numpy()
        np.testing.assert_allclose(got, expected[rec], atol=tol.FP32_ATOL)

    # Control: the same v recorded under the live names gives another P~, so another update.
    control = _checkpoint(tmp_path / "live", LIVE, _base_block(base_dir, {n: n for n in LIVE}))
    other = {d.name: d.delta_weight(np.float32) for d in load_adapter(control).deltas}
    for rec, live in live_names.items():
        assert np.abs(other[live] - expected[rec]).max() > 1e-3

    import json

    report = json.loads((art.path / "merge_report.json").read_text())
    assert report["renamed"] == live_names
    assert report["base_check"]["weights_match"] is True


def test_base_hash_uses_recorded_names_and_live_tensors(base_dir: Path, tmp_path: Path) -> None:
    """A base whose files use the recorded names hashes like the renamed base (P stable)."""
    tensors = load_file(str(base_dir / "model.safetensors"))
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    save_file(
        {k.replace("model.", "decoder.", 1): v.contiguous() for k, v in tensors.items()},
        str(old_dir / "model.safetensors"),
    )
    live_names = dict(zip(RECORDED, LIVE, strict=True))
    on_old, missing_old = target_weights_sha256(old_dir, list(RECORDED))
    on_new, missing_new = target_weights_sha256(base_dir, list(RECORDED), live_names)
    assert on_old == on_new
    assert not missing_old
    assert not missing_new
    assert target_weights_sha256(base_dir, list(RECORDED))[1] == sorted(RECORDED)


def test_wrong_target_names_both(base_dir: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(
        tmp_path / "rec", RECORDED, _base_block(base_dir, dict(zip(RECORDED, LIVE, strict=True)))
    )
    with pytest.raises(AdapterFormatError) as info:
        merge_adapter(
            base_dir,
            ckpt,
            tmp_path / "out",
            MergeConfig(),
            AdapterConfig(rename={"decoder": "transformer"}, allow_base_mismatch=True),
        )
    err = info.value
    assert err.code == "E020"
    assert "transformer.layers.0.self_attn.q_proj" in err.message
    assert "decoder.layers.0.self_attn.q_proj" in err.message
    assert not (tmp_path / "out").exists()


def test_cli_merge_rename(base_dir: Path, tmp_path: Path, capsys: Any) -> None:
    ckpt = _checkpoint(
        tmp_path / "rec", RECORDED, _base_block(base_dir, dict(zip(RECORDED, LIVE, strict=True)))
    )
    common = ["merge", "--base", str(base_dir), "--adapter", str(ckpt)]
    assert main([*common, "--out", str(tmp_path / "bad"), "--rename", "decoder"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "OLD=NEW" in err[0]
    assert not (tmp_path / "bad").exists()
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "clash"),
                "--rename",
                "decoder.layers.0.self_attn.q_proj=model.layers.1.mlp.down_proj",
                "--rename",
                "decoder.layers.1=model.layers.1",
            ]
        )
        == 1
    )
    assert "onto 'model.layers.1.mlp.down_proj'" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists()
    assert main([*common, "--out", str(tmp_path / "ok"), "--rename", "decoder.=model."]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_cli_build_passes_rename_to_the_config(
    monkeypatch: Any, tmp_path: Path, capsys: Any
) -> None:
    import rslora_deploy.api

    seen = []

    def fake_build(config: Any, **_: Any) -> None:
        seen.append(config)
        raise ConfigError("stop here")

    monkeypatch.setattr(rslora_deploy.api, "build", fake_build)
    out = tmp_path / "pkg"
    assert main(["build", "--profile", "t4-2gb", "--out", str(out), "--rename", "x"]) == 1
    assert "OLD=NEW" in capsys.readouterr().err
    assert not seen
    assert (
        main(
            [
                "build",
                "--profile",
                "t4-2gb",
                "--out",
                str(out),
                "--rename",
                "a.=b",
                "--rename",
                "c=d",
            ]
        )
        == 1
    )
    assert seen[0].adapter.rename == {"a": "b", "c": "d"}
    assert not out.exists()
