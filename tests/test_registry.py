"""One registration helper for every method users choose by name: its contract, and the
registries that use it (fusion, weighting, pruning criteria)."""
import inspect

import pytest

from mtl_models import fusion
from mtl_models.training import weighting
from mtl_models.pruning import IMPORTANCES, NEEDS_GRADS
from spaces.errors import PrunefuseError
from spaces.knobs import Knob
from spaces.registry import Registry

REGISTRIES = {"fusion": fusion.METHODS, "weighting": weighting.METHODS, "importance": IMPORTANCES}


def test_knob_defaults_come_from_the_signature():
    r = Registry("thing")

    @r.register("a", knobs={"alpha": Knob(0.0, 2.0)})
    def a(x, *, alpha=0.7, beta=3):
        return x

    assert r.knobs == {"a": {"alpha": Knob(0.0, 2.0, default=0.7)}}
    assert r.method("a").params == ("alpha", "beta")
    assert r["a"] is a  # reads like a plain dict name -> callable


def test_a_knob_the_method_does_not_take_is_refused_at_registration():
    r = Registry("thing")
    with pytest.raises(TypeError, match="'gamma' is not a keyword-only argument"):
        r.register("a", knobs={"gamma": Knob(0.0, 1.0)})(lambda x, *, alpha=1: x)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("b")(len)
        r.register("b")(len)


def test_unknown_names_and_params_list_the_valid_ones():
    r = Registry("thing")
    r.register("a")(lambda x, *, alpha=1: x)
    with pytest.raises(PrunefuseError, match="unknown thing 'z'.*a"):
        r.method("z")
    with pytest.raises(PrunefuseError, match="unknown parameter 'beta' for thing 'a'; expected one of: alpha"):
        r.check_params("a", {"beta": 1})


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registered_knob_default_lies_in_its_range(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry)
    for name, knobs in registry.knobs.items():
        defaults = {p.name: p.default for p in inspect.signature(registry[name]).parameters.values()}
        for key, knob in knobs.items():
            assert knob.default == defaults[key], (name, key)
            assert knob.low <= knob.default <= knob.high, (name, key)


def test_what_methods_need_is_declared_beside_them():
    assert fusion.METHODS.needing("seed") == {"dare_linear", "dare_ties", "della"}
    assert fusion.METHODS.needing("data") == {"adamerging"}  # learns its coefficients on training inputs
    assert weighting.METHODS.needing("seed") == {"rlw"}
    assert NEEDS_GRADS == {"taylor", "multitask_taylor"}
