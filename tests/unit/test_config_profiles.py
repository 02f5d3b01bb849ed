"""Config and profile schemas: round-trips, validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from rslora_deploy.config import BuildConfig, load_recipe, make_config
from rslora_deploy.errors import ConfigError
from rslora_deploy.profiles import list_profiles, load_profile


def _to_toml(data: dict) -> str:
    """Tiny TOML writer for flat sections (enough for BuildConfig)."""
    top = [
        f"{k} = {json.dumps(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and v is not None
    ]
    lines = top
    for section, body in data.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def test_recipe_round_trip(tmp_path: Path) -> None:
    config = make_config({"profile": "t4-2gb", "quantize": {"method": "rtn", "group_size": 32}})
    recipe = tmp_path / "r.toml"
    recipe.write_text(_to_toml(config.to_json_dict()))
    assert tomllib.loads(recipe.read_text())["quantize"]["method"] == "rtn"
    assert load_recipe(recipe) == config


def test_cli_overrides_beat_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('profile = "t4-2gb"\n[quantize]\nmethod = "gptq"\n')
    config = load_recipe(recipe, **{"quantize.method": "rtn", "profile": None})
    assert config.quantize.method == "rtn"
    assert config.profile == "t4-2gb"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"profile": "t4-2gb", "quantize": {"bits": 3}}, "quantize.bits"),
        ({"profile": "t4-2gb", "quantize": {"group_size": 100}}, "quantize.group_size"),
        ({"profile": "t4-2gb", "quantize": {"metod": "rtn"}}, "quantize.metod"),
        ({"quantize": {}}, "profile"),
        ({"profile": "t4-2gb", "quantize": {"compute_dtype": "int8"}}, "quantize.compute_dtype"),
        ({"profile": "t4-2gb", "quantize": {"mse": -1.0}}, "quantize.mse"),
        ({"profile": "t4-2gb", "eval": {"survival_threshold": 1.5}}, "eval.survival_threshold"),
        ({"profile": "t4-2gb", "quantize": {"method": "awq", "compute_dtype": "float32"}}, "awq"),
    ],
)
def test_invalid_config_names_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config(data)


def test_bad_recipe_toml(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("profile = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(recipe)


def test_every_profile_loads_and_is_sane() -> None:
    profiles = list_profiles()
    assert {p.name for p in profiles} >= {"t4-2gb", "ascend-310p-2gb", "ascend-310b-2gb"}
    for profile in profiles:
        assert profile.memory_bytes == 2 * 1024**3
        assert 0 < profile.reserved_bytes < profile.memory_bytes
        if profile.exporter == "ascend-om":
            # An Ascend package ships fp16 weights (310P/310B run int8 at best, never int4).
            assert profile.supported_bits == [16]
            assert profile.export_target == "npu"
            assert profile.soc_versions
        else:
            assert 4 in profile.supported_bits
            assert profile.export_target in ("cuda", "cpu")


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ConfigError, match="known profiles: .*t4-2gb"):
        load_profile("t5-9gb")


def test_profile_missing_required_field(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('description = "x"\ndevice = "cuda"\n')
    with pytest.raises(ConfigError, match="memory_bytes"):
        load_profile(str(path))


def test_build_config_is_frozen() -> None:
    config = BuildConfig(profile="t4-2gb")
    with pytest.raises(Exception, match="frozen"):
        config.profile = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("export_target", "cdua", "'cpu', 'cuda' or 'npu'"),
        ("exporter", "onnxruntime-genia", "registered: "),
        ("kv_dtype", "fp8", "'float16', 'bfloat16' or 'float32'"),
        ("runtime", "tensorrt", "'onnxruntime-genai', 'onnxruntime' or 'acl'"),
        ("execution_provider", "rocm", "'cpu', 'cuda' or 'cann'"),
    ],
)
def test_profile_typo_in_a_closed_field_exits_1_naming_field_and_choices(
    tmp_path: Path, field: str, value: str, allowed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from rslora_deploy.cli.app import main
    from rslora_deploy.profiles import profiles_dir

    text = (profiles_dir() / "t4-2gb.toml").read_text()
    # Replace the one top-level line, keeping the file's tables ([reserved_source]) intact.
    typo = re.sub(rf"^{field} = .*$", f"{field} = {json.dumps(value)}", text, flags=re.M)
    assert tomllib.loads(typo)[field] == value
    path = tmp_path / "typo.toml"
    path.write_text(typo)
    out = tmp_path / "pkg"

    code = main(["build", "--profile", str(path), "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 1
    assert field in err
    assert allowed in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("profile", "export", "field", "exporter", "accepts"),
    [
        ("ascend-310p-2gb", 'lm_head = "int4"', "export.lm_head", "ascend-om", "max_length, gears"),
        ("t4-2gb", "gears = [1, 16]", "export.gears", "onnxruntime-genai", "lm_head"),
    ],
)
def test_another_exporters_option_in_a_recipe_exits_1_naming_field_exporter_and_accepted(
    tmp_path: Path,
    profile: str,
    export: str,
    field: str,
    exporter: str,
    accepts: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rslora_deploy.cli.app import main
    from tests.unit.cli.clean_failure import assert_failed_cleanly

    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[export]\n{export}\n")
    out = tmp_path / "pkg"
    code = main(["build", "--profile", profile, "--recipe", str(recipe), "--out", str(out)])
    assert_failed_cleanly(code, capsys.readouterr().err, out, field, exporter, accepts)


def test_a_genai_cli_override_on_an_ascend_profile_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rslora_deploy.cli.app import main
    from tests.unit.cli.clean_failure import assert_failed_cleanly

    out = tmp_path / "pkg"
    code = main(["build", "--profile", "ascend-310p-2gb", "--lm-head", "int4", "--out", str(out)])
    assert_failed_cleanly(code, capsys.readouterr().err, out, "export.lm_head", "ascend-om")


def test_an_ascend_override_on_a_genai_profile_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('profile = "t4-2gb"\n')
    with pytest.raises(ConfigError, match=r"export\.gears: not an option of the onnxruntime-genai"):
        load_recipe(recipe, **{"export.gears": [1, 16]})


def test_each_profile_gets_its_exporters_options_in_the_manifest_config() -> None:
    genai = make_config({"profile": "t4-2gb"}).to_json_dict()["export"]
    ascend = make_config({"profile": "ascend-310p-2gb"}).to_json_dict()["export"]
    assert "lm_head" in genai
    assert "gears" not in genai
    assert ascend == {"max_length": None, "gears": [1, 16, 64, 256]}


@pytest.mark.parametrize(
    ("adapters", "expected"),
    [
        ([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], "two adapters are named 'a'"),
        ([{"name": "my-task", "path": "x"}], "adapters.0.name"),
        ([{"name": "base", "path": "x"}], "'base' names the base model"),
        ([{"name": "a b", "path": "x"}], "adapters.0.name"),
    ],
)
def test_bad_run_time_adapter_names_exit_1_naming_them(
    tmp_path: Path, adapters: list, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Duplicate, non-identifier and reserved names fail before anything is read or written."""
    from rslora_deploy.cli.app import main

    args = [f"--adapter={a['name']}={tmp_path / a['path']}" for a in adapters]
    out = tmp_path / "pkg"
    assert main(["build", "--profile", "cpu-2gb", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()


def test_one_merged_adapter_and_named_ones_are_not_mixed(tmp_path: Path) -> None:
    from rslora_deploy.config import make_config
    from rslora_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="both set"):
        make_config(
            {
                "profile": "cpu-2gb",
                "adapter": {"path": "x"},
                "adapters": [{"name": "a", "path": "y"}],
            }
        )
    from rslora_deploy.cli.app import main

    assert main(["build", "--profile", "cpu-2gb", "--adapter", "x", "--adapter", "a=y"]) == 2
