"""Parameters and command line: bad params name the dotted key (ConfigError, CLI exit 2),
``--set`` values are YAML-typed, and ``--help`` works for every stage."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipeline.app.cli import STAGES, main
from pipeline.config import Config, ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_params_yaml_loads_and_matches_defaults() -> None:
    cfg = load_config(PARAMS)
    assert isinstance(cfg, Config)
    # Every key in params.yaml is a known key, and params.yaml spells out every default.
    assert cfg.to_dict() == Config().to_dict()


# --- bad values name the dotted key -------------------------------------------------------------

BAD_OVERRIDES = [
    ("unknown key", {"train.epochz": 3}, "train.epochz"),
    ("unknown section", {"trian.epochs": 3}, "trian"),
    ("wrong type", {"train.epochs": "many"}, "train.epochs"),
    ("wrong type in list", {"validate.allowed_modes": "RGB"}, "validate.allowed_modes"),
    ("bad literal", {"train.optimizer": "adam"}, "train.optimizer"),
    ("split does not sum to 1", {"data.split.train": 0.8}, "data.split"),
    ("negative count", {"synthetic.images_per_class": -1}, "synthetic.images_per_class"),
    ("zero workers", {"validate.workers": 0}, "validate.workers"),
    ("negative min per class", {"validate.min_train_per_class": -2}, "validate.min_train_per_class"),
    ("empty allowed modes", {"validate.allowed_modes": []}, "validate.allowed_modes"),
    ("min above max", {"validate.min_width": 20_000}, "min_width must be <= max_width"),
    ("unknown class", {"synthetic.class_counts": {"xyz": 3}}, "synthetic.class_counts"),
    ("set below a value", {"seed.value": 1}, "seed"),
]


@pytest.mark.parametrize(("what", "overrides", "key"), BAD_OVERRIDES, ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override_names_key(what: str, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PARAMS, overrides)
    assert key in str(info.value)


def test_bad_params_file_names_key(tmp_path: Path) -> None:
    path = write_params(tmp_path, lambda raw: raw["augment"].update(colour=0.3))
    with pytest.raises(ConfigError, match=r"augment\.colour"):
        load_config(path)
    path = write_params(tmp_path, lambda raw: raw["data"]["split"].update(val=0.5))
    with pytest.raises(ConfigError, match=r"data\.split: .*sum to 1"):
        load_config(path)


def test_missing_and_unparsable_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.parametrize("text", ["train.epochs", "=3", " =3", "train.epochs=[1,"])
def test_bad_set_syntax(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


# --- --set parses YAML types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.epochs=3", ("train.epochs", 3)),
        ("train.lr=0.5", ("train.lr", 0.5)),
        ("train.lr=1.0e-3", ("train.lr", 1e-3)),
        ("train.amp=false", ("train.amp", False)),
        ("data.root=null", ("data.root", None)),
        ("validate.allowed_modes=[RGB, L]", ("validate.allowed_modes", ["RGB", "L"])),
        ("synthetic.class_counts={nv: 3}", ("synthetic.class_counts", {"nv": 3})),
        ("data.root=/a/b=c", ("data.root", "/a/b=c")),
        ("mlflow.experiment='42'", ("mlflow.experiment", "42")),
        ("mlflow.experiment=", ("mlflow.experiment", "")),
    ],
)
def test_set_values_are_yaml(text: str, expected: tuple) -> None:
    assert parse_override(text) == expected


def test_set_overrides_reach_config() -> None:
    overrides = ["train.epochs=7", "train.amp=false", "validate.allowed_modes=[RGB, L]", "data.root=/x"]
    overrides.append("train.lr=1e-3")
    cfg = load_config(PARAMS, overrides)
    assert cfg.train.epochs == 7 and cfg.train.amp is False
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as text; pydantic coerces it
    assert cfg.validate_cfg.allowed_modes == ["RGB", "L"] and cfg.data.root == "/x"


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_set_int_round_trip(n: int) -> None:
    assert parse_override(f"seed={n}") == ("seed", n)


# --- the CLI: exit 2 with the key on stderr, --help for every stage ----------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "train.epochz=3"], "train.epochz"),
        (["--set", "validate.workers=-1"], "validate.workers"),
        (["--set", "data.split.test=0.5"], "data.split"),
        (["--set", "train.epochs"], "expected dotted.key=value"),
        (["--params", "does-not-exist.yaml"], "does-not-exist.yaml"),
    ],
)
def test_cli_bad_params_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error:")


def test_cli_bad_params_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--params", "params.yaml", "--set", "train.batch_size=-4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_for_every_stage(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([stage, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--params" in out and "--set" in out
    assert STAGES[stage].help.split()[0] in out


def test_top_level_help_lists_stages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)


def test_unknown_stage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-stage"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"train.optimizer": "sgd"}, "train.momentum: required with optimizer=sgd"),
        ({"train.momentum": 0.9}, "train.momentum: only used with optimizer=sgd"),
        ({"train.schedule": "onecycle", "train.warmup_epochs": 1}, "train.warmup_epochs: onecycle has its own warm-up"),
        ({"train.warmup_epochs": 12}, "train.warmup_epochs"),
        ({"model.extractor": [[1, 16, 1, 3]]}, "model.extractor: Value error, row 0 [1, 16, 1, 3]: stride must be 1 or 2"),
        ({"model.branch": [[0, 16, 1, 2]]}, "model.branch"),
    ],
)
def test_cross_field_rules_fail_at_load_naming_the_key(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PARAMS, overrides)
    assert needle.replace("Value error, ", "") in str(info.value)


def test_source_rules_need_the_registry_and_fail_at_load() -> None:
    from pipeline.app.params import load_params

    with pytest.raises(ConfigError, match="data.source: unknown source 'dicom'"):
        load_params(PARAMS, {"data.source": "dicom"})
    with pytest.raises(ConfigError, match="data.root: must be set for data.source='ham10000'"):
        load_params(PARAMS, {"data.source": "ham10000"})
    with pytest.raises(ConfigError, match="data.csv: must be set"):
        load_params(PARAMS, {"data.source": "isic_csv", "data.root": "/x"})
    assert load_params(PARAMS, {"train.optimizer": "sgd", "train.momentum": 0.9}).train.momentum == 0.9


# --- params-real.yaml: the real-data config is params.yaml with marked differences ---------------

PARAMS_REAL = ROOT / "params-real.yaml"


def _marked_keys(text: str, marker: str = "# real:") -> set[str]:
    """Dotted keys of the lines of a block-style YAML file whose comment carries ``marker``."""
    stack: list[tuple[int, str]] = []
    marked = set()
    for line in text.splitlines():
        body = line.split("#", 1)[0]
        m = re.match(r"^( *)([A-Za-z_][\w-]*):", body)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if marker in line:
            marked.add(".".join(k for _, k in stack))
    return marked


def test_params_real_has_the_same_keys_and_marks_every_difference() -> None:
    from pipeline.config import flatten

    base = flatten(yaml.safe_load(PARAMS.read_text()))
    real = flatten(yaml.safe_load(PARAMS_REAL.read_text()))
    assert set(real) == set(base), "params-real.yaml must spell out the same keys as params.yaml"
    differing = {k for k in base if base[k] != real[k]}
    assert differing == _marked_keys(PARAMS_REAL.read_text())
    assert {"data.source", "data.root", "select.decision_rule", "registry.model_name"} <= differing


def test_params_real_loads_with_its_own_registry_name() -> None:
    from pipeline.app.params import load_params

    cfg = load_params(PARAMS_REAL)
    assert cfg.data.source == "ham10000" and Path(cfg.data.root).is_absolute()
    assert cfg.registry.model_name != load_config(PARAMS).registry.model_name


def test_marked_keys_follow_nesting() -> None:
    text = "a:\n  b: 1  # real: x\n  c:\n    d: 2 # real: y\ne: 3\n"
    assert _marked_keys(text) == {"a.b", "a.c.d"}


def test_console_script_has_the_same_subcommands_as_python_m_pipeline() -> None:
    """``skin-twin <stage>`` (pyproject's [project.scripts]) is ``python -m pipeline <stage>``."""
    script = Path(sys.executable).parent / "skin-twin"
    if not script.is_file():
        pytest.skip(f"{script} not installed (make setup installs it)")
    a = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    b = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True).stdout
    assert a.startswith("usage: skin-twin") and b.startswith("usage: python -m pipeline")
    assert a.split("\n", 1)[1] == b.split("\n", 1)[1]
