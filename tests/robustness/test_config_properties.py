"""Property tests of config loading (in-process, fast): random valid `--set` overrides land in the config and
survive a dump -> load round trip; random invalid values, unknown keys and arbitrary YAML / override text
never raise anything but a one-line ConfigError that names the file and the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archipelago.config import ArchipelagoConfig, dump_config, load_config
from archipelago.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "digits-quickstart.yaml"
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# YAML 1.1 turns these words into booleans / null: never valid as free text in a --set value.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "~"}
WORD = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True).filter(lambda s: s not in _YAML_WORDS)
FLOAT = {"allow_nan": False, "allow_infinity": False, "width": 64}


def _unit(exclude_max: bool = True) -> st.SearchStrategy[float]:
    return st.floats(0.0, 1.0, exclude_max=exclude_max, **FLOAT)


# field -> strategy of valid values (every kind: bounded ints, positive floats, enums, bools, text)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "name": WORD,
    "data.num_clusters": st.integers(1, 256),
    "data.image_size": st.integers(8, 256),
    "data.partitioner": st.sampled_from(["kmeans", "random"]),
    "data.max_imbalance": st.floats(1.0, 1e3, **FLOAT),
    "data.seed": st.integers(-(2**62), 2**62),
    "expert.depth": st.integers(1, 64),
    "expert.steps": st.integers(1, 10**9),
    "expert.lr": st.floats(1e-12, 10.0, **FLOAT),
    "expert.strategy": st.sampled_from(["single", "ddp", "fsdp2", "deepspeed"]),
    "expert.zero_stage": st.integers(1, 3),
    "expert.class_dropout": _unit(),
    "expert.ema_decay": _unit(),
    "expert.lr_min_ratio": _unit(exclude_max=False),
    "expert.precision": st.sampled_from(["fp32", "bf16"]),
    "expert.sampler": st.sampled_from(["euler", "heun"]),
    "router.steps": st.integers(1, 10**6),
    "islands.num_workers": st.integers(1, 4096),
    "islands.cpus_per_worker": st.floats(1e-3, 512.0, **FLOAT),
    "islands.max_failures": st.integers(0, 100),
    "inference.routing": st.one_of(st.just("full"), st.integers(1, 99).map(lambda k: f"top-{k}")),
    "inference.mode": st.sampled_from(["single", "naive_patch", "sync_patch", "distrifusion", "cfg_parallel",
                                       "expert_parallel"]),
    "tracking.enabled": st.booleans(),
    "tracking.experiment": WORD,
    "storage.root": st.lists(WORD, min_size=1, max_size=4).map(lambda p: "/".join(["runs", *p])),
}

# field -> strategy of values that must be refused (below/above a bound, wrong type, not in the enum)
_NOT_A_NUMBER = st.from_regex(r"x[a-z]{0,8}", fullmatch=True)
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "data.num_clusters": st.one_of(st.integers(max_value=0), st.integers(min_value=257), _NOT_A_NUMBER),
    "data.image_size": st.one_of(st.integers(max_value=7), st.integers(min_value=257)),
    "data.partitioner": WORD.filter(lambda s: s not in ("kmeans", "random")),
    "data.max_imbalance": st.floats(max_value=0.999, **FLOAT),
    "expert.depth": st.one_of(st.integers(max_value=0), _NOT_A_NUMBER),
    "expert.steps": st.integers(max_value=0),
    "expert.lr": st.one_of(st.floats(max_value=0.0, **FLOAT), _NOT_A_NUMBER),
    "expert.strategy": WORD.filter(lambda s: s not in ("single", "ddp", "fsdp2", "deepspeed")),
    "expert.zero_stage": st.one_of(st.integers(max_value=0), st.integers(min_value=4)),
    "expert.ema_decay": st.one_of(st.floats(min_value=1.0, **FLOAT), st.floats(max_value=-1e-9, **FLOAT)),
    # 2D sin-cos positions need 4 | hidden_size (a cross-field check of the model: it names 'expert')
    "expert.hidden_size": st.integers(8, 4096).filter(lambda h: h % 4 != 0),
    "router.batch_size": st.integers(max_value=0),
    "islands.num_workers": st.one_of(st.integers(max_value=0), _NOT_A_NUMBER),
    "islands.cpus_per_worker": st.floats(max_value=0.0, **FLOAT),
    "inference.routing": WORD.filter(lambda s: s != "full"),
    "inference.world_size": st.integers(max_value=0),
    "tracking.enabled": _NOT_A_NUMBER,
}

SECTIONS = {name: set(f.annotation.model_fields) for name, f in ArchipelagoConfig.model_fields.items()
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One directory for every example (each writes its file afresh; mktemp per example is quadratic)."""
    return tmp_path_factory.mktemp("config-properties")


