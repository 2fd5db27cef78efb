"""The model registry, and the tiny preset of every registered model."""

import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_has_a_working_tiny_preset(name):
    model = models.create(name, tiny=True)
    inputs = model.dummy_inputs(2)
    # One compiled program each: op-by-op (eager) initialisation compiles every
    # initialiser and op separately, several times slower for these tiny models.
    variables = jax.jit(model.init)(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, **inputs
    )
    outputs = jax.jit(model.apply)(variables, **inputs)
    leaves = jax.tree.leaves(outputs)
    assert leaves and all(np.isfinite(np.asarray(leaf, np.float32)).all() for leaf in leaves)
    num_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert num_params < 2_000_000, f"tiny preset of {name} has {num_params} parameters"
    assert all(leaf.shape[0] == 2 for leaf in leaves if jnp.ndim(leaf) > 0)
