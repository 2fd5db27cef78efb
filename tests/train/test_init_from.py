"""Starting a run from another run's parameters (config.init_from), and restore(workdir)."""

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effformer import models
from effformer.train import evaluate, train_and_evaluate
from effformer.train.checkpoint import Checkpointer
from effformer.train.experiment import build_experiment
from effformer.train.init_from import adapt_params


def _restored(config, workdir):
    exp = build_experiment(config)
    checkpointer = Checkpointer(workdir)
    try:
        step, state, _ = checkpointer.restore(exp.abstract_state)
    finally:
        checkpointer.close()
    return step, jax.device_get(state)


def test_new_run_starts_from_the_source_parameters(baseline_run, make_config, tmp_path):
    source_config, source_dir, _ = baseline_run
    # With a zero learning rate and no weight decay, the new run's parameters after its
    # steps are exactly the ones it started from.
    config = make_config(num_train_steps=2, init_from__workdir=str(source_dir))
    config.optimizer.learning_rate = 0.0
    train_and_evaluate(config, tmp_path)
    _, source = _restored(source_config, source_dir)
    step, target = _restored(config, tmp_path)
    assert step == 2
    for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(target.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shape_change_names_the_parameter_and_reinit(baseline_run, make_config, tmp_path):
    _, source_dir, _ = baseline_run
    config = make_config(num_train_steps=1, init_from__workdir=str(source_dir))
    config.model.kwargs.hidden = 32  # Dense_0 and Dense_1 change shape.
    with pytest.raises(
        ValueError,
        match=r"\['Dense_0'\]\['bias'\] has shape \(16,\).*expects \(32,\).*'Dense_0' to config.init_from.reinit",
    ):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints" / "1").exists()


def test_bad_init_from_fails_before_training(make_config, tmp_path):
    with pytest.raises(ValueError, match="config.init_from.workdir.*holds no config.json"):
        train_and_evaluate(make_config(init_from__workdir=str(tmp_path / "nothing")), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_fine_tuned_run_evaluates_and_resumes_without_its_source(
    baseline_run, make_config, tmp_path
):
    _, baseline_dir, _ = baseline_run
    source = tmp_path / "source"
    shutil.copytree(baseline_dir, source)
    config = make_config(num_train_steps=2, init_from__workdir=str(source))
    train_and_evaluate(config, tmp_path / "tuned", stop_after_steps=1)
    shutil.rmtree(source)  # Its checkpoint holds everything the fine-tuned run needs.
    assert evaluate(tmp_path / "tuned")["step"] == 1
    assert train_and_evaluate(config, tmp_path / "tuned")["step"] == 2


def _random_params(model, seed):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs(1)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes["params"])


def test_adapt_params_resizes_the_position_table_and_copies_the_rest():
    source_model = models.create("vit_digits", tiny=True, image_size=8, patch_size=2)
    target_model = models.create("vit_digits", tiny=True, image_size=16, patch_size=2)
    source, fresh = _random_params(source_model, 0), _random_params(target_model, 1)
    adapted = adapt_params(source, source_model, target_model, fresh)
    table = adapted["position_embedding"]["embedding"]
    assert table.shape == fresh["position_embedding"]["embedding"].shape
    # The class token's row is kept; the grid rows are the source grid resized 4x4 -> 8x8.
    np.testing.assert_array_equal(table[0], source["position_embedding"]["embedding"][0])
    grid = source["position_embedding"]["embedding"][1:].reshape(4, 4, -1)
    expected = jax.image.resize(grid, (8, 8, grid.shape[-1]), "bilinear", antialias=False)
    np.testing.assert_allclose(table[1:].reshape(8, 8, -1), expected, rtol=1e-6)
    for key in source:
        if key != "position_embedding":
            for a, b in zip(
                jax.tree.leaves(source[key]), jax.tree.leaves(adapted[key]), strict=True
            ):
                np.testing.assert_array_equal(a, b)


def test_adapt_params_rejects_unknown_reinit_and_missing_parameters():
    model = models.create("vit_digits", tiny=True)
    params = _random_params(model, 0)
    with pytest.raises(ValueError, match=r"reinit names \['heads'\].*'head'"):
        adapt_params(params, model, model, params, reinit=("heads",))
    missing = {k: v for k, v in params.items() if k != "head"}
    with pytest.raises(ValueError, match=r"no parameter \['head'\]\['bias'\].*reinit"):
        adapt_params(missing, model, model, params)
    kept = adapt_params(missing, model, model, params, reinit=("head",))
    np.testing.assert_array_equal(kept["head"]["kernel"], params["head"]["kernel"])


def test_restore_gives_the_model_and_the_checkpoint_parameters(baseline_run, tmp_path):
    from effformer.train import restore

    config, workdir, result = baseline_run
    run = restore(workdir)
    assert run.step == 6 and run.config.model.name == config.model.name
    _, state = _restored(config, workdir)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(a, b)
    inputs = run.model.dummy_inputs(2)
    assert run.model.apply({"params": run.params}, **inputs).shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="No checkpoint.*train first"):
        (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
        restore(tmp_path)


def test_adapt_params_renames_the_layer_stack_between_decoder_and_encoder():
    from effformer.train.init_from import rename_modules

    decoder = models.create("ettin_decoder_17m", tiny=True)
    encoder = models.create("ettin_encoder_17m", tiny=True)
    source, fresh = _random_params(decoder, 0), _random_params(encoder, 1)
    assert "decoder" in source and "encoder" in fresh  # the stack is named by its attention
    with pytest.raises(ValueError, match=r"no parameter \['encoder'\]"):
        adapt_params(source, decoder, encoder, fresh, reinit=("head_dense", "head_norm"))
    adapted = adapt_params(
        source, decoder, encoder, fresh, ("head_dense", "head_norm"), {"decoder": "encoder"}
    )
    for mine, theirs in (("encoder", "decoder"), ("token_embedding", "token_embedding")):
        for a, b in zip(
            jax.tree.leaves(adapted[mine]), jax.tree.leaves(source[theirs]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(adapted["head_dense"]["kernel"], fresh["head_dense"]["kernel"])
    # Back again: the encoder's MLM head transform is not used by the decoder.
    back = adapt_params(adapted, encoder, decoder, source, rename={"encoder": "decoder"})
    np.testing.assert_array_equal(
        jax.tree.leaves(back["decoder"])[0], jax.tree.leaves(source["decoder"])[0]
    )
    with pytest.raises(ValueError, match=r"rename names \['stack'\].*not top-level modules"):
        adapt_params(source, decoder, encoder, fresh, rename={"stack": "encoder"})

    config = ml_collections.ConfigDict({"init_from": {"rename": " decoder:encoder, a:b "}})
    assert rename_modules(config) == {"decoder": "encoder", "a": "b"}
    config.init_from.rename = "decoder-encoder"
    with pytest.raises(ValueError, match="source:target pairs.*'decoder-encoder'"):
        rename_modules(config)


def test_source_trained_on_another_device_count_starts_a_run_here(make_config, tmp_path):
    import json

    # Trained on 2 devices with a batch of 2, which this run's 8-device mesh cannot split.
    source_dir = tmp_path / "source"
    source_config = make_config(num_train_steps=1, global_batch_size=2, mesh__num_devices=2)
    train_and_evaluate(source_config, source_dir)
    # Given in epochs, with a warmup longer than an epoch at the new run's batch of 32:
    # the source's own step count (an epoch of batches of 2) must be kept.
    saved = json.loads((source_dir / "config.json").read_text())
    saved["num_train_steps"], saved["num_epochs"] = 0, 1.0
    saved["optimizer"]["warmup_steps"] = 100
    (source_dir / "config.json").write_text(json.dumps(saved))
    config = make_config(num_train_steps=1, init_from__workdir=str(source_dir))
    config.optimizer.learning_rate = 0.0
    train_and_evaluate(config, tmp_path / "target")
    _, source = _restored(source_config, source_dir)
    _, target = _restored(config, tmp_path / "target")
    for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(target.params), strict=True):
        np.testing.assert_array_equal(a, b)
