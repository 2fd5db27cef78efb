"""The model registry, and the tiny preset of every registered model."""

import pytest

from effformer import models


def test_unknown_name_lists_closest_names():
    names = models.list_models()
    if not names:
        pytest.skip("no models registered")
    typo = names[0] + "x"
    with pytest.raises(KeyError, match=f"Unknown model name '{typo}'.*Closest: {names[0]}"):
        models.create(typo)


def test_list_models_pattern_and_sorting():
    everything = models.list_models()
    assert everything == sorted(everything)
    assert models.list_models("no_such_prefix_*") == []
    for name in everything:
        assert models.list_models(name) == [name]


def test_bad_override_names_the_model():
    names = models.list_models()
    if not names:
        pytest.skip("no models registered")
    with pytest.raises(TypeError, match=f"create\\('{names[0]}'\\)"):
        models.create(names[0], tiny=True, not_a_field_of_any_model=3)


def test_duplicate_registration_is_refused():
    models.register("test_registry_duplicate", tiny={})(lambda **kw: None)
    with pytest.raises(ValueError, match="already registered"):
        models.register("test_registry_duplicate", tiny={})(lambda **kw: None)


# Every registered tiny preset is built, run and checked (finite outputs, batch
# dimension, under 2M parameters) in test_registry_properties.py, with its properties.
