"""Recipes: small frozen dataclasses loaded from ``recipes/*.yaml`` with strict key and type checks."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qkit.errors import QkitError
from qkit.quant.schemes import default_scheme, get_scheme

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data; ./recipes links here
BITS = (32, 16, 8, 4, 2, 1)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BY_BITS = {32: "fp32", 16: "fp16", 8: "int8", 4: "w4a8", 2: "w2a8", 1: "w1a8"}
_ADDER_BY_BITS = {32: "adder", 8: "adder-int8"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters: SGD (Nesterov momentum), cosine schedule, weight decay."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    shift_augment: float = 0.0      # random translations up to this fraction of the image side
    flip_augment: bool = False      # random left-right mirror (natural images such as CIFAR-10)
    crop_augment: float = 0.0       # random-resized crop of at least this fraction of the area (0: off)
    distill_alpha: float = 0.5      # weight of the KD loss when --teacher is given
    distill_temperature: float = 4.0
    divergence_retries: int = 0     # on a non-finite loss: redo the epoch at half the lr, this many times


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how: scheme, weight/activation bits, training and export settings."""

    name: str
    weight_bits: int = 32
    act_bits: int = 32
    first_last_bits: int = 8        # first conv and last linear stay at this weight precision
    scheme: str = ""                # a registered scheme (qkit.quant.schemes); "" picks it from weight_bits
    adder_eta: float = 0.2          # AdderNet adaptive learning-rate coefficient η
    max_drop: float = 1.0           # accuracy gate (percentage points) used by `qkit check --baseline`
    opset: int = 17
    description: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    # per-dataset training settings, e.g. {"fashion-mnist": {"epochs": 3}}: 60k images need fewer passes
    data_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        return self.scheme == "float"

    @property
    def adder(self) -> bool:
        return self.scheme == "adder"

    @property
    def dtype(self) -> str:
        """The exported model's input and compute dtype."""
        return "float16" if self.weight_bits == 16 else "float32"

    @property
    def is_quantized(self) -> bool:
        return self.weight_bits <= 8 or self.act_bits <= 8

    def for_data(self, data: str) -> "Recipe":
        """This recipe with the training settings it gives dataset ``data`` (``name`` or ``name:PATH``)."""
        changes = self.data_overrides.get(data.split(":", 1)[0])
        return self.replace(train=dataclasses.replace(self.train, **changes)) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        """A recipe from :meth:`to_dict`'s form (checkpoints), type-checked as a YAML recipe is."""
        return _checked(cls(**_typed(cls, _legacy(dict(data), where), where)))

    def replace(self, **changes: Any) -> "Recipe":
        return _checked(dataclasses.replace(self, **changes))


