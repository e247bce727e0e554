"""Recipes and the CLI shorthands: `--bits 2` means w2a8, as users expect."""
from __future__ import annotations

import pytest

from qkit.errors import QkitError
from qkit.quant import list_recipes, parse_recipe, resolve_recipe
from tests.conftest import RECIPES


def test_every_documented_recipe_ships():
    assert set(RECIPES) <= set(list_recipes())


@pytest.mark.parametrize("kw, name, w, a", [
    ({}, "fp32", 32, 32), ({"bits": 16}, "fp16", 16, 16), ({"bits": 8}, "int8", 8, 8), ({"bits": 4}, "w4a8", 4, 8),
    ({"bits": 2}, "w2a8", 2, 8), ({"bits": 2, "act_bits": 2}, "w2a2", 2, 2), ({"bits": 1}, "w1a8", 1, 8),
    ({"bits": 1, "act_bits": 1}, "w1a1", 1, 1), ({"bits": 4, "act_bits": 2}, "w4a2", 4, 2),
    ({"adder": True}, "adder", 32, 32), ({"adder": True, "bits": 8}, "adder-int8", 8, 8),
    ({"recipe": "int8", "act_bits": 4}, "w8a4", 8, 4)])
def test_shorthands(kw, name, w, a):
    r = resolve_recipe(**kw)
    assert (r.name, r.weight_bits, r.act_bits) == (name, w, a)


@pytest.mark.parametrize("kw, message", [
    ({"bits": 3}, "--bits must be one of"), ({"bits": 8, "act_bits": 5}, "--act-bits"),
    ({"adder": True, "bits": 2}, "--adder runs at"), ({"recipe": "nope"}, "unknown recipe"),
    ({"bits": 32, "act_bits": 8}, "fp32 weights need fp32 activations")])
def test_bad_shorthands(kw, message):
    with pytest.raises(QkitError, match=message):
        resolve_recipe(**kw)


@pytest.mark.parametrize("text, message", [
    ("name: x\nweight_bits: eight\n", "weight_bits must be int"),
    ("name: x\ncolour: red\n", "unknown key 'colour'"),
    ("name: x\ntrain: {epochs: 2, lr: fast}\n", "lr must be float"),
    ("name: x\ntrain: {momentom: 0.9}\n", "unknown key 'momentom'"),
    ("[1, 2", "invalid YAML"), ("- a\n- b\n", "a mapping"),
    ("name: x\nweight_bits: 5\nact_bits: 8\n", "bits must be one of")])
def test_recipe_parser_rejects_bad_yaml(text, message):
    with pytest.raises(QkitError, match=message):
        parse_recipe(text)


def test_every_recipe_names_a_registered_scheme_that_fits_its_bits():
    from qkit.quant import SCHEMES, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        assert r.scheme in SCHEMES and SCHEMES[r.scheme].check(r) is None, name


@pytest.mark.parametrize("kw, scheme", [({"bits": 1}, "binary"), ({"bits": 2}, "int"), ({"bits": 16}, "float"),
                                        ({"adder": True, "bits": 8}, "adder"), ({"recipe": "w1a1", "bits": 4}, "int")])
def test_shorthands_pick_the_scheme_of_their_bits(kw, scheme):
    assert resolve_recipe(**kw).scheme == scheme


def test_recipes_and_checkpoints_from_before_schemes_still_load():
    """They said ``adder: true``; a recipe dict in an old checkpoint also has ``adder: false``."""
    from qkit.quant import Recipe

    assert parse_recipe("name: a\nweight_bits: 8\nact_bits: 8\nadder: true").scheme == "adder"
    old = {**resolve_recipe(bits=2).to_dict(), "adder": False}
    old.pop("scheme")
    assert Recipe.from_dict(old).scheme == "int"


@pytest.mark.parametrize("text, message", [
    ("name: a\nscheme: quaternary", "unknown scheme 'quaternary'"),
    ("name: a\nweight_bits: 4\nact_bits: 8\nscheme: binary", "binary weights are 1 bit"),
    ("name: a\nweight_bits: 4\nact_bits: 4\nscheme: ternary", "ternary weights take weight_bits 2"),
    ("name: a\nweight_bits: 8\nact_bits: 8\nscheme: int\nadder: true", "contradicts scheme")])
def test_a_scheme_refuses_bits_it_cannot_run(text, message):
    with pytest.raises(QkitError, match=message):
        parse_recipe(text)
