"""Convert a trained qkit model to its deploy form (``qkit.convert``): plain torch ops that
``torch.onnx.export`` writes as standard ONNX and ExecuTorch lowers to XNNPACK.

A generic loop: each trained module is converted by the scheme that owns it (:func:`schemes.owner`), a
BatchNorm right after a weighted layer is folded into it, then each scheme rewires around its own nodes.
"""
from __future__ import annotations

import copy

from torch import fx, nn

from qkit.errors import QkitError
from qkit.quant.deploy import bn_fold
from qkit.quant.recipe import Recipe
from qkit.quant.schemes import get_scheme, owner


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe :func:`qkit.quantize` prepared ``model`` with."""
    recipe = getattr(model, "qkit_recipe", None) or getattr(model, "meta", {}).get("qkit_recipe")
    if not isinstance(recipe, Recipe):
        raise QkitError("the model was not prepared by qkit.quantize(model, recipe); pass recipe= explicitly")
    return recipe


def following_bn(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The BatchNorm node that is ``node``'s only consumer, if any."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    bn = gm.get_submodule(user.target) if user.op == "call_module" else None
    return user if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm1d)) else None


def convert(model: nn.Module, recipe: Recipe | None = None) -> nn.Module:
    """An export-ready copy of trained ``model`` in eval mode; the original is left untouched.
    ``recipe``: the one it was prepared with (default: what :func:`qkit.quantize` recorded on it)."""
    from qkit.quant import set_module

    recipe = recipe or recipe_of(model)
    model = copy.deepcopy(model).eval()
    whole = get_scheme(recipe.scheme).convert_model(model, recipe)
    if whole is not None:
        return whole
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    converted = []
    for node in list(gm.graph.nodes):
        found = owner(gm.get_submodule(node.target)) if node.op == "call_module" else None
        if found is None:
            continue
        scheme, weighted = found
        m = gm.get_submodule(node.target)
        if weighted:
            bn_node = following_bn(node, gm)
            mult, shift = bn_fold(gm.get_submodule(bn_node.target) if bn_node else None, m.weight)
            set_module(gm, node.target, scheme.convert_layer(m, mult, shift))
            if bn_node is not None:
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
        else:
            set_module(gm, node.target, scheme.convert_act(m))
        converted.append((scheme, node))
    for scheme, node in converted:
        scheme.rewire(node, gm)
    gm.graph.lint()
    gm.recompile()
    return gm