def _legacy(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Recipes and checkpoints from before schemes said ``adder: true``; that now means ``scheme: adder``."""
    if "adder" in data:
        adder = data.pop("adder")
        if adder is True:
            if data.get("scheme", "adder") != "adder":
                raise QkitError(f"{where}: adder: true contradicts scheme: {data['scheme']}")
            data["scheme"] = "adder"
    return data


def _checked(r: Recipe) -> Recipe:
    if not r.scheme:
        r = dataclasses.replace(r, scheme=default_scheme(r.weight_bits))
    if not _NAME.fullmatch(r.name):
        raise QkitError(f"recipe name {r.name[:80]!r}: letters, digits, '.', '_' and '-' only (it names run folders)")
    if r.weight_bits not in BITS or r.act_bits not in BITS:
        raise QkitError(f"recipe {r.name}: bits must be one of {BITS}, got w{r.weight_bits} a{r.act_bits}")
    problem = get_scheme(r.scheme).check(r)
    if problem:
        raise QkitError(f"recipe {r.name}: {problem} (scheme {r.scheme}, w{r.weight_bits} a{r.act_bits})")
    if r.first_last_bits not in (8, 16, 32):
        raise QkitError(f"recipe {r.name}: first_last_bits must be 8, 16 or 32")
    t = r.train
    if t.epochs < 0 or t.batch_size < 1 or t.lr <= 0 or not 0 <= t.distill_alpha <= 1 or not 0 <= t.crop_augment < 1:
        raise QkitError(f"recipe {r.name}: epochs ≥ 0, batch_size ≥ 1, lr > 0, 0 ≤ distill_alpha ≤ 1 and "
                        "0 ≤ crop_augment < 1")
    return r


def _typed(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in known:
            raise QkitError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        kind = known[key].type
        if kind == "TrainConfig":
            if not isinstance(value, dict):
                raise QkitError(f"{where}: 'train' must be a mapping")
            out[key] = TrainConfig(**_typed(TrainConfig, value, f"{where} train"))
            continue
        if key == "data_overrides":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise QkitError(f"{where}: data_overrides maps a dataset name to training settings")
            out[key] = {str(d): _typed(TrainConfig, v, f"{where} data_overrides {d}") for d, v in value.items()}
            continue
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}[kind]
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, want):
            raise QkitError(f"{where}: {key} must be {kind}, got {type(value).__name__} {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise QkitError(f"{where}: {key} must be a finite number, got {value!r}")
        out[key] = float(value) if kind == "float" else value
    return out


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a recipe never needs ``*ref``, and nested aliases turn a few
    hundred bytes into gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a recipe", mark)
        return super().compose_node(parent, index)


MAX_RECIPE_BYTES = 64 << 10


def parse_recipe(text: str, where: str = "recipe") -> Recipe:
    if len(text) > MAX_RECIPE_BYTES:
        raise QkitError(f"{where}: {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise QkitError(f"{where}: invalid YAML ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict) or "name" not in data:
        raise QkitError(f"{where}: a recipe is a mapping with at least a 'name'")
    return Recipe.from_dict(data, where)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``recipes/NAME.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise QkitError(f"unknown recipe {name_or_path!r}; choose from {', '.join(list_recipes())} or a YAML path")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise QkitError(f"{path}: {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise QkitError(f"{path}: not a text file") from None
    return parse_recipe(text, str(path))


def resolve_recipe(recipe: str | None = None, bits: int | None = None, act_bits: int | None = None,
                   adder: bool = False) -> Recipe:
    """Apply the CLI shorthands: ``--bits 2`` alone means w2a8, ``--adder`` the adder recipe at those bits."""
    if bits is not None and bits not in BITS:
        raise QkitError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if act_bits is not None and act_bits not in BITS:
        raise QkitError(f"--act-bits must be one of {', '.join(map(str, BITS))}, got {act_bits}")
    if recipe is None:
        if adder:
            b = 32 if bits is None else bits
            if b not in _ADDER_BY_BITS:
                raise QkitError(f"--adder runs at --bits 32 or 8, not {b}")
            recipe = _ADDER_BY_BITS[b]
        else:
            recipe = _BY_BITS[32 if bits is None else bits]
            if bits is not None and act_bits is not None and (RECIPES_DIR / f"w{bits}a{act_bits}.yaml").exists():
                recipe = f"w{bits}a{act_bits}"
    r = load_recipe(recipe)
    changes: dict[str, Any] = {}
    if adder and not r.adder:
        raise QkitError(f"recipe {r.name} is not an AdderNet recipe; drop --adder or pick adder/adder-int8")
    if bits is not None and bits != r.weight_bits:
        changes["weight_bits"] = bits
        changes["act_bits"] = bits if bits >= 16 else (r.act_bits if r.act_bits <= 8 else 8)
    if act_bits is not None and act_bits != changes.get("act_bits", r.act_bits):
        changes["act_bits"] = act_bits
    if changes:
        w, a = changes.get("weight_bits", r.weight_bits), changes.get("act_bits", r.act_bits)
        changes["name"] = f"w{w}a{a}" if w <= 8 else f"fp{w}"
        if not r.adder:
            changes["scheme"] = default_scheme(w)
        r = r.replace(**changes)
    return r