def _get(cfg: ArchipelagoConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _render(value: Any) -> str:
    """How a person types the value after `--set key=`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _assert_one_line(err: ConfigError, *needles: str) -> None:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@SETTINGS
@given(data=st.data(), fields=st.lists(st.sampled_from(sorted(VALID)), unique=True, min_size=1, max_size=6),
       heads=st.integers(1, 8), width=st.integers(2, 16), with_size=st.booleans())
def test_valid_overrides_round_trip(workdir, data, fields, heads, width, with_size):
    values = {f: data.draw(VALID[f], label=f) for f in fields}
    if with_size:   # a coupled pair: num_heads | hidden_size and 4 | hidden_size
        values |= {"expert.num_heads": heads, "expert.hidden_size": 4 * heads * width}
    cfg = load_config(QUICKSTART, [f"{k}={_render(v)}" for k, v in values.items()])
    for key, value in values.items():
        assert _get(cfg, key) == value, key
    path = workdir / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and again.config_hash() == cfg.config_hash()


@SETTINGS
@given(data=st.data(), field=st.sampled_from(sorted(INVALID)), via_file=st.booleans())
def test_invalid_values_are_one_line_naming_the_field(workdir, data, field, via_file):
    value = data.draw(INVALID[field], label=field)
    section, key = field.split(".")
    path = workdir / "bad.yaml"
    if via_file:
        path.write_text(yaml.safe_dump({section: {key: value}}))
        overrides: list[str] = []
    else:
        path.write_text("{}\n")
        overrides = [f"{field}={_render(value)}"]
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    # a cross-field check reports 'expert' and the values, e.g. "num_heads=4 must divide hidden_size=9"
    needle = f"hidden_size={value}" if field == "expert.hidden_size" else f"'{field}'"
    _assert_one_line(ei.value, str(path), needle)


@SETTINGS
@given(section=st.sampled_from(sorted(SECTIONS)), key=WORD, via_file=st.booleans())
def test_unknown_keys_are_one_line_with_the_known_ones(workdir, section, key, via_file):
    if key in SECTIONS[section]:
        return
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump({section: {key: 1}}) if via_file else "{}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path, [] if via_file else [f"{section}.{key}=1"])
    _assert_one_line(ei.value, str(path), f"unknown field '{section}.{key}'", "known: ")


_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(**FLOAT), st.text(max_size=8))
_YAML_TREE = st.recursive(_SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                           st.dictionaries(st.one_of(WORD, st.integers(-3, 300)),
                                                                           kids, max_size=3)), max_leaves=12)
_KEYS = st.one_of(st.sampled_from(sorted(SECTIONS)), WORD)


@SETTINGS
@given(doc=st.one_of(st.dictionaries(_KEYS, st.one_of(_YAML_TREE, st.dictionaries(
    st.one_of(WORD, st.sampled_from(sorted({k for ks in SECTIONS.values() for k in ks}))), _YAML_TREE,
    max_size=4)), max_size=4), _YAML_TREE))
def test_arbitrary_yaml_loads_or_is_one_config_error(workdir, doc):
    path = workdir / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as exc:
        _assert_one_line(exc, str(path))


@SETTINGS
@given(items=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
                      max_size=3),
       text=st.text(max_size=60))
def test_arbitrary_override_or_file_text_is_one_config_error(workdir, items, text):
    path = workdir / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, items)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg
